"""Storage faults and untrusted caches (issue 19), one test per row of its table and more:

- a write the storage refuses (disk or quota full, read-only, permission denied) in any
  stage gives one line naming the path and the cause and exit code 4, leaves nothing
  half-written under a final name, and a rerun once the fault is cleared resumes and writes
  the bytes of an uninterrupted run;
- a damaged shard stops a run with one line naming it before its rows train the student,
  whatever the cache's size, and the last good checkpoint stays;
- a cache whose manifest names a file outside its folder is refused before that file is
  opened.

The faults are injected where Python opens a file to write it (``builtins.open`` and
``io.open``, which ``Path.write_bytes`` uses), so they need no mount rights: a file whose
path the test picks takes ``room`` bytes and then fails with the errno of a full disk, as a
real one does, or fails at once for a read-only or forbidden folder.
"""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import shutil
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pytest
import torch

from builders import write_wds_dataset
from rdkd.cache import TeacherCache
from rdkd.cache import format as fmt
from rdkd.errors import StorageError
from rdkd.files import atomic_write_bytes
from rdkd.stages.extract_teacher import extract_teacher
from test_cache import run_cli, write_cache  # noqa: F401  (fixture)
from test_extract import REFERENCE, REFERENCE_ARGS, _files, _teacher_args, reference_cache  # noqa: F401

STORAGE_EXIT = 4
TRAIN_ARGS = ["--batch-size", "4", "--workers", "0", "--no-progress", "--lr", "2e-3", "--warmup", "1"]


class _FillingFile:
    """A file being written on a disk with ``room`` bytes left: the write that does not fit
    writes what fits and raises ``error``."""

    def __init__(self, handle, room: int, error: int):
        self._handle, self._room, self._error = handle, room, error

    def write(self, data) -> int:
        view = memoryview(data.encode() if isinstance(data, str) else data).cast("B")
        if len(view) > self._room:
            self._handle.write(view[:self._room] if "b" in self._handle.mode else "")
            self._room = 0
            raise OSError(self._error, os.strerror(self._error), self._handle.name)
        self._room -= len(view)
        return self._handle.write(data)

    def __getattr__(self, name: str):
        return getattr(self._handle, name)

    def __enter__(self) -> "_FillingFile":
        return self

    def __exit__(self, *exc) -> None:
        self._handle.close()


def faulty_storage(monkeypatch, hits: Callable[[str], bool], error: int, room: int | None = None) -> None:
    """Writes to paths for which ``hits`` is true fail with ``error``: after ``room`` bytes
    (a disk filling up), or with ``room`` None at once, folder creation included (a
    read-only or forbidden folder)."""
    real_open, real_mkdir = builtins.open, os.mkdir

    def opening(file, mode="r", *args, **kwargs):
        writes = any(c in mode for c in "wax+")
        path = os.fspath(file) if isinstance(file, (str, os.PathLike)) else None
        if writes and path is not None and hits(path) and room is None:
            raise OSError(error, os.strerror(error), path)
        handle = real_open(file, mode, *args, **kwargs)
        return _FillingFile(handle, room, error) if writes and path is not None and hits(path) else handle

    def making(path, *args, **kwargs):
        if room is None and hits(os.fspath(path)):
            raise OSError(error, os.strerror(error), os.fspath(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", opening)
    monkeypatch.setattr(io, "open", opening)
    monkeypatch.setattr(os, "mkdir", making)


def _under(folder: Path) -> Callable[[str], bool]:
    base = os.path.abspath(folder)
    return lambda path: os.path.abspath(path).startswith(base + os.sep) or os.path.abspath(path) == base


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def _no_temporaries(root: Path) -> None:
    assert not [p for p in root.rglob("*") if ".tmp-" in p.name or p.name.endswith(".partial")]


# --- the helper -----------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES])
def test_a_refused_atomic_write_names_the_final_path_and_keeps_the_old_file(tmp_path, monkeypatch, code):
    target = tmp_path / "out" / "metrics.json"
    atomic_write_bytes(target, b"old")
    faulty_storage(monkeypatch, lambda path: ".metrics.json.tmp-" in path, code, room=2)
    with pytest.raises(StorageError) as caught:
        atomic_write_bytes(target, b"new and longer")
    assert str(caught.value) == f"cannot write {target}: {os.strerror(code)}"
    assert target.read_bytes() == b"old"
    _no_temporaries(tmp_path)


# --- extract-teacher ---------------------------------------------------------------------------------


def test_extraction_into_a_disk_that_fills_mid_shard_resumes_to_the_same_bytes(
        tmp_path, monkeypatch, csv_dataset, tiny_teacher, reference_cache, run_cli):
    """The disk fills half-way through the caption file of shard 1 (of 3): one line, exit 4,
    shard 0 kept as it is in an uninterrupted run, nothing of shard 1 under a final name; the
    rerun after space is freed resumes and the cache is byte-identical."""
    out = tmp_path / "cache"
    args = ["extract-teacher", "--data", csv_dataset.path, *_teacher_args(tiny_teacher), "--out", str(out),
            "--device", "cpu", *REFERENCE_ARGS]
    half = (reference_cache / "texts" / "part-00001.arrow").stat().st_size // 2
    with monkeypatch.context() as patch:
        faulty_storage(patch, lambda path: "/texts/.part-00001.arrow.tmp-" in path, errno.ENOSPC, room=half)
        code, _, err = run_cli(*args)
    assert code == STORAGE_EXIT
    assert _one_line(err) == f"error: cannot write {out / 'texts' / 'part-00001.arrow'}: No space left on device"
    reference = _files(reference_cache)
    left = _files(out)
    assert "parts/part-00000.json" in left and not any("part-00001" in name for name in left)
    assert all(data == reference[name] for name, data in left.items())  # whole files only
    _no_temporaries(out)

    code, _, err = run_cli(*args)
    assert code == 0, err
    assert _files(out) == reference


def test_extraction_into_a_read_only_folder_is_one_line(tmp_path, monkeypatch, csv_dataset, tiny_teacher, run_cli):
    out = tmp_path / "ro" / "cache"
    (tmp_path / "ro").mkdir()
    faulty_storage(monkeypatch, _under(tmp_path / "ro"), errno.EROFS)
    code, _, err = run_cli("extract-teacher", "--data", csv_dataset.path, *_teacher_args(tiny_teacher),
                           "--out", str(out), "--device", "cpu", *REFERENCE_ARGS)
    assert code == STORAGE_EXIT and _one_line(err) == f"error: cannot write {out}: Read-only file system"
    assert list((tmp_path / "ro").iterdir()) == []


# --- train-student ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def csv_cache(tmp_path_factory, csv_dataset, tiny_teacher) -> Path:
    out = tmp_path_factory.mktemp("storage-cache") / "cache"
    extract_teacher(csv_dataset, tiny_teacher, out, workers=0, progress=False)
    return out


def _train_args(data: str, cache: Path, student: str, out: Path, *more: str) -> list[str]:
    return ["train-student", "--data", data, "--cache", str(cache), "--student", student, "--loss", "cliprd",
            "--out", str(out), *TRAIN_ARGS, *more]


def test_train_student_into_a_read_only_folder_is_one_line(tmp_path, monkeypatch, csv_dataset, csv_cache,
                                                          tiny_vit, run_cli):
    (tmp_path / "ro").mkdir()
    faulty_storage(monkeypatch, _under(tmp_path / "ro"), errno.EROFS)
    code, _, err = run_cli(*_train_args(csv_dataset.path, csv_cache, tiny_vit, tmp_path / "ro" / "run", "--steps", "2"))
    assert code == STORAGE_EXIT
    line = _one_line(err)
    assert line.startswith(f"error: cannot write {tmp_path / 'ro' / 'run'}") and line.endswith("Read-only file system")
    assert list((tmp_path / "ro").iterdir()) == []


def test_a_checkpoint_on_a_full_disk_keeps_the_last_one_and_a_resume_ends_as_an_uninterrupted_run(
        tmp_path, monkeypatch, csv_dataset, csv_cache, tiny_vit, run_cli):
    steps = ["--steps", "4", "--save-every", "2", "--log-dir", str(tmp_path / "logs")]
    straight = tmp_path / "straight"
    assert run_cli(*_train_args(csv_dataset.path, csv_cache, tiny_vit, straight, *steps))[0] == 0

    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        faulty_storage(patch, lambda path: ".step-00000004.pt.tmp-" in path, errno.ENOSPC, room=4096)
        code, _, err = run_cli(*_train_args(csv_dataset.path, csv_cache, tiny_vit, run, *steps))
    assert code == STORAGE_EXIT
    assert _one_line(err) == f"error: cannot write {run / 'checkpoints' / 'step-00000004.pt'}: No space left on device"
    assert sorted(p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file()) == \
        ["checkpoints/step-00000002.pt"]  # the last good checkpoint, whole; no export, no run.json
    _same_state(run / "checkpoints" / "step-00000002.pt", straight / "checkpoints" / "step-00000002.pt")

    code, _, err = run_cli(*_train_args(csv_dataset.path, csv_cache, tiny_vit, run, *steps, "--resume", str(run)))
    assert code == 0, err
    for name in ("open_clip_model.safetensors", "open_clip_config.json", "model_config.json"):
        assert (run / "export" / name).read_bytes() == (straight / "export" / name).read_bytes(), name
    _same_state(run / "checkpoints" / "step-00000004.pt", straight / "checkpoints" / "step-00000004.pt")
    _no_temporaries(run)


def _same_state(a: Path, b: Path) -> None:
    """Two checkpoints hold the same training state (they differ in the run folder they record)."""
    one, two = (torch.load(path, weights_only=True) for path in (a, b))
    for part in ("model", "loss"):
        assert one[part].keys() == two[part].keys()
        assert all(torch.equal(one[part][k], two[part][k]) for k in two[part]), part
    assert one["position"] == two["position"]


# --- evaluate, report, demo-data -----------------------------------------------------------------------


def _evaluate_args(csv_dataset, tiny_teacher, out: Path) -> list[str]:
    return ["evaluate", "--data", csv_dataset.path, *_teacher_args(tiny_teacher), "--workers", "0",
            "--device", "cpu", "--no-progress", "--out", str(out / "metrics.json")]


@pytest.mark.parametrize("stage", ["evaluate", "report", "demo-data"])
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES])
def test_evaluate_report_and_demo_data_on_refused_storage_are_one_line(
        stage, code, tmp_path, monkeypatch, csv_dataset, tiny_teacher, run_cli):
    """The first file of the stage's output that gets bytes fails (a full disk after 10
    bytes, or a folder that forbids writing): one line, exit 4, no output under a final
    name; the same command afterwards succeeds."""
    if stage == "report":
        assert run_cli(*_evaluate_args(csv_dataset, tiny_teacher, tmp_path / "eval" / "a"))[0] == 0
        args = ["report", str(tmp_path / "eval"), "--out", str(tmp_path / "out")]
    elif stage == "evaluate":
        args = _evaluate_args(csv_dataset, tiny_teacher, tmp_path / "out")
    else:
        args = ["demo-data", "--out", str(tmp_path / "out"), "--profile", "quick", "--pretrain", "4", "--train", "4",
                "--test", "2", "--zeroshot-per-class", "1", "--zeroshot-task", "shape", "--workers", "1"]
    hits = _under(tmp_path / "out") if stage != "demo-data" else (lambda path: ".out.partial" in path)
    with monkeypatch.context() as patch:
        faulty_storage(patch, hits, code, room=10 if code == errno.ENOSPC else None)
        exit_code, _, err = run_cli(*args)
    assert exit_code == STORAGE_EXIT
    line = _one_line(err)
    # demo-data makes its partial folder beside the output: a forbidden folder is the parent
    named = tmp_path if (stage, code) == ("demo-data", errno.EACCES) else tmp_path / "out"
    assert line.startswith(f"error: cannot write {named}") and line.endswith(os.strerror(code)), line
    assert [p for p in tmp_path.iterdir() if p.name != "eval"] in ([], [tmp_path / "out"])
    if (tmp_path / "out").exists():  # an output folder may be made, but holds no file
        assert [p for p in (tmp_path / "out").rglob("*") if p.is_file()] == []
    exit_code, _, err = run_cli(*args)
    assert exit_code == 0, err


# --- damaged shards --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wds_cache(tmp_path_factory, tiny_teacher):
    """Two webdataset shards of 6 samples and their shard-aligned cache (streamable)."""
    from builders import standard_samples

    data = write_wds_dataset(tmp_path_factory.mktemp("storage-wds"), standard_samples())
    out = tmp_path_factory.mktemp("storage-wds-cache") / "cache"
    extract_teacher(data, tiny_teacher, out, workers=0, progress=False)
    return data, out


def _flip_a_byte(path: Path) -> None:
    """Flip a bit of the first embedding value: the file still reads, only a value changes."""
    mapped = pa.memory_map(str(path))
    values = pa.ipc.open_file(mapped).read_all().column("embedding").chunk(0).values
    mapped.seek(0)
    offset = values.buffers()[1].address - mapped.read_buffer(1).address
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_damaged_shard_met_mid_run_stops_it_before_the_next_checkpoint(tmp_path, wds_cache, tiny_vit, run_cli):
    """A streamed run (how a large cache is read) meets the damaged shard after training on
    the other one: it stops with one line naming the shard, and keeps the checkpoints of the
    steps made before it, which equal an undamaged run's. Whichever of the two shards is
    damaged, the sizes all match: only the sha256 can tell."""
    data, cache = wds_cache
    args = ["--stream", "--shuffle-buffer", "1", "--batch-size", "2", "--steps", "6", "--save-every", "1",
            "--keep-checkpoints", "6", "--log-dir", str(tmp_path / "logs")]
    clean = tmp_path / "clean"
    assert run_cli(*_train_args(data.path, cache, tiny_vit, clean, *args))[0] == 0
    kept = []
    for shard in (0, 1):
        damaged = tmp_path / f"cache-{shard}"
        shutil.copytree(cache, damaged)
        _flip_a_byte(damaged / "images" / f"part-{shard:05d}.arrow")
        run = tmp_path / f"run-{shard}"
        code, _, err = run_cli(*_train_args(data.path, damaged, tiny_vit, run, *args))
        assert code == 2
        assert f"images/part-{shard:05d}.arrow does not match its sha256" in _one_line(err)
        checkpoints = sorted((run / "checkpoints").glob("*.pt")) if (run / "checkpoints").exists() else []
        for path in checkpoints:
            _same_state(path, clean / "checkpoints" / path.name)
        kept.append(len(checkpoints))
        assert not (run / "export").exists()
    # the shard read first stops the run at once; the one read second after the first's 3 steps
    assert sorted(kept) == [0, 3]


def test_a_truncated_shard_is_refused_before_training(tmp_path, csv_dataset, csv_cache, tiny_vit, run_cli):
    damaged = tmp_path / "cache"
    shutil.copytree(csv_cache, damaged)
    shard = damaged / "texts" / "part-00000.arrow"
    shard.write_bytes(shard.read_bytes()[:-100])
    code, _, err = run_cli(*_train_args(csv_dataset.path, damaged, tiny_vit, tmp_path / "run", "--steps", "2"))
    assert code == 2 and "texts/part-00000.arrow" in _one_line(err) and "bytes, manifest says" in err
    assert not (tmp_path / "run").exists()


def test_a_damaged_shard_is_refused_by_every_reader_of_its_rows(tmp_path):
    write_cache(tmp_path)
    _flip_a_byte(tmp_path / "images" / "part-00002.arrow")
    cache = TeacherCache.open(tmp_path)
    first = cache.manifest["shards"][0]["images"]["rows"] + cache.manifest["shards"][1]["images"]["rows"]
    cache.image_embeddings([0, 1])  # shard 0 is fine
    cache.lookup([f"{k}" for k in cache.image_keys([0])])  # lookups read keys, and hash nothing
    for read in (lambda: cache.image_embeddings([first]), lambda: cache.view_params([first]),
                 lambda: list(cache.iter_images())):
        with pytest.raises(Exception, match="images/part-00002.arrow does not match its sha256"):
            read()
    unchecked = TeacherCache.open(tmp_path, check=False)  # --no-verify-cache trusts the cache
    assert unchecked.image_embeddings([first]).shape == (1, cache.dim)


def test_the_check_hashes_each_shard_once_and_only_when_its_rows_are_read(tmp_path, monkeypatch):
    write_cache(tmp_path, shard_sizes=(3, 2, 4))
    hashed = []
    real = fmt.sha256_file
    monkeypatch.setattr(fmt, "sha256_file", lambda path, *a: hashed.append(Path(path).name) or real(path, *a))
    cache = TeacherCache.open(tmp_path)
    assert hashed == []  # start-up reads no shard
    cache.image_embeddings([0, 1])
    cache.image_embeddings([2, 0])
    cache.view_params([1])
    assert hashed == ["part-00000.arrow"]
    cache.text_embeddings([cache.num_texts - 1])
    assert hashed == ["part-00000.arrow", "part-00002.arrow"]


# --- a cache stays inside its folder ------------------------------------------------------------------------


def _record_opens(monkeypatch) -> list[str]:
    opened: list[str] = []
    real_open, real_os_open, real_map = builtins.open, os.open, pa.memory_map

    def opening(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)):
            opened.append(os.path.realpath(file))
        return real_open(file, *args, **kwargs)

    def os_opening(path, *args, **kwargs):
        opened.append(os.path.realpath(path))
        return real_os_open(path, *args, **kwargs)

    def mapping(path, *args, **kwargs):
        opened.append(os.path.realpath(path))
        return real_map(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", opening)
    monkeypatch.setattr(io, "open", opening)
    monkeypatch.setattr(os, "open", os_opening)
    monkeypatch.setattr(pa, "memory_map", mapping)
    return opened


@pytest.mark.parametrize("escape", ["dotdot", "absolute", "symlink", "symlinked folder"])
@pytest.mark.parametrize("command", ["verify", "train-student"])
def test_a_manifest_naming_a_file_outside_the_cache_is_refused_before_it_is_opened(
        escape, command, tmp_path, monkeypatch, csv_dataset, tiny_vit, run_cli):
    secret = tmp_path / "secret.arrow"
    root = tmp_path / "cache"
    write_cache(root)
    shutil.copy(root / "images" / "part-00000.arrow", secret)  # a valid shard, so only the place is wrong
    manifest = json.loads((root / fmt.MANIFEST).read_text())
    entry = manifest["shards"][0]["images"]
    if escape == "dotdot":
        entry["file"] = "images/../../secret.arrow"
    elif escape == "absolute":
        entry["file"] = str(secret)
    elif escape == "symlink":
        (root / "images" / "part-00000.arrow").unlink()
        (root / "images" / "part-00000.arrow").symlink_to(secret)
    else:
        (root / "outside").symlink_to(tmp_path)
        entry["file"] = "outside/secret.arrow"
    (root / fmt.MANIFEST).write_text(json.dumps(manifest))
    opened = _record_opens(monkeypatch)
    args = ["cache", "verify", str(root)] if command == "verify" else \
        _train_args(csv_dataset.path, root, tiny_vit, tmp_path / "run", "--steps", "2")
    code, _, err = run_cli(*args)
    assert code == 2 and "outside the cache folder" in _one_line(err)
    assert str(secret) not in opened


def test_a_manifest_of_the_wrong_type_is_one_line(tmp_path, run_cli):
    write_cache(tmp_path)
    manifest = json.loads((tmp_path / fmt.MANIFEST).read_text())
    manifest["dim"] = "not-a-number"
    (tmp_path / fmt.MANIFEST).write_text(json.dumps(manifest))
    code, _, err = run_cli("cache", "verify", str(tmp_path))
    assert code == 2 and "not-a-number" in _one_line(err)


def test_extraction_redoes_a_shard_whose_record_names_a_file_outside(tmp_path, csv_dataset, tiny_teacher,
                                                                   reference_cache):
    out = tmp_path / "cache"
    shutil.copytree(reference_cache, out)
    (out / fmt.MANIFEST).unlink()  # an interrupted run, all shards done
    record = json.loads(fmt.part_file(out, 1).read_text())
    record["images"]["file"] = "../../etc/passwd"
    fmt.part_file(out, 1).write_text(json.dumps(record))
    summary = extract_teacher(csv_dataset, tiny_teacher, out, device="cpu", **REFERENCE)
    assert summary.shards_done == 1
    assert _files(out) == _files(reference_cache)
