"""rdkd train-student: training from a teacher cache, resume, divergence, export, bad input.

Tiny models (32 px, 2 layers) on the 12 standard samples; every run is a few steps on CPU.
"""

from __future__ import annotations

import dataclasses
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
from rdkd.training import EpochBatchSampler, PairDataset, WarmupCosine, build_optimizer

# Tiny students with another embedding size than the tiny teacher's 32, so the loss's
# projection heads are used: a ViT and an open_clip ModifiedResNet (layers as a list).
TINY_VIT = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
TINY_RESNET = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
FAST = dict(batch_size=4, workers=0, progress=False, lr=2e-3, warmup=1, log_every=1)


def _config(tmp_path: Path, name: str, config: dict) -> str:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(config))
    return str(path)


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory) -> str:
    return _config(tmp_path_factory.mktemp("students"), "tiny-vit", TINY_VIT)


@pytest.fixture(scope="module")
def tiny_resnet(tmp_path_factory) -> str:
    return _config(tmp_path_factory.mktemp("students"), "tiny-resnet", TINY_RESNET)


@pytest.fixture(scope="module")
def teacher_cache(tmp_path_factory, tiny_teacher, csv_dataset) -> Path:
    """A float32 cache of the tiny teacher over the CSV dataset: 3 views per image."""
    from rdkd.cache import ViewConfig
    from rdkd.stages.extract_teacher import extract_teacher

    out = tmp_path_factory.mktemp("cache") / "cache"
    extract_teacher(csv_dataset, tiny_teacher, out, views=ViewConfig(count=3), batch_size=8,
                    workers=0, storage_dtype="float32", progress=False)
    return out


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


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
                        seed=3, cache=cache)
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
        assert state["loss"]["head_img.weight"].shape == (32, 24)


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


def test_resume_equals_uninterrupted_run(tmp_path, monkeypatch, csv_dataset, teacher_cache, tiny_vit):
    """7 steps straight vs interrupted after the step-4 checkpoint (mid-epoch: 3 steps per
    epoch) and resumed with DataLoader workers: identical weights, loss state and optimizer."""
    import rdkd.stages.train_student as stage

    args = dict(steps=7, save_every=2, **{**FAST, "lr": 1e-3})
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

    a = torch.load(straight / "checkpoints" / "step-00000007.pt", weights_only=True)
    b = torch.load(interrupted / "checkpoints" / "step-00000007.pt", weights_only=True)
    for part in ("model", "loss"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    assert [m["loss"] for m in _metrics(straight)] == [m["loss"] for m in _metrics(interrupted)]


def test_nan_loss_stops_naming_step_and_term_and_keeps_checkpoint(
        tmp_path, monkeypatch, capsys, csv_dataset, teacher_cache, tiny_vit):
    import rdkd.losses as losses

    real = losses.TERMS["xrd"]
    calls = []

    def xrd_goes_nan(rel, scales):
        calls.append(1)
        value = real.compute(rel, scales)
        return value * float("nan") if len(calls) >= 3 else value

    monkeypatch.setitem(losses.TERMS, "xrd", dataclasses.replace(real, compute=xrd_goes_nan))
    run = tmp_path / "run"
    code, err = run_cli(["train-student", "--data", csv_dataset.path, "--cache", str(teacher_cache),
                      "--student", tiny_vit, "--loss", "cliprd", "--steps", "6", "--batch-size", "4",
                      "--save-every", "2", "--workers", "0", "--no-progress", "--out", str(run)], capsys)
    line = _one_error_line(err)
    assert code == 3 and "xrd" in line and "step 3" in line and "step-00000002.pt" in line
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000002.pt"]
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


def test_skips_and_counts_images_that_fail_to_decode(tmp_path, tiny_clip_config):
    samples = builders.standard_samples(8)
    samples[2] = dataclasses.replace(samples[2], data=b"not an image")
    spec = builders.write_csv_dataset(tmp_path / "data", samples)
    summary = train_student(spec, str(tiny_clip_config), "clip", steps=4, out=tmp_path / "run", **FAST)
    assert sum(summary["skipped"].values()) >= 1 and np.isfinite(summary["final_loss"])


# --- building blocks ------------------------------------------------------------------------


def test_sampler_is_deterministic_sharded_and_resumable():
    one = EpochBatchSampler(10, 4, seed=1)
    assert one.steps_per_epoch == 2
    epoch0, epoch1 = one.epoch_batches(0), one.epoch_batches(1)
    assert epoch0 == EpochBatchSampler(10, 4, seed=1).epoch_batches(0) and epoch0 != epoch1
    stream = iter(EpochBatchSampler(10, 4, seed=1, start=(1, 1)))
    assert next(stream) == epoch1[1] and next(stream) == one.epoch_batches(2)[0]
    ranks = [EpochBatchSampler(10, 2, seed=1, rank=r, world=2).epoch_batches(0) for r in (0, 1)]
    for step in range(2):  # the two ranks' batches form the 1-process global batch
        assert {p for r in ranks for p in r[step]} == set(EpochBatchSampler(10, 4, seed=1).epoch_batches(0)[step])


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
    assert id(loss.head_img.weight) in ids["loss_decay"]
    assert {id(loss.scale_img), id(loss.scale_cross), id(loss.head_img.bias)} <= ids["loss_no_decay"]
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
                      "--student", tiny_vit, "--steps", "2", "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and "damaged" in _one_error_line(err) and "sha256" in err


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


@pytest.mark.slow
def test_two_processes_end_with_the_weights_of_one(tmp_path, csv_dataset, teacher_cache, tiny_vit):
    """torchrun, 2 gloo processes x batch 2 vs 1 process x batch 4: the same global batches
    and the loss over the gathered batch, so the same weights (to float rounding)."""
    script = tmp_path / "run_train.py"
    script.write_text(
        "import sys, torch\n"
        "torch.set_num_threads(1)\n"
        "from rdkd.data import DataSpec\n"
        "from rdkd.stages.train_student import train_student\n"
        f"train_student(DataSpec({csv_dataset.path!r}), {tiny_vit!r}, 'cliprd', {str(teacher_cache)!r},\n"
        "    steps=3, batch_size=4, workers=0, progress=False, lr=2e-3, warmup=1, device='cpu', out=sys.argv[1])\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, str(script), str(one)], check=True, timeout=120, env=env)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", str(_free_port()), str(script), str(two)],
        timeout=180, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = torch.load(one / "checkpoints" / "step-00000003.pt", weights_only=True)
    b = torch.load(two / "checkpoints" / "step-00000003.pt", weights_only=True)
    for part in ("model", "loss"):
        for k in a[part]:
            one_proc, two_proc = a[part][k], b[part][k]
            if k.endswith("attn.in_proj_bias"):
                # The key bias has a zero gradient (softmax is shift-invariant): what it gets is
                # float rounding, which Adam normalises into lr-sized steps. Compare q and v.
                width = one_proc.shape[0] // 3
                keep = torch.cat([torch.arange(width), torch.arange(2 * width, 3 * width)])
                one_proc, two_proc = one_proc[keep], two_proc[keep]
            torch.testing.assert_close(two_proc, one_proc, atol=1e-5, rtol=0, msg=f"{part} {k}")
    assert json.loads((two / "run.json").read_text())["world_size"] == 2


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
                        seed=0, cache=TeacherCache.open(teacher_cache))
    copy = pickle.loads(pickle.dumps(pairs))
    for item in [(0, 0), (2, 5)]:
        a, b = pairs[[item]], copy[[item]]
        assert torch.equal(a["image"], b["image"]) and a["image_row"] == b["image_row"]
