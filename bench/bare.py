"""P8 references: the speed of the models alone, which the stages' rates are divided by.

Two figures, each on random inputs already on the device (no loader, no disk), in one
process, printed as JSON lines (one per figure and batch size) on stdout:

- ``student_step``: the training step of ``rdkd train-student`` on its own: uint8 pixels
  normalised on the device (:class:`rdkd.runtime.DeviceNormalize`), the student's forward
  under autocast, the CLIP-RD loss (``DistillLoss.from_preset("cliprd")`` against random
  L2-normalised teacher rows held in float16, as the cache stores them), backward, fused
  AdamW (:func:`rdkd.training.build_optimizer`) and the logit-scale clamp. samples/s.
- ``teacher_forward``: the teacher's image + text encode under ``inference_mode`` and
  autocast, L2-normalised, as ``rdkd extract-teacher`` runs it (pixels normalised on the
  device). images/s.

Each figure: ``--warmup`` untimed steps, then ``--repeats`` timed runs of ``--steps`` steps
(the device synchronised before and after each timed run, not inside it); the rate is the
median of the runs, with min and max. Two input sets alternate, so no step reads exactly
what the one before it read. Models are random-init open_clip models built by rdkd's own
factory (the speed of a model does not depend on its weights).

    python bench/bare.py                                      # CUDA, bf16, ViT-T-16 / ViT-B-16, batch 256 and 1024
    python bench/bare.py --device cpu --precision fp32 --student demo-student-vit \\
        --teacher demo-teacher-vit --batches 8,16 --warmup 1 --steps 2 --repeats 2   # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from typing import Callable, Iterator

import open_clip
import torch
import torch.nn.functional as F

from rdkd import runtime
from rdkd.losses import DistillLoss
from rdkd.models import ModelSpec, create_student, load_clip
from rdkd.training import ImageCfg, build_optimizer

INPUT_SETS = 2


def timed(step: Callable[[int], None], device: torch.device, warmup: int, steps: int,
          repeats: int) -> list[float]:
    """Seconds of ``repeats`` runs of ``steps`` calls of ``step(i)`` after ``warmup`` calls;
    the device is drained before and after each timed run only."""
    for i in range(warmup):
        step(i)
    runs = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        for i in range(steps):
            step(i)
        _synchronize(device)
        runs.append(time.perf_counter() - start)
    return runs


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_pixels(batch: int, size: tuple[int, int], device: torch.device, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 256, (batch, 3, *size), dtype=torch.uint8, generator=gen).to(device)


def random_tokens(batch: int, context: int, vocab: int, device: torch.device, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(1, vocab, (batch, context), dtype=torch.long, generator=gen).to(device)


def random_rows(batch: int, dim: int, device: torch.device, gen: torch.Generator) -> torch.Tensor:
    return F.normalize(torch.randn(batch, dim, generator=gen), dim=-1).to(torch.float16).to(device)


def student_step_rates(args: argparse.Namespace, device: torch.device, batches: list[int],
                       teacher_dim: int) -> Iterator[dict]:
    """samples/s of the bare training step at each batch size (see the module docstring);
    one student, loss and optimizer for all of them."""
    torch.manual_seed(args.seed)
    built = create_student(args.student, device=device)
    model = built.model
    loss = DistillLoss.from_preset("cliprd", student_dim=built.embed_dim, teacher_dim=teacher_dim).to(device)
    optimizer = build_optimizer(model, loss, 1e-3, 0.1, fused=True)
    image_cfg = ImageCfg.of_model(model)
    normalize = runtime.DeviceNormalize(image_cfg.mean, image_cfg.std, device)
    vocab = built.model_config["text_cfg"].get("vocab_size", 49408)
    t_scale = torch.tensor(1 / 0.07, device=device)  # a random-init teacher's logit scale
    max_log_scale = math.log(100)
    model.train()
    for batch in batches:
        gen = torch.Generator().manual_seed(args.seed)
        inputs = [(random_pixels(batch, image_cfg.size, device, gen),
                   random_tokens(batch, built.context_length, vocab, device, gen),
                   random_rows(batch, teacher_dim, device, gen), random_rows(batch, teacher_dim, device, gen))
                  for _ in range(INPUT_SETS)]

        def step(i: int) -> None:
            pixels, tokens, t_img, t_txt = inputs[i % INPUT_SETS]
            with runtime.autocast(device, args.precision):
                output = model(normalize(pixels), tokens)
            s_img, s_txt = ((output["image_features"], output["text_features"]) if isinstance(output, dict)
                            else output[:2])
            total, _ = loss(t_img.float(), t_txt.float(), s_img.float(), s_txt.float(), model.logit_scale, t_scale)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, max_log_scale)

        yield _record("student_step", "samples/s", args.student, batch, device, args,
                      timed(step, device, args.warmup, args.steps, args.repeats))
        del inputs


def teacher_forward_rates(args: argparse.Namespace, device: torch.device, batches: list[int]) -> Iterator[dict]:
    """images/s of the bare teacher forward, image + text, at each batch size (see the
    module docstring); one teacher for all of them."""
    torch.manual_seed(args.seed)
    loaded = load_clip(ModelSpec(name=args.teacher), device=device)
    model = loaded.model
    image_cfg = ImageCfg.of_model(model)
    normalize = runtime.DeviceNormalize(image_cfg.mean, image_cfg.std, device)
    vocab = loaded.model_config["text_cfg"].get("vocab_size", 49408)
    for batch in batches:
        gen = torch.Generator().manual_seed(args.seed)
        inputs = [(random_pixels(batch, image_cfg.size, device, gen),
                   random_tokens(batch, loaded.context_length, vocab, device, gen)) for _ in range(INPUT_SETS)]

        def step(i: int) -> None:
            pixels, tokens = inputs[i % INPUT_SETS]
            with torch.inference_mode(), runtime.autocast(device, args.precision):
                F.normalize(model.encode_image(normalize(pixels)).float(), dim=-1)
                F.normalize(model.encode_text(tokens).float(), dim=-1)

        yield _record("teacher_forward", "images/s", args.teacher, batch, device, args,
                      timed(step, device, args.warmup, args.steps, args.repeats))
        del inputs


def _record(figure: str, unit: str, model: str, batch: int, device: torch.device,
            args: argparse.Namespace, seconds: list[float]) -> dict:
    rates = [args.steps * batch / s for s in seconds]
    record = {"figure": figure, "model": model, "batch": batch, "unit": unit,
              "rate": statistics.median(rates), "rate_min": min(rates), "rate_max": max(rates),
              "steps": args.steps, "repeats": args.repeats, "warmup": args.warmup,
              "device": str(device), "precision": args.precision}
    if device.type == "cuda":  # the model's and this batch's (the previous batch's inputs are freed)
        record["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
    return record


def teacher_dim_of(name: str) -> int:
    """The teacher's embedding width from its open_clip config (rdkd's configs included)."""
    config = open_clip.get_model_config(name)
    if config is None:
        raise SystemExit(f"error: no open_clip model config named {name!r}")
    return int(config["embed_dim"])


def cpu_name() -> str:
    """The processor's model name from /proc/cpuinfo (Linux), else what platform says."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precision", default="bf16", help="fp32, bf16 or fp16 (autocast)")
    parser.add_argument("--student", default="ViT-T-16", help="student model name or config JSON")
    parser.add_argument("--teacher", default="ViT-B-16", help="teacher open_clip model name (random init)")
    parser.add_argument("--batches", default="256,1024", help="comma-separated batch sizes")
    parser.add_argument("--figures", default="student_step,teacher_forward", help="which figures, comma-separated")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before timing")
    parser.add_argument("--steps", type=int, default=15, help="steps per timed run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs; the rate is their median")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = runtime.resolve_device(args.device)
    runtime.check_precision(args.precision, device)
    batches = [int(b) for b in args.batches.split(",") if b]
    figures = [f for f in args.figures.split(",") if f]
    unknown = set(figures) - {"student_step", "teacher_forward"}
    if unknown:
        raise SystemExit(f"error: unknown figure(s) {', '.join(sorted(unknown))}")
    print(json.dumps({"figure": "machine", "device": str(device),
                      "name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
                      "torch": torch.__version__, "open_clip": open_clip.__version__,
                      "python": platform.python_version(), "threads": torch.get_num_threads()}), flush=True)
    for figure in figures:
        records = (student_step_rates(args, device, batches, teacher_dim_of(args.teacher))
                   if figure == "student_step" else teacher_forward_rates(args, device, batches))
        for record in records:
            print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
