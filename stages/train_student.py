"""Stage two: train a student against the cached teacher geometry (``rdkd train-student``).

The student sees the very views the teacher embedded (replayed from the cache's crop boxes
at the student's own size and normalisation) and one caption per image per step, and is
trained with a CLIP-RD loss preset over the global batch. The teacher is never loaded or
run: its embeddings come from the cache; global forward hooks count calls of open_clip
modules outside the student and the loss, reported as ``teacher_forwards`` (zero).

Output folder (default ``artifacts/students/<name>``)::

    checkpoints/step-NNNNNNNN.pt   full training state, every --save-every steps and at the end
    logs/metrics.jsonl             one JSON line per step: every loss term, lr, scales, samples/s
    logs/tb/                       TensorBoard events of the same scalars
    logs/skipped.jsonl             images that failed to decode: key, reason, step
    export/                        the student alone: weights + open_clip model-config JSON
    run.json                       what was trained (method, student, seed, steps, ...) and how it went

``logs/`` can live elsewhere (``log_dir``): the logs hold wall-clock times and host names,
everything else is a function of the inputs and the seed, byte for byte (run.json has no
timings; paths are recorded as given; every global RNG whose state a checkpoint records is
seeded), so a pipeline can hash the run folder and keep the logs out of the hash.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from rdkd.errors import UserError
from rdkd.training import (
    EpochBatchSampler,
    ImageCfg,
    LossNotFinite,
    MetricsLog,
    PairDataset,
    TeacherForwardCounter,
    build_optimizer,
    build_scheduler,
    collate_pairs,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)

CHECKPOINT_FORMAT = "rdkd-train-checkpoint/1"
PRECISIONS = ("fp32", "bf16", "fp16")
DEFAULT_ARTIFACTS = Path("artifacts")
# Caches up to this size are checksummed in full before training (seconds); bigger ones get
# a file-size check unless --verify-cache asks for the full one.
FULL_VERIFY_MAX_BYTES = 2 << 30
# Decode failures recorded by key in logs/skipped.jsonl (all are counted in run.json).
MAX_SKIPPED_RECORDS = 10_000
# Settings that shape the trajectory: a resumed run must agree on all of them.
RESUME_MUST_MATCH = ("student", "method", "weights", "scale_param", "seed", "global_batch", "total_steps",
                     "lr", "weight_decay", "warmup", "grad_clip", "precision",
                     "dataset_fingerprint", "cache_fingerprint")


def train_student(
    data: Any,
    student: str,
    loss: str = "cliprd",
    cache: str | Path | None = None,
    *,
    init: str | Path | None = None,
    weights: Sequence[str] | dict[str, float] | None = None,
    scale_param: str = "raw",
    epochs: int | None = None,
    steps: int | None = None,
    batch_size: int = 256,
    lr: float = 1e-3,
    weight_decay: float = 0.1,
    warmup: int | None = None,
    grad_clip: float | None = None,
    precision: str = "fp32",
    device: str = "auto",
    workers: int = 4,
    seed: int = 0,
    save_every: int = 1000,
    keep_checkpoints: int = 2,
    resume: str | Path | None = None,
    out: str | Path | None = None,
    log_dir: str | Path | None = None,
    verify_cache: bool | None = None,
    progress: bool = True,
) -> dict:
    """Train one student; return the run summary (also written to ``<out>/run.json``).

    ``data`` is a :class:`rdkd.data.DataSpec` or a dataset path; ``student`` an open_clip
    model name or a model-config JSON; ``loss`` a preset of :mod:`rdkd.losses` with
    ``weights`` overrides (``["fd=1000"]`` or ``{"fd": 1000}``); ``scale_param`` ``raw`` (the
    loss's scales a_I, a_T, a_X used as they are, as in the reference code) or ``exp`` (used
    as exp() clamped at 100, like CLIP's logit scale). ``batch_size`` is the
    global batch (split over torchrun ranks). Give ``epochs`` or ``steps``. ``warmup``
    defaults to CLIP-KD's 10k steps, capped at a tenth of a shorter run. ``resume``: a
    checkpoint file, or a run folder / its ``checkpoints`` folder (latest checkpoint).
    ``log_dir`` defaults to ``<out>/logs``.
    Raises :class:`UserError` for bad input before anything is written.
    """
    from rdkd import distributed, losses
    from rdkd.data import DataSpec, open_dataset
    from rdkd.models import create_student, export_clip

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA device is available here (use --device cpu)")
    dist = distributed.setup(None if device == "auto" else device)
    torch_device = torch.device(dist.device)
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and torch_device.type != "cuda":
        raise UserError("--precision fp16 needs a CUDA device (use bf16 or fp32 on CPU)")
    if batch_size % dist.world_size:
        raise UserError(f"--batch-size {batch_size} does not split over {dist.world_size} processes")
    if (epochs is None) == (steps is None):
        raise UserError("give exactly one of --epochs and --steps")
    overrides = dict(weights) if isinstance(weights, dict) else losses.parse_weight_overrides(weights)
    term_weights = losses.weights_for(loss, overrides)
    needs_teacher = any(losses.TERMS[name].uses_teacher for name in term_weights)

    # --- data and cache: joined by key, checked before anything is written ---------------
    spec = data if isinstance(data, DataSpec) else DataSpec(str(data))
    dataset = open_dataset(spec)
    teacher_cache = None
    if cache is not None:
        from rdkd.cache import TeacherCache

        teacher_cache = TeacherCache.open(Path(cache))
        if teacher_cache.dataset_fingerprint != dataset.fingerprint:
            raise UserError(f"cache {cache} was made from another dataset (fingerprint "
                            f"{teacher_cache.dataset_fingerprint[:12]} != {dataset.fingerprint[:12]} of {spec.path})")
        _verify_cache(teacher_cache, verify_cache)
    if needs_teacher and teacher_cache is None:
        raise UserError(f"--loss {loss} distils from a teacher: give its embedding cache with --cache")

    # --- student --------------------------------------------------------------------------
    torch.manual_seed(seed)  # the random init of the student and the loss's heads
    random.seed(seed)  # unused by training, but their states go into every checkpoint
    np.random.seed(seed)
    init_state = _rdkd_checkpoint_model(Path(init)) if init is not None else None
    built = create_student(student, init=None if init is None or init_state is not None else str(init),
                           device=torch_device)
    model, model_config, tokenizer = built.model, built.model_config, built.tokenizer
    if init_state is not None:
        try:
            model.load_state_dict(init_state)
        except RuntimeError as err:
            raise UserError(f"--init {init}: its weights do not fit {student}: "
                            f"{str(err).splitlines()[0]}") from None
    image_cfg = ImageCfg.of_model(model)
    student_dim = built.embed_dim
    teacher_dim = teacher_cache.dim if teacher_cache is not None else student_dim
    loss_module = losses.DistillLoss(term_weights, student_dim=student_dim, teacher_dim=teacher_dim,
                                     scale_param=scale_param).to(torch_device)

    pairs = PairDataset(dataset, tokenizer, image_cfg, seed, cache=teacher_cache)
    local_batch = batch_size // dist.world_size
    steps_per_epoch = EpochBatchSampler(len(pairs), local_batch, seed, dist.rank,
                                        dist.world_size).steps_per_epoch
    total_steps = steps if steps is not None else epochs * steps_per_epoch
    if total_steps <= 0:
        raise UserError("nothing to train: --steps/--epochs must be positive")
    warmup = min(10_000, total_steps // 10) if warmup is None else warmup

    config = {
        "student": student, "method": loss, "weights": loss_module.weights,
        "scale_param": scale_param, "seed": seed,
        "global_batch": batch_size, "total_steps": total_steps, "lr": lr,
        "weight_decay": weight_decay, "warmup": warmup, "grad_clip": grad_clip,
        "precision": precision, "dataset_fingerprint": dataset.fingerprint,
        "cache_fingerprint": teacher_cache.cache_id if teacher_cache is not None else None,
    }

    # --- output folder and resume ----------------------------------------------------------
    resume_state = None
    if resume is not None:
        resume_path = _find_checkpoint(Path(resume))
        resume_state = load_checkpoint(resume_path)
        _check_resumable(resume_state, config, resume_path)
        if out is None:
            out = resume_path.parent.parent
    out_dir = Path(out) if out is not None else DEFAULT_ARTIFACTS / "students" / _run_name(student, loss, seed)
    if resume_state is None and out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"output folder {out_dir} already holds files; pass --resume to continue "
                        f"that run or choose another --out")

    optimizer = build_optimizer(model, loss_module, lr, weight_decay)
    scheduler = build_scheduler(optimizer, warmup, total_steps)
    scaler = torch.amp.GradScaler(torch_device.type, enabled=precision == "fp16")
    start_step, start_epoch, start_in_epoch = 0, 0, 0
    # counts by reason (the join's skips: keys the cache rejected or lacks; then images that
    # failed to decode here) and this rank's decode failures with key and step
    skipped: dict[str, int] = dict(pairs.skipped_at_join)
    skipped_records: list[dict] = []
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        loss_module.load_state_dict(resume_state["loss"])
        optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
        scaler.load_state_dict(resume_state["scaler"])
        rngs = resume_state["rng"]  # one per rank of the interrupted run
        set_rng_state(rngs[min(dist.rank, len(rngs) - 1)])
        position = resume_state["position"]
        start_step, start_epoch, start_in_epoch = position["step"], position["epoch"], position["step_in_epoch"]
        skipped = dict(resume_state["skipped"])
        skipped_records = list(resume_state["skipped_records"][dist.rank]
                               if dist.rank < len(resume_state["skipped_records"]) else [])

    train_model = model
    if dist.distributed:  # DDP averages; gather_batch's backward makes that the global gradient
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[torch_device.index] if torch_device.type == "cuda" else None)
    sampler = EpochBatchSampler(len(pairs), local_batch, seed, dist.rank, dist.world_size,
                                start=(start_epoch, start_in_epoch))
    loader = torch.utils.data.DataLoader(
        pairs, batch_sampler=sampler, collate_fn=collate_pairs, num_workers=workers,
        pin_memory=torch_device.type == "cuda", persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None)

    checkpoint_dir = out_dir / "checkpoints"
    log_dir = Path(log_dir) if log_dir is not None else out_dir / "logs"
    log = MetricsLog(log_dir, resume_step=start_step if resume_state else None) if dist.is_main else None
    autocast = (torch.autocast(torch_device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
                if precision != "fp32" else contextlib.nullcontext())
    t_scale = torch.tensor(teacher_cache.logit_scale if teacher_cache is not None else 1.0,
                           device=torch_device)

    def checkpoint(step: int, epoch: int, in_epoch: int) -> Path:
        rngs = _gather_objects(rng_state(), dist)
        records = _gather_objects(skipped_records, dist)
        path = checkpoint_dir / f"step-{step:08d}.pt"
        if dist.is_main:
            save_checkpoint(path, {
                "format": CHECKPOINT_FORMAT, "config": config, "model_config": model_config,
                "model": model.state_dict(), "loss": loss_module.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "rng": rngs,
                "position": {"step": step, "epoch": epoch, "step_in_epoch": in_epoch},
                "skipped": skipped, "skipped_records": records,
            })
            for old in sorted(checkpoint_dir.glob("step-*.pt"))[:-keep_checkpoints]:
                old.unlink()
        distributed.barrier()
        return path

    last_checkpoint = resume_path if resume_state is not None else None
    last_record: dict = {}
    model.train()
    with TeacherForwardCounter(train_model, loss_module) as teacher_forwards, \
            _progress_bar(progress and dist.is_main, total_steps, start_step) as advance:
        batches = iter(loader)
        for step in range(start_step, total_steps):
            tick = time.perf_counter()
            batch = next(batches)
            epoch, in_epoch = divmod(step, steps_per_epoch)
            for key, reason in batch["skipped"]:
                skipped[reason] = skipped.get(reason, 0) + 1
                if len(skipped_records) < MAX_SKIPPED_RECORDS:
                    skipped_records.append({"key": key, "reason": reason, "step": step + 1})
            images = batch["image"].to(torch_device, non_blocking=True)
            texts = batch["text"].to(torch_device, non_blocking=True)
            with autocast:
                s_img, s_txt = _student_outputs(train_model(images, texts))
            s_img, s_txt = distributed.gather_batch(s_img.float(), s_txt.float())
            if loss_module.needs_teacher:
                t_img, t_txt = distributed.gather_batch(
                    teacher_cache.image_embeddings(batch["image_row"]).to(torch_device, non_blocking=True),
                    teacher_cache.text_embeddings(batch["text_row"]).to(torch_device, non_blocking=True))
            else:
                t_img = t_txt = None
            # the loss takes the student's logit_scale in log space and clamps exp() to 100
            total, parts = loss_module(t_img, t_txt, s_img, s_txt, model.logit_scale, t_scale)
            if not torch.isfinite(total):
                bad = next((n for n, v in parts.items() if not torch.isfinite(v)), "total")
                if log is not None:
                    log.close()
                raise LossNotFinite(
                    f"loss term {bad} is {float(parts.get(bad, total))} at step {step + 1}; run stopped"
                    + (f", last good checkpoint {last_checkpoint}" if last_checkpoint else
                       ", no checkpoint was written yet"))
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(total).backward()
            if grad_clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(
                    [p for g in optimizer.param_groups for p in g["params"]], grad_clip)
            scaler.step(optimizer)
            scaler.update()
            step_lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            with torch.no_grad():  # open_clip clamps the student's temperature to at most 100
                model.logit_scale.clamp_(0, math.log(100))

            done = step + 1
            loss_value = total.item()
            if log is not None:
                seconds = time.perf_counter() - tick
                last_record = {
                    "step": done, "epoch": epoch, "loss": loss_value,
                    **{f"loss/{n}": float(v) for n, v in parts.items()},
                    "lr": step_lr,
                    "logit_scale": model.logit_scale.detach().exp().item(),
                    **{f"scale/{n}": float(v) for n, v in loss_module.scales().items()},
                    "samples_per_s": batch_size / seconds, "skipped": sum(skipped.values()),
                }
                log.write(last_record)
            if done % save_every == 0 or done == total_steps:
                next_epoch, next_in_epoch = divmod(done, steps_per_epoch)
                last_checkpoint = checkpoint(done, next_epoch, next_in_epoch)
            advance(loss_value)

    summary = {
        "method": loss, "student": _student_label(student), "student_spec": student,
        "init": str(init) if init is not None else None, "seed": seed, "steps": total_steps,
        "epochs": total_steps / steps_per_epoch, "steps_per_epoch": steps_per_epoch,
        "global_batch": batch_size, "world_size": dist.world_size, "lr": lr,
        "weight_decay": weight_decay, "warmup": warmup, "grad_clip": grad_clip,
        "precision": precision, "weights": loss_module.weights, "scale_param": scale_param,
        "data": str(spec.path), "dataset_fingerprint": dataset.fingerprint,
        "cache": str(cache) if cache is not None else None,
        "cache_fingerprint": config["cache_fingerprint"],
        "teacher": teacher_cache.manifest.get("teacher") if teacher_cache is not None else None,
        "student_image_cfg": image_cfg.to_dict(), "embed_dim": student_dim,
        "teacher_dim": teacher_dim if teacher_cache is not None else None,
        "samples": len(pairs), "skipped": skipped,
        "teacher_forwards": teacher_forwards.count,
        "final_loss": last_record.get("loss"), "final_losses": {
            k[5:]: v for k, v in last_record.items() if k.startswith("loss/")},
        "resumed_from_step": start_step if resume_state is not None else None,
        "checkpoint": str(last_checkpoint) if last_checkpoint else None,
        "export": str(out_dir / "export"),
    }
    all_records = [r for rank_records in _gather_objects(skipped_records, dist) for r in rank_records]
    if dist.is_main:
        log.close()
        with open(log_dir / "skipped.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in all_records)
        export_clip(model, model_config, out_dir / "export")
        (out_dir / "run.json").write_text(json.dumps(summary, indent=2) + "\n")
    distributed.barrier()
    return summary


def _student_outputs(output: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(image features, text features), L2-normalised, from an open_clip model's forward,
    whether it returns a tuple or, with ``output_dict``, a dict."""
    if isinstance(output, dict):
        return output["image_features"], output["text_features"]
    return output[0], output[1]


def _gather_objects(obj: Any, dist_info: Any) -> list:
    """``obj`` of every rank, in rank order (one process: ``[obj]``)."""
    if not dist_info.distributed:
        return [obj]
    gathered: list = [None] * dist_info.world_size
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


def _verify_cache(cache: Any, full: bool | None) -> None:
    """Refuse a damaged cache. Full check (sha256 of every file, rows, dims) when ``full``,
    or by default when the cache is small enough to hash in seconds; otherwise every
    file must exist with the byte size the manifest records."""
    manifest = cache.manifest
    files = [manifest["index"], manifest["rejects"]]
    files += [s[kind] for s in manifest["shards"] for kind in ("images", "texts")]
    if full is None:
        full = sum(int(f.get("bytes", 0)) for f in files) <= FULL_VERIFY_MAX_BYTES
    if full:
        problems = cache.verify()
    else:
        problems = []
        for f in files:
            path = cache.root / f["file"]
            if not path.is_file():
                problems.append(f"{f['file']}: missing")
            elif "bytes" in f and path.stat().st_size != int(f["bytes"]):
                problems.append(f"{f['file']}: {path.stat().st_size} bytes, manifest says {f['bytes']}")
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UserError(f"teacher cache {cache.root} is damaged: {problems[0]}{more}; "
                        f"run `rdkd cache verify {cache.root}` or extract it again")


def _student_label(student: str) -> str:
    """A short name for reports: the config file's stem or the open_clip model name."""
    return Path(student).stem if student.lower().endswith(".json") else student


def _run_name(student: str, loss: str, seed: int) -> str:
    return f"{_student_label(student).replace('/', '-')}-{loss}-seed{seed}"


def _rdkd_checkpoint_model(path: Path) -> dict | None:
    """The student weights of an rdkd train-student checkpoint, or None for any other file
    (an open_clip checkpoint or tag, which open_clip loads itself)."""
    if not path.is_file() or path.suffix != ".pt":
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception:  # not ours to judge: open_clip reports what is wrong with it
        return None
    if isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT:
        return state["model"]
    return None


def _find_checkpoint(path: Path) -> Path:
    """A checkpoint file as given, or the latest one of a run folder / checkpoints folder."""
    if path.is_file():
        return path
    for folder in (path / "checkpoints", path):
        found = sorted(folder.glob("step-*.pt")) if folder.is_dir() else []
        if found:
            return found[-1]
    raise UserError(f"--resume {path}: no checkpoint there")


def _check_resumable(state: dict, config: dict, path: Path) -> None:
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not an rdkd train-student checkpoint")
    differ = [k for k in RESUME_MUST_MATCH if state["config"].get(k) != config.get(k)]
    if differ:
        shown = ", ".join(f"{k} {state['config'].get(k)!r} -> {config.get(k)!r}" for k in differ)
        raise UserError(f"cannot resume {path}: the run differs in {shown}")


@contextlib.contextmanager
def _progress_bar(enabled: bool, total: int, done: int):
    """A rich progress bar over steps; yields ``advance(loss)``."""
    if not enabled:
        yield lambda loss: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("train-student"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn()) as bar:
        task = bar.add_task("steps", total=total, completed=done, loss="-")
        yield lambda loss: bar.update(task, advance=1, loss=f"{loss:.4f}")
