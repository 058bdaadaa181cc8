"""Stage one: run the teacher once over a dataset and keep its embeddings in a cache.

Output folder (default ``artifacts/cache/<teacher>_<dataset>``), laid out as
``cache/FORMAT.md`` describes: ``images/`` and ``texts/`` Arrow shards, ``parts/`` shard
records, ``index.arrow``, ``rejects.parquet`` and, written last, ``manifest.json``.

How the work flows (the file reads in this order):

1. :class:`ExtractConfig`: the options, filled by :func:`extract_teacher`'s keyword
   arguments (the CLI's). Those that shape the cache (precision, storage dtype, views, rows
   per shard) are recorded in the manifest and its cache id.
2. The dataset is cut into fixed shards (webdataset: one per data shard; otherwise
   ``rows_per_shard`` entries each). Batches never cross a shard boundary, so every shard
   sees the same batches whatever the number of processes or restarts: the cache is
   byte-identical for 1 or N processes and for a resumed run. Under torchrun rank r does the
   shards j with j % world == r; rank 0 writes the index, rejects and manifest after a barrier.
3. DataLoader workers (:class:`TeacherInputs`) read and decode the images, render all K
   views at the teacher's input size and hand them over as ``uint8`` (a quarter of the
   bytes of float32), with the captions tokenised. With ``decode="device"`` they read the
   image's header only and hand over its encoded bytes and view boxes; the main process
   decodes, crops and resizes them on the device (:class:`rdkd.pixels.DeviceDecoder`,
   :meth:`_Batch.decode_on`), an image that does not decode there becoming a reject.
4. The main process runs the teacher with :class:`rdkd.encoding.Encoder`, the encoder
   evaluate scores models with: it copies a batch from pinned memory to the device without
   waiting, normalises it there (bitwise the values of the teacher's host transform), runs
   the teacher under the precision's autocast, L2-normalises in float32 and starts the copy
   of the embeddings back. The one wait on the device per batch is for that copy, and it
   comes one batch late: batch i is stored while the device runs batch i+1.
5. :class:`ShardAssembler` gathers each batch's rows into its shard (cast to the storage
   dtype) and writes the shard atomically as soon as its last entry is in.

Rates, per process (:class:`ExtractSummary`, the printed line):

- whole run: images through the teacher / ``seconds``, the time of shards, index and
  manifest (setup, i.e. dataset indexing and model loading, excluded);
- steady state, the pipeline fill excluded: with N batches and K = max(1, workers) fill
  batches (each worker's first batch carries its start-up; the first batches also carry the
  device's warm-up), the images of batches K+1..N divided by the wall time from the moment
  batch K's embeddings were on the host to the moment batch N's were (the end of the
  forward work; the last shard write, the index and the manifest come after it). "On the
  host": on CUDA when the wait for the batch's copy back returns; on a CPU device, where the
  forward runs synchronously, when it returns. None when N <= K. Batches the workers had ready when the window opens (at most workers x prefetch)
  count in it, so on a loader-bound run this over-states the loader's rate by at most that
  many batches over N - K.
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
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

import rdkd
from rdkd import distributed, pixels, runtime
from rdkd.cache import format as fmt
from rdkd.cache import writer
from rdkd.cache.views import ViewConfig, random_view, view_rng
from rdkd.data import DataSpec, Dataset, open_dataset, open_image
from rdkd.encoding import Encoded, Encoder
from rdkd.errors import UserError
from rdkd.files import writing
from rdkd.models import LoadedClip, ModelSpec, load_clip
from rdkd.options import nested, option

# Names the extraction writes into its output folder; --overwrite removes only these.
_CACHE_ENTRIES = (fmt.MANIFEST, fmt.INDEX, fmt.REJECTS, fmt.IMAGES_DIR, fmt.TEXTS_DIR, fmt.PARTS_DIR)

console = Console(stderr=True)


@dataclass(frozen=True)
class ExtractConfig:
    """How one extraction runs. ``precision``, ``storage_dtype``, ``views``, ``preprocess``
    and ``rows_per_shard`` shape the cache and are recorded in its manifest; the others say how
    the work is done (the same cache comes out for any batch size, workers or device count)."""

    batch_size: int = option(256, "Images per teacher forward pass (per process).", min=1)
    workers: int = option(4, "DataLoader processes that read, decode and preprocess (per process).", min=0)
    device: str = option("auto", "auto (cuda:LOCAL_RANK if present, else cpu), cpu, cuda, cuda:N.")
    precision: str = option("fp32", "fp32, or bf16 / fp16 autocast (fp16 on CUDA only).")
    storage_dtype: str = option("float16", "Embedding dtype on disk: float16, bfloat16 or float32.")
    views: ViewConfig = nested(ViewConfig)
    preprocess: str = option(pixels.DEFAULT_MODE, "How images become pixels: exact (open_clip's transforms on the "
                                                  "full decode) or fast (JPEGs decoded at reduced size, one "
                                                  "crop-resize per view); recorded in the cache, followed by students.")
    decode: str = option("workers", pixels.DECODE_HELP)
    rows_per_shard: int = option(10_000, "Images per cache shard (CSV/Parquet; webdataset follows its data shards).",
                                 min=1)
    resume: bool = option(True, "Keep and skip shards an interrupted run finished.", "--resume/--no-resume")
    overwrite: bool = option(False, "Replace a cache of another teacher, preprocessing or dataset at --out.")
    max_reject_fraction: float = option(0.05, "Fail when more than this fraction of samples is rejected.",
                                        min=0.0, max=1.0)
    progress: bool = option(True, "Show a progress bar.", "--progress/--no-progress")

    def check(self) -> None:
        """One-line :class:`UserError` for an option out of range (the device's checks come
        with the device)."""
        if self.batch_size < 1:
            raise UserError("--batch-size must be at least 1")
        if self.workers < 0:
            raise UserError("--workers must be 0 or more")
        if self.precision not in runtime.PRECISIONS:
            raise UserError(f"unknown precision {self.precision!r}; expected one of {', '.join(runtime.PRECISIONS)}")
        if self.storage_dtype not in fmt.STORAGE_DTYPES:
            raise UserError(f"unknown storage dtype {self.storage_dtype!r}; "
                            f"expected one of {', '.join(fmt.STORAGE_DTYPES)}")
        pixels.check_mode(self.preprocess)
        if pixels.check_decode(self.decode) == "device" and self.preprocess != "fast":
            raise UserError("--decode device makes the fast views: pass --preprocess fast with it")
        if self.views.count < 1:
            raise UserError("--views must be at least 1")
        if not 0 < self.views.scale[0] <= self.views.scale[1] <= 1:
            raise UserError("--view-scale must be two numbers 0 < min <= max <= 1")
        if self.rows_per_shard < 1:
            raise UserError("--rows-per-shard must be at least 1")
        if not 0 <= self.max_reject_fraction <= 1:
            raise UserError("--max-reject-fraction must be between 0 and 1")

    @property
    def fill_batches(self) -> int:
        """K of the steady-state rate (module docstring): one batch per worker."""
        return max(1, self.workers)


@dataclass
class ExtractSummary:
    """What one call of :func:`extract_teacher` produced. Rates are this process's; the
    module docstring defines them."""

    output: Path
    manifest: dict
    images: int  # distinct images in the cache
    captions: int
    rejects: int
    shards_done: int  # shards this call computed (0 when the cache was already complete)
    seconds: float  # extracting and writing shards, index and manifest (setup excluded)
    images_per_second: float  # whole run: images through the teacher by this process / seconds
    steady_images_per_second: float | None = None  # pipeline fill excluded; None for runs of <= K batches


# --- inputs: what the DataLoader workers hand over -------------------------------------------


@dataclass
class _Item:
    """One entry: its K views and tokens, or the reason it was rejected."""

    index: int
    key: str
    pixels: torch.Tensor | bytes | None = None  # uint8 [K, 3, H, W]; --decode device: the encoded image
    crops: np.ndarray | None = None  # [K, 4]
    flips: np.ndarray | None = None  # [K]
    captions: list[str] = field(default_factory=list)
    tokens: torch.Tensor | None = None  # [len(captions), context_length]
    reject: dict | None = None  # {"key", "source", "reason"}


@dataclass
class _Batch:
    """Consecutive entries of one shard: the rows of those that decoded, and the rejects."""

    first: int  # the first entry (decoded or not): which shard the batch belongs to
    entries: int  # entries covered, decoded + rejected
    keys: list[str]  # entries that decoded, in order
    pixels: torch.Tensor | list[bytes]  # uint8 [len(keys) * K, 3, H, W]; --decode device: encoded, one per key
    indices: list[int]  # the entries of keys
    crops: np.ndarray  # [len(keys) * K, 4]
    flips: np.ndarray  # [len(keys) * K]
    captions: list[str]  # all captions of those entries, in order
    caption_counts: list[int]
    tokens: torch.Tensor  # [len(captions), context_length]
    rejects: list[dict]

    def pin_memory(self) -> "_Batch":
        if isinstance(self.pixels, torch.Tensor):
            self.pixels = self.pixels.pin_memory()
        self.tokens = self.tokens.pin_memory()
        return self

    def decode_on(self, decoder: pixels.DeviceDecoder, dataset: Dataset) -> "_Batch":
        """--decode device: the encoded images become their K views on the device; entries
        that no path decodes move to the rejects, as a worker would have rejected them."""
        views = len(self.crops) // max(1, len(self.keys))
        wanted = [[None] + [(box, bool(flip)) for box, flip in zip(self.crops[k * views + 1:(k + 1) * views],
                                                                   self.flips[k * views + 1:(k + 1) * views])]
                  for k in range(len(self.keys))]
        self.pixels, failed = decoder.decode(self.pixels, wanted)
        if not failed:
            return self
        lost = {k for k, _ in failed}
        self.rejects += [{"key": self.keys[k], "source": dataset.source(self.indices[k]), "reason": reason}
                         for k, reason in failed]
        kept = [k for k in range(len(self.keys)) if k not in lost]
        rows = [k * views + v for k in kept for v in range(views)]
        firsts = np.cumsum([0] + self.caption_counts)
        text_rows = [r for k in kept for r in range(firsts[k], firsts[k + 1])]
        self.keys, self.indices = [self.keys[k] for k in kept], [self.indices[k] for k in kept]
        self.pixels, self.crops, self.flips = self.pixels[rows], self.crops[rows], self.flips[rows]
        self.captions = [self.captions[r] for r in text_rows]
        self.caption_counts = [self.caption_counts[k] for k in kept]
        self.tokens = self.tokens[text_rows]
        return self


class TeacherInputs(torch.utils.data.Dataset):
    """Entry i -> the teacher's inputs for image i (K views, uint8) and its captions, or a
    reject reason. Runs in DataLoader workers: reading, decoding, rendering views and
    tokenising happen there, off the main process that feeds the teacher.

    View 0 is the teacher's eval view, views 1..K-1 random crops drawn from the image's
    size; all are rendered by one :class:`rdkd.pixels.ViewRenderer` in the cache's
    preprocessing (``exact``: view 0 is open_clip's eval transform stopped before its float
    conversion), the pixels a student replays.
    """

    def __init__(self, dataset: Dataset, loaded: LoadedClip, views: ViewConfig, preprocess: str = pixels.DEFAULT_MODE,
                 encoded: bool = False):
        self.dataset = dataset
        self.renderer = pixels.ViewRenderer(loaded.preprocess, loaded.preprocess_cfg["size"], views.interpolation,
                                            loaded.preprocess_cfg.get("resize_mode", "shortest"), preprocess)
        self.encoded = encoded  # --decode device: hand over the bytes and the views' boxes, not pixels
        self.tokenizer = loaded.tokenizer
        self.views = views

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> _Item:
        key = self.dataset.keys[i]
        rendered, reason = runtime.decode_or_reason(partial(self.dataset.read_image_bytes, i),
                                                    partial(self.render, key))
        if reason is not None:
            return _Item(i, key, reject={"key": key, "source": self.dataset.source(i), "reason": reason})
        pixels, crops, flips = rendered
        captions = list(self.dataset.captions(i))
        return _Item(i, key, pixels, crops, flips, captions, self.tokenizer(captions))

    def render(self, key: str, data: bytes) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        """The K views of one image: uint8 pixels [K, 3, H, W], crop boxes [K, 4], flips [K]."""
        def views(width: int, height: int) -> list:
            return [None] + [random_view(width, height, view_rng(key, view, self.views.seed), self.views)
                             for view in range(1, self.views.count)]

        if self.encoded:
            width, height = open_image(data).size
            chosen = views(width, height)[1:]
            boxes = [self.renderer.eval_box(width, height)] + [box for box, _ in chosen]
            flips = [False] + [flip for _, flip in chosen]
            return data, np.array(boxes, dtype=np.float32), np.array(flips, dtype=bool)
        return self.renderer.render(data, views)


def _collate(items: Sequence[_Item]) -> _Batch:
    good = [it for it in items if it.reject is None]
    return _Batch(
        first=items[0].index,
        entries=len(items),
        keys=[it.key for it in good],
        pixels=([it.pixels for it in good] if good and isinstance(good[0].pixels, bytes) else
                torch.cat([it.pixels for it in good]) if good else torch.zeros(0, dtype=torch.uint8)),
        indices=[it.index for it in good],
        crops=np.concatenate([it.crops for it in good]) if good else np.zeros((0, 4), np.float32),
        flips=np.concatenate([it.flips for it in good]) if good else np.zeros(0, bool),
        captions=[c for it in good for c in it.captions],
        caption_counts=[len(it.captions) for it in good],
        tokens=torch.cat([it.tokens for it in good]) if good else torch.zeros(0, dtype=torch.long),
        rejects=[it.reject for it in items if it.reject is not None],
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


# --- the shards' rows ------------------------------------------------------------------------


class _ShardRows:
    """Rows of one shard, batch by batch, until the shard is written as one unit."""

    def __init__(self, shard: int, entries: range):
        self.shard, self.entries = shard, entries
        self.seen = 0  # entries added, decoded or rejected
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


class ShardAssembler:
    """Gathers finished batches into their shards and writes each shard (atomically, with
    its commit record) as soon as its last entry is in."""

    def __init__(self, root: Path, cache_id: str, dim: int, storage_dtype: str, views: int):
        self.root, self.cache_id, self.dim, self.storage_dtype, self.views = root, cache_id, dim, storage_dtype, views
        self.open: dict[int, _ShardRows] = {}
        self._starts = np.zeros(0, np.int64)  # first entry of each shard opened, in shard order
        self._shards: list[int] = []
        self.images = 0  # entries decoded and embedded so far
        self.rejects = 0  # entries rejected so far

    def begin(self, shards: dict[int, range]) -> list[range]:
        """Open ``shards`` (shard -> entries, in shard order). Shards without entries (a data
        shard whose members were all broken) are written at once; returns the entry ranges
        left to extract."""
        live = {j: entries for j, entries in shards.items() if len(entries) > 0}
        for j, entries in shards.items():
            if j not in live:
                _ShardRows(j, entries).write(self.root, self.cache_id, self.dim, self.storage_dtype)
        self.open = {j: _ShardRows(j, entries) for j, entries in live.items()}
        self._shards = list(live)
        self._starts = np.array([entries.start for entries in live.values()], dtype=np.int64)
        return list(live.values())

    def add(self, done: Encoded[_Batch]) -> int | None:
        """Store a batch's rows in its shard; return the shard when this completed and wrote it."""
        batch, image_emb, text_emb = done.tag, done.images, done.texts
        shard = self._shards[int(np.searchsorted(self._starts, batch.first, side="right")) - 1]
        rows = self.open[shard]
        rows.rejects.extend(batch.rejects)
        if batch.keys:
            k = self.views
            rows.image_keys.extend(key for key in batch.keys for _ in range(k))
            rows.views.append(np.tile(np.arange(k, dtype=np.int16), len(batch.keys)))
            rows.crops.append(batch.crops)
            rows.flips.append(batch.flips)
            rows.image_emb.append(fmt.to_storage(image_emb, self.storage_dtype))
            rows.text_keys.extend(key for key, n in zip(batch.keys, batch.caption_counts) for _ in range(n))
            rows.caption_index.extend(np.arange(n, dtype=np.int16) for n in batch.caption_counts)
            rows.captions.extend(batch.captions)
            rows.text_emb.append(fmt.to_storage(text_emb, self.storage_dtype))
        rows.seen += batch.entries
        self.images += len(batch.keys)
        self.rejects += len(batch.rejects)
        if not rows.complete:
            return None
        self.open.pop(shard).write(self.root, self.cache_id, self.dim, self.storage_dtype)
        return shard


class _Clock:
    """When each batch's embeddings reached the host: the steady-state window (module docstring)."""

    def __init__(self, fill_batches: int):
        self.fill_batches = fill_batches
        self.batches = 0
        self.window_start: float | None = None
        self.window_end: float | None = None
        self.window_images = 0

    def batch_done(self, images: int, ready_at: float) -> None:
        """Batch number ``batches + 1``, of ``images`` images, had its embeddings on the host at ``ready_at``."""
        self.batches += 1
        if self.batches == self.fill_batches:
            self.window_start = ready_at
        elif self.batches > self.fill_batches:
            self.window_end = ready_at
            self.window_images += images

    @property
    def steady_rate(self) -> float | None:
        if self.window_start is None or self.window_end is None or self.window_end <= self.window_start:
            return None
        return self.window_images / (self.window_end - self.window_start)


# --- the stage -------------------------------------------------------------------------------


def shard_ranges(dataset: Dataset, rows_per_shard: int) -> list[range]:
    """The fixed entry ranges of the cache shards: data shards for webdataset, else R rows each."""
    if dataset.shard_ranges is not None:
        return list(dataset.shard_ranges)
    n = len(dataset)
    return [range(start, min(start + rows_per_shard, n)) for start in range(0, n, rows_per_shard)]


def default_output(data: DataSpec, teacher: ModelSpec, artifacts: Path = runtime.DEFAULT_ARTIFACTS) -> Path:
    """``artifacts/cache/<teacher>_<dataset>``, both parts reduced to safe file-name characters."""
    teacher_part = teacher.name or Path(teacher.config or "teacher").stem
    if teacher.pretrained and not Path(teacher.pretrained).exists():  # a tag, not a checkpoint path
        teacher_part += f"-{teacher.pretrained}"
    data_path = Path(str(data.path).split("{")[0].rstrip("/") or "data")
    data_part = data_path.stem if data_path.suffix else data_path.name
    name = f"{teacher_part}_{data_part}"
    return artifacts / "cache" / re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-")


def _cache_header(loaded: LoadedClip, dataset: Dataset, data: DataSpec, ranges: Sequence[range],
                  config: ExtractConfig) -> dict:
    """Everything the manifest says about how the cache was made, and the cache id over it."""
    info = loaded.info
    views, storage_dtype, precision = config.views, config.storage_dtype, config.precision
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
    # exact is recorded by the field's absence: caches made before the choice existed keep their id and bytes
    preprocess = {} if config.preprocess == "exact" else {pixels.MANIFEST_FIELD: config.preprocess}
    identity.update(preprocess)
    cache_id = hashlib.sha256(fmt.canonical_json(identity)).hexdigest()[:32]
    return {
        **preprocess,
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
            "rows_per_shard": config.rows_per_shard if dataset.shard_ranges is None else None,
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
        with writing(root):  # full, read-only, not ours: StorageError (exit 4)
            root.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
    except OSError as err:  # e.g. a file where a folder should be
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


def extract_teacher(data: DataSpec, teacher: ModelSpec, output: Path | str | None = None,
                    **options: Any) -> ExtractSummary:
    """Run ``teacher`` over ``data`` once and write its embeddings to a cache at ``output``.

    ``options`` are the fields of :class:`ExtractConfig` (``rdkd extract-teacher``'s
    options, by field name). Resumes an interrupted run by default (finished shards are
    kept and skipped); ``overwrite`` replaces a cache of another teacher/preprocessing/
    dataset. Raises :class:`UserError` (nothing already written lost) for bad options, a
    missing dataset, a teacher that cannot be loaded, an output that holds another cache,
    an unwritable output, or more rejected samples than ``max_reject_fraction`` of the
    dataset.
    """
    config = ExtractConfig(**options)
    config.check()
    torch_device = runtime.resolve_device(config.device, int(os.environ.get("LOCAL_RANK", "0")))
    runtime.check_precision(config.precision, torch_device)
    joined_here = not torch.distributed.is_initialized()
    dist_info = distributed.setup(torch_device)
    try:
        return _extract(data, teacher, output, config, torch_device, dist_info.rank, dist_info.world_size)
    finally:
        if joined_here:
            distributed.cleanup()


@dataclass
class _Job:
    """One process's extraction, once its output is checked: what every step below reads."""

    config: ExtractConfig
    root: Path
    dataset: Dataset
    loaded: LoadedClip
    ranges: list[range]  # entries of every cache shard
    header: dict  # the manifest's description of the cache (see _cache_header)
    device: torch.device
    rank: int
    world: int

    @property
    def cache_id(self) -> str:
        return self.header["cache_id"]


@dataclass(frozen=True)
class _RejectLimit:
    """``--max-reject-fraction`` of all entries (those the index refused included)."""

    total: int
    fraction: float

    @property
    def allowed(self) -> int:
        return math.floor(self.fraction * self.total)

    def check(self, root: Path, rejects: int, partial: bool) -> None:
        if rejects <= self.allowed:
            return
        where = "" if partial else f" (reasons in {root / fmt.REJECTS}; finished shards are kept, so a rerun resumes)"
        raise UserError(
            f"{rejects} of {self.total} samples rejected ({rejects / max(self.total, 1):.1%}), more than "
            f"--max-reject-fraction {self.fraction:g}{where}"
        )


def _extract(data: DataSpec, teacher: ModelSpec, output: Path | str | None, config: ExtractConfig,
             device: torch.device, rank: int, world: int) -> ExtractSummary:
    """:func:`extract_teacher` on one rank, after the options are checked and the group is joined."""
    job, action = _open_job(data, teacher, output, config, device, rank, world)
    dataset, root = job.dataset, job.root
    index_rejects = [{"key": r.key, "source": r.source, "reason": r.reason} for r in dataset.index_rejects]
    limit = _RejectLimit(len(dataset) + len(dataset.index_rejects), config.max_reject_fraction)

    distributed.barrier()
    if action == "complete" and config.resume:
        return _summary_of_complete(root, rank)
    if rank == 0:
        _clear_output(root, action, config.resume)
    distributed.barrier()
    limit.check(root, len(index_rejects), partial=True)

    mine = [j for j in range(len(job.ranges)) if j % world == rank]
    todo = [j for j in mine if not (config.resume and _shard_done(root, j, job.ranges[j], job.cache_id))]
    start = time.perf_counter()
    images, clock = _extract_shards(job, todo, limit, len(index_rejects))
    distributed.barrier()
    manifest = _finish(job, index_rejects, limit)
    seconds = time.perf_counter() - start  # shards, index and manifest; not indexing or model loading
    summary = ExtractSummary(
        output=root,
        manifest=manifest,
        images=manifest["counts"]["images"],
        captions=manifest["counts"]["captions"],
        rejects=manifest["counts"]["rejects"],
        shards_done=len(todo),
        seconds=seconds,
        images_per_second=images / seconds if seconds > 0 else 0.0,
        steady_images_per_second=clock.steady_rate,
    )
    if rank == 0:
        _print_summary(summary, world)
    return summary


def _open_job(data: DataSpec, teacher: ModelSpec, output: Path | str | None, config: ExtractConfig,
              device: torch.device, rank: int, world: int) -> tuple[_Job, str]:
    """Open the dataset, load the teacher and decide what to do with the output ('new',
    'resume', 'complete' or 'replace'; every rank decides the same, before any change)."""
    dataset = open_dataset(data)
    root = Path(output) if output is not None else default_output(data, teacher)
    created = _check_writable(root, rank)
    try:
        loaded = load_clip(teacher, device=device)
        ranges = shard_ranges(dataset, config.rows_per_shard)
        header = _cache_header(loaded, dataset, data, ranges, config)
        action = _check_output(root, header["cache_id"], config.overwrite)
    except UserError:
        if created and rank == 0:  # leave no empty folder behind a run that never started
            with contextlib.suppress(OSError):
                root.rmdir()
        raise
    return _Job(config, root, dataset, loaded, ranges, header, device, rank, world), action


def _clear_output(root: Path, action: str, resume: bool) -> None:
    """Rank 0, before any shard: remove a cache being replaced, or the manifest of a cache being
    redone, and temporary files of a killed run."""
    if action == "replace":
        _remove_cache(root)
    elif not resume:
        (root / fmt.MANIFEST).unlink(missing_ok=True)
    _remove_stale_temporaries(root)


def _shard_done(root: Path, shard: int, entries: range, cache_id: str) -> bool:
    record = writer.read_part(root, shard)
    return record is not None and record["cache_id"] == cache_id and record["entries"] == [entries.start, entries.stop]


def _extract_shards(job: _Job, todo: list[int], limit: _RejectLimit, index_rejects: int) -> tuple[int, _Clock]:
    """Extract and write the shards ``todo``: the loop. Returns the images that went through
    the teacher and when their embeddings reached the host."""
    config = job.config
    assembler = ShardAssembler(job.root, job.cache_id, job.header["dim"], config.storage_dtype, config.views.count)
    live = assembler.begin({j: job.ranges[j] for j in todo})
    clock = _Clock(config.fill_batches)
    if not live:
        return 0, clock
    encoder = Encoder(job.loaded, job.device, config.precision)
    show = config.progress and job.rank == 0
    batches = iter(_loader(job, live))
    decoder = None
    if config.decode == "device":
        decoder = pixels.DeviceDecoder(TeacherInputs(job.dataset, job.loaded, config.views, config.preprocess).renderer,
                                       job.device)
        batches = (batch.decode_on(decoder, job.dataset) if batch.keys else batch for batch in batches)
    with runtime.progress(show, "extract-teacher", sum(map(len, live)), unit="images") as advance:
        # a batch whose entries were all rejected has nothing to embed, but its rejects
        # still reach their shard in order
        inputs = ((batch, batch.pixels, batch.tokens) if batch.keys else (batch, None, None) for batch in batches)
        for done in encoder.stream(inputs):
            clock.batch_done(len(done.tag.keys), done.ready_at)
            written = assembler.add(done)
            # One process knows the run can no longer meet the threshold: stop now, keep what
            # is written (under torchrun the check waits for all ranks, at the end).
            if written is not None and job.world == 1:
                limit.check(job.root, index_rejects + assembler.rejects, partial=True)
            advance(done.tag.entries)
    if decoder is not None and decoder.fallbacks:
        console.print(f"--decode device: {decoder.fallbacks} image(s) decoded on the CPU path instead "
                      f"(not JPEG, or refused by the device's decoder)")
    return assembler.images, clock


def _loader(job: _Job, ranges: list[range]) -> torch.utils.data.DataLoader:
    """Workers build whole batches of uint8 views; their prefetch is sized by a batch's bytes."""
    config, cfg = job.config, job.loaded.preprocess_cfg
    height, width = (cfg["size"], cfg["size"]) if isinstance(cfg["size"], int) else cfg["size"]
    batch_bytes = config.batch_size * config.views.count * 3 * height * width
    return torch.utils.data.DataLoader(
        TeacherInputs(job.dataset, job.loaded, config.views, config.preprocess, encoded=config.decode == "device"),
        batch_sampler=_ShardBatches(ranges, config.batch_size),
        num_workers=config.workers,
        collate_fn=_collate,
        pin_memory=job.device.type == "cuda",
        prefetch_factor=runtime.prefetch_factor(batch_bytes, config.workers, runtime.PREFETCH_BUDGET_BYTES),
    )


def _finish(job: _Job, index_rejects: list[dict], limit: _RejectLimit) -> dict:
    """After every rank's shards: check they are all there and the rejects within the limit;
    rank 0 writes the index, rejects and manifest. Returns the manifest."""
    root = job.root
    parts = [writer.read_part(root, j) for j in range(len(job.ranges))]
    missing = [j for j, p in enumerate(parts) if p is None or p["cache_id"] != job.cache_id]
    if missing:
        raise UserError(f"{len(missing)} shard(s) of {root} were not written (first: {missing[0]}); rerun to resume")
    rejects = writer.all_rejects(parts, index_rejects)
    if len(rejects) > limit.allowed:
        if job.rank == 0:
            writer.write_rejects(root, rejects)
        distributed.barrier()
        limit.check(root, len(rejects), partial=False)
    manifest = writer.finalize(root, job.header, parts, index_rejects) if job.rank == 0 else None
    distributed.barrier()
    if manifest is None:
        manifest = json.loads((root / fmt.MANIFEST).read_text(encoding="utf-8"))
    return manifest


def _summary_of_complete(root: Path, rank: int) -> ExtractSummary:
    manifest = json.loads((root / fmt.MANIFEST).read_text(encoding="utf-8"))
    counts = manifest["counts"]
    summary = ExtractSummary(root, manifest, counts["images"], counts["captions"], counts["rejects"], 0, 0.0, 0.0)
    if rank == 0:
        console.print(f"cache {root} is already complete (cache id {manifest['cache_id']}); nothing to do")
    return summary


def _print_summary(summary: ExtractSummary, world: int) -> None:
    steady = summary.steady_images_per_second
    console.print(
        f"[bold]cache[/bold] {summary.output}: {summary.images:,} images, {summary.captions:,} captions, "
        f"{summary.rejects:,} rejects; {summary.shards_done} shard(s) extracted in {summary.seconds:.1f} s "
        f"({summary.images_per_second:,.1f} images/s whole run, "
        f"{f'{steady:,.1f}' if steady is not None else '-'} images/s steady state"
        f"{' on rank 0' if world > 1 else ''})",
        soft_wrap=True,  # one line in a log, whatever the terminal's width
    )
