"""Building blocks of student training, usable from any training loop.

- a :class:`Feed` is where a training loop takes its local batches from: the steps of an
  epoch, ``batches(start_step)`` (resumable from the step alone), each batch shipped in
  ``pieces`` consecutive pieces that :func:`rdkd.runtime.device_batches` joins on the
  device, what was skipped at the join, and the shape a resume must match. Two
  implementations: :class:`IndexedFeed` (an index joined with the caches, shuffled over all
  samples) and :class:`rdkd.streaming.ShardStream` (shards read in order).
- :class:`PairDataset` joins a dataset with a teacher cache by key and yields pieces of
  local batches of (image, caption) pairs, built in DataLoader workers: images as uint8 at the
  student's input size (normalise on the device with :class:`rdkd.runtime.DeviceNormalize`:
  a quarter of float32's bytes cross the process boundary; with ``decode="device"`` the
  encoded images, their views and keys instead, for :class:`rdkd.pixels.DeviceDecoder`), the
  captions tokenised, and the teacher rows of exactly those views and captions, gathered
  with one read per batch and shipped in the cache's storage dtype (float16 by default: the
  exact stored values).
- :class:`EpochBatchSampler` shards and shuffles deterministically per epoch (seed +
  epoch), and can start in the middle of an epoch, which is what makes resume exact.
- the optimizer (open_clip's decay rule), the warm-up + cosine schedule, atomic checkpoint
  files and the RNG state they carry (tensors and plain data: checkpoints load with
  ``weights_only=True``, see :mod:`rdkd.checkpoints`), and the metrics log.

Every random choice a sample needs (view, caption, crop) derives from (seed, epoch,
index), never from a worker's RNG state, so any number of DataLoader workers, processes
or interruptions give the same samples.

One bad-sample policy for every feed (:meth:`PairBuilder.piece`, :func:`fill_slots`): an
image that fails to decode is skipped, counted and reported with its key and reason, and
its slot takes the nearest following decodable sample of the same piece (cyclically). A
piece keeps its size and its boundaries, no entry is read ahead of its turn, and the
choice depends only on which images of the piece decode, so resume stays exact; a piece
where no image decodes stops the run with one line.
"""

from __future__ import annotations

import functools
import json
import math
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from torch.utils.data import DistributedSampler

from rdkd import checkpoints, pixels
from rdkd.errors import Diverged, SampleError, UserError
from rdkd.files import atomic_write, writing
from rdkd.runtime import uint8_transform

# CLIP-KD's train augmentation: RandomResizedCrop with scale (0.9, 1.0).
DEFAULT_CROP_SCALE = (0.9, 1.0)


class LossNotFinite(Diverged):
    """The loss or the weights became NaN or inf; the message names the step and the term."""


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The random stream of one sample in one epoch: a pure function of its coordinates."""
    return np.random.default_rng([seed, epoch, index])


@dataclass(frozen=True)
class ImageCfg:
    """The student's own image preprocessing (open_clip's ``preprocess_cfg`` fields we use)."""

    size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"

    @classmethod
    def of_model(cls, model: torch.nn.Module) -> "ImageCfg":
        """Read the preprocessing open_clip attached to the model (``model.visual.preprocess_cfg``)."""
        cfg = getattr(getattr(model, "visual", None), "preprocess_cfg", None)
        if not cfg:
            raise UserError("the student model carries no open_clip preprocess_cfg")
        size = cfg["size"]
        size = (size, size) if isinstance(size, int) else tuple(size)
        return cls(
            size=(int(size[0]), int(size[1])),
            mean=tuple(float(m) for m in cfg["mean"]),
            std=tuple(float(s) for s in cfg["std"]),
            interpolation=cfg.get("interpolation") or "bicubic",
            resize_mode=cfg.get("resize_mode") or "shortest",
        )

    def to_dict(self) -> dict:
        return {"size": list(self.size), "mean": list(self.mean), "std": list(self.std),
                "interpolation": self.interpolation, "resize_mode": self.resize_mode}


def fill_slots(decoded: Sequence[bool], skipped: Sequence[tuple[str, str]]) -> list[int]:
    """The bad-sample policy (the module docstring): for each slot of a piece, the slot
    whose sample fills it, its own when its image decoded, else the nearest following one
    that did (cyclically). ``skipped``: the (key, reason) of the failed ones, for the one
    line raised as :class:`UserError` when none decoded."""
    good = [i for i, ok in enumerate(decoded) if ok]
    if not good:
        key, reason = skipped[-1]
        raise UserError(f"no image of a batch piece decoded (last: {key}: {reason}); check the dataset")
    fill = list(range(len(decoded)))
    following = good[0]  # past the last decodable slot the search wraps to the first
    for i in reversed(range(len(decoded))):
        following = i if decoded[i] else following
        fill[i] = following
    return fill


def teacher_keys(k: int) -> tuple[str, str]:
    """The batch keys of teacher ``k``'s image and text rows: ``t_img``, ``t_txt`` for the
    first cache (the one-teacher batch), ``t_img1``, ``t_txt1``, ... for the others."""
    suffix = str(k) if k else ""
    return f"t_img{suffix}", f"t_txt{suffix}"


class PairBuilder:
    """Makes training samples and local batches from what a reader found: the image bytes,
    the captions and the cache rows of one sample. Shared by :class:`PairDataset` (an
    index) and :mod:`rdkd.streaming` (tar shards read in order), so that both draw the same
    view and caption for the same sample in the same epoch.

    Every random choice comes from ``sample_rng(seed, epoch, index)`` in a fixed order
    (caption, then view or crop), ``index`` being the sample's dataset entry. View 0 of a
    cache is the teacher's open_clip eval view; the student's own eval transform shows the
    same region when both resize the same way, so it replays it exactly (at the student's
    size). Other views: the recorded crop box and flip. Both are made the cache's way
    (:class:`rdkd.pixels.ViewRenderer`, ``exact`` or ``fast`` as its manifest says). Without a
    cache: open_clip's train transform with CLIP-KD's crop scale.
    """

    def __init__(self, tokenizer: Callable, image_cfg: ImageCfg, seed: int, caches: Sequence[Any] = (),
                 crop_scale: tuple[float, float] = DEFAULT_CROP_SCALE, decode: str = "workers"):
        self.tokenizer = tokenizer
        self.caches = list(caches)
        cache = self.cache
        # device: samples carry their encoded image and view, for a DeviceDecoder in the main process
        self.encoded = pixels.check_decode(decode) == "device"
        if self.encoded and (cache is None or pixels.mode_of(cache.manifest) != "fast"):
            raise UserError("--decode device replays the views of a fast cache (extract-teacher --preprocess fast)")
        self.image_cfg = image_cfg
        self.seed = int(seed)
        self._eval_view0 = cache is not None and (
            cache.manifest.get("preprocess", {}).get("resize_mode") or "shortest") == image_cfg.resize_mode
        # the cache's way of making pixels (exact without a cache: open_clip's train transform)
        self.preprocess = pixels.mode_of(cache.manifest) if cache is not None else pixels.DEFAULT_MODE
        # Built lazily (and per worker): open_clip's train transform (CLIP-KD's crop scale)
        # and the view renderer, with the student's size, mean and std.
        self._crop_scale = crop_scale
        self._augment = None
        self._renderer = None

    @property
    def cache(self) -> Any:
        """The first cache: its recorded views are the ones replayed (every cache holds the same)."""
        return self.caches[0] if self.caches else None

    def __getstate__(self) -> dict:
        """Picklable for spawn/forkserver DataLoader workers: the memory-mapped caches are
        reopened from their folders in the worker, the transforms are rebuilt there."""
        return dict(self.__dict__, _augment=None, _renderer=None,
                    caches=[(str(c.root), c.check) for c in self.caches])

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self.caches:
            from rdkd.cache import TeacherCache

            self.caches = [TeacherCache.open(root, check=check) for root, check in self.caches]

    @property
    def renderer(self) -> pixels.ViewRenderer:
        """The student's eval view and the cache's views at the student's size, made the cache's way."""
        if self._renderer is None:
            import open_clip

            cfg = self.image_cfg
            eval_transform = open_clip.image_transform(cfg.size, is_train=False, mean=cfg.mean, std=cfg.std,
                                                       interpolation=cfg.interpolation, resize_mode=cfg.resize_mode)
            self._renderer = pixels.ViewRenderer(eval_transform, cfg.size, cfg.interpolation, cfg.resize_mode,
                                                 self.preprocess)
        return self._renderer

    def sample(self, epoch: int, index: int, captions: Sequence[str], image_bytes: bytes,
               rows: Sequence[tuple[int, int, int]] | None = None) -> dict:
        """One sample: uint8 image, tokens, ``index``, the first cache's rows (-1 without a
        cache) and every cache's (``cache_rows``). ``rows``: per cache, (first image row,
        view rows, first caption row) of the sample. Raises :class:`SampleError` when the
        image does not decode."""
        from rdkd.data import decode_image

        rng = sample_rng(self.seed, epoch, index)
        caption_choice = int(rng.integers(len(captions)))
        if rows is None:
            image_pixels = self._augmented(decode_image(image_bytes), int(rng.integers(2**63 - 1)))
            cache_rows = [(-1, -1)]
        else:
            count = rows[0][1]  # every cache holds the same views of a sample
            view = int(rng.integers(count))
            cache_rows = [(int(start + view), int(text_start + caption_choice)) for start, _, text_start in rows]
            if view == 0 and self._eval_view0:
                chosen = None
            else:
                box, flip = self.cache.view_params(np.asarray([cache_rows[0][0]], dtype=np.int64))
                chosen = (box[0].tolist(), bool(flip[0]))
            if self.encoded:
                text = self.tokenizer([captions[caption_choice]])[0]
                return {"image": pixels.checked_bytes(image_bytes), "view": chosen, "text": text, "index": index,
                        "cache_rows": cache_rows}
            image_pixels = self.renderer.view_pixels(image_bytes, chosen)
        text = self.tokenizer([captions[caption_choice]])[0]
        return {"image": image_pixels, "text": text, "index": index, "cache_rows": cache_rows}

    def piece(self, samples: Sequence[tuple[str, Callable[[], dict]]]) -> dict:
        """A piece of a local batch from (key, make the sample) pairs, in order, made and
        collated under the one bad-sample policy (:func:`fill_slots`): a make that raises
        :class:`SampleError` is skipped with its key and reason, its slot filled."""
        made: list[dict | None] = []
        skipped: list[tuple[str, str]] = []
        for key, make in samples:
            try:
                sample = make()
            except SampleError as err:
                skipped.append((key, err.reason))
                made.append(None)
                continue
            sample["key"] = key  # --decode device records a failure by key, after the hand-over
            made.append(sample)
        fill = fill_slots([sample is not None for sample in made], skipped)
        return self.collate([made[j] for j in fill], skipped)

    def collate(self, samples: Sequence[dict], skipped: list[tuple[str, str]]) -> dict:
        """A local batch (the format of the module docstring) with every teacher's rows of
        exactly its views and captions: one read per batch and cache, in storage dtype. The
        images go into one buffer, in shared memory inside a DataLoader worker (no copy on
        hand-over)."""
        if self.encoded:  # the encoded images, their views (None: the eval view) and keys, host lists
            images = [s["image"] for s in samples]
            encoded = {"view": [s["view"] for s in samples], "host_key": [s["key"] for s in samples]}
        else:
            height, width = self.image_cfg.size
            images = _batch_buffer((len(samples), 3, height, width), torch.uint8)
            for i, sample in enumerate(samples):
                images[i] = sample["image"]
            encoded = {}
        batch = {
            "image": images,
            "text": torch.stack([s["text"] for s in samples]),
            "index": torch.tensor([s["index"] for s in samples], dtype=torch.int64),
            "image_row": torch.tensor([s["cache_rows"][0][0] for s in samples], dtype=torch.int64),
            "text_row": torch.tensor([s["cache_rows"][0][1] for s in samples], dtype=torch.int64),
            "skipped": skipped,
            **encoded,
        }
        for k, cache in enumerate(self.caches):
            image_rows = np.asarray([s["cache_rows"][k][0] for s in samples], dtype=np.int64)
            text_rows = np.asarray([s["cache_rows"][k][1] for s in samples], dtype=np.int64)
            image_key, text_key = teacher_keys(k)
            batch[image_key] = cache.image_embeddings(image_rows, stored=True)
            batch[text_key] = cache.text_embeddings(text_rows, stored=True)
        return batch

    def _augmented(self, image: Image.Image, torch_seed: int) -> torch.Tensor:
        """open_clip's train transform (up to uint8), its torch RNG seeded from the sample's own stream."""
        if self._augment is None:
            import open_clip

            cfg = self.image_cfg
            self._augment = uint8_transform(open_clip.image_transform(
                cfg.size, is_train=True, mean=cfg.mean, std=cfg.std,
                interpolation=cfg.interpolation, aug_cfg={"scale": self._crop_scale}))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(torch_seed)
            return self._augment(image)


class PairDataset(torch.utils.data.Dataset):
    """(image, caption) training pairs of a dataset, joined by key with its teacher caches.

    Indexed by a list of ``(epoch, position)`` items (one piece of a local batch, as
    :class:`EpochBatchSampler` yields them; give the DataLoader ``sampler=`` and
    ``batch_size=None``, as :class:`IndexedFeed` does) and returns the piece as a dict:
    ``image`` uint8 [B, 3, H, W], ``text`` tokens, ``index`` dataset entries, ``image_row`` / ``text_row`` the first
    cache's rows, per cache ``k`` the teacher rows in storage dtype under
    :func:`teacher_keys` ``(k)`` (``t_img`` / ``t_txt`` for the first), ``skipped``.
    ``position`` indexes the usable entries: dataset entries every cache holds and did not
    reject (without a cache: every entry); each cache is joined by key on its own, so
    caches of one dataset cut into shards differently still agree. An image that fails to
    decode is skipped and reported with its key and reason, its slot filled from the same
    piece (:meth:`PairBuilder.piece`). Samples are made by a :class:`PairBuilder` (``.builder``).
    """

    def __init__(self, data: Any, tokenizer: Callable, image_cfg: ImageCfg, seed: int,
                 caches: Sequence[Any] = (), crop_scale: tuple[float, float] = DEFAULT_CROP_SCALE,
                 decode: str = "workers"):
        self.data = data
        self.builder = PairBuilder(tokenizer, image_cfg, seed, caches, crop_scale, decode)
        self.image_cfg = image_cfg
        self.skipped_at_join: dict[str, int] = {}
        if not caches:
            self.entries = np.arange(len(data), dtype=np.int64)
            self.cache_rows = None
        else:
            self._join(data, caches)
        if len(self.entries) == 0:
            raise UserError("no usable training samples: the dataset is empty or every entry was rejected")

    @property
    def cache(self) -> Any:
        return self.builder.cache

    def _join(self, data: Any, caches: Sequence[Any]) -> None:
        """Rows of every usable entry, as flat arrays: all keys joined with each cache at
        once (:meth:`TeacherCache.lookup`), no per-entry Python. An entry is usable when
        every cache holds its rows (a key can also be in the rejects, as the later copy of a
        duplicate); the others are counted by whether a cache rejected them."""
        keys = pa.array(data.keys, pa.large_string())
        found = [cache.lookup(keys) for cache in caches]
        usable = np.logical_and.reduce([rows.found for rows in found])
        missing = ~usable
        rejected = np.zeros_like(missing)
        missing_keys = keys.filter(pa.array(missing))
        rejected[missing] = np.logical_or.reduce([cache.is_rejected(missing_keys) for cache in caches])
        for reason, count in (("rejected by the cache", rejected.sum()),
                              ("not in the cache", (missing & ~rejected).sum())):
            if count:
                self.skipped_at_join[reason] = self.skipped_at_join.get(reason, 0) + int(count)
        self.entries = np.flatnonzero(usable).astype(np.int64)
        # [caches, usable entries, 3]: first image row, view rows, first caption row
        self.cache_rows = np.stack([np.stack([rows.image_row[usable], rows.image_count[usable],
                                              rows.text_row[usable]], axis=1) for rows in found])

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, items: Sequence[tuple[int, int]]) -> dict:
        """One piece of a local batch, built in a DataLoader worker (see the module docstring)."""
        return self.builder.piece([(self.data.keys[int(self.entries[position])],
                                    functools.partial(self._load, epoch, position)) for epoch, position in items])

    def _load(self, epoch: int, position: int) -> dict:
        """The sample of usable entry ``position`` in ``epoch``; raises :class:`SampleError`
        when its image does not decode."""
        index = int(self.entries[position])
        rows = None if self.cache_rows is None else [tuple(r) for r in self.cache_rows[:, position].tolist()]
        return self.builder.sample(epoch, index, self.data.captions(index), self.data.read_image_bytes(index), rows)


def _batch_buffer(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An empty tensor to fill sample by sample; in a DataLoader worker it is allocated in
    shared memory, so handing the batch to the main process copies nothing (what torch's
    default_collate does for the batches it stacks)."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    numel = math.prod(shape)
    storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(numel)
    return torch.empty(0, dtype=dtype).new(storage).view(shape)


class EpochBatchSampler(torch.utils.data.Sampler):
    """Local batches of ``(epoch, position)`` items: shuffled with seed + epoch and sharded
    over ``world`` ranks by torch's DistributedSampler, incomplete batches dropped (every
    step sees a full global batch). Iteration runs from ``start`` = (epoch, step in epoch).

    With ``pieces`` > 1 iteration yields each batch as that many consecutive pieces (sizes
    differing by at most one): DataLoader workers then build pieces, and the memory in
    flight is workers x prefetch x a piece, not x a batch; :func:`rdkd.runtime.device_batches`
    joins the pieces of a step on the device.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, rank: int = 0,
                 world: int = 1, start: tuple[int, int] = (0, 0), pieces: int = 1):
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world = world
        self.start = start
        self.pieces = max(1, min(pieces, batch_size))
        # Full global batches only: DistributedSampler pads a shard by repeating entries when
        # the world does not divide the entries; counting per rank (ceil(n / world) // batch)
        # would let those repeats into a step and give another world size another epoch.
        self.steps_per_epoch = num_samples // (world * batch_size)
        if self.steps_per_epoch == 0:
            raise UserError(f"the global batch ({batch_size * world}) is larger than the "
                            f"{num_samples} usable samples")

    def epoch_batches(self, epoch: int) -> list[list[tuple[int, int]]]:
        shard = DistributedSampler(range(self.num_samples), num_replicas=self.world,
                                   rank=self.rank, shuffle=True, seed=self.seed, drop_last=False)
        shard.set_epoch(epoch)
        order = list(shard)
        return [[(epoch, p) for p in order[b * self.batch_size:(b + 1) * self.batch_size]]
                for b in range(self.steps_per_epoch)]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, step = self.start
        while True:
            for batch in self.epoch_batches(epoch)[step:]:
                bounds = np.linspace(0, len(batch), self.pieces + 1).round().astype(int)
                yield from (batch[a:b] for a, b in zip(bounds[:-1], bounds[1:]))
            epoch, step = epoch + 1, 0

    def __len__(self) -> int:  # an endless stream; the training loop counts steps
        return 2**62


class Feed(Protocol):
    """Where a training loop takes its local batches from (the module docstring):
    :class:`IndexedFeed` or :class:`rdkd.streaming.ShardStream`."""

    builder: PairBuilder  # makes the samples: its caches, image config and way of making pixels
    pieces: int  # pieces a local batch comes in, consecutive in ``batches``
    piece_size: int  # samples of the largest piece (what a DataLoader's prefetch is sized by)
    skipped_at_join: dict[str, int]  # samples left out before training, counted by reason

    @property
    def samples(self) -> int:
        """Usable samples (after the join with the caches)."""

    @property
    def shape(self) -> dict | None:
        """What the order of batches depends on besides seed and data, which a resume must
        match (None: nothing more than the batch size and the world size)."""

    def steps_per_epoch(self, epochs: int | None = None, steps: int | None = None) -> int:
        """Steps every rank does per epoch, for a run of ``epochs`` or ``steps``."""

    def batches(self, start_step: int, steps_per_epoch: int, **loader_options: Any) -> Iterator[dict]:
        """The pieces of the local batches from ``start_step`` on, endlessly, built by
        DataLoader workers (``loader_options``: pin_memory, prefetch_factor)."""


class IndexedFeed:
    """The indexed :class:`Feed`: a :class:`PairDataset`'s pieces in :class:`EpochBatchSampler`
    order (shuffled over all usable samples per epoch), built by ``workers`` DataLoader
    workers whose base seed comes from :func:`loader_generator` (seed, rank)."""

    def __init__(self, pairs: PairDataset, batch_size: int, seed: int, rank: int = 0, world: int = 1,
                 workers: int = 0, pieces: int = 1):
        self.pairs = pairs
        self.builder = pairs.builder
        self.skipped_at_join = pairs.skipped_at_join
        self.seed, self.rank, self.world, self.workers = int(seed), rank, world, workers
        self._sampler = EpochBatchSampler(len(pairs), batch_size, self.seed, rank, world, pieces=pieces)
        self.pieces = self._sampler.pieces
        self.piece_size = math.ceil(batch_size / self.pieces)

    @property
    def samples(self) -> int:
        return len(self.pairs)

    @property
    def shape(self) -> None:
        return None

    def steps_per_epoch(self, epochs: int | None = None, steps: int | None = None) -> int:
        return self._sampler.steps_per_epoch  # every epoch holds the same samples

    def batches(self, start_step: int, steps_per_epoch: int, **loader_options: Any) -> Iterator[dict]:
        sampler = EpochBatchSampler(len(self.pairs), self._sampler.batch_size, self.seed, self.rank, self.world,
                                    start=divmod(start_step, steps_per_epoch), pieces=self.pieces)
        # a generator: the DataLoader starts its workers at the first piece asked for
        yield from torch.utils.data.DataLoader(self.pairs, sampler=sampler, batch_size=None,
                                               num_workers=self.workers,
                                               generator=loader_generator(self.seed, self.rank), **loader_options)


def is_decayed(name: str, param: torch.nn.Parameter) -> bool:
    """open_clip's rule: no weight decay on gains, biases, norms and the logit scale."""
    return not (param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name
                or "logit_scale" in name)


def param_groups(model: torch.nn.Module, loss_module: torch.nn.Module,
                 weight_decay: float) -> list[dict]:
    """Student decay / no-decay groups plus the loss module's own parameters (projection
    heads, learnable scales a_I, a_T, a_X) in their own groups: the scales never decay."""
    groups = []
    for owner, module in (("student", model), ("loss", loss_module)):
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        decay = [p for n, p in named if is_decayed(n, p)]
        no_decay = [p for n, p in named if not is_decayed(n, p)]
        groups.append({"name": f"{owner}_decay", "params": decay, "weight_decay": weight_decay})
        groups.append({"name": f"{owner}_no_decay", "params": no_decay, "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


def build_optimizer(model: torch.nn.Module, loss_module: torch.nn.Module, lr: float,
                    weight_decay: float, betas: tuple[float, float] = (0.9, 0.98),
                    eps: float = 1e-6, fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW with CLIP-KD's settings (lr 1e-3, wd 0.1, betas (0.9, 0.98), eps 1e-6).
    ``fused``: torch's fused kernel, which keeps the step counts on the device (the default
    implementation reads them on the host every step) and takes GradScaler's inf check
    without a host synchronisation."""
    return torch.optim.AdamW(param_groups(model, loss_module, weight_decay), lr=lr,
                             betas=betas, eps=eps, fused=fused)


class WarmupCosine:
    """LR factor: linear warm-up from lr/warmup to lr over ``warmup`` steps, then cosine to 0
    at ``total`` (open_clip's ``cosine_lr`` shape). A class, not a lambda, so that
    LambdaLR's state_dict holds it."""

    def __init__(self, warmup: int, total: int):
        self.warmup = warmup
        self.total = total

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        decay_steps = max(1, self.total - self.warmup)
        progress = min(1.0, (step - self.warmup) / decay_steps)
        return 0.5 * (1.0 + math.cos(math.pi * progress))


def loader_generator(seed: int, *stream: int) -> torch.Generator:
    """The generator a DataLoader takes its workers' base seed from, a function of the run's
    seed and ``stream`` (rank, epoch). Without one, every iterator a DataLoader starts draws
    that seed from torch's global RNG: a resumed run starts its iterator after restoring the
    checkpoint's RNG state, an uninterrupted one before its first step, so every later draw
    of a student that uses the global RNG while training (dropout, patch dropout) would
    differ between the two."""
    state = np.random.SeedSequence([int(seed), *map(int, stream)]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def build_scheduler(optimizer: torch.optim.Optimizer, warmup: int,
                    total: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(warmup, total))


def rng_state() -> dict:
    """Every RNG a training process touches (torch CPU and CUDA, numpy, Python), as tensors
    and plain data, so that a checkpoint holding it loads with ``weights_only=True``."""
    state = {"torch": torch.get_rng_state(),
             "numpy": checkpoints.numpy_rng_as_data(np.random.get_state()),
             "python": checkpoints.python_rng_as_data(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(checkpoints.numpy_rng_from_data(state["numpy"]))
    random.setstate(checkpoints.python_rng_from_data(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, state: dict) -> None:
    """Write ``state`` atomically (a reader never sees a partial checkpoint). ``state``
    holds tensors and plain data only (:mod:`rdkd.checkpoints`)."""
    atomic_write(path, lambda tmp: checkpoints.save(state, tmp))


def load_checkpoint(path: Path) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`, as data only
    (``weights_only=True``): a file that needs more is refused with one line."""
    return checkpoints.load(path, "checkpoint")


class TeacherForwardCounter:
    """Counts calls of open_clip models outside the trained ones (student, loss module).

    While active, the ``forward`` of every open_clip module class (models, towers, blocks:
    the classes of the ``open_clip`` modules imported when it starts) is wrapped; a call
    on a module that is not part of the trained ones is counted when it is outermost (a
    teacher's forward, or the tower that its ``encode_image`` / ``encode_text`` runs).
    Training from a cache runs no open_clip model but the student, so a run that never
    touches a teacher ends with zero. A wrapped class costs the trained modules one set
    look-up per call; torch's own modules (Linear, LayerNorm, ...) are not touched, unlike
    global module hooks, which would put every module call of every step on the slow path.
    """

    def __init__(self, *trained: torch.nn.Module):
        self.count = 0
        self._trained = {id(m) for module in trained for m in module.modules()}
        self._depth = 0
        self._patched: list[tuple[type, Callable]] = []

    def _wrap(self, original: Callable) -> Callable:
        counter = self

        @functools.wraps(original)
        def forward(module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
            if id(module) in counter._trained:
                return original(module, *args, **kwargs)
            counter.count += counter._depth == 0
            counter._depth += 1
            try:
                return original(module, *args, **kwargs)
            finally:
                counter._depth -= 1

        return forward

    def __enter__(self) -> "TeacherForwardCounter":
        import sys

        import open_clip  # noqa: F401 (its model classes are what is counted)

        classes = {cls for name, module in list(sys.modules.items())
                   if name == "open_clip" or name.startswith("open_clip.")
                   for cls in vars(module).values()
                   if isinstance(cls, type) and issubclass(cls, torch.nn.Module)
                   and cls.__module__.startswith("open_clip") and "forward" in vars(cls)}
        for cls in classes:
            self._patched.append((cls, cls.forward))
            cls.forward = self._wrap(cls.forward)
        return self

    def __exit__(self, *exc: Any) -> None:
        for cls, original in reversed(self._patched):
            cls.forward = original
        self._patched = []


class LogWindow:
    """The loss terms of the steps since the last log point, summed on the device.

    ``add`` launches a few device operations per step and never waits for the device;
    ``read`` copies the sums, the scalars asked for and the non-finite state to the host in
    one transfer (the one synchronisation of a log interval) and starts a new window. Per
    term it keeps the first step whose value was not finite (-1: none), so a divergence
    is reported with its step whenever it is looked at.
    """

    def __init__(self, names: Sequence[str], device: torch.device, step: int = 0):
        self.names = ["total", *names]
        self.sums = torch.zeros(len(self.names), dtype=torch.float64, device=device)
        self.first_bad = torch.full((len(self.names),), -1, dtype=torch.int64, device=device)
        self._step = torch.tensor(step, dtype=torch.int64, device=device)
        self.steps = 0

    def add(self, total: torch.Tensor, parts: dict[str, torch.Tensor]) -> None:
        values = torch.stack([total.detach(), *(parts[n] for n in self.names[1:])]).double()
        self._step += 1
        self.sums += values
        newly_bad = ~torch.isfinite(values) & (self.first_bad < 0)
        self.first_bad = torch.where(newly_bad, self._step, self.first_bad)
        self.steps += 1

    def read(self, *scalars: torch.Tensor) -> tuple[dict[str, float], dict[str, int], list[float]]:
        """(mean of each term over the window, first non-finite step of each term that had
        one, the values of ``scalars``), then an empty window."""
        n = len(self.names)
        host = _to_host(self.sums, self.first_bad, *scalars)
        means = {name: host[i] / max(1, self.steps) for i, name in enumerate(self.names)}
        self.sums.zero_()
        self.steps = 0
        return means, self._bad(host[n:2 * n]), host[2 * n:]

    def check(self, *scalars: torch.Tensor) -> tuple[dict[str, int], list[float]]:
        """(first non-finite step of each term that had one, the values of ``scalars``),
        the window left as it is."""
        n = len(self.names)
        host = _to_host(self.first_bad, *scalars)
        return self._bad(host[:n]), host[n:]

    def _bad(self, first_bad: list[float]) -> dict[str, int]:
        return {name: int(step) for name, step in zip(self.names, first_bad) if step >= 0}

    def state_dict(self) -> dict:
        return {"sums": self.sums.cpu(), "first_bad": self.first_bad.cpu(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.sums.copy_(state["sums"])
        self.first_bad.copy_(state["first_bad"])
        self.steps = int(state["steps"])


def _to_host(*tensors: torch.Tensor) -> list[float]:
    """The values of ``tensors``, flattened, in one copy to the host (one synchronisation)."""
    return torch.cat([t.detach().double().reshape(-1) for t in tensors]).to("cpu", copy=True).tolist()


class MetricsLog:
    """One record per log interval: a JSON line in ``metrics.jsonl`` and TensorBoard
    scalars. On resume the JSONL keeps only lines before the resumed step, so the log reads
    as one run; a fresh run replaces the logs of an earlier run in the same folder."""

    def __init__(self, log_dir: Path, resume_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = log_dir
        self.path = log_dir / "metrics.jsonl"
        with writing(log_dir):
            log_dir.mkdir(parents=True, exist_ok=True)
            if resume_step is None:
                self.path.write_text("")
                shutil.rmtree(log_dir / "tb", ignore_errors=True)  # or TensorBoard shows both runs as one
            elif self.path.exists():
                kept = [line for line in self.path.read_text().splitlines()
                        if line and json.loads(line)["step"] <= resume_step]
                self.path.write_text("".join(line + "\n" for line in kept))
            self._file = open(self.path, "a")
            self._tb = SummaryWriter(str(log_dir / "tb"),
                                     purge_step=resume_step + 1 if resume_step is not None else None)

    def write(self, record: dict) -> None:
        with writing(self.path):
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        step = record["step"]
        with writing(self.log_dir / "tb"):
            for name, value in record.items():
                if name != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(name, value, step)

    def close(self) -> None:
        with writing(self.log_dir):
            self._file.close()
            self._tb.close()
