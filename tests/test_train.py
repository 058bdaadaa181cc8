"""rdkd train-student: training from a teacher cache, resume, divergence, export, bad input.

Tiny models (32 px, 2 layers) on the 12 standard samples; every run is a few steps on CPU.
The wiring guards record what the stage hands the loss (``DistillLoss.forward``), the
student (the model ``create_student`` built) and the clipper (``clip_grad_norm_``), and
compare it with what the pure functions say a step must see (``EpochBatchSampler``,
``sample_rng``, ``TeacherCache`` rows, ``rdkd.losses`` terms); they read no batch format.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import builders
from builders import run_cli
from rdkd.stages.train_student import train_student
from rdkd.training import EpochBatchSampler, PairDataset, WarmupCosine, build_optimizer, sample_rng

FAST = {**builders.TRAIN_FAST, "log_every": 1}


@pytest.fixture(scope="module")
def teacher_cache(tmp_path_factory, tiny_teacher, csv_dataset) -> Path:
    """A float32 cache of the tiny teacher over the CSV dataset: 3 views per image."""
    from rdkd.cache import ViewConfig
    from rdkd.stages.extract_teacher import extract_teacher

    out = tmp_path_factory.mktemp("cache") / "cache"
    extract_teacher(csv_dataset, tiny_teacher, out, views=ViewConfig(count=3), batch_size=8,
                    workers=0, storage_dtype="float32", progress=False)
    return out


@pytest.fixture(scope="module")
def teacher_cache_fp16(tmp_path_factory, tiny_teacher, csv_dataset) -> Path:
    """The same cache stored as float16 (the default storage): rows that stay exactly the
    cache's values however they travel to the loss. 3 views per image; the closest two
    rows of different views differ by 8e-3 (max abs), 30 times float16's rounding."""
    from rdkd.cache import ViewConfig
    from rdkd.stages.extract_teacher import extract_teacher

    out = tmp_path_factory.mktemp("cache16") / "cache"
    extract_teacher(csv_dataset, tiny_teacher, out, views=ViewConfig(count=3), batch_size=8,
                    workers=0, storage_dtype="float16", progress=False)
    return out


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def _record_loss_calls(monkeypatch) -> list[dict]:
    """Patch ``DistillLoss.forward`` (class level) to record every call: its arguments by
    name (tensors detached and copied), the loss module and its state at the call."""
    from rdkd.losses import DistillLoss

    real = DistillLoss.forward
    calls: list[dict] = []

    def recording(self, *args, **kwargs):
        bound = inspect.signature(real).bind(self, *args, **kwargs)
        bound.apply_defaults()
        call = {name: value.detach().clone() if torch.is_tensor(value) else value
                for name, value in bound.arguments.items() if name != "self"}
        call["module"] = self
        call["state"] = {k: v.detach().clone() for k, v in self.state_dict().items()}
        calls.append(call)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(DistillLoss, "forward", recording)
    return calls


def _record_students(monkeypatch) -> list[dict]:
    """Wrap ``rdkd.models.create_student``: record each student built and, per forward call,
    its (image, text) inputs and its weights at that moment."""
    import rdkd.models

    real = rdkd.models.create_student
    students: list[dict] = []

    def creating(*args, **kwargs):
        built = real(*args, **kwargs)
        record = {"model": built.model, "forwards": []}

        def before_forward(module, args, kwargs):
            named = dict(zip(("image", "text"), args), **kwargs)
            record["forwards"].append({
                "image": named["image"].detach().clone(), "text": named["text"].detach().clone(),
                "state": {k: v.detach().clone() for k, v in module.state_dict().items()}})

        built.model.register_forward_pre_hook(before_forward, with_kwargs=True)
        students.append(record)
        return built

    monkeypatch.setattr(rdkd.models, "create_student", creating)  # setup looks it up there when it runs
    return students


def _sampled_pairs(spec, cache, seed: int, batch_size: int, steps: int) -> list[list[dict]]:
    """What one process should train on at each step, derived from the pure functions that
    decide it: the usable entries (dataset order, keys the cache holds and did not reject),
    the sampler's order for (seed, epoch), then per sample its own stream, which draws the
    caption first and the view second."""
    from rdkd.data import open_dataset

    data = open_dataset(spec)
    rejected = set(cache.rejected_keys)
    usable = [i for i, key in enumerate(data.keys) if key not in rejected and cache.find(key) is not None]
    sampler = EpochBatchSampler(len(usable), batch_size, seed)
    batches = []
    for step in range(steps):
        epoch, in_epoch = divmod(step, sampler.steps_per_epoch)
        batch = []
        for item_epoch, position in sampler.epoch_batches(epoch)[in_epoch]:
            assert item_epoch == epoch
            index = usable[position]
            entry = cache.find(data.keys[index])
            captions = data.captions(index)
            assert len(captions) == len(entry.text_rows)
            rng = sample_rng(seed, epoch, index)
            caption = int(rng.integers(len(captions)))
            view = int(rng.integers(len(entry.image_rows)))
            batch.append({"epoch": epoch, "key": entry.key, "caption": captions[caption],
                          "image_row": entry.image_rows[view], "text_row": entry.text_rows[caption]})
        batches.append(batch)
    return batches


def _rows(batch: list[dict], kind: str) -> np.ndarray:
    return np.asarray([sample[f"{kind}_row"] for sample in batch], dtype=np.int64)


def _nearest_rows(got: torch.Tensor, table: torch.Tensor) -> list[int]:
    """For a failure message: the cache row closest to each row of ``got``."""
    return (got.float()[:, None] - table[None]).abs().amax(-1).argmin(1).tolist()


# --- training ------------------------------------------------------------------------------


def test_clip_without_cache_trains_and_loss_falls(tmp_path, csv_dataset, tiny_clip_config):
    run = tmp_path / "run"
    summary = train_student(csv_dataset, str(tiny_clip_config), "clip", steps=24, out=run,
                            save_every=100, **FAST)
    losses = [m["loss/task"] for m in _metrics(run)]
    assert len(losses) == 24 and all(np.isfinite(losses))
    assert np.mean(losses[-6:]) < np.mean(losses[:6]) - 0.2
    assert summary["teacher_forwards"] == 0 and summary["cache"] is None
    run_json = json.loads((run / "run.json").read_text())
    assert {"method": "clip", "student": "tiny-clip", "student_spec": str(tiny_clip_config),
            "seed": 0, "steps": 24, "teacher_forwards": 0}.items() <= run_json.items()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000024.pt"]
    assert list((run / "logs" / "tb").glob("events.out.tfevents.*"))


def test_metrics_log_every_term_lr_scales_and_speed(tmp_path, csv_dataset, teacher_cache, tiny_vit):
    run = tmp_path / "run"
    train_student(csv_dataset, tiny_vit, "cliprd", teacher_cache, steps=3, out=run, **FAST)
    first = _metrics(run)[0]
    for key in ("loss", "loss/task", "loss/crd", "loss/fd", "loss/icl", "loss/vrd", "loss/xrd",
                "lr", "logit_scale", "scale/a_img", "scale/a_txt", "scale/a_cross", "samples_per_s"):
        assert np.isfinite(first[key]), key
    assert first["loss"] == pytest.approx(sum(v for k, v in first.items() if k.startswith("loss/")), rel=1e-5)
    assert first["scale/a_img"] == pytest.approx(np.log(1 / 0.07), rel=1e-2)


def test_exp_parameterised_scales_start_at_one_over_0_07(tmp_path, csv_dataset, teacher_cache, tiny_vit):
    run = tmp_path / "run"
    summary = train_student(csv_dataset, tiny_vit, "cliprd", teacher_cache, steps=2, out=run,
                            scale_param="exp", **FAST)
    assert summary["scale_param"] == "exp"
    assert _metrics(run)[0]["scale/a_cross"] == pytest.approx(1 / 0.07, rel=2e-2)


def test_replayed_views_and_captions_match_their_teacher_rows(teacher_cache, csv_dataset, tiny_teacher):
    """A student that *is* the teacher, fed what PairDataset replays, reproduces the cached
    embedding of exactly the chosen view and caption: the join, the view replay (crop box,
    resize, flip, normalisation) and the caption choice are right."""
    from rdkd.cache import TeacherCache
    from rdkd.data import open_dataset
    from rdkd.models import create_student
    from rdkd.runtime import DeviceNormalize
    from rdkd.training import ImageCfg

    cache = TeacherCache.open(teacher_cache)
    student = create_student(tiny_teacher.config, init=tiny_teacher.pretrained)
    student.model.eval()
    pairs = PairDataset(open_dataset(csv_dataset), student.tokenizer, ImageCfg.of_model(student.model),
                        seed=3, caches=[cache])
    assert len(pairs) == 12 and cache.views == 3
    batch = pairs[[(epoch, pos) for epoch in (0, 1) for pos in range(12)]]
    assert batch["image"].dtype == torch.uint8  # normalised on the device, in the step
    assert len(set((batch["image_row"] % 3).tolist())) > 1  # the views vary (3 rows per image)
    # the teacher rows travel with the batch, exactly as stored
    assert torch.equal(batch["t_img"].float(), cache.image_embeddings(batch["image_row"]))
    assert torch.equal(batch["t_txt"].float(), cache.text_embeddings(batch["text_row"]))
    cfg = pairs.image_cfg
    with torch.no_grad():
        images = DeviceNormalize(cfg.mean, cfg.std, torch.device("cpu"))(batch["image"])
        s_img = student.model.encode_image(images, normalize=True)
        s_txt = student.model.encode_text(batch["text"], normalize=True)
    torch.testing.assert_close(s_img, cache.image_embeddings(batch["image_row"]), atol=2e-5, rtol=0)
    torch.testing.assert_close(s_txt, cache.text_embeddings(batch["text_row"]), atol=2e-5, rtol=0)
    # one caption per image per epoch, and the multi-caption images use more than one
    multi = [i for i in range(12) if len(pairs.data.captions(i)) > 1]
    chosen = {(int(i), int(r)) for i, r in zip(batch["index"], batch["text_row"])}
    assert any(len({r for i, r in chosen if i == m}) > 1 for m in multi)


def test_two_architectures_train_from_one_cache_without_the_teacher(
        tmp_path, monkeypatch, csv_dataset, teacher_cache, tiny_teacher, tiny_vit, tiny_resnet):
    """Reuse: a ViT and a ResNet student (embed 24 != teacher 32: heads in use) train from one
    cache; the teacher's loader fails if called and its weights file is never read."""
    import rdkd.models

    def no_teacher(*args, **kwargs):
        raise AssertionError("train-student loaded a teacher")

    real_load = torch.load
    teacher_file = Path(tiny_teacher.pretrained).resolve()

    def guarded_load(f, *args, **kwargs):
        assert not (isinstance(f, (str, os.PathLike)) and Path(f).resolve() == teacher_file)
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(rdkd.models, "load_clip", no_teacher)
    monkeypatch.setattr(torch, "load", guarded_load)
    for name, student in (("vit", tiny_vit), ("resnet", tiny_resnet)):
        run = tmp_path / name
        summary = train_student(csv_dataset, student, "cliprd", teacher_cache, steps=3, out=run, **FAST)
        assert summary["teacher_forwards"] == 0
        assert summary["embed_dim"] == 24 and summary["teacher_dim"] == 32
        assert np.isfinite(summary["final_loss"])
        state = real_load(run / "checkpoints" / "step-00000003.pt", weights_only=True)
        assert state["loss"]["teachers.0.head_img.weight"].shape == (32, 24)


def test_teacher_forward_counter_sees_a_teacher(tiny_teacher):
    """The counter behind ``teacher_forwards`` is real: running another model counts."""
    from rdkd.models import load_clip
    from rdkd.training import TeacherForwardCounter

    teacher = load_clip(tiny_teacher).model
    student = load_clip(tiny_teacher).model
    with TeacherForwardCounter(student) as counter:
        student.encode_image(torch.zeros(1, 3, 32, 32))
        assert counter.count == 0
        teacher.encode_image(torch.zeros(1, 3, 32, 32))
    assert counter.count == 1


def assert_same_training_state(a: dict, b: dict) -> None:
    """Two train-student checkpoints hold the same weights, loss state, optimizer moments
    and RNG states of every rank, to the bit."""
    for part in ("model", "loss"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    assert len(a["rng"]) == len(b["rng"])
    for rank, (ra, rb) in enumerate(zip(a["rng"], b["rng"])):
        assert ra.keys() == rb.keys()
        for name in ra:
            assert _same_data(ra[name], rb[name]), f"{name} RNG state of rank {rank}"


def _same_data(a, b) -> bool:
    """Equal plain data (dicts, lists, tensors compared exactly)."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_data(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same_data(x, y) for x, y in zip(a, b))
    if torch.is_tensor(a):
        return torch.equal(a, b)
    return a == b


@pytest.mark.parametrize("teachers", [1, 2], ids=["one-teacher", "two-teachers"])
def test_resume_equals_uninterrupted_run(tmp_path, monkeypatch, csv_dataset, teacher_cache, wide_teacher_cache,
                                         tiny_vit_patch_dropout, teachers):
    """7 steps straight vs interrupted after the step-4 checkpoint (mid-epoch: 3 steps per
    epoch; mid log window: records every 3 steps) and resumed with DataLoader workers, for a
    student that draws from torch's RNG at every step (patch dropout), from one cache or an
    ensemble of two: identical weights, loss state (every teacher's heads and scales),
    optimizer, RNG states and log records."""
    import rdkd.stages.train_student as stage

    tiny_vit = tiny_vit_patch_dropout
    teacher_cache = [str(teacher_cache), str(wide_teacher_cache)][:teachers]

    args = dict(steps=7, save_every=2, **{**FAST, "lr": 1e-3, "log_every": 3})
    straight = tmp_path / "straight"
    train_student(csv_dataset, tiny_vit, "cliprd", teacher_cache, out=straight, **args)

    real_save = stage.save_checkpoint

    def save_then_stop(path, state):
        real_save(path, state)
        if state["position"]["step"] == 4:
            raise KeyboardInterrupt

    interrupted = tmp_path / "interrupted"
    monkeypatch.setattr(stage, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train_student(csv_dataset, tiny_vit, "cliprd", teacher_cache, out=interrupted, **args)
    monkeypatch.setattr(stage, "save_checkpoint", real_save)
    assert not (interrupted / "run.json").exists()
    summary = train_student(csv_dataset, tiny_vit, "cliprd", teacher_cache, resume=interrupted,
                            **{**args, "workers": 2})
    assert summary["resumed_from_step"] == 4

    assert_same_training_state(torch.load(straight / "checkpoints" / "step-00000007.pt", weights_only=True),
                               torch.load(interrupted / "checkpoints" / "step-00000007.pt", weights_only=True))
    records = [[(m["step"], m["loss"]) for m in _metrics(run)] for run in (straight, interrupted)]
    assert records[0] == records[1] and [step for step, _ in records[0]] == [3, 6, 7]


def xrd_goes_nan_from_call(monkeypatch, first_bad_call: int) -> None:
    """Make the xrd term NaN from its ``first_bad_call``-th evaluation on (one per step)."""
    import rdkd.losses as losses

    real = losses.TERMS["xrd"]
    calls = []

    def xrd(rel):
        calls.append(1)
        value = real.compute(rel)
        return value * float("nan") if len(calls) >= first_bad_call else value

    monkeypatch.setitem(losses.TERMS, "xrd", dataclasses.replace(real, compute=xrd))


@pytest.mark.parametrize("save_every, log_every, says, kept", [
    # a checkpoint comes first: it checks before writing, the last good one stays
    ("2", "50", "checked at step 4); run stopped, last good checkpoint", ["step-00000002.pt"]),
    # a log point comes first: no checkpoint was ever written
    ("100", "5", "checked at step 5); run stopped, no checkpoint was written yet", None),
])
def test_nan_loss_stops_naming_step_and_term_and_keeps_checkpoint(
        save_every, log_every, says, kept, tmp_path, monkeypatch, capsys, csv_dataset, teacher_cache, tiny_vit):
    """A non-finite loss is caught at the next log point or checkpoint, whichever comes
    first: one line naming the term and its first bad step, exit 3 (not bad input)."""
    xrd_goes_nan_from_call(monkeypatch, 3)
    run = tmp_path / "run"
    code, err = run_cli(["train-student", "--data", csv_dataset.path, "--cache", str(teacher_cache),
                         "--student", tiny_vit, "--loss", "cliprd", "--steps", "6", "--batch-size", "4",
                         "--save-every", save_every, "--log-every", log_every, "--workers", "0",
                         "--no-progress", "--out", str(run)], capsys)
    line = _one_error_line(err)
    assert code == 3 and "loss term xrd is not finite from step 3" in line and says in line
    if kept:
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == kept and kept[-1] in line
    else:
        assert not (run / "checkpoints").exists()
    assert not (run / "run.json").exists()


def test_export_loads_with_plain_open_clip(tmp_path, csv_dataset, teacher_cache, tiny_resnet):
    import open_clip

    run = tmp_path / "run"
    train_student(csv_dataset, tiny_resnet, "cliprd", teacher_cache, steps=2, out=run, **FAST)
    trained = torch.load(run / "checkpoints" / "step-00000002.pt", weights_only=True)["model"]
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{run / 'export'}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{run / 'export'}")
    exported = model.state_dict()
    assert exported.keys() == trained.keys()
    for k in trained:
        assert torch.equal(exported[k], trained[k]), k
    model.eval()
    image = preprocess(builders.make_image(1)).unsqueeze(0)
    with torch.no_grad():
        features = model.encode_image(image, normalize=True)
        text = model.encode_text(tokenizer(["a picture"]), normalize=True)
    assert features.shape == (1, 24) and text.shape == (1, 24)


@pytest.mark.parametrize("samples_per_piece", [None, 2], ids=["whole-batches", "two-sample-pieces"])
def test_skips_and_counts_images_that_fail_to_decode(tmp_path, monkeypatch, tiny_clip_config, samples_per_piece):
    """One of 8 images is not an image; 4 steps of 4 are two epochs, each visiting it once:
    two skips of that key, each recorded at the step whose batch drew it, whether a batch
    arrives whole or in pieces of two samples (its slot filled from its own piece)."""
    import rdkd.stages.train_student as stage
    from rdkd.data import open_dataset
    from rdkd.training import ImageCfg

    if samples_per_piece is not None:  # the tiny CLIP's samples: 32 px, 16 tokens, no teacher rows
        sample_bytes = stage._sample_bytes(ImageCfg((32, 32), (0.0,) * 3, (1.0,) * 3), builders.TINY_CLIP_CONFIG, [])
        monkeypatch.setattr(stage, "PIECE_BYTES", samples_per_piece * sample_bytes)
    samples = builders.standard_samples(8)
    samples[2] = dataclasses.replace(samples[2], data=b"not an image")
    spec = builders.write_csv_dataset(tmp_path / "data", samples)
    run = tmp_path / "run"
    summary = train_student(spec, str(tiny_clip_config), "clip", steps=4, out=run, **FAST)
    data = open_dataset(spec)
    [bad] = [i for i in range(len(data)) if data.captions(i) == samples[2].captions]
    sampler = EpochBatchSampler(len(data), FAST["batch_size"], seed=0)  # no cache: position = index
    steps = [epoch * sampler.steps_per_epoch + in_epoch + 1 for epoch in (0, 1)
             for in_epoch, batch in enumerate(sampler.epoch_batches(epoch)) if (epoch, bad) in batch]
    assert summary["skipped"] == {"not an image": 2} and np.isfinite(summary["final_loss"])
    assert json.loads((run / "run.json").read_text())["skipped"] == {"not an image": 2}
    records = [json.loads(line) for line in (run / "logs" / "skipped.jsonl").read_text().splitlines()]
    assert records == [{"key": data.keys[bad], "reason": "not an image", "step": step} for step in steps]


def test_an_undecodable_image_takes_the_next_decodable_sample_of_its_piece(tmp_path, tiny_clip_config):
    """The one bad-sample policy, as the indexed feed's workers apply it: the bad image is
    skipped and reported with its key and reason, its slot filled by the nearest following
    decodable sample of the same piece (cyclically: the first one when it is last), and
    nothing is read beyond the piece; a piece where no image decodes stops with one line."""
    from rdkd.data import open_dataset
    from rdkd.errors import UserError
    from rdkd.models import create_student
    from rdkd.training import ImageCfg

    samples = builders.standard_samples(8)
    samples[2] = dataclasses.replace(samples[2], data=b"not an image")
    data = open_dataset(builders.write_csv_dataset(tmp_path / "data", samples))
    [bad] = [i for i in range(len(data)) if data.captions(i) == samples[2].captions]
    student = create_student(str(tiny_clip_config))
    pairs = PairDataset(data, student.tokenizer, ImageCfg.of_model(student.model), seed=0)
    others = [i for i in range(len(data)) if i != bad]  # no cache: position = index
    for piece, filled in (([others[0], bad, others[1]], others[1]), ([others[0], others[1], bad], others[0])):
        got = pairs[[(0, p) for p in piece]]
        assert got["index"].tolist() == [filled if p == bad else p for p in piece]
        assert got["skipped"] == [(data.keys[bad], "not an image")]
    with pytest.raises(UserError, match=f"^no image of a batch piece decoded \\(last: {data.keys[bad]}: not an image\\)"):
        pairs[[(0, bad)]]


# --- what the stage hands the loss: guards of the loop's wiring -------------------------------


def test_loss_gets_the_cached_rows_of_the_sampled_pairs_the_student_features_and_the_teacher_scale(
        tmp_path, monkeypatch, csv_dataset, teacher_cache_fp16, tiny_vit):
    """One step, recorded at the loss's door: the teacher rows are the cache's image rows of
    exactly the sampled views and its text rows of exactly the sampled captions; the teacher
    scale is the cache's (50, not the student's 14.3 nor a constant); the student tensors are
    the student's own normalised features of what it was fed (the sampled captions'
    tokens); the logged terms are the rdkd.losses functions of those inputs."""
    from rdkd import losses
    from rdkd.cache import TeacherCache
    from rdkd.models import create_student

    calls, students = _record_loss_calls(monkeypatch), _record_students(monkeypatch)
    seed, run = 5, tmp_path / "run"
    train_student(csv_dataset, tiny_vit, "cliprd", teacher_cache_fp16, steps=1, seed=seed, out=run, **FAST)
    cache = TeacherCache.open(teacher_cache_fp16)
    [batch] = _sampled_pairs(csv_dataset, cache, seed, FAST["batch_size"], steps=1)
    [call] = calls
    want_img = cache.image_embeddings(_rows(batch, "image"))
    want_txt = cache.text_embeddings(_rows(batch, "text"))
    all_img = cache.image_embeddings(np.arange(cache.num_image_rows))
    assert torch.equal(call["t_img"].float().cpu(), want_img), (
        f"teacher image rows {_nearest_rows(call['t_img'].cpu(), all_img)} != sampled {_rows(batch, 'image')}")
    all_txt = cache.text_embeddings(np.arange(cache.num_texts))
    assert torch.equal(call["t_txt"].float().cpu(), want_txt), (
        f"teacher text rows {_nearest_rows(call['t_txt'].cpu(), all_txt)} != sampled {_rows(batch, 'text')}")
    assert cache.logit_scale == pytest.approx(50.0, rel=1e-6)
    assert float(call["t_scale"]) == pytest.approx(cache.logit_scale, rel=1e-6)

    # the student: one forward of the sampled captions, its normalised features handed on
    [student] = students
    [forward] = student["forwards"]
    fresh = create_student(tiny_vit)
    assert torch.equal(forward["text"].cpu().long(), fresh.tokenizer([s["caption"] for s in batch]))
    fresh.model.load_state_dict(forward["state"])
    with torch.no_grad():
        own_img = fresh.model.encode_image(forward["image"].float().cpu(), normalize=True)
        own_txt = fresh.model.encode_text(forward["text"].cpu(), normalize=True)
    torch.testing.assert_close(call["s_img"].cpu(), own_img, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(call["s_txt"].cpu(), own_txt, rtol=1e-5, atol=1e-6)
    for features in (call["s_img"], call["s_txt"]):
        torch.testing.assert_close(features.norm(dim=1), torch.ones(len(batch)), rtol=0, atol=1e-5)
    assert torch.equal(call["s_logit_scale"].cpu(), forward["state"]["logit_scale"])

    # the logged terms: the reference functions on the cache's rows and the recorded student
    weights = losses.weights_for("cliprd")
    s_img, s_txt = call["s_img"].cpu(), call["s_txt"].cpu()
    state = {k.removeprefix("teachers.0."): v for k, v in call["state"].items()}  # the one teacher's
    p_img = torch.nn.functional.normalize(
        torch.nn.functional.linear(s_img, state["head_img.weight"], state["head_img.bias"]), dim=-1)
    p_txt = torch.nn.functional.normalize(
        torch.nn.functional.linear(s_txt, state["head_txt.weight"], state["head_txt.bias"]), dim=-1)
    s_scale = call["s_logit_scale"].cpu().exp().clamp(max=100)
    a_img, a_txt, a_cross = state["scale_img"], state["scale_txt"], state["scale_cross"]  # raw: as they are
    t_scale = cache.logit_scale
    want = {
        "task": losses.clip_task(s_img, s_txt, s_scale),
        "crd": losses.crd(want_img, want_txt, s_img, s_txt, t_scale, s_scale),
        "fd": losses.fd(want_img, want_txt, p_img, p_txt),
        "icl": losses.icl(want_img, want_txt, p_img, p_txt, a_cross),
        "vrd": losses.vrd(want_img, want_txt, p_img, p_txt, a_img, a_txt),
        "xrd": losses.xrd(want_img, want_txt, p_img, p_txt, a_cross),
    }
    [record] = [r for r in _metrics(run) if r["step"] == 1]
    assert {k[len("loss/"):] for k in record if k.startswith("loss/")} == set(weights) == set(want)
    for name, value in want.items():
        assert record[f"loss/{name}"] == pytest.approx(weights[name] * float(value), rel=1e-5), name
    assert record["loss"] == pytest.approx(sum(weights[n] * float(v) for n, v in want.items()), rel=1e-5)


def test_every_step_trains_the_teacher_rows_and_student_inputs_of_its_sampled_pairs(
        tmp_path, monkeypatch, csv_dataset, teacher_cache_fp16, tiny_teacher):
    """The student *is* the teacher (its weights; lr 0 keeps them), fed by DataLoader
    workers for two epochs: at every step its features are the cache's rows of exactly the
    sampled views and captions, beside the same rows on the teacher side. So pixels
    (replayed view), tokens (chosen caption), teacher rows and their pairing are right at
    every step, and each epoch shows every image once, in a new order."""
    from rdkd.cache import TeacherCache
    from rdkd.data import open_dataset

    calls = _record_loss_calls(monkeypatch)
    seed, steps = 7, 6  # 12 samples, batch 4: 3 steps per epoch
    train_student(csv_dataset, tiny_teacher.config, "cliprd", teacher_cache_fp16, init=tiny_teacher.pretrained,
                  steps=steps, seed=seed, out=tmp_path / "run", **{**FAST, "lr": 0.0, "workers": 2})
    cache = TeacherCache.open(teacher_cache_fp16)
    batches = _sampled_pairs(csv_dataset, cache, seed, FAST["batch_size"], steps)
    assert len(calls) == steps
    for step, (call, batch) in enumerate(zip(calls, batches), start=1):
        want_img = cache.image_embeddings(_rows(batch, "image"))
        want_txt = cache.text_embeddings(_rows(batch, "text"))
        assert torch.equal(call["t_img"].float().cpu(), want_img), f"step {step}: teacher image rows"
        assert torch.equal(call["t_txt"].float().cpu(), want_txt), f"step {step}: teacher text rows"
        # float16 storage rounds by <= 2.5e-4; another view of the image is >= 8e-3 away
        torch.testing.assert_close(call["s_img"].cpu(), want_img, rtol=0, atol=5e-4,
                                   msg=lambda m: f"step {step}: student images: {m}")
        torch.testing.assert_close(call["s_txt"].cpu(), want_txt, rtol=0, atol=5e-4,
                                   msg=lambda m: f"step {step}: student texts: {m}")
    epochs = [[s["key"] for b in batches[e * 3:(e + 1) * 3] for s in b] for e in (0, 1)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == sorted(open_dataset(csv_dataset).keys)
    assert epochs[0] != epochs[1]


def _record_clipping(monkeypatch) -> list[dict]:
    """Patch ``torch.nn.utils.clip_grad_norm_`` to record each call: the parameters by id
    (in order), the max norm and each parameter's gradient as it was handed in."""
    real = torch.nn.utils.clip_grad_norm_
    calls: list[dict] = []

    def recording(parameters, max_norm, *args, **kwargs):
        parameters = [parameters] if torch.is_tensor(parameters) else list(parameters)
        calls.append({"ids": [id(p) for p in parameters], "max_norm": max_norm,
                      "grads": {id(p): None if p.grad is None else p.grad.detach().clone() for p in parameters}})
        return real(parameters, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils.clip_grad, "clip_grad_norm_", recording)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording)
    return calls


@pytest.mark.parametrize("device, precision", [
    ("cpu", "fp32"),
    pytest.param("cuda", "fp16", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                           reason="fp16's GradScaler runs on CUDA only")),
])
def test_grad_clip_runs_once_per_step_over_every_trained_parameter_on_unscaled_gradients(
        device, precision, tmp_path, monkeypatch, csv_dataset, teacher_cache, tiny_vit):
    """--grad-clip: one clip_grad_norm_ per step, over the student's and the loss module's
    parameters (heads, scales), each once, at the given norm; and what it clips is the
    step's true gradient: the loss module's gradients equal those recomputed from the loss's
    recorded inputs, so under fp16 the GradScaler's factor (65536 at the start) has been
    divided out before clipping. (The loss module computes in float32: its scaled gradients
    never overflow, also on steps that the scaler skips for the student's fp16 overflow.)"""
    from rdkd.losses import DistillLoss

    real_forward = DistillLoss.forward
    clips, losses_in, students = (_record_clipping(monkeypatch), _record_loss_calls(monkeypatch),
                                  _record_students(monkeypatch))
    steps = 3
    train_student(csv_dataset, tiny_vit, "cliprd", teacher_cache, steps=steps, out=tmp_path / "run",
                  grad_clip=0.5, device=device, precision=precision, **FAST)
    [student] = students
    loss_module = losses_in[0]["module"]
    trained = {id(p): f"student {n}" for n, p in student["model"].named_parameters() if p.requires_grad}
    loss_params = list(loss_module.parameters())
    assert len(loss_params) == 7  # two heads (weight and bias each) and a_I, a_T, a_X
    trained.update({id(p): f"loss {n}" for n, p in loss_module.named_parameters()})
    assert len(clips) == steps
    for step, clip in enumerate(clips, start=1):
        assert clip["max_norm"] == 0.5
        missed = sorted(name for i, name in trained.items() if i not in clip["ids"])
        assert not missed, f"step {step}: {len(missed)} trained parameters not clipped: {missed[:4]}"
        assert len(clip["ids"]) == len(set(clip["ids"])) == len(trained), f"step {step}: extra or repeated"
    for step, (clip, call) in enumerate(zip(clips, losses_in), start=1):
        got = [clip["grads"][id(p)] for p in loss_params]
        replica = copy.deepcopy(loss_module)
        replica.load_state_dict(call["state"])
        total, _ = real_forward(replica, call["t_img"], call["t_txt"], call["s_img"], call["s_txt"],
                                call["s_logit_scale"], call["t_scale"])
        want = torch.autograd.grad(total, list(replica.parameters()))
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-7, msg=lambda m: f"step {step}: {m}")


def test_a_tiny_clip_norm_bounds_the_first_update(
        tmp_path, monkeypatch, capsys, csv_dataset, teacher_cache, tiny_vit):
    """--grad-clip 1e-12 through the CLI, one step, no weight decay: every gradient is at
    most 1e-12 after clipping, so AdamW's first update, lr * g / (|g| + eps) with eps 1e-6,
    is at most lr * 1e-6 for every student and loss parameter (twice that with float
    rounding), where the unclipped run moves both parts by about lr."""
    lr = 2e-3
    moved = {}
    for name, clip in (("clipped", ["--grad-clip", "1e-12"]), ("unclipped", [])):
        with monkeypatch.context() as patch:
            losses_in, students = _record_loss_calls(patch), _record_students(patch)
            run = tmp_path / name
            code, err = run_cli(["train-student", "--data", csv_dataset.path, "--cache", str(teacher_cache),
                                 "--student", tiny_vit, "--loss", "cliprd", "--steps", "1", "--batch-size", "4",
                                 "--lr", str(lr), "--wd", "0", "--warmup", "1", "--workers", "0",
                                 "--no-progress", "--out", str(run), *clip], capsys)
        assert code == 0, err
        state = torch.load(run / "checkpoints" / "step-00000001.pt", weights_only=True)
        before = {"model": students[0]["forwards"][0]["state"], "loss": losses_in[0]["state"]}
        moved[name] = {part: max(float((state[part][k] - v).abs().max()) for k, v in before[part].items())
                       for part in ("model", "loss")}
    for part in ("model", "loss"):
        assert moved["unclipped"][part] > 0.5 * lr, (part, moved)
        assert moved["clipped"][part] <= 2 * lr * 1e-12 / 1e-6, (part, moved)


# --- building blocks ------------------------------------------------------------------------


def _order(sampler: EpochBatchSampler, epoch: int) -> list[int]:
    """The positions one epoch visits, in order, checking that each item carries its epoch."""
    items = [item for batch in sampler.epoch_batches(epoch) for item in batch]
    assert {e for e, _ in items} == {epoch}
    return [position for _, position in items]


def test_sampler_reshuffles_every_epoch_and_visits_each_entry_once():
    """Orders, not (epoch, position) items, differ between epochs. Covered: when the global
    batch divides the entries, every epoch is a permutation of all of them; otherwise it
    visits steps_per_epoch * batch distinct entries (the rest of the permutation is the
    dropped incomplete batch), never one twice."""
    full = EpochBatchSampler(12, 4, seed=1)
    orders = [_order(full, epoch) for epoch in range(4)]
    assert all(sorted(order) == list(range(12)) for order in orders)
    assert len({tuple(order) for order in orders}) == 4
    dropping = EpochBatchSampler(10, 4, seed=1)
    for epoch in range(4):
        order = _order(dropping, epoch)
        assert len(order) == len(set(order)) == 8 and set(order) <= set(range(10))
    assert len({tuple(_order(dropping, epoch)) for epoch in range(4)}) == 4


@pytest.mark.parametrize("samples, global_batch", [(12, 4), (10, 4), (11, 4), (13, 4), (11, 6), (24, 12)])
def test_sampler_order_is_a_function_of_seed_and_epoch_for_any_world_size(samples, global_batch):
    """The global batch of every step depends on (seed, epoch) alone: a fresh sampler repeats
    it, another seed changes it, and for 2, 3 or 4 ranks the ranks' local batches form the
    1-process global batch step by step, with the same number of steps per epoch."""
    one = EpochBatchSampler(samples, global_batch, seed=3)
    assert [_order(one, e) for e in (0, 1)] == [_order(EpochBatchSampler(samples, global_batch, seed=3), e)
                                               for e in (0, 1)]
    assert _order(one, 0) != _order(EpochBatchSampler(samples, global_batch, seed=4), 0)
    assert one.steps_per_epoch == samples // global_batch
    for world in (2, 3, 4):
        if global_batch % world:
            continue
        ranks = [EpochBatchSampler(samples, global_batch // world, seed=3, rank=r, world=world)
                 for r in range(world)]
        assert [r.steps_per_epoch for r in ranks] == [one.steps_per_epoch] * world, f"world {world}"
        for epoch in (0, 1):
            for step, global_ in enumerate(one.epoch_batches(epoch)):
                local = [item for r in ranks for item in r.epoch_batches(epoch)[step]]
                assert sorted(local) == sorted(global_), f"world {world}, epoch {epoch}, step {step}"


def test_sampler_stream_resumes_mid_epoch():
    one = EpochBatchSampler(10, 4, seed=1)
    stream = iter(EpochBatchSampler(10, 4, seed=1, start=(1, 1)))
    assert next(stream) == one.epoch_batches(1)[1] and next(stream) == one.epoch_batches(2)[0]


def test_optimizer_groups_follow_open_clip_decay_rule(tiny_clip_config):
    from rdkd.losses import DistillLoss
    from rdkd.models import create_student

    model = create_student(str(tiny_clip_config)).model
    loss = DistillLoss.from_preset("cliprd", student_dim=32, teacher_dim=48)
    groups = {g["name"]: g for g in build_optimizer(model, loss, 1e-3, 0.1).param_groups}
    ids = {name: {id(p) for p in g["params"]} for name, g in groups.items()}
    assert id(model.logit_scale) in ids["student_no_decay"]
    assert id(model.visual.conv1.weight) in ids["student_decay"]
    assert id(model.ln_final.weight) in ids["student_no_decay"]
    link = loss.teachers[0]
    assert id(link.head_img.weight) in ids["loss_decay"]
    assert {id(link.scale_img), id(link.scale_cross), id(link.head_img.bias)} <= ids["loss_no_decay"]
    assert groups["loss_no_decay"]["weight_decay"] == 0 and groups["student_decay"]["weight_decay"] == 0.1
    opt = groups["student_decay"]
    assert opt["betas"] == (0.9, 0.98) and opt["eps"] == 1e-6
    n_params = sum(1 for _ in model.parameters()) + sum(1 for _ in loss.parameters())
    assert sum(len(g) for g in ids.values()) == n_params


def test_warmup_then_cosine():
    f = WarmupCosine(warmup=4, total=12)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0 and f(8) == pytest.approx(0.5) and f(12) == pytest.approx(0.0)


# --- bad input: one line, exit 2, nothing overwritten ---------------------------------------


@pytest.mark.parametrize("flags, says", [
    (["--loss", "nope"], "unknown loss preset"),
    (["--weight", "vrdd=1"], "unknown loss term"),
    (["--weight", "fd"], "TERM=NUMBER"),
    (["--scale-param", "log"], "unknown scale_param"),
    (["--student", "ViT-Nope-99"], "ViT-Nope-99"),
    (["--cache", None], "give its embedding cache"),
    pytest.param(["--precision", "fp16"], "CUDA", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="fp16 is refused only without CUDA")),
])
def test_bad_options_exit_2_with_one_line(flags, says, tmp_path, capsys, csv_dataset, teacher_cache, tiny_vit):
    argv = ["train-student", "--data", csv_dataset.path, "--cache", str(teacher_cache),
            "--student", tiny_vit, "--loss", "cliprd", "--steps", "2", "--out", str(tmp_path / "run")]
    for flag, value in zip(flags[::2], flags[1::2]):
        if value is None:  # drop the option
            del argv[argv.index(flag):argv.index(flag) + 2]
        elif flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    code, err = run_cli(argv, capsys)
    assert code == 2 and says in _one_error_line(err)
    assert not (tmp_path / "run").exists()


def test_cache_of_another_dataset_is_refused(tmp_path, capsys, wds_dataset, teacher_cache, tiny_vit):
    code, err = run_cli(["train-student", "--data", wds_dataset.path, "--cache", str(teacher_cache),
                      "--student", tiny_vit, "--steps", "2", "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and "another dataset" in _one_error_line(err)
    assert not (tmp_path / "run").exists()


def test_damaged_cache_is_refused(tmp_path, capsys, csv_dataset, teacher_cache, tiny_vit):
    import shutil

    damaged = tmp_path / "cache"
    shutil.copytree(teacher_cache, damaged)
    shard = sorted((damaged / "images").glob("*.arrow"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    code, err = run_cli(["train-student", "--data", csv_dataset.path, "--cache", str(damaged),
                         "--student", tiny_vit, "--steps", "2", "--batch-size", "4", "--workers", "1",
                         "--out", str(tmp_path / "run")], capsys)
    line = _one_error_line(err)  # found in a DataLoader worker: still one line
    assert code == 2 and "damaged" in line and f"images/{shard.name} does not match its sha256" in line
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_resume_of_another_run_is_refused_and_overwrites_nothing(
        tmp_path, capsys, csv_dataset, teacher_cache, tiny_vit, tiny_resnet):
    run = tmp_path / "run"
    train_student(csv_dataset, tiny_vit, "cliprd", teacher_cache, steps=2, out=run, **FAST)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    base = ["train-student", "--data", csv_dataset.path, "--cache", str(teacher_cache),
            "--steps", "2", "--batch-size", "4", "--warmup", "1", "--lr", "0.002",
            "--workers", "0", "--resume", str(run)]
    code, err = run_cli(base + ["--student", tiny_resnet, "--loss", "cliprd"], capsys)
    assert code == 2 and "student" in _one_error_line(err)
    code, err = run_cli(base + ["--student", tiny_vit, "--loss", "clipkd"], capsys)
    assert code == 2 and "method" in _one_error_line(err)
    code, err = run_cli(["train-student", "--data", csv_dataset.path, "--cache", str(teacher_cache),
                      "--student", tiny_vit, "--steps", "2", "--batch-size", "4", "--out", str(run)], capsys)
    assert code == 2 and "already holds" in _one_error_line(err)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


# --- torchrun --------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Bounds of the torchrun test: each rank stops itself (SIGALRM) before the launcher's
# timeout, and the launcher is stopped (SIGTERM: torchrun ends its ranks) when it runs over.
RANK_ALARM_S = 150
TORCHRUN_TIMEOUT_S = 180


def _run_torchrun(args: list[str], env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=TORCHRUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        pytest.fail(f"torchrun ran over {TORCHRUN_TIMEOUT_S} s:\n{out[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out)


@pytest.fixture(scope="module")
def wide_teacher_cache(tmp_path_factory, csv_dataset) -> Path:
    """A second teacher's cache of the CSV dataset (another seed, 40-d embeddings), cut into
    shards of 5 images: with `teacher_cache`, an ensemble whose rows differ per cache."""
    from rdkd.cache import ViewConfig
    from rdkd.stages.extract_teacher import extract_teacher

    root = tmp_path_factory.mktemp("wide-teacher")
    wide = builders.write_tiny_clip(root / "model", seed=1, config={**builders.TINY_CLIP_CONFIG, "embed_dim": 40})
    extract_teacher(csv_dataset, wide, root / "cache", views=ViewConfig(count=3), batch_size=8, workers=0,
                    storage_dtype="float32", progress=False, rows_per_shard=5)
    return root / "cache"


@pytest.mark.slow
@pytest.mark.parametrize("teachers", [1, 2], ids=["one-teacher", "two-teachers"])
def test_two_processes_take_the_step_of_one(tmp_path, csv_dataset, teacher_cache, wide_teacher_cache, tiny_vit,
                                            teachers):
    """torchrun, 2 gloo processes x batch 2 vs 1 process x batch 4, one step from the same
    init on the same global batch: the same logged loss and terms, and the same gradient of
    every parameter (with one teacher, and with an ensemble of two caches of other widths). After one AdamW step exp_avg = (1 - beta1) * grad exactly, so each
    checkpoint's optimizer state holds the step's gradient (DDP's average of the gathered
    batch's backward on 2 ranks). Float rounding differs between the two (another reduction
    order); a wiring bug (a rank's own batch only, a missing gather gradient, a doubled
    average) moves gradients by a sizeable fraction of their scale."""
    caches = [str(teacher_cache), str(wide_teacher_cache)][:teachers]
    script = tmp_path / "run_train.py"
    script.write_text(
        "import signal, sys, torch\n"
        f"signal.alarm({RANK_ALARM_S})\n"
        "torch.set_num_threads(1)\n"
        "from rdkd.data import DataSpec\n"
        "from rdkd.stages.train_student import train_student\n"
        f"train_student(DataSpec({csv_dataset.path!r}), {tiny_vit!r}, 'cliprd', {caches!r},\n"
        "    steps=1, batch_size=4, workers=0, progress=False, lr=2e-3, warmup=1, device='cpu', out=sys.argv[1])\n"
    )
    one, two = tmp_path / "one", tmp_path / "two"
    train_student(csv_dataset, tiny_vit, "cliprd", caches, steps=1, out=one, device="cpu", **FAST)
    proc = _run_torchrun(["--nproc_per_node", "2", "--master_port", str(_free_port()), str(script), str(two)],
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert json.loads((two / "run.json").read_text())["world_size"] == 2

    [logged_one], [logged_two] = _metrics(one), _metrics(two)
    for key in [k for k in logged_one if k == "loss" or k.startswith("loss/")]:
        assert logged_two[key] == pytest.approx(logged_one[key], rel=1e-5, abs=1e-6), key

    a = torch.load(one / "checkpoints" / "step-00000001.pt", weights_only=True)["optimizer"]
    b = torch.load(two / "checkpoints" / "step-00000001.pt", weights_only=True)["optimizer"]
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys(), "parameters without a gradient in one of the runs"
    beta1 = {i: g["betas"][0] for g in a["param_groups"] for i in g["params"]}
    grads_one = {i: s["exp_avg"] / (1 - beta1[i]) for i, s in a["state"].items()}
    grads_two = {i: s["exp_avg"] / (1 - beta1[i]) for i, s in b["state"].items()}
    largest = max(float(g.abs().max()) for g in grads_one.values())
    worst = {}
    for i, g in grads_one.items():
        # relative to the parameter's own gradient scale, with a floor at 1e-6 of the largest
        # gradient for parameters whose gradient is rounding noise (attention key biases: zero
        # in exact arithmetic, softmax is shift-invariant)
        scale = max(float(g.abs().max()), 1e-6 * largest)
        worst[i] = float((grads_two[i] - g).abs().max()) / scale
    bad = {i: (tuple(grads_one[i].shape), round(w, 4)) for i, w in worst.items() if w > 1e-3}
    assert not bad, f"gradients of parameters {bad} (index: shape, max difference / scale) differ " \
                    f"between 1 and 2 processes"


def test_init_from_an_rdkd_checkpoint_and_pickled_workers(tmp_path, csv_dataset, teacher_cache, tiny_vit):
    """--init accepts a train-student checkpoint (lr 0: the weights stay those), and the
    dataset survives pickling (spawn/forkserver workers) with the same samples."""
    import pickle

    from rdkd.cache import TeacherCache
    from rdkd.data import open_dataset
    from rdkd.models import create_student
    from rdkd.training import ImageCfg

    first = tmp_path / "first"
    train_student(csv_dataset, tiny_vit, "cliprd", teacher_cache, steps=2, out=first, **FAST)
    start = torch.load(first / "checkpoints" / "step-00000002.pt", weights_only=True)["model"]
    second = tmp_path / "second"
    train_student(csv_dataset, tiny_vit, "clip", steps=1, out=second, init=first / "checkpoints" / "step-00000002.pt",
                  **{**FAST, "lr": 0.0})
    after = torch.load(second / "checkpoints" / "step-00000001.pt", weights_only=True)["model"]
    assert all(torch.equal(start[k], after[k]) for k in start)

    student = create_student(tiny_vit)
    pairs = PairDataset(open_dataset(csv_dataset), student.tokenizer, ImageCfg.of_model(student.model),
                        seed=0, caches=[TeacherCache.open(teacher_cache)])
    copy = pickle.loads(pickle.dumps(pairs))
    for item in [(0, 0), (2, 5)]:
        a, b = pairs[[item]], copy[[item]]
        assert torch.equal(a["image"], b["image"]) and a["image_row"] == b["image_row"]
