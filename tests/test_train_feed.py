"""The GPU feed of train-student: no host sync inside a step, compact batches, log windows,
a checkpoint never written with non-finite weights, batches built in pieces. (A non-finite
loss caught at a log point or a checkpoint, and resume in the middle of a log window, are
tests/test_train.py's.)

Counted on CPU: the operations that would make a CUDA host wait for the device dispatch the
same way here (``rdkd.runtime.HostSyncCounter``).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rdkd.runtime import HostSyncCounter
from rdkd.stages.train_student import train_student
from test_train import FAST, _metrics, teacher_cache  # noqa: F401 (fixture)

# FAST logs every step; these tests set the interval themselves.
QUIET = {k: v for k, v in FAST.items() if k != "log_every"}


def _syncs(tmp_path, name, csv_dataset, teacher_cache, tiny_vit, steps: int) -> HostSyncCounter:
    with HostSyncCounter() as counter:
        train_student(csv_dataset, tiny_vit, "cliprd", teacher_cache, steps=steps, save_every=10_000,
                      out=tmp_path / name, **QUIET)
    return counter


def test_a_training_step_waits_for_the_device_at_most_once_per_log_interval(
        tmp_path, csv_dataset, teacher_cache, tiny_vit):
    """Host syncs per step at the default --log-every (50): a 100-step run minus a 50-step
    run, so set-up, the final checkpoint and the export cancel out. Before the rebuild every
    step read its loss terms, scales and NaN state: dozens per step."""
    long = _syncs(tmp_path, "long", csv_dataset, teacher_cache, tiny_vit, 100)
    short = _syncs(tmp_path, "short", csv_dataset, teacher_cache, tiny_vit, 50)
    per_step = (long.count - short.count) / 50
    assert per_step <= 0.1, (long.ops, short.ops)


def test_batches_cross_the_process_boundary_compact(csv_dataset, teacher_cache, tiny_vit):
    """uint8 pixels at the student's size, the tokens, and the teacher rows in the cache's
    storage dtype: nothing else of any size."""
    from rdkd.cache import TeacherCache
    from rdkd.data import open_dataset
    from rdkd.models import create_student
    from rdkd.training import ImageCfg, PairDataset

    student = create_student(tiny_vit)
    cache = TeacherCache.open(teacher_cache)
    pairs = PairDataset(open_dataset(csv_dataset), student.tokenizer, ImageCfg.of_model(student.model),
                        seed=0, caches=[cache])
    batch = pairs[[(0, p) for p in range(8)]]
    height, width = pairs.image_cfg.size
    itemsize = batch["t_img"].element_size()
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (8, 3, height, width)
    assert batch["t_img"].dtype == batch["t_txt"].dtype == torch.float32  # this fixture stores float32
    essential = 3 * height * width + batch["text"][0].nbytes + 2 * cache.dim * itemsize
    shipped = sum(v.nbytes for v in batch.values() if isinstance(v, torch.Tensor)) / 8
    assert shipped <= 1.1 * essential


def test_log_records_are_interval_means_with_the_schedule_and_rates(tmp_path, csv_dataset, teacher_cache,
                                                                     tiny_vit):
    """--log-every 3 over 7 steps: records at steps 3, 6 and 7, each the mean of the
    per-step values of the same run logged every step; the rate is the interval's samples
    over its seconds. Logged every step, the lr is the step's lr of a linear warm-up over 3
    steps then a cosine to 0 at step 7 (open_clip's cosine_lr), computed here."""
    args = dict(steps=7, **{**QUIET, "warmup": 3, "lr": 1e-3})
    every = tmp_path / "every"
    train_student(csv_dataset, tiny_vit, "cliprd", teacher_cache, out=every, log_every=1, **args)
    windows = tmp_path / "windows"
    train_student(csv_dataset, tiny_vit, "cliprd", teacher_cache, out=windows, log_every=3, **args)
    per_step = _metrics(every)
    records = _metrics(windows)
    assert [r["step"] for r in records] == [3, 6, 7]
    for record, (lo, hi) in zip(records, [(0, 3), (3, 6), (6, 7)]):
        for key in ("loss", "loss/vrd", "loss/xrd", "loss/task"):
            assert record[key] == pytest.approx(np.mean([m[key] for m in per_step[lo:hi]]), rel=1e-9), key
        assert 0 <= record["data_s"] <= record["step_s"]
        assert record["samples_per_s"] * record["step_s"] == pytest.approx((hi - lo) * QUIET["batch_size"], rel=1e-9)

    warmup, total = 3, 7
    expected = [1e-3 * (i + 1) / warmup if i < warmup
                else 1e-3 * 0.5 * (1 + math.cos(math.pi * (i - warmup) / (total - warmup))) for i in range(total)]
    assert [m["lr"] for m in per_step] == pytest.approx(expected, rel=1e-12)


def test_a_checkpoint_is_never_written_with_non_finite_weights(tmp_path, monkeypatch, csv_dataset,
                                                               teacher_cache, tiny_vit):
    import rdkd.stages.train_student as stage
    from rdkd.training import LossNotFinite

    real_step = stage.train_step
    steps = []

    def poisoned(run, batch, window):
        real_step(run, batch, window)
        steps.append(1)
        if len(steps) == 4:  # after the step: the loss of step 4 was finite
            with torch.no_grad():
                run.model.logit_scale.fill_(float("nan"))

    monkeypatch.setattr(stage, "train_step", poisoned)
    run = tmp_path / "run"
    with pytest.raises(LossNotFinite, match="weights are not finite .*step-00000002.pt"):
        train_student(csv_dataset, tiny_vit, "cliprd", teacher_cache, steps=6, save_every=2, out=run, **QUIET)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000002.pt"]


def test_batches_built_in_pieces_train_exactly_like_whole_batches(tmp_path, monkeypatch, csv_dataset,
                                                                  teacher_cache, tiny_vit):
    """Workers building a local batch in pieces (memory in flight per piece, not per batch),
    joined on the device: the same steps as whole batches, to the bit."""
    import rdkd.stages.train_student as stage
    from rdkd.training import EpochBatchSampler

    sampler = EpochBatchSampler(12, 4, seed=3, pieces=3)
    stream = iter(sampler)
    for batch in sampler.epoch_batches(0) + sampler.epoch_batches(1):
        assert [item for _ in range(3) for item in next(stream)] == batch
    whole = tmp_path / "whole"
    train_student(csv_dataset, tiny_vit, "cliprd", teacher_cache, steps=4, out=whole, **{**FAST, "workers": 2})
    monkeypatch.setattr(stage, "PIECE_BYTES", 1)  # one sample a piece
    pieces = tmp_path / "pieces"
    train_student(csv_dataset, tiny_vit, "cliprd", teacher_cache, steps=4, out=pieces, **{**FAST, "workers": 2})
    assert [m["loss"] for m in _metrics(whole)] == [m["loss"] for m in _metrics(pieces)]
    a = torch.load(whole / "checkpoints" / "step-00000004.pt", weights_only=True)["model"]
    b = torch.load(pieces / "checkpoints" / "step-00000004.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
