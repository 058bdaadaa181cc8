"""Streaming training data: webdataset shards read in order beside their cache shards.

For datasets too big to index (an indexed run first builds an index of every entry and
joins it with the cache, on every launch and every rank), ``train-student --stream``
reads each rank's share of the data shards sequentially, each beside the cache shard that
was made from it (one cache shard per data shard, same sample order: cache/FORMAT.md),
and holds nothing of the whole dataset: the manifest's per-shard counts, and per DataLoader
worker one shard's cache keys and captions and a shuffle buffer of raw samples.

The stream is a pure function of ``(seed, epoch)`` and the run's shape (ranks, DataLoader
workers, local batch, shuffle buffer), laid out from the per-shard counts of the cache
manifest before any byte is read:

- **Shards.** Each epoch permutes the data shards (seeded by seed and epoch); the ``i``-th
  shard of that order goes to rank ``i % world``, and the ``i'``-th shard of a rank's list to
  its worker (*lane*) ``i' % W`` (``W`` = DataLoader workers, 1 without workers).
- **Samples.** A lane's *usable samples* are the samples of its shards that the cache
  holds, in shard order: the tar's other samples (rejected while indexing or extracting)
  are skipped. Each sample's key and captions are checked against its cache rows.
  Several caches (a teacher ensemble) must each be shard-aligned with the data and hold
  the same samples of every shard (checked per shard against the first); each gives its
  own rows of the sample.
- **Shuffle.** A sliding shuffle buffer of ``shuffle_buffer`` samples (seeded by seed,
  epoch, rank, lane) decides the emission order; it is simulated on sample positions
  first, so the reader holds at most that many raw samples and a resumed run knows what
  to skip without reading it.
- **Batches.** Workers ship a local batch of ``B`` in ``pieces`` equal pieces of
  ``P = B / pieces`` samples (bounding the memory in flight, as the indexed feed does;
  ``pieces`` = 1 for small batches), which the training loop joins on the device. A lane
  makes ``floor(usable / P)`` pieces of consecutive emitted samples; a rank's pieces are
  its lanes' pieces taken round-robin, skipping lanes that ran out (the order in which a
  DataLoader takes items from its workers), and every ``pieces`` consecutive ones are a batch.
- **Equal steps.** Every rank does ``steps_per_epoch`` steps per epoch: the fewest full
  batches any rank can make in any epoch of the run (from the counts; the loss gathers
  over ranks, so all must step together). An epoch therefore shows every usable sample at
  most once; what does not make it (fewer than ``P`` samples per lane, the last partial
  batch, and what a rank holds beyond the poorest rank in the poorest epoch) is left out
  of that epoch only: the next epoch's shard order puts other samples there.

Resume: step ``s`` is ``(epoch, k) = divmod(s, steps_per_epoch)``; how many pieces the
first ``k`` steps took from each lane follows from the lanes' piece counts, so each lane
skips that many pieces of its emission order without decoding them (reading starts at the
shard holding its oldest sample still to come). Nothing but the step is recorded: a resumed
run yields exactly the batches of an uninterrupted one, given the same ranks, workers,
batch, pieces and buffer (``ShardStream.shape``, which a resume must match).

Samples are made by :class:`rdkd.training.PairBuilder` from ``sample_rng(seed, epoch,
entry)``, ``entry`` being the sample's dataset entry number (its cache shard's entry range
plus its place among the shard's indexed samples), as :class:`rdkd.training.PairDataset`
does: a sample gets the same view and caption in both modes. Batches have PairDataset's
format. An image that no longer decodes (extraction decoded it) is skipped and counted under
the bad-sample policy of every feed (:mod:`rdkd.training`): its slot takes the piece's next
decodable sample, so piece boundaries and resume do not move.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from rdkd.data import BROKEN_TAR_MEMBER, DataSpec, expand_shards, caption_lines, iter_samples
from rdkd.errors import UserError
from rdkd.training import PairBuilder, loader_generator

# --stream's default (auto) streams webdataset data above this many entries (the cache
# manifest's count): an index of CC3M-size data costs minutes per launch and rank and
# gigabytes per rank, while up to here it is seconds and a shuffle over all samples.
STREAM_AUTO_MIN_ENTRIES = 2_000_000
# Raw samples a DataLoader worker may hold to shuffle (~50 KB each for img2dataset's 256 px JPEGs).
DEFAULT_SHUFFLE_BUFFER = 2_000
# Data shards whose first cached sample is looked for in the tar before training (spread over the dataset).
ALIGNMENT_CHECKS = 16
# Samples read from the start of a tar while looking for the cache shard's first sample.
ALIGNMENT_WINDOW = 64
# Separate random streams for the shard order and the shuffle buffers.
_SHARD_ORDER, _SHUFFLE = 1, 2


@dataclass(frozen=True)
class StreamLayout:
    """The data shards and the usable samples of each (cache image rows / views)."""

    shards: tuple[str, ...]
    counts: np.ndarray

    @property
    def samples(self) -> int:
        return int(self.counts.sum())


def streaming_layout(stream: bool | None, spec: DataSpec, caches: Sequence[Any]) -> StreamLayout | None:
    """The layout to stream, or None to train from the index. ``stream`` None (auto):
    stream webdataset data of more than :data:`STREAM_AUTO_MIN_ENTRIES` entries with
    shard-aligned caches; True: stream or refuse with one line; False: never. Every cache
    must be shard-aligned with the data; the first one's counts lay the stream out."""
    if stream is False:
        return None
    fmt = spec.resolved_format()
    cache = caches[0] if caches else None
    if stream is None:
        aligned = cache is not None and all(c.manifest.get("layout", {}).get("shard_by") == "data shard"
                                            for c in caches)
        big = cache is not None and int(cache.manifest["dataset"].get("entries", 0)) > STREAM_AUTO_MIN_ENTRIES
        if fmt != "webdataset" or not (aligned and big):
            return None
    if fmt != "webdataset":
        raise UserError(f"--stream reads webdataset shards; {spec.path} is {fmt} data")
    if cache is None:
        raise UserError("--stream needs the teacher cache of the data (--cache): its manifest gives "
                        "the samples of each shard")
    shards = expand_shards(spec.path)
    layouts = [_aligned_layout(shards, c) for c in caches]
    for other, layout in zip(caches[1:], layouts[1:]):
        if not np.array_equal(layout.counts, layouts[0].counts):
            raise UserError(f"caches {cache.root} and {other.root} hold different samples of the data shards")
    return layouts[0]


def _aligned_layout(shards: list[str], cache: Any) -> StreamLayout:
    """Refuse, with one line, a cache that does not hold one shard per data shard in the
    same order; spot-check that data shards begin with their cache shard's first sample."""
    manifest, root = cache.manifest, cache.root
    layout = manifest.get("layout", {})
    if layout.get("shard_by") != "data shard":
        raise UserError(f"cache {root} is not shard-aligned with the data: it is cut into shards of "
                        f"{layout.get('rows_per_shard')} rows, not one per data shard (--stream needs a "
                        f"cache extracted from these webdataset shards)")
    cache_shards = manifest["shards"]
    if len(cache_shards) != len(shards) or [s["shard"] for s in cache_shards] != list(range(len(shards))):
        raise UserError(f"cache {root} is not shard-aligned with the data: {len(cache_shards)} cache shards "
                        f"for {len(shards)} data shards")
    views = cache.views
    counts = np.asarray([int(s["images"]["rows"]) // views for s in cache_shards], dtype=np.int64)
    filled = np.flatnonzero(counts)
    for j in filled[np.linspace(0, len(filled) - 1, min(ALIGNMENT_CHECKS, len(filled))).astype(int)]:
        first = cache.images.shard(int(j)).table.column("key")[0].as_py()
        keys = [key for key, _ in zip(_tar_keys(shards[j]), range(ALIGNMENT_WINDOW))]
        if first not in keys:
            raise UserError(f"cache {root} is not shard-aligned with the data: data shard {shards[j]} "
                            f"does not hold cache shard {j}'s first sample {first!r}")
    return StreamLayout(tuple(shards), counts)


def _tar_keys(path: str) -> Iterator[str]:
    """Sample keys of a tar in order (headers only)."""
    try:
        for sample in iter_samples(path, contents=lambda key: False):
            if (sample.problem or "").startswith(BROKEN_TAR_MEMBER):
                raise UserError(f"cannot read data shard {path}: {sample.problem}")
            yield sample.key
    except OSError as err:
        raise UserError(f"cannot read data shard {path}: {err}") from None


def emission_order(n: int, buffer: int, rng: np.random.Generator) -> np.ndarray:
    """The order in which a sliding shuffle buffer of ``buffer`` samples emits a stream of
    ``n``: fill, then each new sample replaces a random held one, which is emitted; at the
    end the rest in random order. At most ``buffer`` samples are held at any time."""
    buffer = max(1, buffer)
    held = list(range(min(n, buffer)))
    picks = rng.integers(0, len(held), size=max(0, n - buffer)) if held else np.zeros(0, np.int64)
    order = np.empty(n, dtype=np.int64)
    for t, (position, pick) in enumerate(zip(range(buffer, n), picks.tolist())):
        order[t] = held[pick]
        held[pick] = position
    order[n - len(held):] = np.asarray(held, dtype=np.int64)[rng.permutation(len(held))]
    return order


def round_robin(batches: list[int], taken: int) -> tuple[list[int], int]:
    """Lanes with ``batches[w]`` batches each, taken round-robin (skipping lanes that ran
    out): how many the first ``taken`` take from each lane, and the lane of the next."""
    used = [0] * len(batches)
    lane = 0
    for _ in range(taken):
        while used[lane] == batches[lane]:
            lane = (lane + 1) % len(batches)
        used[lane] += 1
        lane = (lane + 1) % len(batches)
    return used, lane


class ShardStream:
    """One rank's stream of local batches over the epochs (see the module docstring): the
    streamed :class:`rdkd.training.Feed`."""

    def __init__(self, layout: StreamLayout, builder: PairBuilder, batch_size: int, seed: int,
                 rank: int, world: int, workers: int, shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
                 pieces: int = 1):
        if shuffle_buffer < 1:
            raise UserError("--shuffle-buffer must be at least 1")
        self.layout = layout
        self.builder = builder
        self.batch_size = batch_size
        self.seed = int(seed)
        self.rank, self.world = rank, world
        self.workers = workers
        self.lanes = max(1, workers)
        self.shuffle_buffer = shuffle_buffer
        # equal pieces: the fewest that divide the batch, at least as many as asked
        self.pieces = next(d for d in range(max(1, min(pieces, batch_size)), batch_size + 1) if batch_size % d == 0)
        self.piece_size = batch_size // self.pieces
        manifest = builder.cache.manifest
        # the cache's own rejects (images extraction could not decode): counted once, as PairDataset does
        undecodable = int(manifest["counts"]["rejects"]) - int(manifest["dataset"].get("index_rejects", 0))
        self.skipped_at_join = {"rejected by the cache": undecodable} if undecodable > 0 else {}

    @property
    def samples(self) -> int:
        return self.layout.samples

    @property
    def shape(self) -> dict:
        """What the stream's order depends on besides seed and data: a resume must match it."""
        return {"world_size": self.world, "workers": self.lanes, "local_batch": self.batch_size,
                "piece_size": self.piece_size, "shuffle_buffer": self.shuffle_buffer}

    # -- the layout of an epoch (counts only) ---------------------------------------------------

    def shard_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch, _SHARD_ORDER]).permutation(len(self.layout.shards))

    def lane_shards(self, epoch: int, rank: int, lane: int) -> np.ndarray:
        return self.shard_order(epoch)[rank::self.world][lane::self.lanes]

    def lane_pieces(self, epoch: int) -> np.ndarray:
        """[world, lanes] full pieces each lane of each rank makes in ``epoch``."""
        order = self.shard_order(epoch)
        i = np.arange(len(order))
        lane_id = (i % self.world) * self.lanes + (i // self.world) % self.lanes
        usable = np.bincount(lane_id, weights=self.layout.counts[order], minlength=self.world * self.lanes)
        return (usable.astype(np.int64) // self.piece_size).reshape(self.world, self.lanes)

    def steps_per_epoch(self, epochs: int | None = None, steps: int | None = None) -> int:
        """Steps every rank does per epoch: the fewest full batches a rank makes in any epoch
        the run reaches (``epochs`` of them, or as many as ``steps`` need)."""
        fewest = None
        epoch = 0
        while True:
            made = int(self.lane_pieces(epoch).sum(axis=1).min()) // self.pieces
            fewest = made if fewest is None else min(fewest, made)
            if fewest == 0:
                raise UserError(
                    f"--stream: in epoch {epoch} a rank's workers cannot make one full batch of "
                    f"{self.batch_size} from its share of the {len(self.layout.shards)} data shards "
                    f"({self.world} ranks x {self.lanes} workers); use fewer --workers, a smaller "
                    f"--batch-size or --no-stream")
            epoch += 1
            if (epochs is not None and epoch >= epochs) or (steps is not None and epoch * fewest >= steps):
                return fewest

    # -- batches ------------------------------------------------------------------------------

    def batches(self, start_step: int, steps_per_epoch: int, **loader_options: Any) -> Iterator[dict]:
        """Pieces of local batches from ``start_step`` on, endlessly (``pieces`` consecutive
        ones make a batch: :func:`rdkd.runtime.device_batches` joins them): per epoch a
        DataLoader over :class:`EpochStream` whose workers are the lanes, stopped after
        ``steps_per_epoch`` batches."""
        epoch, step = divmod(start_step, steps_per_epoch)
        items = self._epoch_loader(epoch, step * self.pieces, loader_options)
        while True:
            for k in range(step * self.pieces, steps_per_epoch * self.pieces):
                piece = next(items, None)
                if piece is None:
                    raise UserError(f"rank {self.rank}'s stream ended before step {steps_per_epoch} of epoch {epoch}")
                if k == steps_per_epoch * self.pieces - 1:  # the next epoch's workers start while this trains
                    upcoming = self._epoch_loader(epoch + 1, 0, loader_options)
                yield piece
            items, epoch, step = upcoming, epoch + 1, 0  # dropping the iterator ends its workers

    def _epoch_loader(self, epoch: int, piece: int, loader_options: dict) -> Iterator[dict]:
        """A DataLoader iterator over ``epoch`` from its ``piece``-th piece on."""
        taken, next_lane = round_robin(self.lane_pieces(epoch)[self.rank].tolist(), piece)
        return iter(torch.utils.data.DataLoader(EpochStream(self, epoch, taken, next_lane), batch_size=None,
                                                num_workers=self.workers,
                                                generator=loader_generator(self.seed, self.rank, epoch),
                                                **loader_options))

    def lane(self, epoch: int, lane: int, skip: int) -> Iterator[dict]:
        """The full pieces of one lane in ``epoch``, after its first ``skip``."""
        shards = self.lane_shards(epoch, self.rank, lane)
        counts = self.layout.counts[shards]
        n = int(counts.sum())
        rng = np.random.default_rng([self.seed, epoch, _SHUFFLE, self.rank, lane])
        P = self.piece_size
        order = emission_order(n, self.shuffle_buffer, rng)[skip * P:(n // P) * P]
        if len(order) == 0:
            return
        wanted = np.zeros(n, dtype=bool)
        wanted[order] = True
        starts = np.concatenate([[0], np.cumsum(counts)])
        first = int(np.searchsorted(starts, order.min(), side="right")) - 1  # shard of the oldest sample to come
        samples = (found for j, start in zip(shards[first:].tolist(), starts[first:-1].tolist())
                   for found in self._read_shard(j, int(start), wanted))
        held: dict[int, tuple] = {}
        for b in range(len(order) // P):
            raws = []
            for position in order[b * P:(b + 1) * P].tolist():
                while position not in held:
                    found = next(samples, None)
                    if found is None:
                        raise UserError(f"the data shards of rank {self.rank} lane {lane} ended before "
                                        f"their cached samples did")
                    held[found[0]] = found[1]
                raws.append(held.pop(position))
            yield self._piece(epoch, raws)

    def _piece(self, epoch: int, raws: list[tuple]) -> dict:
        """A piece of raw samples, made under the one bad-sample policy (:meth:`PairBuilder.piece`)."""
        return self.builder.piece([(key, functools.partial(self.builder.sample, epoch, index, captions, data, rows))
                                   for key, index, captions, data, rows in raws])

    def _read_shard(self, shard: int, first_position: int, wanted: np.ndarray) -> Iterator[tuple[int, tuple]]:
        """(lane position, raw sample) of the cached samples of data shard ``shard`` that are
        ``wanted``, in one sequential pass over the tar; a raw sample is (key, dataset entry,
        captions, image bytes, per cache: its rows). Checks every cached sample against the tar."""
        path = self.layout.shards[shard]
        refs = [_CacheShardRef(cache, shard) for cache in self.builder.caches]
        ref = refs[0]
        for other in refs[1:]:
            if other.keys != ref.keys:
                raise UserError(f"caches {ref.root} and {other.root} hold other samples of data shard {path}")
        found = 0  # cached samples met so far
        entry = ref.entries.start  # dataset entry of the next indexed sample
        undecodable_seen: set[str] = set()

        def taking(key: str) -> tuple[int, int] | None:
            """(sample in the cache shard, dataset entry) of a wanted cached sample, else None."""
            nonlocal found, entry
            if found < len(ref.keys) and key == ref.keys[found]:
                take = (found, entry) if wanted[first_position + found] else None
                found += 1
                entry += 1
                return take
            if key in ref.undecodable and key not in undecodable_seen:
                undecodable_seen.add(key)
                entry += 1
            return None

        try:
            for sample in iter_samples(path, taking, sequential=True):
                if sample.tag is None or (sample.problem or "").startswith(BROKEN_TAR_MEMBER):
                    continue  # a tar broken part-way: fine if the cache ends where it breaks (checked below)
                i, index = sample.tag
                kept = caption_lines(sample.caption)[0] if sample.caption is not None else ()
                if kept != ref.captions[i]:
                    raise UserError(f"data shard {path} sample {sample.key!r}: captions differ from cache shard "
                                    f"{shard}'s; the cache was made from other data")
                rows = [(r.image_first + i * r.views, r.views, int(r.text_starts[i])) for r in refs]
                yield first_position + i, (sample.key, index, ref.captions[i], sample.image_bytes or b"", rows)
        except OSError as err:
            raise UserError(f"cannot read data shard {path}: {err}") from None
        if found != len(ref.keys) or entry != ref.entries.stop:
            raise UserError(f"data shard {path} does not match cache shard {shard} of {ref.root}: found "
                            f"{found} of its {len(ref.keys)} samples and {entry - ref.entries.start} of "
                            f"{len(ref.entries)} entries; the cache was made from other data")


class _CacheShardRef:
    """What a reader checks a data shard against: the cache shard's keys, captions, rows,
    entry range and the keys extraction could not decode (its parts/ record)."""

    def __init__(self, cache: Any, shard: int):
        from rdkd.cache import format as fmt

        self.root = cache.root
        self.views = cache.views
        # checked: the keys and captions decide which rows and captions a student sees
        images, texts = cache.images.checked_shard(shard), cache.texts.checked_shard(shard)
        self.keys = images.table.column("key").to_pylist()[::self.views]
        self.image_first = images.first_row
        text_keys = texts.table.column("key").to_pylist()
        captions = texts.table.column("caption").to_pylist()
        starts = [i for i in range(len(text_keys)) if i == 0 or text_keys[i] != text_keys[i - 1]]
        if [text_keys[i] for i in starts] != self.keys:
            raise UserError(f"cache {self.root} shard {shard}: its image and caption rows disagree; "
                            f"run `rdkd cache verify {self.root}`")
        bounds = starts + [len(text_keys)]
        self.captions = [tuple(captions[a:b]) for a, b in zip(bounds, bounds[1:])]
        self.text_starts = texts.first_row + np.asarray(starts, dtype=np.int64)
        start, stop = cache.manifest["shards"][shard]["entries"]
        self.entries = range(int(start), int(stop))
        try:
            part = json.loads(fmt.part_file(cache.root, shard).read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise UserError(f"cache {self.root}: cannot read the record of shard {shard} ({err}); "
                            f"--stream needs the cache's parts/ folder") from None
        self.undecodable = {r["key"] for r in part.get("rejects", [])}


class EpochStream(torch.utils.data.IterableDataset):
    """One epoch of a rank's stream for a DataLoader: worker ``i`` serves lane
    ``(first_lane + i) % lanes`` from its ``taken[lane]``-th piece on, so the DataLoader's
    round-robin over workers yields the rank's pieces in order."""

    def __init__(self, stream: ShardStream, epoch: int, taken: list[int], first_lane: int):
        self.stream, self.epoch, self.taken, self.first_lane = stream, epoch, taken, first_lane

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if workers != self.stream.lanes:
            raise UserError(f"the stream has {self.stream.lanes} lanes but the DataLoader {workers} workers")
        lane = (self.first_lane + worker) % workers
        return self.stream.lane(self.epoch, lane, self.taken[lane])

