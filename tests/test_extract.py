"""Stage one, `rdkd extract-teacher`: values, views, bad samples, resume after SIGKILL, torchrun, CLI misuse."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF

from builders import Sample, image_bytes, make_image, sample_members, standard_samples, write_csv_dataset, write_tar
from rdkd import runtime
from rdkd.cache import TeacherCache, ViewConfig, eval_view_box, render_view
from rdkd.cache import format as fmt
from rdkd.data import DataSpec, decode_image, open_dataset
from rdkd.encoding import Encoder
from rdkd.errors import UserError
from rdkd.models import load_clip
from rdkd.stages import extract_teacher as stage
from rdkd.stages.extract_teacher import extract_teacher
from test_cache import run_cli  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[1]
FP16_ATOL = 2e-3  # float16 storage of unit vectors: |error| <= 2^-11 per component, plus compute noise
# The settings of the reference run, shared by the resume and torchrun tests (3 shards of 4).
REFERENCE = dict(rows_per_shard=4, batch_size=3, workers=0, views=ViewConfig(count=2), progress=False)
REFERENCE_ARGS = ["--rows-per-shard", "4", "--batch-size", "3", "--workers", "0", "--views", "2", "--no-progress"]


def _teacher_args(spec) -> list[str]:
    return ["--model", spec.config, "--pretrained", spec.pretrained]


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def teacher(tiny_teacher):
    return load_clip(tiny_teacher)


@pytest.fixture(scope="module")
def reference_cache(tmp_path_factory, csv_dataset, tiny_teacher) -> Path:
    """The CSV dataset extracted in one uninterrupted in-process run (2 views, 3 shards)."""
    out = tmp_path_factory.mktemp("reference") / "cache"
    extract_teacher(csv_dataset, tiny_teacher, out, **REFERENCE)
    return out


def _teacher_embeddings(teacher, pixels: torch.Tensor, captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
    with torch.inference_mode():
        image = F.normalize(teacher.model.encode_image(pixels), dim=-1)
        text = F.normalize(teacher.model.encode_text(teacher.tokenizer(captions)), dim=-1)
    return image.numpy(), text.numpy()


def _check_against_teacher(cache: TeacherCache, spec: DataSpec, teacher, views: int) -> None:
    dataset = open_dataset(spec)
    assert cache.num_images == len(dataset) and cache.num_texts == dataset.num_captions
    for i, key in enumerate(dataset.keys):
        entry = cache.find(key)
        assert entry is not None, key
        captions = list(dataset.captions(i))
        assert len(entry.image_rows) == views and len(entry.text_rows) == len(captions)  # several captions: one image
        assert cache.captions(entry.text_rows) == captions
        image = dataset.read_image(i)
        want_image, want_text = _teacher_embeddings(teacher, teacher.preprocess(image)[None], captions)
        got_image = cache.image_embeddings([entry.image_rows[0]]).numpy()
        np.testing.assert_allclose(got_image, want_image, atol=FP16_ATOL, rtol=0)
        np.testing.assert_allclose(cache.text_embeddings(np.array(entry.text_rows)).numpy(), want_text,
                                   atol=FP16_ATOL, rtol=0)
        crop, flip = cache.view_params([entry.image_rows[0]])
        np.testing.assert_allclose(crop[0], eval_view_box(image.width, image.height, 32, "shortest"), atol=1e-4)
        assert not flip[0]


def test_extraction_equals_the_teacher_in_each_format(any_dataset, tiny_teacher, teacher, tmp_path):
    summary = extract_teacher(any_dataset, tiny_teacher, tmp_path / "cache", batch_size=5, workers=1,
                              rows_per_shard=5, progress=False)
    cache = TeacherCache.open(tmp_path / "cache")
    assert cache.verify() == [] and summary.images == 12 and summary.rejects == 0
    manifest = cache.manifest
    assert manifest["teacher"]["logit_scale"] == pytest.approx(50.0) and cache.dim == 32
    assert manifest["dataset"]["fingerprint"] == open_dataset(any_dataset).fingerprint
    assert manifest["storage_dtype"] == "float16" and cache.views == 1
    _check_against_teacher(cache, any_dataset, teacher, views=1)
    if open_dataset(any_dataset).shard_ranges is not None:  # webdataset: cache shards follow data shards
        assert [s["entries"] for s in manifest["shards"]] == [[0, 6], [6, 12]]


def test_random_views_are_recorded_and_replay_exactly(reference_cache, csv_dataset, teacher):
    cache = TeacherCache.open(reference_cache)
    _check_against_teacher(cache, csv_dataset, teacher, views=2)
    dataset = open_dataset(csv_dataset)
    cfg = teacher.preprocess_cfg
    flips = []
    for i, key in enumerate(dataset.keys):
        row = cache.find(key).image_rows[1]
        crop, flip = cache.view_params([row])
        image = dataset.read_image(i)
        assert 0 <= crop[0, 0] < crop[0, 2] <= image.width and 0 <= crop[0, 1] < crop[0, 3] <= image.height
        view = render_view(image, crop[0].tolist(), bool(flip[0]), cfg["size"], cfg["interpolation"])
        pixels = TF.normalize(TF.to_tensor(view), cfg["mean"], cfg["std"])[None]
        want, _ = _teacher_embeddings(teacher, pixels, ["x"])
        np.testing.assert_allclose(cache.image_embeddings([row]).numpy(), want, atol=FP16_ATOL, rtol=0)
        flips.append(bool(flip[0]))
    assert any(flips) and not all(flips)


def test_rerun_of_a_complete_cache_changes_nothing(reference_cache, csv_dataset, tiny_teacher):
    before = _files(reference_cache)
    summary = extract_teacher(csv_dataset, tiny_teacher, reference_cache, **REFERENCE)
    assert summary.shards_done == 0 and _files(reference_cache) == before


# --- compact transport, device normalisation, rates ----------------------------------------------


def test_workers_hand_over_uint8_views_that_normalise_to_the_host_transform(csv_dataset, teacher):
    dataset = open_dataset(csv_dataset)
    inputs = stage.TeacherInputs(dataset, teacher, ViewConfig(count=2))
    batch = stage._collate([inputs[i] for i in range(3)])
    assert batch.pixels.dtype == torch.uint8 and batch.pixels.shape == (6, 3, 32, 32)
    assert batch.pixels.nbytes / len(batch.keys) == 2 * 3 * 32 * 32  # a quarter of float32's bytes
    normalised = Encoder(teacher, torch.device("cpu"), "fp32").normalize(batch.pixels)
    cfg = teacher.preprocess_cfg
    for i in range(3):  # the float32 values the teacher's own host transforms give, bit for bit
        image = dataset.read_image(i)
        view = render_view(image, batch.crops[2 * i + 1].tolist(), bool(batch.flips[2 * i + 1]), cfg["size"],
                           cfg["interpolation"])
        assert torch.equal(normalised[2 * i], teacher.preprocess(image))
        assert torch.equal(normalised[2 * i + 1], TF.normalize(TF.to_tensor(view), cfg["mean"], cfg["std"]))


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_device_normalize_is_float32_to_tensor_then_normalize_on_every_level(device):
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    levels = torch.arange(256, dtype=torch.uint8).view(1, 1, 1, 256).expand(1, 3, 2, 256)
    got = runtime.DeviceNormalize(mean, std, torch.device(device))(levels.to(device)).cpu().numpy()
    # independent reference: IEEE float32 arithmetic in numpy, (x / 255 - mean) / std
    x = np.arange(256, dtype=np.float32) / np.float32(255)
    want = (x[None, :] - np.float32(mean)[:, None]) / np.float32(std)[:, None]
    assert got.dtype == np.float32 and np.array_equal(got[0, :, 0], want) and np.array_equal(got[0, :, 1], want)


def test_uint8_transport_writes_the_same_bytes_as_float32_pixels(tmp_path, csv_dataset, tiny_teacher, teacher,
                                                                 monkeypatch):
    """The cache of the uint8 path equals, byte for byte, that of the path it replaced:
    float32 pixels normalised on the host in the workers (float32 storage hides nothing)."""
    settings = dict(REFERENCE, storage_dtype="float32")
    extract_teacher(csv_dataset, tiny_teacher, tmp_path / "uint8", **settings)
    cfg = teacher.preprocess_cfg

    def float32_views(self, key, data):
        pixels, crops, flips = real_render(self, key, data)
        image = decode_image(data)
        host = [teacher.preprocess(image)] + [
            TF.normalize(TF.to_tensor(render_view(image, box.tolist(), bool(flip), cfg["size"], cfg["interpolation"])),
                         cfg["mean"], cfg["std"]) for box, flip in zip(crops[1:], flips[1:])]
        return torch.stack(host), crops, flips

    real_render = stage.TeacherInputs.render
    monkeypatch.setattr(stage.TeacherInputs, "render", float32_views)
    monkeypatch.setattr(runtime, "DeviceNormalize", lambda mean, std, device: lambda pixels: pixels)
    extract_teacher(csv_dataset, tiny_teacher, tmp_path / "float32", **settings)
    assert _files(tmp_path / "uint8") == _files(tmp_path / "float32")


def test_no_host_sync_per_batch(tmp_path, csv_dataset, tiny_teacher, monkeypatch):
    """The extraction loop makes the host wait for the device only to copy the embeddings back
    (a no-op on CPU): the sync count of a run does not grow with its number of batches."""
    counts = []
    real_loop = stage._extract_shards

    def counted(*args, **kwargs):
        with runtime.HostSyncCounter() as counter:
            result = real_loop(*args, **kwargs)
        counts.append(counter.count)
        return result

    monkeypatch.setattr(stage, "_extract_shards", counted)
    for batch_size in (4, 1):  # 3 batches, then 12
        extract_teacher(csv_dataset, tiny_teacher, tmp_path / f"b{batch_size}", batch_size=batch_size, workers=0,
                        rows_per_shard=4, progress=False)
    assert counts[0] == counts[1] <= 2, counts  # one-off setup: the DataLoader's seed, the normalisation table


def test_steady_state_window_excludes_the_fill():
    clock = stage._Clock(fill_batches=2)
    for images, ready_at in ((4, 10.0), (4, 11.0), (4, 13.0), (2, 14.0)):
        clock.batch_done(images, ready_at)
    assert clock.steady_rate == pytest.approx((4 + 2) / (14.0 - 11.0))  # batches 3..4 over [end of 2, end of 4]
    short = stage._Clock(fill_batches=2)
    short.batch_done(4, 1.0)
    short.batch_done(4, 2.0)
    assert short.steady_rate is None  # N <= K: no window
    assert stage.ExtractConfig(workers=0).fill_batches == 1 and stage.ExtractConfig(workers=6).fill_batches == 6


def test_summary_reports_both_rates(tmp_path, csv_dataset, tiny_teacher, capsys):
    summary = extract_teacher(csv_dataset, tiny_teacher, tmp_path / "cache", batch_size=2, workers=0,
                              rows_per_shard=6, progress=False)
    assert summary.images_per_second > 0 and summary.steady_images_per_second > 0
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "images/s whole run" in line and "images/s steady state" in line


# --- bad samples -------------------------------------------------------------------------------


def _huge_png(side: int) -> bytes:
    """A PNG whose header claims side x side pixels (a decompression bomb), a few bytes long."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _bad_webdataset(root: Path) -> tuple[DataSpec, dict[str, str], list[str]]:
    """Two shards full of bad samples; returns the spec, key -> expected reason, and the converted keys."""
    root.mkdir(parents=True)
    good = standard_samples(4)
    jpeg = good[0].data
    bad = [
        Sample("zero", b"", ("zero bytes",)),
        Sample("trunc", jpeg[: len(jpeg) // 2], ("truncated jpeg",)),
        Sample("noimage", b"this is not an image at all", ("text bytes",)),
        Sample("huge", _huge_png(20_000), ("a decompression bomb",), ext="png"),
        Sample("cmyk", image_bytes(make_image(1, mode="CMYK"), "JPEG"), ("cmyk",)),
        Sample("grey", image_bytes(make_image(2, mode="L"), "PNG"), ("grey",), ext="png"),
        Sample("alpha", image_bytes(make_image(3, mode="RGBA"), "PNG"), ("alpha",), ext="png"),
        Sample("emptycap", jpeg, ("   ",)),
    ]
    members = [m for s in good[:2] + bad for m in sample_members(s)]
    members += [("notutf8.jpg", jpeg), ("notutf8.txt", b"caf\xe9 \xff\xfe")]
    write_tar(root / "00000.tar", members)
    # shard 1: a good sample, a duplicate of a shard-0 key, then a member cut off by the end of the file
    path = write_tar(root / "00001.tar", [m for s in [good[2], good[0], good[3]] for m in sample_members(s)])
    with tarfile.open(path) as tar:
        last = next(m for m in tar.getmembers() if m.name == f"{good[3].key}.jpg")
    path.write_bytes(path.read_bytes()[: last.offset_data + last.size // 2])
    expected = {
        "zero": "empty image file", "trunc": "truncated or corrupt image", "noimage": "not an image",
        "huge": "image too large", "emptycap": "empty caption", "notutf8": "caption not UTF-8",
        good[0].key: "duplicate key", good[3].key: "broken tar member",
    }
    return DataSpec(f"{root}/{{00000..00001}}.tar"), expected, ["cmyk", "grey", "alpha"]


def _check_rejects(cache: TeacherCache, expected: dict[str, str]) -> None:
    rejects = cache.rejects.to_pylist()
    reasons = {r["key"]: r["reason"] for r in rejects}
    assert set(reasons) == set(expected)
    for key, reason in expected.items():
        assert reasons[key].startswith(reason), (key, reasons[key])
    assert all(r["source"] for r in rejects)


def test_bad_samples_are_rejected_with_a_reason_and_the_run_completes(tmp_path, tiny_teacher):
    spec, expected, converted = _bad_webdataset(tmp_path / "wds")
    summary = extract_teacher(spec, tiny_teacher, tmp_path / "cache", batch_size=4, workers=2,
                              max_reject_fraction=1.0, progress=False)
    cache = TeacherCache.open(tmp_path / "cache")
    _check_rejects(cache, expected)
    assert summary.rejects == len(expected) == cache.manifest["counts"]["rejects"]
    for key in converted + ["000000", "000001", "000002"]:
        assert cache.find(key) is not None, key  # CMYK, greyscale and alpha are converted, not rejected
    assert cache.num_images == 6 and cache.verify() == []


def test_missing_file_in_a_csv_is_a_reject(tmp_path, tiny_teacher):
    spec = write_csv_dataset(tmp_path / "csv", standard_samples(3), extra_rows=[("images/gone.jpg", "no such file")])
    extract_teacher(spec, tiny_teacher, tmp_path / "cache", workers=0, max_reject_fraction=0.5, progress=False)
    cache = TeacherCache.open(tmp_path / "cache")
    assert [r["reason"] for r in cache.rejects.to_pylist()] == ["image file not found"]
    assert cache.num_images == 3


def test_too_many_rejects_fail_with_one_line_and_keep_finished_shards(tmp_path, tiny_teacher, run_cli):
    spec, expected, _ = _bad_webdataset(tmp_path / "wds")
    out = tmp_path / "cache"
    code, _, err = run_cli("extract-teacher", "--data", spec.path, *_teacher_args(tiny_teacher), "--out", str(out),
                           "--workers", "0", "--no-progress", "--max-reject-fraction", "0.4")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "max-reject-fraction" in err, err
    assert not (out / fmt.MANIFEST).exists() and (out / "parts" / "part-00000.json").exists()
    # a higher threshold finishes the cache, reusing the shard already written
    summary = extract_teacher(spec, tiny_teacher, out, workers=0, max_reject_fraction=1.0, progress=False)
    assert summary.shards_done == 1
    _check_rejects(TeacherCache.open(out), expected)


# --- resume after SIGKILL --------------------------------------------------------------------------

# Runs the CLI with the image file of shard 1 torn: half of it is written to its temporary
# name, then the process sleeps until the test kills it (as a crash in the middle of a write).
_TORN_WRITE_DRIVER = """
import os, sys, time
import rdkd.cache.writer as writer
real_write = writer.atomic_write_bytes
def torn_write(path, data):
    if path.parent.name == "images" and path.name == "part-00001.arrow":
        data = bytes(memoryview(data))
        path.with_name(f".{path.name}.tmp-{os.getpid()}").write_bytes(data[: len(data) // 2])
        time.sleep(600)
    real_write(path, data)
writer.atomic_write_bytes = torn_write
from rdkd.cli import main
sys.argv = ["rdkd"] + sys.argv[1:]
main()
"""


def _subprocess_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "tests")}


def test_sigkill_mid_run_then_resume_equals_an_uninterrupted_run(tmp_path, csv_dataset, tiny_teacher, reference_cache):
    out = tmp_path / "cache"
    driver = tmp_path / "driver.py"
    driver.write_text(_TORN_WRITE_DRIVER)
    proc = subprocess.Popen(
        [sys.executable, str(driver), "extract-teacher", "--data", csv_dataset.path, *_teacher_args(tiny_teacher),
         "--out", str(out), *REFERENCE_ARGS],
        env=_subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while not list((out / "images").glob(".part-00001.arrow.tmp-*")):
            assert proc.poll() is None, f"extraction ended early: {proc.stderr.read().decode()}"
            assert time.monotonic() < deadline, "extraction did not reach shard 1 in time"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    # in between: no manifest, so no reader accepts the folder; every visible shard file is whole
    with pytest.raises(UserError, match="not a complete teacher cache"):
        TeacherCache.open(out)
    assert (out / "parts" / "part-00000.json").exists() and not (out / "images" / "part-00001.arrow").exists()
    for path in list((out / "images").glob("part-*.arrow")) + list((out / "texts").glob("part-*.arrow")):
        pa.ipc.open_file(pa.memory_map(str(path))).read_all().validate(full=True)
    summary = extract_teacher(csv_dataset, tiny_teacher, out, **REFERENCE)
    assert summary.shards_done == 2  # shard 0 was kept
    assert _files(out) == _files(reference_cache)  # byte for byte, temporary files gone


# --- torchrun ---------------------------------------------------------------------------------------


def test_two_processes_under_torchrun_equal_one(tmp_path, csv_dataset, tiny_teacher, reference_cache):
    out = tmp_path / "cache"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "rdkd.cli", "extract-teacher", "--data", csv_dataset.path, *_teacher_args(tiny_teacher),
         "--out", str(out), "--device", "cpu", *REFERENCE_ARGS],
        env=_subprocess_env(), capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert _files(out) == _files(reference_cache)  # same rows, same embedding bytes, same manifest


# --- CLI misuse ---------------------------------------------------------------------------------------


def _one_line_error(code: int, err: str, match: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and match in lines[0], err


def test_cli_misuse_is_one_line_and_exit_2(tmp_path, csv_dataset, wds_dataset, tiny_teacher, run_cli):
    teacher = _teacher_args(tiny_teacher)
    base = ["extract-teacher", "--workers", "0", "--no-progress"]
    code, _, err = run_cli(*base, "--data", str(tmp_path / "missing.tsv"), *teacher, "--out", str(tmp_path / "a"))
    _one_line_error(code, err, "dataset not found")
    code, _, err = run_cli(*base, "--data", csv_dataset.path, "--model", "ViT-B-32", "--pretrained", "openai",
                           "--out", str(tmp_path / "b"))
    _one_line_error(code, err, "offline")
    assert not (tmp_path / "b").exists()
    (tmp_path / "file").write_text("x")
    code, _, err = run_cli(*base, "--data", csv_dataset.path, *teacher, "--out", str(tmp_path / "file" / "cache"))
    _one_line_error(code, err, "cannot write")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "thesis.tex").write_text("precious")
    code, _, err = run_cli(*base, "--data", csv_dataset.path, *teacher, "--out", str(tmp_path / "notes"))
    _one_line_error(code, err, "not an rdkd cache")
    assert (tmp_path / "notes" / "thesis.tex").read_text() == "precious"
    code, _, err = run_cli(*base, "--data", csv_dataset.path, *teacher, "--precision", "fp16", "--device", "cpu",
                           "--out", str(tmp_path / "c"))
    _one_line_error(code, err, "needs a CUDA device")
    code, _, err = run_cli(*base, "--data", csv_dataset.path, *teacher, "--view-scale", "big",
                           "--out", str(tmp_path / "c"))
    _one_line_error(code, err, "--view-scale")


def test_another_cache_at_the_output_is_kept_unless_overwrite(tmp_path, wds_dataset, csv_dataset, tiny_teacher,
                                                              run_cli):
    out = tmp_path / "cache"
    args = ["extract-teacher", *_teacher_args(tiny_teacher), "--out", str(out), "--workers", "0", "--no-progress"]
    assert run_cli(*args, "--data", wds_dataset.path)[0] == 0
    before = _files(out)
    code, _, err = run_cli(*args, "--data", csv_dataset.path)  # another dataset
    _one_line_error(code, err, "another teacher, preprocessing or dataset")
    code, _, err = run_cli(*args, "--data", wds_dataset.path, "--storage-dtype", "float32")  # other storage
    _one_line_error(code, err, "--overwrite")
    assert _files(out) == before  # nothing lost
    code, _, err = run_cli(*args, "--data", csv_dataset.path, "--overwrite")
    assert code == 0, err
    cache = TeacherCache.open(out)
    assert cache.dataset_fingerprint == open_dataset(csv_dataset).fingerprint and cache.verify() == []
