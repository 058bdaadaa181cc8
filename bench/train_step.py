"""P1, P2, P4: what a distillation step costs when the teacher comes from the cache.

One run, one process, the same student, batch and data throughout:

- P1 = step time of ``rdkd train-student --loss cliprd --cache ...`` / step time of
  ``--loss clip`` without a cache (plain student training with open_clip's augmentation).
  Both are full ``train_student`` runs (data loading in the process (``workers=0``), view
  replay, cache reads, logging, AdamW). A step's cost is the process CPU time of a run of
  ``--steps`` steps minus that of a run of ``--skip`` steps, divided by the difference:
  set-up, warm-up and export cancel, and CPU time is what the step costs even on a machine
  shared with other jobs (wall time there is noisy; the median wall-clock step time of
  the long runs, from their metrics.jsonl, is printed too). Target <= 1.10.
- P2 = step time of online distillation (a ViT-B-32-size teacher, random init, runs on
  every step on the student's batch, as CLIP-KD and CLIP-RD train) / step time of the same
  loop reading the teacher embeddings from the cache. Both loops are the stage's step
  (student forward, CLIP-RD loss, backward, AdamW) on the same batches, timed per step in
  process CPU time (first ``--skip`` steps dropped).
- P15 = step time of ``--loss cliprd --cache A --cache B`` (an ensemble of two teachers'
  caches, ``--teacher`` and ``--second-teacher``, of other widths) / step time of
  ``--cache A`` alone: full ``train_student`` runs measured as P1's.
- P4 = teacher forwards while a student trains from an existing cache: the stage's
  ``teacher_forwards`` counter (open_clip module calls outside the student); the online
  loop's count is printed beside it to show the counter sees a teacher.

Figures are medians over ``--repeats`` interleaved repetitions, with min-max. On CUDA
(``--device cuda``) CPU time does not measure the GPU: there the wall-clock figures
(synchronised by the per-step loss read-out) are the ones to use. The dataset is generated (``--images`` JPEGs of 256 x 256 with one caption each,
seeded), and so is the cache: the teacher runs once over it before timing.

    python bench/train_step.py                                  # CPU defaults, ~3 min on 2 cores
    python bench/train_step.py --device cuda --batch 256 --images 4096 --threads 8
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from rdkd.cache import TeacherCache, ViewConfig
from rdkd.data import DataSpec, open_dataset
from rdkd.losses import DistillLoss
from rdkd.models import ModelSpec, create_student, load_clip
from rdkd.stages.extract_teacher import extract_teacher
from rdkd.stages.train_student import train_student
from rdkd.runtime import DeviceNormalize
from rdkd.training import EpochBatchSampler, ImageCfg, PairDataset, TeacherForwardCounter, build_optimizer

SHIPPED_STUDENT = str(Path(__file__).resolve().parents[1] / "pipeline" / "model_configs" / "ViT-T-16.json")


def write_dataset(root: Path, images: int, seed: int = 0, size: int = 256) -> DataSpec:
    """``images`` seeded JPEGs (smooth colour gradients plus noise) in an open_clip TSV."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "images").mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    rows = ["filepath\ttitle"]
    for i in range(images):
        base, slope = rng.uniform(0, 255, 3), rng.uniform(-1, 1, (3, 2))
        pixels = np.stack([base[c] + slope[c, 0] * xx + slope[c, 1] * yy for c in range(3)], -1)
        pixels += rng.normal(0, 10, pixels.shape)
        buffer = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
        (root / "images" / f"{i:06d}.jpg").write_bytes(buffer.getvalue())
        rows.append(f"images/{i:06d}.jpg\ta generated picture number {i} with colour {int(base[0])}")
    (root / "data.tsv").write_text("\n".join(rows) + "\n")
    return DataSpec(str(root / "data.tsv"))


def stage_step_times(run: Path, skip: int) -> list[float]:
    """Seconds per step of a train_student run logged every step, from its metrics.jsonl."""
    records = [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    return [r["step_s"] for r in records[skip:]]


def loop_step_times(spec: DataSpec, cache: TeacherCache, student: str, teacher, batch: int,
                    steps: int, skip: int, device: torch.device, seed: int) -> tuple[list[float], int]:
    """The stage's step (student forward, CLIP-RD loss, backward, AdamW) in a plain loop, with
    teacher embeddings from ``teacher`` (a model run on every batch: online distillation) or,
    when ``teacher`` is None, from ``cache``. (seconds per timed step, teacher module calls)."""
    torch.manual_seed(seed)
    built = create_student(student, device=device)
    model = built.model
    loss = DistillLoss.from_preset("cliprd", student_dim=built.embed_dim, teacher_dim=cache.dim).to(device)
    optimizer = build_optimizer(model, loss, 1e-4, 0.1)
    image_cfg = ImageCfg.of_model(model)
    pairs = PairDataset(open_dataset(spec), built.tokenizer, image_cfg, seed, caches=[cache])
    loader = torch.utils.data.DataLoader(pairs, sampler=EpochBatchSampler(len(pairs), batch, seed),
                                         batch_size=None, num_workers=0)
    normalize = DeviceNormalize(image_cfg.mean, image_cfg.std, device)
    t_scale = torch.tensor(cache.logit_scale, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    times = []
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    with TeacherForwardCounter(model, loss) as counter:
        batches = iter(loader)
        for _ in range(steps):
            start = clock()
            b = next(batches)
            images, texts = normalize(b["image"].to(device)), b["text"].to(device)
            if teacher is None:
                t_img, t_txt = b["t_img"].to(device).float(), b["t_txt"].to(device).float()
            else:
                with torch.no_grad(), autocast:
                    t_img = teacher.encode_image(images, normalize=True).float()
                    t_txt = teacher.encode_text(texts, normalize=True).float()
            with autocast:
                s_img, s_txt, _ = model(images, texts)
            total, _ = loss(t_img, t_txt, s_img.float(), s_txt.float(), model.logit_scale, t_scale)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            total.item()  # wait for the step to finish, so that the clock measures it
            times.append(clock() - start)
    return times[skip:], counter.count


def summary(times: list[float]) -> str:
    return f"{statistics.median(times) * 1e3:.1f} ms (min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f}, n={len(times)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", default=SHIPPED_STUDENT, help="student model name or config JSON (default: shipped ViT-T-16)")
    parser.add_argument("--teacher", default="ViT-B-32", help="open_clip teacher architecture, random init")
    parser.add_argument("--second-teacher", default="RN50",
                        help="the ensemble's second teacher (P15), random init; '' to skip P15")
    parser.add_argument("--batch", type=int, default=8, help="batch size")
    parser.add_argument("--images", type=int, default=24, help="generated dataset size")
    parser.add_argument("--views", type=int, default=2, help="views per image in the cache")
    parser.add_argument("--steps", type=int, default=6, help="steps of the long runs")
    parser.add_argument("--skip", type=int, default=2, help="steps of the short runs (P1) / warm-up steps dropped (P2)")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved repetitions of each measurement")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    with tempfile.TemporaryDirectory(prefix="rdkd-bench-train-") as tmp:
        tmp = Path(tmp)
        spec = write_dataset(tmp / "data", args.images, args.seed)
        teacher_spec = ModelSpec(name=args.teacher)
        start = time.perf_counter()
        extract_teacher(spec, teacher_spec, tmp / "cache", views=ViewConfig(count=args.views, seed=args.seed),
                        batch_size=16, workers=1, device=args.device, storage_dtype="float16", progress=False)
        extract_s = time.perf_counter() - start
        cache = TeacherCache.open(tmp / "cache")
        # P1, P15 and P4: the stage itself, clip without a cache, cliprd from the cache, and
        # cliprd from two caches, interleaved. name -> (preset, caches)
        runs = {"clip": ("clip", []), "cliprd": ("cliprd", [tmp / "cache"])}
        if args.second_teacher:
            extract_teacher(spec, ModelSpec(name=args.second_teacher), tmp / "cache-b",
                            views=ViewConfig(count=args.views, seed=args.seed), batch_size=16, workers=1,
                            device=args.device, storage_dtype="float16", progress=False)
            runs["ensemble"] = ("cliprd", [tmp / "cache", tmp / "cache-b"])

        p1 = {name: [] for name in runs}
        p1_wall = {name: [] for name in runs}
        forwards = []
        for r in range(args.repeats):
            cpu = {}
            for steps in (args.skip, args.steps):
                for name, (preset, caches) in runs.items():
                    run = tmp / f"{name}-{steps}-{r}"
                    start = time.perf_counter() if device.type == "cuda" else time.process_time()
                    info = train_student(spec, args.student, preset, caches,
                                         steps=steps, batch_size=args.batch, workers=0, device=args.device,
                                         precision="bf16" if device.type == "cuda" else "fp32",
                                         seed=args.seed, out=run, progress=False, warmup=0, log_every=1)
                    cpu[name, steps] = (time.perf_counter() if device.type == "cuda" else time.process_time()) - start
                    forwards.append(info["teacher_forwards"])
                    if steps == args.steps:
                        p1_wall[name] += stage_step_times(run, args.skip)
            for name in p1:
                p1[name].append((cpu[name, args.steps] - cpu[name, args.skip]) / (args.steps - args.skip))

        # P2: online teacher vs cache in the same loop.
        teacher = load_clip(teacher_spec, device=device).model
        p2 = {"cache": [], "online": []}
        online_calls = 0
        for r in range(args.repeats):
            t, _ = loop_step_times(spec, cache, args.student, None, args.batch, args.steps, args.skip, device, args.seed)
            p2["cache"] += t
            t, calls = loop_step_times(spec, cache, args.student, teacher, args.batch, args.steps, args.skip, device, args.seed)
            p2["online"] += t
            online_calls += calls

    med = {k: statistics.median(v) for k, v in {**p1, **{f"p2_{k}": v for k, v in p2.items()}}.items()}
    clock = "wall-clock" if device.type == "cuda" else "CPU"
    print(f"machine: {torch.get_num_threads()} torch thread(s), device {device}; student {Path(args.student).stem}, "
          f"teacher {args.teacher} (random init), batch {args.batch}, {args.images} images, {args.views} views; "
          f"cache extraction {extract_s:.1f} s")
    print(f"clip (no cache)          step, {clock}: {summary(p1['clip'])}; wall-clock {summary(p1_wall['clip'])}")
    print(f"cliprd (from cache)      step, {clock}: {summary(p1['cliprd'])}; wall-clock {summary(p1_wall['cliprd'])}")
    print(f"P1 = cliprd / clip            = {med['cliprd'] / med['clip']:.3f}   (target <= 1.10; "
          f"wall-clock medians: {statistics.median(p1_wall['cliprd']) / statistics.median(p1_wall['clip']):.3f})")
    if "ensemble" in p1:
        print(f"cliprd (two caches)      step, {clock}: {summary(p1['ensemble'])}; "
              f"wall-clock {summary(p1_wall['ensemble'])}")
        print(f"P15 = two caches / one cache = {med['ensemble'] / med['cliprd']:.3f}   (wall-clock medians: "
              f"{statistics.median(p1_wall['ensemble']) / statistics.median(p1_wall['cliprd']):.3f}; "
              f"second teacher {args.second_teacher})")
    print(f"loop, teacher from cache step, {clock}: {summary(p2['cache'])}")
    print(f"loop, online teacher     step, {clock}: {summary(p2['online'])}")
    print(f"P2 = online / cache           = {med['p2_online'] / med['p2_cache']:.2f}")
    print(f"P4 teacher forwards while training from the cache: {sum(forwards)} "
          f"(the same counter saw {online_calls} teacher module calls in the online loop)")


if __name__ == "__main__":
    main()
