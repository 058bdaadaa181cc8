"""Checkpoints are data, never code: hostile files are refused, rdkd's own load weights-only.

A hostile checkpoint is a pickle whose ``__reduce__`` creates a sentinel file when unpickled.
Given to ``--init``, ``--resume`` (a file, and a run folder holding it) or as the weights of
a teacher or an evaluated model, it is refused with one line and exit code 2, nothing is
written, and the sentinel never appears. A control test shows that the same files do create
the sentinel when unpickled without ``weights_only``.
"""

from __future__ import annotations

import os
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import builders
from builders import run_cli
from rdkd import checkpoints
from rdkd.stages.train_student import train_student

FAST = builders.TRAIN_FAST


class _Payload:
    """Unpickling this creates ``path``: what a malicious checkpoint would do."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').close()",))


class _FallbackBait:
    """Raises TypeError under torch's weights-only unpickler (it calls ``Tensor.set_`` with
    the state) but loads under plain pickle (``Tensor.__setstate__``): the error on which
    open_clip retries ``torch.load`` without ``weights_only``."""

    def __reduce__(self):
        return (torch.Tensor, (), (False, None, None))


def write_hostile(path: Path, sentinel: Path, kind: str = "zip") -> Path:
    """A checkpoint that creates ``sentinel`` when unpickled. ``zip``: torch.save's format,
    dressed as an rdkd checkpoint; ``legacy``: torch's pre-1.6 format; ``pickle``: a bare
    pickle; ``fallback``: the TypeError bait followed by the payload."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "zip":
        torch.save({"format": checkpoints.TRAIN_FORMAT, "model": _Payload(sentinel)}, path)
    elif kind == "legacy":
        torch.save({"model": _Payload(sentinel)}, path, _use_new_zipfile_serialization=False)
    elif kind == "pickle":
        path.write_bytes(pickle.dumps({"model": _Payload(sentinel)}))
    elif kind == "fallback":
        torch.save({"bait": _FallbackBait(), "payload": _Payload(sentinel)}, path)
    return path


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def _refused(code: int, err: str, sentinel: Path, path: Path) -> str:
    line = _one_error_line(err)
    assert code == 2, err
    assert str(path) in line
    assert not sentinel.exists(), "the hostile checkpoint ran code"
    return line


def _train_args(data, student, *extra) -> list[str]:
    return ["train-student", "--data", data.path, "--student", str(student), "--loss", "clip",
            "--steps", "2", "--batch-size", "4", "--workers", "0", "--no-progress", *extra]


@pytest.mark.parametrize("kind", ["zip", "legacy", "pickle", "fallback"])
def test_control_the_hostile_files_do_run_code_when_unpickled(tmp_path, kind):
    """Without weights_only the payload runs: the refusals below are not vacuous."""
    sentinel = tmp_path / "SENTINEL"
    evil = write_hostile(tmp_path / "evil.pt", sentinel, kind)
    if kind == "pickle":
        pickle.loads(evil.read_bytes())
    else:
        torch.load(evil, weights_only=False)
    assert sentinel.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # the bare pickle's, from torch
@pytest.mark.parametrize("kind", ["zip", "legacy", "pickle", "fallback"])
def test_hostile_init_is_refused(tmp_path, capsys, csv_dataset, tiny_clip_config, kind):
    sentinel = tmp_path / "SENTINEL"
    evil = write_hostile(tmp_path / "evil.pt", sentinel, kind)
    out = tmp_path / "run"
    code, err = run_cli(_train_args(csv_dataset, tiny_clip_config, "--init", str(evil), "--out", str(out)), capsys)
    _refused(code, err, sentinel, evil)
    assert not out.exists()


def test_hostile_init_of_another_suffix_is_refused_before_open_clip(tmp_path, capsys, csv_dataset, tiny_clip_config):
    """A .pth/.bin --init goes to open_clip: rdkd reads it as data first."""
    sentinel = tmp_path / "SENTINEL"
    evil = write_hostile(tmp_path / "evil.bin", sentinel)
    out = tmp_path / "run"
    code, err = run_cli(_train_args(csv_dataset, tiny_clip_config, "--init", str(evil), "--out", str(out)), capsys)
    assert "not plain data" in _refused(code, err, sentinel, evil)
    assert not out.exists()


def test_hostile_resume_file_is_refused(tmp_path, capsys, csv_dataset, tiny_clip_config):
    sentinel = tmp_path / "SENTINEL"
    evil = write_hostile(tmp_path / "elsewhere" / "evil.pt", sentinel)
    out = tmp_path / "run"
    code, err = run_cli(_train_args(csv_dataset, tiny_clip_config, "--resume", str(evil), "--out", str(out)), capsys)
    line = _refused(code, err, sentinel, evil)
    assert "not plain data" in line and "builtins.exec" in line
    assert not out.exists()


def test_hostile_checkpoint_in_a_resumed_run_folder_is_refused(tmp_path, capsys, csv_dataset, tiny_clip_config):
    sentinel = tmp_path / "SENTINEL"
    run = tmp_path / "run"
    evil = write_hostile(run / "checkpoints" / "step-00000001.pt", sentinel)
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    code, err = run_cli(_train_args(csv_dataset, tiny_clip_config, "--resume", str(run)), capsys)
    _refused(code, err, sentinel, evil)
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before


@pytest.mark.parametrize("kind", ["zip", "fallback"])
def test_hostile_teacher_weights_are_refused_by_extract_teacher(
        tmp_path, capsys, monkeypatch, csv_dataset, tiny_clip_config, kind):
    """``fallback``: under TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 (or torch < 2.6) open_clip's
    retry after the TypeError would unpickle the file in full; rdkd reads it first."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    sentinel = tmp_path / "SENTINEL"
    evil = write_hostile(tmp_path / "teacher.pt", sentinel, kind)
    out = tmp_path / "cache"
    code, err = run_cli(["extract-teacher", "--data", csv_dataset.path, "--model", str(tiny_clip_config),
                         "--pretrained", str(evil), "--workers", "0", "--no-progress", "--out", str(out)], capsys)
    _refused(code, err, sentinel, evil)
    assert not out.exists()


def test_hostile_weights_in_a_local_dir_teacher_are_refused(tmp_path, capsys, csv_dataset, tiny_clip_config):
    """local-dir: with open_clip_pytorch_model.bin: open_clip would torch.load it."""
    import json

    sentinel = tmp_path / "SENTINEL"
    folder = tmp_path / "teacher"
    evil = write_hostile(folder / "open_clip_pytorch_model.bin", sentinel)
    (folder / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": json.loads(Path(tiny_clip_config).read_text()), "preprocess_cfg": {}}))
    out = tmp_path / "cache"
    code, err = run_cli(["extract-teacher", "--data", csv_dataset.path, "--model", f"local-dir:{folder}",
                         "--workers", "0", "--no-progress", "--out", str(out)], capsys)
    _refused(code, err, sentinel, evil)
    assert not out.exists()


def test_hostile_model_weights_are_refused_by_evaluate(tmp_path, capsys, csv_dataset, tiny_clip_config):
    sentinel = tmp_path / "SENTINEL"
    evil = write_hostile(tmp_path / "model.pt", sentinel)
    out = tmp_path / "eval" / "metrics.json"
    code, err = run_cli(["evaluate", "--data", csv_dataset.path, "--model", str(tiny_clip_config),
                         "--pretrained", str(evil), "--workers", "0", "--out", str(out)], capsys)
    _refused(code, err, sentinel, evil)
    assert not out.parent.exists()


def test_open_clip_loads_inside_rdkd_are_weights_only(tmp_path, monkeypatch, tiny_clip_config):
    """Weights open_clip reads itself (Hub downloads) cannot take its unsafe retry either."""
    import open_clip

    from rdkd.models import ModelSpec, load_clip

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    sentinel = tmp_path / "SENTINEL"
    bait = write_hostile(tmp_path / "bait.pt", sentinel, "fallback")
    model = load_clip(ModelSpec(config=str(tiny_clip_config))).model
    with checkpoints.weights_only_loads(), pytest.raises(TypeError):
        open_clip.load_checkpoint(model, str(bait))
    assert not sentinel.exists()
    assert os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] == "1"
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ


# --- what rdkd writes loads as data ------------------------------------------------------------


def test_rng_state_is_plain_data_and_restores_every_generator(tmp_path):
    from rdkd.training import rng_state, set_rng_state

    state = rng_state()
    torch.save(state, tmp_path / "rng.pt")  # no numpy objects, no custom classes
    assert torch.serialization.get_unsafe_globals_in_checkpoint(tmp_path / "rng.pt") == []
    first = (torch.rand(3), np.random.rand(3), random.random(), np.random.randn(), random.gauss(0, 1))
    set_rng_state(state)
    again = (torch.rand(3), np.random.rand(3), random.random(), np.random.randn(), random.gauss(0, 1))
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    assert first[2:] == again[2:]
    # a cached Gaussian (numpy's has_gauss, Python's gauss_next) survives the round trip too
    np.random.randn(), random.gauss(0, 1)
    mid = rng_state()
    after = (np.random.randn(), random.gauss(0, 1))
    set_rng_state(mid)
    assert (np.random.randn(), random.gauss(0, 1)) == after


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, csv_dataset, tiny_clip_config) -> Path:
    """3 steps of a tiny student, checkpoints at steps 2 and 3."""
    run = tmp_path_factory.mktemp("trained") / "run"
    train_student(csv_dataset, str(tiny_clip_config), "clip", steps=3, save_every=2, out=run, **FAST)
    return run


def test_train_checkpoints_need_nothing_beyond_weights_only(trained_run):
    for path in sorted((trained_run / "checkpoints").glob("step-*.pt")):
        assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []
        state = torch.load(path, weights_only=True)
        assert state["format"] == checkpoints.TRAIN_FORMAT
        assert state["scheduler"]["_last_lr"] and isinstance(state["scheduler"]["lr_lambdas"][0], dict)
        rng = state["rng"][0]
        assert rng["numpy"]["key"].dtype == torch.int64 and rng["numpy"]["key"].shape == (624,)
        assert rng["python"]["words"].shape == (625,)


def _as_format_1(state: dict) -> dict:
    """What rdkd wrote before format /2: numpy's and Python's RNG states as their libraries
    return them (a numpy array inside)."""
    return dict(state, format=checkpoints.OLD_TRAIN_FORMAT, rng=[
        dict(rank, numpy=checkpoints.numpy_rng_from_data(rank["numpy"]),
             python=checkpoints.python_rng_from_data(rank["python"]))
        for rank in state["rng"]])


def test_old_format_is_refused_then_upgraded_and_resumes_exactly(
        tmp_path, capsys, csv_dataset, tiny_clip_config, trained_run):
    """A format-/1 checkpoint: --resume refuses it naming the command; `rdkd checkpoint
    upgrade` converts it in place; the resumed run ends where the uninterrupted one did."""
    run = tmp_path / "old-run"
    old = run / "checkpoints" / "step-00000002.pt"
    old.parent.mkdir(parents=True)
    torch.save(_as_format_1(torch.load(trained_run / "checkpoints" / "step-00000002.pt", weights_only=True)), old)
    assert torch.serialization.get_unsafe_globals_in_checkpoint(old)  # numpy objects inside

    args = _train_args(csv_dataset, tiny_clip_config, "--resume", str(run), "--lr", "0.002", "--warmup", "1")
    args[args.index("--steps") + 1] = "3"
    code, err = run_cli(args, capsys)
    line = _one_error_line(err)
    assert code == 2 and checkpoints.OLD_TRAIN_FORMAT in line and f"rdkd checkpoint upgrade {old}" in line
    assert sorted(p.name for p in run.rglob("*")) == ["checkpoints", "step-00000002.pt"]

    code, err = run_cli(["checkpoint", "upgrade", str(old)], capsys)
    assert code == 0, err
    upgraded = torch.load(old, weights_only=True)
    original = torch.load(trained_run / "checkpoints" / "step-00000002.pt", weights_only=True)
    assert upgraded["format"] == checkpoints.TRAIN_FORMAT
    assert torch.equal(upgraded["rng"][0]["numpy"]["key"], original["rng"][0]["numpy"]["key"])
    assert torch.equal(upgraded["rng"][0]["python"]["words"], original["rng"][0]["python"]["words"])

    code, err = run_cli(args, capsys)
    assert code == 0, err
    resumed = torch.load(run / "checkpoints" / "step-00000003.pt", weights_only=True)
    straight = torch.load(trained_run / "checkpoints" / "step-00000003.pt", weights_only=True)
    for k in straight["model"]:
        assert torch.equal(resumed["model"][k], straight["model"][k]), k


def test_upgrade_refuses_what_it_should_not_convert(tmp_path, capsys, trained_run):
    sentinel = tmp_path / "SENTINEL"
    evil = write_hostile(tmp_path / "evil.pt", sentinel)
    code, err = run_cli(["checkpoint", "upgrade", str(evil), str(tmp_path / "new.pt")], capsys)
    assert "builtins.exec" in _refused(code, err, sentinel, evil)
    assert not (tmp_path / "new.pt").exists()

    current = trained_run / "checkpoints" / "step-00000003.pt"
    code, err = run_cli(["checkpoint", "upgrade", str(current), str(tmp_path / "new.pt")], capsys)
    assert code == 2 and "already" in _one_error_line(err)

    old = tmp_path / "old.pt"
    torch.save(_as_format_1(torch.load(current, weights_only=True)), old)
    taken = tmp_path / "taken.pt"
    shutil.copy(current, taken)
    code, err = run_cli(["checkpoint", "upgrade", str(old), str(taken)], capsys)
    assert code == 2 and "already exists" in _one_error_line(err)
    assert taken.read_bytes() == current.read_bytes()
    code, err = run_cli(["checkpoint", "upgrade", str(old), str(tmp_path / "kept-old.pt")], capsys)
    assert code == 0 and old.exists()
    assert torch.load(tmp_path / "kept-old.pt", weights_only=True)["format"] == checkpoints.TRAIN_FORMAT
