"""Stage one: run the teacher once over a dataset and keep its embeddings in a cache.

Output folder (default ``artifacts/cache/<teacher>_<dataset>``), laid out as
``cache/FORMAT.md`` describes: ``images/`` and ``texts/`` Arrow shards, ``parts/`` shard
records, ``index.arrow``, ``rejects.parquet`` and, written last, ``manifest.json``.

How the work flows: the dataset is cut into fixed shards (webdataset: one per data shard;
otherwise ``rows_per_shard`` entries each). DataLoader workers read, decode and preprocess
images (all K views) and tokenise captions; the main process runs the teacher in batches
under ``torch.inference_mode`` (autocast on CUDA for bf16/fp16), L2-normalises, casts to the
storage dtype and writes each shard atomically when its last batch is done. Batches never
cross a shard boundary, so every shard sees the same batches whatever the number of
processes or restarts: the cache is byte-identical for 1 or N processes and for a resumed
run. Under torchrun rank r does the shards j with j % world == r; rank 0 writes the index,
rejects and manifest after a barrier.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.text import Text

import rdkd
from rdkd import distributed
from rdkd.cache import format as fmt
from rdkd.cache import writer
from rdkd.cache.views import ViewConfig, eval_view_box, random_view, render_view, view_rng
from rdkd.data import DataSpec, Dataset, decode_image, open_dataset
from rdkd.errors import SampleError, UserError
from rdkd.models import LoadedClip, ModelSpec, load_clip

DEFAULT_ARTIFACTS = Path("artifacts")
PRECISIONS = ("fp32", "bf16", "fp16")
_AUTOCAST_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Names the extraction writes into its output folder; --overwrite removes only these.
_CACHE_ENTRIES = (fmt.MANIFEST, fmt.INDEX, fmt.REJECTS, fmt.IMAGES_DIR, fmt.TEXTS_DIR, fmt.PARTS_DIR)

console = Console(stderr=True)


@dataclass
class ExtractSummary:
    """What one call of :func:`extract_teacher` produced."""

    output: Path
    manifest: dict
    images: int  # distinct images in the cache
    captions: int
    rejects: int
    shards_done: int  # shards this call computed (0 when the cache was already complete)
    seconds: float  # extracting and writing shards, index and manifest (setup excluded)
    images_per_second: float  # images through the teacher by this process / seconds


# --- inputs: one torch Dataset over the rdkd dataset ----------------------------------------


@dataclass
class _Item:
    index: int
    pixels: torch.Tensor | None = None  # [K, 3, H, W]
    crops: np.ndarray | None = None  # [K, 4]
    flips: np.ndarray | None = None  # [K]
    tokens: torch.Tensor | None = None  # [n_captions, context_length]
    reason: str | None = None


@dataclass
class _Batch:
    indices: list[int]  # entries that decoded, in order
    pixels: torch.Tensor  # [len(indices) * K, 3, H, W]
    crops: np.ndarray
    flips: np.ndarray
    tokens: torch.Tensor  # [sum(caption counts), context_length]
    caption_counts: list[int]
    rejects: list[tuple[int, str]] = field(default_factory=list)  # (entry, reason)

    def pin_memory(self) -> "_Batch":
        self.pixels = self.pixels.pin_memory()
        self.tokens = self.tokens.pin_memory()
        return self


class TeacherInputs(torch.utils.data.Dataset):
    """Entry i -> the teacher's inputs for image i (K views) and its captions, or a reject reason.

    Runs in DataLoader workers: reading, decoding, preprocessing and tokenising happen there,
    off the main process that feeds the teacher.
    """

    def __init__(self, dataset: Dataset, loaded: LoadedClip, views: ViewConfig):
        self.dataset = dataset
        self.preprocess = loaded.preprocess
        self.tokenizer = loaded.tokenizer
        cfg = loaded.preprocess_cfg
        self.size = cfg["size"]
        self.resize_mode = cfg.get("resize_mode", "shortest")
        self.mean, self.std = list(cfg["mean"]), list(cfg["std"])
        self.views = views

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> _Item:
        key = self.dataset.keys[i]
        try:
            image = decode_image(self.dataset.read_image_bytes(i))
        except SampleError as err:
            return _Item(i, reason=err.reason)
        except Exception as err:  # one odd file must not end a run over millions; it is recorded
            return _Item(i, reason=f"unreadable image: {type(err).__name__}: {err}")
        pixels = [self.preprocess(image)]
        crops = [eval_view_box(image.width, image.height, self.size, self.resize_mode)]
        flips = [False]
        for view in range(1, self.views.count):
            box, flip = random_view(image.width, image.height, view_rng(key, view, self.views.seed), self.views)
            rendered = render_view(image, box, flip, self.size, self.views.interpolation)
            pixels.append(TF.normalize(TF.to_tensor(rendered), self.mean, self.std))
            crops.append(box)
            flips.append(flip)
        tokens = self.tokenizer(list(self.dataset.captions(i)))
        return _Item(i, torch.stack(pixels), np.array(crops, dtype=np.float32), np.array(flips, dtype=bool), tokens)


def _collate(items: Sequence[_Item]) -> _Batch:
    good = [it for it in items if it.reason is None]
    rejects = [(it.index, it.reason) for it in items if it.reason is not None]
    if not good:
        return _Batch([], torch.zeros(0), np.zeros((0, 4), np.float32), np.zeros(0, bool), torch.zeros(0, dtype=torch.long),
                      [], rejects)
    return _Batch(
        indices=[it.index for it in good],
        pixels=torch.cat([it.pixels for it in good]),
        crops=np.concatenate([it.crops for it in good]),
        flips=np.concatenate([it.flips for it in good]),
        tokens=torch.cat([it.tokens for it in good]),
        caption_counts=[len(it.tokens) for it in good],
        rejects=rejects,
    )


class _ShardBatches:
    """Batches of entry indices that never cross a shard boundary (the same for any world size)."""

    def __init__(self, ranges: Sequence[range], batch_size: int):
        self.ranges, self.batch_size = list(ranges), batch_size

    def __iter__(self) -> Iterator[list[int]]:
        for r in self.ranges:
            for start in range(r.start, r.stop, self.batch_size):
                yield list(range(start, min(start + self.batch_size, r.stop)))

    def __len__(self) -> int:
        return sum(math.ceil(len(r) / self.batch_size) for r in self.ranges)


# --- one shard's results ---------------------------------------------------------------------


class _ShardBuffer:
    """Rows of one shard collected batch by batch, then written as one unit."""

    def __init__(self, shard: int, entries: range):
        self.shard, self.entries = shard, entries
        self.seen = 0
        self.image_keys: list[str] = []
        self.views: list[np.ndarray] = []
        self.crops: list[np.ndarray] = []
        self.flips: list[np.ndarray] = []
        self.image_emb: list[np.ndarray] = []
        self.text_keys: list[str] = []
        self.caption_index: list[np.ndarray] = []
        self.captions: list[str] = []
        self.text_emb: list[np.ndarray] = []
        self.rejects: list[dict] = []

    @property
    def complete(self) -> bool:
        return self.seen == len(self.entries)

    def write(self, root: Path, cache_id: str, dim: int, storage_dtype: str) -> dict:
        empty = np.zeros((0, dim), fmt.numpy_storage_dtype(storage_dtype))
        images = writer.image_table(
            self.image_keys,
            np.concatenate(self.views) if self.views else np.zeros(0),
            np.concatenate(self.crops) if self.crops else np.zeros((0, 4)),
            np.concatenate(self.flips) if self.flips else np.zeros(0, bool),
            np.concatenate(self.image_emb) if self.image_emb else empty,
            storage_dtype,
        )
        texts = writer.text_table(
            self.text_keys,
            np.concatenate(self.caption_index) if self.caption_index else np.zeros(0),
            self.captions,
            np.concatenate(self.text_emb) if self.text_emb else empty,
            storage_dtype,
        )
        return writer.write_shard(root, self.shard, self.entries, cache_id, images, texts, self.rejects)


# --- the stage -------------------------------------------------------------------------------


def shard_ranges(dataset: Dataset, rows_per_shard: int) -> list[range]:
    """The fixed entry ranges of the cache shards: data shards for webdataset, else R rows each."""
    if dataset.shard_ranges is not None:
        return list(dataset.shard_ranges)
    n = len(dataset)
    return [range(start, min(start + rows_per_shard, n)) for start in range(0, n, rows_per_shard)]


def default_output(data: DataSpec, teacher: ModelSpec, artifacts: Path = DEFAULT_ARTIFACTS) -> Path:
    """``artifacts/cache/<teacher>_<dataset>``, both parts reduced to safe file-name characters."""
    teacher_part = teacher.name or Path(teacher.config or "teacher").stem
    if teacher.pretrained and not Path(teacher.pretrained).exists():  # a tag, not a checkpoint path
        teacher_part += f"-{teacher.pretrained}"
    data_path = Path(str(data.path).split("{")[0].rstrip("/") or "data")
    data_part = data_path.stem if data_path.suffix else data_path.name
    name = f"{teacher_part}_{data_part}"
    return artifacts / "cache" / re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-")


def _cache_header(loaded: LoadedClip, dataset: Dataset, data: DataSpec, ranges: Sequence[range],
                  rows_per_shard: int | None, views: ViewConfig, storage_dtype: str, precision: str) -> dict:
    """Everything the manifest says about how the cache was made, and the cache id over it."""
    info = loaded.info
    identity = {
        "teacher": {
            "weights_sha256": loaded.weights_sha256,
            "model_config": info.get("model_config"),
            "open_clip_name": info.get("open_clip_name"),
        },
        "preprocess": loaded.preprocess_cfg,
        "tokenizer": {"name": info.get("tokenizer"), "context_length": loaded.context_length},
        "views": views.to_dict(),
        "storage_dtype": storage_dtype,
        "precision": precision,
        "dataset_fingerprint": dataset.fingerprint,
        "shards": [[r.start, r.stop] for r in ranges],
    }
    cache_id = hashlib.sha256(fmt.canonical_json(identity)).hexdigest()[:32]
    return {
        "cache_id": cache_id,
        "rdkd_version": rdkd.__version__,
        "teacher": {
            "spec": loaded.spec.to_dict(),
            "weights_sha256": loaded.weights_sha256,
            "logit_scale": loaded.logit_scale,
            "embed_dim": loaded.embed_dim,
            "open_clip_name": info.get("open_clip_name"),
            "open_clip_version": info.get("open_clip_version"),
            "model_config": info.get("model_config"),
        },
        "dim": loaded.embed_dim,
        "storage_dtype": storage_dtype,
        "precision": precision,
        "preprocess": loaded.preprocess_cfg,
        "views": views.to_dict(),
        "tokenizer": {"name": info.get("tokenizer"), "context_length": loaded.context_length},
        "dataset": {
            "path": str(data.path),
            "format": dataset.format,
            "fingerprint": dataset.fingerprint,
            "entries": len(dataset),
            "index_rejects": len(dataset.index_rejects),
        },
        "layout": {
            "shards": len(ranges),
            "shard_by": "data shard" if dataset.shard_ranges is not None else "rows",
            "rows_per_shard": rows_per_shard if dataset.shard_ranges is None else None,
        },
    }


def _existing_cache_id(root: Path) -> str | None:
    """The cache id of what is already at ``root`` (complete or partial), None when nothing is."""
    manifest = root / fmt.MANIFEST
    if manifest.is_file():
        try:
            return json.loads(manifest.read_text(encoding="utf-8"))["cache_id"]
        except (OSError, ValueError, KeyError, TypeError):
            return "<unreadable manifest>"
    for part in sorted((root / fmt.PARTS_DIR).glob("part-*.json")):
        try:
            return json.loads(part.read_text(encoding="utf-8"))["cache_id"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def _check_output(root: Path, cache_id: str, overwrite: bool) -> str:
    """Decide what to do with ``root``: 'new', 'resume', 'complete' or 'replace'. Changes nothing."""
    if root.exists() and not root.is_dir():
        raise UserError(f"output {root} exists and is not a folder")
    if not root.exists():
        return "new"
    present = [name for name in _CACHE_ENTRIES if (root / name).exists()]
    others = [p.name for p in root.iterdir() if p.name not in _CACHE_ENTRIES and not p.name.startswith(".")]
    if others and not present:
        raise UserError(f"output {root} is a non-empty folder that is not an rdkd cache; choose a new or empty folder")
    existing = _existing_cache_id(root)
    if existing is not None and existing != cache_id:
        if not overwrite:
            raise UserError(
                f"output {root} holds a cache of another teacher, preprocessing or dataset "
                f"(cache id {existing} != {cache_id}); pass --overwrite to replace it or choose another --output"
            )
        return "replace"
    if overwrite:
        return "replace"
    if existing == cache_id and (root / fmt.MANIFEST).is_file():
        return "complete"
    return "resume"


def _check_writable(root: Path, rank: int) -> bool:
    """Create ``root`` if needed and check a file can be written there; True if it was created."""
    created = not root.exists()
    probe = root / f".rdkd-write-probe-{rank}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise UserError(f"cannot write to output {root}: {err.strerror or err}") from None
    return created


def _remove_cache(root: Path) -> None:
    for name in _CACHE_ENTRIES:
        path = root / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _remove_stale_temporaries(root: Path) -> None:
    """Temporary files of a killed run (never renamed into place, so never read)."""
    for folder in (fmt.IMAGES_DIR, fmt.TEXTS_DIR, fmt.PARTS_DIR):
        for tmp in (root / folder).glob(".part-*.tmp-*"):
            tmp.unlink(missing_ok=True)


def _resolve_device(device: str, local_rank: int) -> torch.device:
    if device == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device} requested but CUDA is not available")
    return resolved


class _RateColumn(ProgressColumn):
    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.1f} img/s" if speed else "- img/s", style="progress.data.speed")


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]extract-teacher"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("images"),
        _RateColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
    )


def _validate(batch_size: int, workers: int, precision: str, storage_dtype: str, views: ViewConfig,
              rows_per_shard: int, max_reject_fraction: float) -> None:
    if batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    if workers < 0:
        raise UserError("--workers must be 0 or more")
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    if storage_dtype not in fmt.STORAGE_DTYPES:
        raise UserError(f"unknown storage dtype {storage_dtype!r}; expected one of {', '.join(fmt.STORAGE_DTYPES)}")
    if views.count < 1:
        raise UserError("--views must be at least 1")
    if not 0 < views.scale[0] <= views.scale[1] <= 1:
        raise UserError("--view-scale must be two numbers 0 < min <= max <= 1")
    if rows_per_shard < 1:
        raise UserError("--rows-per-shard must be at least 1")
    if not 0 <= max_reject_fraction <= 1:
        raise UserError("--max-reject-fraction must be between 0 and 1")


def extract_teacher(
    data: DataSpec,
    teacher: ModelSpec,
    output: Path | str | None = None,
    *,
    batch_size: int = 256,
    workers: int = 4,
    device: str = "auto",
    precision: str = "fp32",
    storage_dtype: str = "float16",
    views: ViewConfig = ViewConfig(),
    rows_per_shard: int = 10_000,
    resume: bool = True,
    overwrite: bool = False,
    max_reject_fraction: float = 0.05,
    progress: bool = True,
) -> ExtractSummary:
    """Run ``teacher`` over ``data`` once and write its embeddings to a cache at ``output``.

    Resumes an interrupted run by default (finished shards are kept and skipped);
    ``overwrite`` replaces a cache of another teacher/preprocessing/dataset. Raises
    :class:`UserError` (nothing already written lost) for bad options, a missing dataset, a
    teacher that cannot be loaded, an output that holds another cache, an unwritable
    output, or more rejected samples than ``max_reject_fraction`` of the dataset.
    """
    _validate(batch_size, workers, precision, storage_dtype, views, rows_per_shard, max_reject_fraction)
    torch_device = _resolve_device(device, int(os.environ.get("LOCAL_RANK", "0")))
    if precision != "fp32" and torch_device.type != "cuda":
        raise UserError(f"--precision {precision} needs CUDA; use fp32 on {torch_device.type}")
    joined_here = not torch.distributed.is_initialized()
    dist_info = distributed.setup(torch_device)
    try:
        return _extract(data, teacher, output, dist_info.rank, dist_info.world_size, torch_device,
                        batch_size=batch_size, workers=workers, precision=precision, storage_dtype=storage_dtype,
                        views=views, rows_per_shard=rows_per_shard, resume=resume, overwrite=overwrite,
                        max_reject_fraction=max_reject_fraction, progress=progress)
    finally:
        if joined_here:
            distributed.cleanup()


def _extract(data: DataSpec, teacher: ModelSpec, output, rank: int, world: int, torch_device: torch.device, *,
             batch_size: int, workers: int, precision: str, storage_dtype: str, views: ViewConfig,
             rows_per_shard: int, resume: bool, overwrite: bool, max_reject_fraction: float,
             progress: bool) -> ExtractSummary:
    """:func:`extract_teacher` on one rank, after the options are checked and the group is joined."""
    dataset = open_dataset(data)
    root = Path(output) if output is not None else default_output(data, teacher)
    created = _check_writable(root, rank)
    try:
        loaded = load_clip(teacher, device=torch_device)
        ranges = shard_ranges(dataset, rows_per_shard)
        header = _cache_header(loaded, dataset, data, ranges, rows_per_shard, views, storage_dtype, precision)
        cache_id = header["cache_id"]
        action = _check_output(root, cache_id, overwrite)  # every rank decides the same, before any change
    except UserError:
        if created and rank == 0:  # leave no empty folder behind a run that never started
            with contextlib.suppress(OSError):
                root.rmdir()
        raise

    total_entries = len(dataset) + len(dataset.index_rejects)
    allowed_rejects = math.floor(max_reject_fraction * total_entries)
    index_rejects = [{"key": r.key, "source": r.source, "reason": r.reason} for r in dataset.index_rejects]

    distributed.barrier()
    if action == "complete" and resume:
        return _summary_of_complete(root, time.perf_counter(), rank)
    if rank == 0:
        if action == "replace":
            _remove_cache(root)
        elif not resume:
            (root / fmt.MANIFEST).unlink(missing_ok=True)
        _remove_stale_temporaries(root)
    distributed.barrier()
    if len(index_rejects) > allowed_rejects:
        raise _too_many_rejects(root, len(index_rejects), total_entries, max_reject_fraction, partial=True)

    mine = [j for j in range(len(ranges)) if j % world == rank]
    todo = [j for j in mine if not (resume and _shard_done(root, j, ranges[j], cache_id))]
    start = time.perf_counter()
    images_done = _run_shards(root, dataset, loaded, todo, ranges, cache_id, header, batch_size, workers,
                              torch_device, precision, storage_dtype, views, progress and rank == 0,
                              len(index_rejects), allowed_rejects, total_entries, max_reject_fraction, world)

    distributed.barrier()
    parts = [writer.read_part(root, j) for j in range(len(ranges))]
    missing = [j for j, p in enumerate(parts) if p is None or p["cache_id"] != cache_id]
    if missing:
        raise UserError(f"{len(missing)} shard(s) of {root} were not written (first: {missing[0]}); rerun to resume")
    rejects = writer.all_rejects(parts, index_rejects)
    if len(rejects) > allowed_rejects:
        if rank == 0:
            writer.write_rejects(root, rejects)
        distributed.barrier()
        raise _too_many_rejects(root, len(rejects), total_entries, max_reject_fraction, partial=False)
    manifest = writer.finalize(root, header, parts, index_rejects) if rank == 0 else None
    distributed.barrier()
    if manifest is None:
        manifest = json.loads((root / fmt.MANIFEST).read_text(encoding="utf-8"))
    seconds = time.perf_counter() - start  # shards, index and manifest; not indexing or model loading
    summary = ExtractSummary(
        output=root,
        manifest=manifest,
        images=manifest["counts"]["images"],
        captions=manifest["counts"]["captions"],
        rejects=manifest["counts"]["rejects"],
        shards_done=len(todo),
        seconds=seconds,
        images_per_second=images_done / seconds if seconds > 0 else 0.0,
    )
    if rank == 0:
        _print_summary(summary, world)
    return summary


def _shard_done(root: Path, shard: int, entries: range, cache_id: str) -> bool:
    record = writer.read_part(root, shard)
    return record is not None and record["cache_id"] == cache_id and record["entries"] == [entries.start, entries.stop]


def _too_many_rejects(root: Path, rejects: int, total: int, fraction: float, partial: bool) -> UserError:
    where = "" if partial else f" (reasons in {root / fmt.REJECTS}; finished shards are kept, so a rerun resumes)"
    return UserError(
        f"{rejects} of {total} samples rejected ({rejects / max(total, 1):.1%}), more than "
        f"--max-reject-fraction {fraction:g}{where}"
    )


def _run_shards(root, dataset, loaded, todo, ranges, cache_id, header, batch_size, workers, device, precision,
                storage_dtype, views, show_progress, index_reject_count, allowed_rejects, total_entries,
                max_reject_fraction, world) -> int:
    """Extract and write the shards ``todo``; return how many images went through the teacher."""
    dim = header["dim"]
    buffers: dict[int, _ShardBuffer] = {}
    for j in todo:
        buffers[j] = _ShardBuffer(j, ranges[j])
    # Shards with no entries (a data shard whose members were all broken) are written at once.
    for j in [j for j in todo if len(ranges[j]) == 0]:
        buffers.pop(j).write(root, cache_id, dim, storage_dtype)
    live = [j for j in todo if len(ranges[j]) > 0]
    live_starts = np.array([ranges[j].start for j in live], dtype=np.int64)
    if not live:
        return 0

    loader = torch.utils.data.DataLoader(
        TeacherInputs(dataset, loaded, views),
        batch_sampler=_ShardBatches([ranges[j] for j in live], batch_size),
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers > 0 else None,
    )
    autocast = (torch.autocast("cuda", dtype=_AUTOCAST_DTYPE[precision]) if precision != "fp32"
                else contextlib.nullcontext())
    model = loaded.model
    keys = dataset.keys
    counts = {"images": 0, "rejects": index_reject_count}

    def forward(batch: _Batch):
        """Start the teacher on a batch; the embeddings come back to the host asynchronously."""
        if not batch.indices:
            return None
        with torch.inference_mode(), autocast:
            image_emb = model.encode_image(batch.pixels.to(device, non_blocking=True))
            text_emb = model.encode_text(batch.tokens.to(device, non_blocking=True))
            image_emb = F.normalize(image_emb.float(), dim=-1).to("cpu", non_blocking=True)
            text_emb = F.normalize(text_emb.float(), dim=-1).to("cpu", non_blocking=True)
        done = None
        if device.type == "cuda":
            done = torch.cuda.Event()
            done.record()
        return image_emb, text_emb, done

    def finish(batch: _Batch, result, bar, task) -> None:
        """Store a batch's rows in its shard buffer; write the shard when it is complete."""
        first = batch.indices[0] if batch.indices else batch.rejects[0][0]
        shard = live[int(np.searchsorted(live_starts, first, side="right")) - 1]
        buf = buffers[shard]
        for index, reason in batch.rejects:
            buf.rejects.append({"key": keys[index], "source": dataset.source(index), "reason": reason})
        if result is not None:
            image_emb, text_emb, done = result
            if done is not None:
                done.synchronize()
            k = views.count
            for index, count in zip(batch.indices, batch.caption_counts):
                buf.image_keys.extend([keys[index]] * k)
                buf.text_keys.extend([keys[index]] * count)
                buf.captions.extend(dataset.captions(index))
                buf.caption_index.append(np.arange(count, dtype=np.int16))
            buf.views.append(np.tile(np.arange(k, dtype=np.int16), len(batch.indices)))
            buf.crops.append(batch.crops)
            buf.flips.append(batch.flips)
            buf.image_emb.append(fmt.to_storage(image_emb.numpy(), storage_dtype))
            buf.text_emb.append(fmt.to_storage(text_emb.numpy(), storage_dtype))
        n = len(batch.indices) + len(batch.rejects)
        buf.seen += n
        counts["images"] += len(batch.indices)
        counts["rejects"] += len(batch.rejects)
        bar.advance(task, n)
        if buf.complete:
            buffers.pop(shard).write(root, cache_id, dim, storage_dtype)
            # One process knows the run can no longer meet the threshold: stop now, keep what
            # is written (under torchrun the check waits for all ranks, at the end).
            if world == 1 and counts["rejects"] > allowed_rejects:
                raise _too_many_rejects(root, counts["rejects"], total_entries, max_reject_fraction, partial=True)

    with _progress(show_progress) as bar:
        task = bar.add_task("extract", total=sum(len(ranges[j]) for j in live))
        pending = None
        # One batch of lag: batch i is stored and written while the device runs batch i+1.
        for batch in loader:
            result = forward(batch)
            if pending is not None:
                finish(*pending, bar, task)
            pending = (batch, result)
        if pending is not None:
            finish(*pending, bar, task)
    images_done = counts["images"]
    return images_done


def _summary_of_complete(root: Path, start: float, rank: int) -> ExtractSummary:
    manifest = json.loads((root / fmt.MANIFEST).read_text(encoding="utf-8"))
    counts = manifest["counts"]
    summary = ExtractSummary(root, manifest, counts["images"], counts["captions"], counts["rejects"], 0,
                             time.perf_counter() - start, 0.0)
    if rank == 0:
        console.print(f"cache {root} is already complete (cache id {manifest['cache_id']}); nothing to do")
    return summary


def _print_summary(summary: ExtractSummary, world: int) -> None:
    console.print(
        f"[bold]cache[/bold] {summary.output}: {summary.images:,} images, {summary.captions:,} captions, "
        f"{summary.rejects:,} rejects; {summary.shards_done} shard(s) extracted in {summary.seconds:.1f} s "
        f"({summary.images_per_second:,.1f} images/s{' on rank 0' if world > 1 else ''})"
    )
