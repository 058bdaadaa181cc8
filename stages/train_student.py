"""Stage two: train a student against the cached teacher geometry (``rdkd train-student``).

The student sees the very views the teacher embedded (replayed from the cache's crop boxes
at the student's own size) and one caption per image per step, and is trained with a
CLIP-RD loss preset over the global batch. The teacher is never loaded or run: its
embeddings come from the cache; :class:`rdkd.training.TeacherForwardCounter` counts calls
of open_clip modules outside the student and the loss, reported as ``teacher_forwards``
(zero).

Read it top to bottom: :class:`TrainConfig` (what the user asked; recorded in every
checkpoint and in run.json), :func:`setup` (data, cache, student, loss, optimizer: a
:class:`Run`), :func:`restore` (a checkpoint's state), :func:`train_step` (one optimizer
step, with no host-device synchronisation), then :func:`train_student`, the loop: a step
call and, every ``log_every`` steps, a log block (the one synchronisation of an interval:
loss means, non-finite check, rates, data-wait and compute time, peak GPU memory).

The feed keeps a GPU busy: DataLoader workers decode and crop, hand over uint8 pixels and
the teacher rows of the batch (one read per batch, storage dtype); pinned batches are
copied to the device on a side stream while the previous step runs, and normalised there.

A loss or weight that is NaN or inf stops the run at the next log point or checkpoint,
whichever comes first: nothing non-finite is ever written, the message names the term and
its first bad step, and the last good checkpoint stays (exit code 3, not 2: a diverged
run is no typo).

Output folder (default ``artifacts/students/<name>``)::

    checkpoints/step-NNNNNNNN.pt   full training state, every --save-every steps and at the end
    export/                        the student alone: weights + open_clip model-config JSON
    run.json                       what was trained (method, student, seed, steps, ...) and how it went
    logs/metrics.jsonl             one JSON record per log interval: loss terms, lr, scales, rates
    logs/tb/                       TensorBoard events of the same scalars
    logs/skipped.jsonl             images that failed to decode: key, reason, step

``--log-dir`` puts the logs elsewhere (they hold wall-clock rates: keep them out of what a
pipeline hashes).
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, List, Optional, Sequence

import numpy as np
import torch

from rdkd import checkpoints, distributed, pixels, runtime, streaming
from rdkd.errors import UserError
from rdkd.files import atomic_write
from rdkd.labels import RUN_FILE, RunLabels, teacher_set
from rdkd.options import option
from rdkd.training import (
    Feed,
    ImageCfg,
    IndexedFeed,
    LogWindow,
    LossNotFinite,
    MetricsLog,
    PairBuilder,
    PairDataset,
    TeacherForwardCounter,
    build_optimizer,
    build_scheduler,
    fill_slots,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    teacher_keys,
)

CHECKPOINT_FORMAT = checkpoints.TRAIN_FORMAT  # tensors and plain data: loads with weights_only=True
# Decode failures recorded by key in logs/skipped.jsonl (all are counted in run.json).
MAX_SKIPPED_RECORDS = 10_000
# DataLoader workers build local batches in pieces of at most this many bytes (the finished
# pieces they hold ready are bounded by runtime.PREFETCH_BUDGET_BYTES per process).
PIECE_BYTES = 32 << 20
# Settings that shape the trajectory: a resumed run must agree on all of them (the config's
# and what they resolved to on this data).
RESUME_MUST_MATCH = ("student", "method", "weights", "scale_param", "seed", "batch_size", "total_steps",
                     "lr", "weight_decay", "warmup", "grad_clip", "precision",
                     "dataset_fingerprint", "cache_fingerprint", "teacher_weights", "stream")


def _weight_overrides(words: Sequence[str] | None) -> dict[str, float]:
    """``--weight TERM=VALUE`` words as the weights they override."""
    from rdkd.losses import parse_weight_overrides

    return parse_weight_overrides(words or [])


def one_or_list(values: Sequence[Any]) -> Any:
    """What a run records per teacher: the value itself for one teacher (as before
    ensembles existed: such runs and their checkpoints keep their records), a list for
    several, None for none."""
    return None if not values else values[0] if len(values) == 1 else list(values)


@dataclass
class TrainConfig:
    """What a train-student run is asked to do, as the CLI (or a caller) gives it.

    ``data`` a :class:`rdkd.data.DataSpec` or dataset path; ``student`` an open_clip model
    name or model-config JSON; ``method`` a preset of :mod:`rdkd.losses`, ``weights`` its
    overrides; ``scale_param`` ``raw`` (the loss's scales a_I, a_T, a_X used as they are,
    as in the reference code) or ``exp`` (exp() clamped at 100, like CLIP's logit scale).
    ``batch_size`` is the global batch (split over torchrun ranks). Give ``epochs`` or
    ``steps``. ``warmup`` defaults to CLIP-KD's 10k steps, capped at a tenth of a shorter
    run. ``resume``: a checkpoint file, or a run folder / its ``checkpoints`` folder (latest
    checkpoint). ``log_every``: steps per log record (and per host-device synchronisation).
    ``compile``: ``torch.compile`` the student. ``stream``: read webdataset shards in
    order beside their cache shards (:mod:`rdkd.streaming`) instead of indexing the
    dataset; None (auto) streams above ``streaming.STREAM_AUTO_MIN_ENTRIES`` entries;
    ``shuffle_buffer``: raw samples each DataLoader worker holds to shuffle when streaming.
    ``decode``: ``workers`` (DataLoader workers make the pixels) or ``device`` (they hand over
    the encoded images; :class:`rdkd.pixels.DeviceDecoder` decodes, crops and resizes them on
    the device; needs a fast cache).
    """

    data: Any
    student: str = option(..., "open_clip model name or model-config JSON (e.g. pipeline/model_configs/ViT-T-16.json).")
    method: str = option("cliprd", "Loss preset: clip, crd, fd, icl, clipkd, vrd, xrd, cliprd, distill, tinyclip.",
                         "--loss")
    cache: list[str] = option(
        ..., "Teacher-embedding cache of this dataset (rdkd extract-teacher); repeat it to distil from an "
             "ensemble of teachers (caches of the same data and views).", factory=list,
        parse=lambda paths: [str(p) for p in paths or []], cli_type=Optional[List[str]], cli_default=None)
    cache_weight: list[float] = option(
        ..., "Weight of each --cache's teacher in the ensemble, in --cache order (default: equal).", factory=list,
        parse=lambda weights: list(weights or []), cli_type=Optional[List[float]], cli_default=None)
    init: str | None = option(None, "Start from these weights (checkpoint path or open_clip tag); default random init.")
    weights: dict[str, float] = option(
        ..., "Override one term weight, TERM=VALUE (repeatable), e.g. fd=1000.", "--weight", factory=dict,
        parse=_weight_overrides, cli_type=Optional[List[str]], cli_default=None)
    scale_param: str = option("raw", "The loss's learnable scales a_I, a_T, a_X: raw (used as is, as the reference "
                                     "code) or exp (exp() clamped at 100, like CLIP's logit scale).")
    epochs: int | None = option(None, "Train this many epochs (or give --steps).", min=1)
    steps: int | None = option(None, "Train this many optimizer steps (or give --epochs).", min=1)
    batch_size: int = option(256, "Global batch size (split over torchrun processes).", min=2)
    lr: float = option(1e-3, "Peak learning rate of AdamW.", min=0.0)
    weight_decay: float = option(0.1, "Weight decay on weight matrices (not gains, biases, scales).", "--wd", min=0.0)
    warmup: int | None = option(None, "Linear warm-up steps before the cosine decay (default min(10000, steps/10)).",
                                min=0)
    grad_clip: float | None = option(None, "Clip the global gradient norm to this value.", min=0.0)
    precision: str = option("fp32", "fp32, bf16 (autocast) or fp16 (autocast + GradScaler, CUDA only).")
    device: str = option("auto", "auto (cuda:LOCAL_RANK if present, else cpu), cpu, cuda, cuda:N.")
    workers: int = option(4, "DataLoader worker processes per rank.", min=0)
    seed: int = option(0, "Seed of the data order, caption and view choices and augmentation.")
    save_every: int = option(1000, "Write a checkpoint every N steps (and at the end).", min=1)
    keep_checkpoints: int = option(2, "Keep the newest N checkpoints.", min=1)
    log_every: int = option(50, "Steps per log record: loss means, rates, data-wait and compute time, and the "
                                "non-finite check (the one host-device sync of an interval).", min=1)
    compile: bool = option(False, "torch.compile the student (see BENCHMARKS.md for when it pays).",
                           "--compile/--no-compile")
    decode: str = option("workers", pixels.DECODE_HELP)
    resume: str | None = option(None, "Continue from a checkpoint file or a run folder (its latest checkpoint).")
    out: str | None = option(None, "Run folder (default artifacts/students/<student>-<loss>-seed<seed>).",
                             "--out", "-o")
    log_dir: str | None = option(None, "Where the logs go (default <out>/logs): metrics.jsonl, TensorBoard events, "
                                       "skipped.jsonl. Outside --out, the run folder holds only what the inputs "
                                       "and the seed determine.")
    verify_cache: bool | None = option(None, "Default: check file sizes first, and each cache shard's sha256 before "
                                             "its rows are first used. --verify-cache: hash every file first "
                                             "(start-up grows with the cache). --no-verify-cache: sizes only, no "
                                             "checksums.", "--verify-cache/--no-verify-cache")
    progress: bool = option(True, "Show a progress bar.", "--progress/--no-progress")
    stream: bool | None = option(None, "Read webdataset shards in order beside their cache shards instead of "
                                       "indexing the dataset (no global index in memory). Default: stream "
                                       "webdataset data of more than 2M entries with a shard-aligned cache.",
                                 "--stream/--no-stream")
    shuffle_buffer: int = option(streaming.DEFAULT_SHUFFLE_BUFFER,
                                 "Streaming: raw samples each DataLoader worker holds to shuffle.", min=1)

    def to_dict(self) -> dict:
        """JSON-ready, paths as given (relative paths stay relative); ``cache`` one path
        for one teacher (:func:`one_or_list`)."""
        record = asdict(self)
        record["data"] = asdict(self.data) if hasattr(self.data, "__dataclass_fields__") else str(self.data)
        record["cache"] = one_or_list(self.cache)
        return record


@dataclass
class Plan:
    """What the config resolves to on this data and this cache (recorded beside it)."""

    weights: dict[str, float]
    total_steps: int
    steps_per_epoch: int
    warmup: int
    samples: int
    world_size: int
    dataset_fingerprint: str
    # per teacher (one_or_list): a value for one cache, a list for an ensemble, None for none
    cache_fingerprint: str | list[str] | None
    embed_dim: int
    teacher_dim: int | list[int] | None
    student_image_cfg: dict
    teacher: dict | list[dict] | None
    teacher_weights: list[float] | None  # normalised, in cache order; None: one teacher or none
    stream: dict | None = None  # streaming: the shape of the stream (ShardStream.shape); None: indexed


@dataclass
class Run:
    """Everything a training step and the loop use, built once by :func:`setup`."""

    config: TrainConfig
    plan: Plan
    dist: Any
    device: torch.device
    model: torch.nn.Module
    train_model: torch.nn.Module
    model_config: dict
    loss_module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    feed: Feed
    loader_options: dict  # the DataLoader's pin_memory and prefetch_factor (sized by bytes)
    normalize: runtime.DeviceNormalize
    decoder: pixels.DeviceDecoder | None
    t_scales: list[torch.Tensor]  # each teacher's logit-scale multiplier tau (1.0 without a teacher)
    out_dir: Path
    log_dir: Path
    trained: list[torch.nn.Parameter]
    resume_state: dict | None = None


@dataclass
class Progress:
    """Where the run stands; a checkpoint holds it, a resume starts from it."""

    step: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # counts by reason
    skipped_records: list[dict] = field(default_factory=list)  # this rank's, with key and step
    last_checkpoint: Path | None = None
    resumed_from: int | None = None


def train_student(data: Any, student: str, method: str = "cliprd",
                  cache: str | Path | Sequence[str | Path] | None = None, **options: Any) -> dict:
    """Train one student; return the run summary (also written to ``<out>/run.json``).

    ``cache``: a teacher cache, or several (an ensemble of teachers). ``options`` are the
    other fields of :class:`TrainConfig` (``rdkd train-student``'s options, by field name). Raises :class:`UserError` for bad input before anything is
    written, :class:`rdkd.training.LossNotFinite` when the run diverges.
    """
    for name in ("init", "resume", "out", "log_dir"):
        if options.get(name) is not None:
            options[name] = str(options[name])
    caches = [] if cache is None else [cache] if isinstance(cache, (str, Path)) else list(cache)
    config = TrainConfig(data=data, student=student, method=method, cache=[str(c) for c in caches], **options)
    joined_here = not torch.distributed.is_initialized()
    log = None
    try:
        run = setup(config)
        progress = restore(run)
        window = LogWindow(list(run.loss_module.weights), run.device, step=progress.step)
        if run.resume_state is not None and "log_window" in run.resume_state:
            window.load_state_dict(run.resume_state["log_window"])
        if run.dist.is_main:
            log = MetricsLog(run.log_dir, resume_step=progress.resumed_from)
        batches = runtime.device_batches(run.feed.batches(progress.step, run.plan.steps_per_epoch,
                                                          **run.loader_options), run.device, run.feed.pieces)
        total = run.plan.total_steps
        timer = _IntervalTimer(progress.step)
        run.model.train()
        with TeacherForwardCounter(run.train_model, run.loss_module) as teacher_forwards, \
                runtime.progress(config.progress and run.dist.is_main, "train-student", total,
                                 progress.step, fields={"loss": "-"}) as advance:
            for step in range(progress.step, total):
                with timer.waiting():
                    batch = next(batches)
                    if run.decoder is not None:
                        _decode_images(run, batch)
                _count_skips(progress, batch["skipped"], step + 1)
                lr = run.optimizer.param_groups[0]["lr"]
                train_step(run, batch, window)
                progress.step = done = step + 1
                advance(1)
                if done % config.log_every == 0 or done == total:
                    record = _log_record(run, window, progress, lr, timer.lap(done))
                    if log is not None:
                        log.write(record)
                    advance(0, loss=f"{record['loss']:.4f}")
                if done % config.save_every == 0 or done == total:
                    _checkpoint(run, window, progress)
        return _finish(run, progress, teacher_forwards.count)
    finally:
        if log is not None:
            log.close()
        if joined_here:
            distributed.cleanup()


def _decode_images(run: Run, batch: dict) -> None:
    """``--decode device``: the batch's encoded images become its uint8 views on the device.
    An image no path decodes (its header read in the worker, its data not) is recorded as
    skipped with its key and its row filled under the workers' bad-sample policy
    (:func:`rdkd.training.fill_slots`), over the batch, whose pieces are joined by now: the
    batch keeps its size on every rank (rare: a corrupt file that reads as an image)."""
    images, failed = run.decoder.decode(batch["image"], [[view] for view in batch["view"]])
    batch["image"] = images
    if not failed:
        return
    skipped = [(batch["host_key"][i], reason) for i, reason in failed]
    batch["skipped"].extend(skipped)
    lost = {i for i, _ in failed}
    fill = fill_slots([i not in lost for i in range(len(batch["view"]))], skipped)
    for i in sorted(lost):
        for value in batch.values():
            if isinstance(value, torch.Tensor):
                value[i] = value[fill[i]]


def train_step(run: Run, batch: dict, window: LogWindow) -> None:
    """One optimizer step on a batch already on the device; the loss terms go into
    ``window`` on the device. Nothing here waits for the device."""
    images = run.normalize(batch["image"])
    with runtime.autocast(run.device, run.config.precision):
        s_img, s_txt = _student_outputs(run.train_model(images, batch["text"]))
    s_img, s_txt = distributed.gather_batch(s_img.float(), s_txt.float())
    t_img = t_txt = None
    if run.loss_module.needs_teacher:  # every teacher's rows, gathered in one call
        rows = distributed.gather_batch(*(batch[key].float() for k in range(len(run.t_scales))
                                          for key in teacher_keys(k)))
        t_img, t_txt = one_or_list(rows[0::2]), one_or_list(rows[1::2])
    # the loss takes the student's logit_scale in log space and clamps exp() to 100; one
    # teacher's tensors and scale go in bare, several as lists
    total, parts = run.loss_module(t_img, t_txt, s_img, s_txt, run.model.logit_scale, one_or_list(run.t_scales))
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(total).backward()
    if run.config.grad_clip:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.trained, run.config.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    with torch.no_grad():  # open_clip clamps the student's temperature to at most 100
        run.model.logit_scale.clamp_(0, math.log(100))
    window.add(total, parts)


# --- setup -------------------------------------------------------------------------------------


def setup(config: TrainConfig) -> Run:
    """Check the config, open data and cache, build student, loss, optimizer; refuse bad
    input with one line before anything is written."""
    from rdkd import losses

    if config.log_every < 1:
        raise UserError("--log-every must be at least 1")
    dist = distributed.setup(config.device)
    device = torch.device(dist.device)
    runtime.check_precision(config.precision, device)
    if config.batch_size % dist.world_size:
        raise UserError(f"--batch-size {config.batch_size} does not split over {dist.world_size} processes")
    if (config.epochs is None) == (config.steps is None):
        raise UserError("give exactly one of --epochs and --steps")
    term_weights = losses.weights_for(config.method, config.weights)

    caches, layout, dataset = _open_data(config)
    if any(losses.TERMS[name].uses_teacher for name in term_weights) and not caches:
        raise UserError(f"--loss {config.method} distils from a teacher: give its embedding cache with --cache")
    teacher_weights = _teacher_weights(config, len(caches))

    built = _build_student(config, device)
    model = built.model
    image_cfg = ImageCfg.of_model(model)
    teacher_dims = [cache.dim for cache in caches]
    loss_module = losses.DistillLoss(term_weights, student_dim=built.embed_dim,
                                     teacher_dim=teacher_dims or built.embed_dim, scale_param=config.scale_param,
                                     teacher_weights=teacher_weights).to(device)

    sample_bytes = _sample_bytes(image_cfg, built.model_config, teacher_dims)
    feed = _feed(config, dist, built.tokenizer, image_cfg, caches, layout, dataset, sample_bytes)
    steps_per_epoch = feed.steps_per_epoch(epochs=config.epochs, steps=config.steps)
    # streamed, the caches vouch for the data (the stream checks each sample's key and captions against them)
    fingerprint = dataset.fingerprint if dataset is not None else caches[0].dataset_fingerprint
    total_steps = config.steps if config.steps is not None else config.epochs * steps_per_epoch
    plan = Plan(
        weights=loss_module.weights, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
        warmup=min(10_000, total_steps // 10) if config.warmup is None else config.warmup,
        samples=feed.samples, world_size=dist.world_size, dataset_fingerprint=fingerprint,
        cache_fingerprint=one_or_list([cache.cache_id for cache in caches]), embed_dim=built.embed_dim,
        teacher_dim=one_or_list(teacher_dims), student_image_cfg=image_cfg.to_dict(),
        teacher=one_or_list([cache.manifest.get("teacher") for cache in caches]),
        teacher_weights=teacher_weights if len(caches) > 1 else None,
        stream=feed.shape)

    out_dir, resume_state = _output_and_resume(config, plan)

    train_model = torch.compile(model) if config.compile else model
    if dist.distributed:  # DDP averages; gather_batch's backward makes that the global gradient
        train_model = torch.nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = build_optimizer(model, loss_module, config.lr, config.weight_decay, fused=True)
    run = Run(
        config=config, plan=plan, dist=dist, device=device, model=model, train_model=train_model,
        model_config=built.model_config, loss_module=loss_module, optimizer=optimizer,
        scheduler=build_scheduler(optimizer, plan.warmup, total_steps),
        scaler=torch.amp.GradScaler(device.type, enabled=config.precision == "fp16"),
        feed=feed, normalize=runtime.DeviceNormalize(image_cfg.mean, image_cfg.std, device),
        loader_options={"pin_memory": device.type == "cuda", "prefetch_factor": runtime.prefetch_factor(
            feed.piece_size * sample_bytes, config.workers, runtime.PREFETCH_BUDGET_BYTES)},
        decoder=pixels.DeviceDecoder(feed.builder.renderer, device) if config.decode == "device" else None,
        t_scales=[torch.tensor(cache.logit_scale, device=device) for cache in caches],
        out_dir=out_dir, log_dir=Path(config.log_dir) if config.log_dir else out_dir / "logs",
        trained=[p for g in optimizer.param_groups for p in g["params"]], resume_state=resume_state)
    return run


def _feed(config: TrainConfig, dist: Any, tokenizer: Any, image_cfg: ImageCfg, caches: Sequence[Any],
          layout: streaming.StreamLayout | None, dataset: Any, sample_bytes: int) -> Feed:
    """This rank's feed: indexed, or streamed when there is a layout. Workers build local
    batches in pieces of at most ``PIECE_BYTES`` (the memory in flight does not grow with the
    batch size); how many is decided here, once, for either feed."""
    local_batch = config.batch_size // dist.world_size
    pieces = math.ceil(local_batch * sample_bytes / PIECE_BYTES)
    if layout is None:
        pairs = PairDataset(dataset, tokenizer, image_cfg, config.seed, caches, decode=config.decode)
        return IndexedFeed(pairs, local_batch, config.seed, dist.rank, dist.world_size, config.workers, pieces)
    builder = PairBuilder(tokenizer, image_cfg, config.seed, caches, decode=config.decode)
    return streaming.ShardStream(layout, builder, local_batch, config.seed, dist.rank, dist.world_size,
                                 config.workers, config.shuffle_buffer, pieces=pieces)


def _open_data(config: TrainConfig) -> tuple[list[Any], streaming.StreamLayout | None, Any]:
    """(caches, stream layout, dataset): data and each cache joined by key (or streamed
    shard beside shard), checked before anything is written; ``config.data`` becomes a
    DataSpec."""
    from rdkd.cache import TeacherCache
    from rdkd.data import DataSpec, open_dataset

    spec = config.data if isinstance(config.data, DataSpec) else DataSpec(str(config.data))
    config.data = spec
    caches = [TeacherCache.open(Path(path), check=config.verify_cache is not False) for path in config.cache]
    _check_same_views(caches)
    layout = streaming.streaming_layout(config.stream, spec, caches)
    dataset = open_dataset(spec) if layout is None else None
    for cache in caches:
        fingerprint = dataset.fingerprint if dataset is not None else caches[0].dataset_fingerprint
        if cache.dataset_fingerprint != fingerprint:
            raise UserError(f"cache {cache.root} was made from another dataset (fingerprint "
                            f"{cache.dataset_fingerprint[:12]} != {fingerprint[:12]} of {spec.path})")
        _verify_cache(cache, config.verify_cache)
    return caches, layout, dataset


def _check_same_views(caches: Sequence[Any]) -> None:
    """Refuse, with one line, an ensemble whose caches hold other views of an image: the
    student replays the first cache's views, so every cache must have embedded the same
    regions the same way (same view count, seed and crop ranges; same eval-view region,
    which the resize mode decides; same way of making pixels)."""
    def views_of(cache: Any) -> dict:
        return {"views": cache.manifest.get("views"), "pixels": pixels.mode_of(cache.manifest),
                "eval view resize": cache.manifest.get("preprocess", {}).get("resize_mode") or "shortest"}

    first = views_of(caches[0]) if caches else None
    for cache in caches[1:]:
        differ = [name for name, value in views_of(cache).items() if value != first[name]]
        if differ:
            raise UserError(f"caches {caches[0].root} and {cache.root} hold other views of the images "
                            f"({', '.join(differ)} differ); an ensemble needs caches extracted with the same "
                            f"--views settings and resize mode")


def _teacher_weights(config: TrainConfig, teachers: int) -> list[float] | None:
    """--cache-weight as the ensemble's normalised teacher weights (None: equal)."""
    from rdkd.losses import normalized_teacher_weights

    if not config.cache_weight:
        return None
    if len(config.cache_weight) != teachers:
        raise UserError(f"{len(config.cache_weight)} --cache-weight values for {teachers} --cache; give one per cache")
    return list(normalized_teacher_weights(config.cache_weight, teachers))


def _build_student(config: TrainConfig, device: torch.device) -> Any:
    """The student (``rdkd.models.create_student``, looked up there when it runs), from
    ``--init`` where given. The seed fixes its random init and, after it, the loss's heads;
    Python's and numpy's global RNGs are unused by training, but their states go into every
    checkpoint."""
    from rdkd.models import create_student

    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed)
    init_state = _rdkd_checkpoint_model(Path(config.init)) if config.init is not None else None
    built = create_student(config.student, init=None if config.init is None or init_state is not None
                           else config.init, device=device)
    if init_state is not None:
        try:
            built.model.load_state_dict(init_state)
        except RuntimeError as err:
            raise UserError(f"--init {config.init}: its weights do not fit {config.student}: "
                            f"{str(err).splitlines()[0]}") from None
    return built


def _output_and_resume(config: TrainConfig, plan: Plan) -> tuple[Path, dict | None]:
    """(run folder, the checkpoint state to resume or None): a resumed run must match its
    checkpoint's run; a fresh one refuses a folder that already holds files."""
    resume_state = None
    out = config.out
    if config.resume is not None:
        resume_path = _find_checkpoint(Path(config.resume))
        resume_state = load_checkpoint(resume_path)
        _check_resumable(resume_state, _resume_key(config, plan), resume_path)
        resume_state["path"] = resume_path
        out = out if out is not None else str(resume_path.parent.parent)
    out_dir = Path(out) if out is not None else runtime.DEFAULT_ARTIFACTS / "students" / _run_name(config)
    if resume_state is None and out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"output folder {out_dir} already holds files; pass --resume to continue "
                        f"that run or choose another --out")
    return out_dir, resume_state


def restore(run: Run) -> Progress:
    """The starting point: step 0, or the state of the checkpoint being resumed."""
    state = run.resume_state
    progress = Progress(skipped=dict(run.feed.skipped_at_join))
    if state is None:
        return progress
    run.model.load_state_dict(state["model"])
    run.loss_module.load_state_dict(state["loss"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.scaler.load_state_dict(state["scaler"])
    rngs = state["rng"]  # one per rank of the interrupted run
    set_rng_state(rngs[min(run.dist.rank, len(rngs) - 1)])
    records = state["skipped_records"]
    progress.step = progress.resumed_from = state["position"]["step"]
    progress.skipped = dict(state["skipped"])
    progress.skipped_records = list(records[run.dist.rank]) if run.dist.rank < len(records) else []
    progress.last_checkpoint = state["path"]
    return progress


def _sample_bytes(image_cfg: ImageCfg, model_config: dict, teacher_dims: Sequence[int]) -> int:
    """Bytes of one sample as the workers ship it, at most: uint8 image, int64 tokens, two
    rows per teacher (counted as float32, the widest storage dtype)."""
    height, width = image_cfg.size
    context = model_config.get("text_cfg", {}).get("context_length", 77)
    return 3 * height * width + 8 * context + 2 * sum(teacher_dims) * 4


# --- log, checkpoint, finish ---------------------------------------------------------------------


class _IntervalTimer:
    """Wall time of a log interval and the part of it spent waiting for the loader."""

    def __init__(self, step: int) -> None:
        self.start = time.perf_counter()
        self.data_s = 0.0
        self.since = step  # the step the interval started after

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        tick = time.perf_counter()
        yield
        self.data_s += time.perf_counter() - tick

    def lap(self, step: int) -> tuple[int, float, float]:
        """(steps, seconds, data-wait seconds) of the interval ending at ``step``; starts the next."""
        now = time.perf_counter()
        lap = (step - self.since, now - self.start, self.data_s)
        self.start, self.data_s, self.since = now, 0.0, step
        return lap


def _log_record(run: Run, window: LogWindow, progress: Progress, lr: float,
                lap: tuple[int, float, float]) -> dict:
    """Read the window (the interval's one synchronisation, which also makes the interval's
    wall time the device's), stop on a non-finite term, and make the log record."""
    scales = run.loss_module.scales()
    means, bad, (logit_scale, *scale_values) = window.read(run.model.logit_scale.detach().exp(),
                                                           *scales.values())
    _stop_if_bad(bad, progress)
    steps, seconds, data_s = lap
    epoch = (progress.step - 1) // run.plan.steps_per_epoch
    record = {"step": progress.step, "epoch": epoch, "loss": means["total"],
              **{f"loss/{name}": value for name, value in means.items() if name != "total"},
              "lr": lr, "logit_scale": logit_scale,
              **{f"scale/{name}": value for name, value in zip(scales, scale_values)},
              "samples_per_s": steps * run.config.batch_size / seconds, "step_s": seconds,
              "data_s": data_s, "skipped": sum(progress.skipped.values())}
    if run.device.type == "cuda":
        record["peak_mem_gib"] = torch.cuda.max_memory_allocated(run.device) / 2**30
    return record


def _stop_if_bad(bad: dict[str, int], progress: Progress) -> None:
    """Raise :class:`LossNotFinite` naming the first bad term (a term rather than their
    total) and its first bad step, or ``weights``."""
    if not bad:
        return
    name, step = min(((n, s) for n, s in bad.items() if n != "total"), key=lambda t: t[1],
                     default=("total", bad.get("total")))
    what = "the weights are" if name == "weights" else f"loss term {name} is"
    where = (f"last good checkpoint {progress.last_checkpoint}" if progress.last_checkpoint
             else "no checkpoint was written yet")
    raise LossNotFinite(f"{what} not finite from step {step} (checked at step {progress.step}); "
                        f"run stopped, {where}")


def _checkpoint(run: Run, window: LogWindow, progress: Progress) -> None:
    """Write the full training state (rank 0), after checking that no loss term and no
    weight is non-finite: a checkpoint is always one a run can go on from."""
    weights_finite = torch.stack([p.detach().isfinite().all() for p in run.trained]).all()
    bad, (finite,) = window.check(weights_finite)
    if not finite:
        bad["weights"] = progress.step  # a term's own first bad step, where there is one, comes first
    _stop_if_bad(bad, progress)
    rngs = _gather_objects(rng_state(), run.dist)
    records = _gather_objects(progress.skipped_records, run.dist)
    step = progress.step
    path = run.out_dir / "checkpoints" / f"step-{step:08d}.pt"
    if run.dist.is_main:
        save_checkpoint(path, {
            "format": CHECKPOINT_FORMAT, "config": run.config.to_dict(), "plan": asdict(run.plan),
            "model_config": run.model_config, "model": run.model.state_dict(),
            "loss": run.loss_module.state_dict(), "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(), "scaler": run.scaler.state_dict(), "rng": rngs,
            "position": {"step": step, "epoch": step // run.plan.steps_per_epoch,
                         "step_in_epoch": step % run.plan.steps_per_epoch},
            "skipped": progress.skipped, "skipped_records": records, "log_window": window.state_dict(),
        })
        for old in sorted(path.parent.glob("step-*.pt"))[:-run.config.keep_checkpoints]:
            old.unlink()
    distributed.barrier()
    progress.last_checkpoint = path


def _finish(run: Run, progress: Progress, teacher_forwards: int) -> dict:
    """Export the student, write run.json and the skipped records; return the summary: the
    config's fields and what they resolved to (``steps``, ``epochs`` as run; ``student`` the
    short label, ``student_spec`` as given) and how the run went. No wall-clock values:
    those are in the logs."""
    config, plan = run.config, run.plan
    last = _last_record(run.log_dir) if run.dist.is_main else {}
    summary = {
        **config.to_dict(), **asdict(plan),
        **RunLabels(method=config.method, student=_student_label(config.student), seed=config.seed,
                    teacher_forwards=teacher_forwards, embed_dim=plan.embed_dim,
                    teachers=_teachers_label(run)).to_dict(),
        "student_spec": config.student,
        "steps": plan.total_steps, "epochs": plan.total_steps / plan.steps_per_epoch,
        "global_batch": config.batch_size, "skipped": progress.skipped,
        "final_loss": last.get("loss"),
        "final_losses": {k[5:]: v for k, v in last.items() if k.startswith("loss/")},
        "resumed_from_step": progress.resumed_from,
        "checkpoint": str(progress.last_checkpoint) if progress.last_checkpoint else None,
        "export": str(run.out_dir / "export"),
    }
    if run.decoder is not None:  # --decode device: images this rank decoded on the CPU path (not JPEG, refused)
        summary["device_decode_fallbacks"] = run.decoder.fallbacks
    preprocess = run.feed.builder.preprocess
    if preprocess != "exact":  # recorded for evaluate; absent means exact, as in a cache
        summary[pixels.MANIFEST_FIELD] = preprocess
    all_records = [r for rank in _gather_objects(progress.skipped_records, run.dist) for r in rank]
    if run.dist.is_main:
        from rdkd.models import export_clip

        text = "".join(json.dumps(r) + "\n" for r in all_records)
        atomic_write(run.log_dir / "skipped.jsonl", lambda tmp: Path(tmp).write_text(text))
        export_clip(run.model, run.model_config, run.out_dir / "export")
        atomic_write(run.out_dir / RUN_FILE,
                     lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2) + "\n"))
    distributed.barrier()
    return summary


def _teachers_label(run: Run) -> str | None:
    """The teacher set the student learned from; None when its loss reads no teacher (the
    ``clip`` preset given a cache learns from the data alone)."""
    if not run.loss_module.needs_teacher:
        return None
    return teacher_set([cache.manifest["teacher"] for cache in run.feed.builder.caches])


def _last_record(log_dir: Path) -> dict:
    lines = (log_dir / "metrics.jsonl").read_text().splitlines()
    return json.loads(lines[-1]) if lines else {}


def _count_skips(progress: Progress, skipped: Sequence[tuple[str, str]], step: int) -> None:
    for key, reason in skipped:
        progress.skipped[reason] = progress.skipped.get(reason, 0) + 1
        if len(progress.skipped_records) < MAX_SKIPPED_RECORDS:
            progress.skipped_records.append({"key": key, "reason": reason, "step": step})


# --- helpers ---------------------------------------------------------------------------------------


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
    """Refuse a damaged cache before anything is written: every file must exist with the
    byte size the manifest records (a stat per file, whatever the cache's size). The sha256
    of each shard is checked by the reader before the shard's rows are first used (opened
    with ``check``: :mod:`rdkd.cache.reader`), so the damage a size cannot show stops the
    run before its rows train the student. ``full`` (--verify-cache): also hash every file
    now, in one pass (then the reader does not hash again); False (--no-verify-cache): the
    reader checks nothing."""
    if full is not False:
        cache.require_intact(sizes_only=not full)


def _student_label(student: str) -> str:
    """A short name for reports: the config file's stem or the open_clip model name."""
    return Path(student).stem if student.lower().endswith(".json") else student


def _run_name(config: TrainConfig) -> str:
    return f"{_student_label(config.student).replace('/', '-')}-{config.method}-seed{config.seed}"


def _rdkd_checkpoint_model(path: Path) -> dict | None:
    """The student weights of an rdkd train-student checkpoint, or None for any other file
    (an open_clip checkpoint or tag, which open_clip loads itself). A ``.pt`` file is read
    as data only: one that needs more than ``weights_only=True`` is refused with one line."""
    if not path.is_file() or path.suffix != ".pt":
        return None
    state = checkpoints.load(path, "--init checkpoint", lazy=True)
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


def _resume_key(config: TrainConfig | dict, plan: Plan | dict) -> dict:
    """The settings a resumed run must share with the checkpoint's run."""
    merged = {**(config if isinstance(config, dict) else config.to_dict()),
              **(plan if isinstance(plan, dict) else asdict(plan))}
    return {name: merged.get(name) for name in RESUME_MUST_MATCH}


def _check_resumable(state: dict, wanted: dict, path: Path) -> None:
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not an rdkd train-student checkpoint")
    had = _resume_key(state["config"], state["plan"])
    differ = [k for k in RESUME_MUST_MATCH if had[k] != wanted[k]]
    if differ:
        shown = ", ".join(f"{k} {had[k]!r} -> {wanted[k]!r}" for k in differ)
        raise UserError(f"cannot resume {path}: the run differs in {shown}")
