"""Reading a teacher-embedding cache by memory mapping: nothing is loaded whole.

Every Arrow file is opened with ``pa.memory_map``; embeddings are handed out as numpy views
of the mapped pages (storage dtype) or gathered into float32 torch tensors for the rows
asked for, so the resident memory of a reader does not grow with the size of the cache.

A cache is input that may come from elsewhere, so the reader trusts it only this far:

- **It stays inside its folder.** Every file name in the manifest must be a relative path
  that resolves inside the cache folder (:func:`rdkd.cache.format.contained_file`);
  :meth:`TeacherCache.open` refuses any other with one line before it opens any file.
- **What it hands out is what was extracted.** Each file's sha256 (recorded in the
  manifest) is checked the first time its contents are used, by the process using them:
  a shard before any of its rows (embeddings, crop boxes, flips; a streaming reader's keys
  and captions) is returned, the index before a key is looked up in it, the rejects table
  when it is read. A mismatch raises :class:`UserError` naming the file. So every shard is
  checked before its rows reach a student, at any cache size, and the cost is one pass
  over each shard when it is first used (a streaming reader goes shard by shard: start-up
  hashes one shard; BENCHMARKS.md measures it), not a pass over the whole cache at
  start-up. Looking keys up in the shards' key columns (:meth:`TeacherCache.lookup`)
  hashes nothing: the rows found are checked when they are read. ``check=False`` (rdkd
  train-student --no-verify-cache) turns the checks off.
- **Whole, on request.** :meth:`TeacherCache.verify` (``rdkd cache verify``) hashes every
  file and checks the shards' rows and dims against the manifest's counts;
  ``verify(sizes_only=True)`` only stats each file against the byte size the manifest
  records, what train-student and evaluate check before they start.
  :meth:`TeacherCache.require_intact` is either check as one line.
"""

from __future__ import annotations

import json
import mmap
import os
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from rdkd.cache import format as fmt
from rdkd.errors import UserError


@dataclass(frozen=True)
class CacheEntry:
    """Where one image's rows are: its K view rows and its caption rows (in caption order)."""

    key: str
    image_rows: range
    text_rows: range


@dataclass(frozen=True)
class CacheLookup:
    """Where many keys' rows are, one element per key asked (see :meth:`TeacherCache.lookup`).

    Where ``found`` is False the rows are -1 and the counts 0.
    """

    found: np.ndarray  # bool
    image_row: np.ndarray  # int64: the first of the key's view rows
    image_count: np.ndarray  # int32: its views (K)
    text_row: np.ndarray  # int64: its first caption row
    text_count: np.ndarray  # int32: its captions

    @classmethod
    def empty(cls, n: int) -> "CacheLookup":
        return cls(np.zeros(n, bool), np.full(n, -1, np.int64), np.zeros(n, np.int32),
                   np.full(n, -1, np.int64), np.zeros(n, np.int32))


@dataclass(frozen=True)
class CacheShard:
    """One memory-mapped shard file: its table and a zero-copy view of its embeddings."""

    shard: int
    first_row: int  # global row of the shard's first row
    table: pa.Table
    embeddings: np.ndarray  # [rows, dim] in the storage dtype (bfloat16 as uint16 bits), read-only
    path: Path
    embedding_offset: int  # file offset of the first embedding value (rows follow contiguously)


class _ShardedColumn:
    """The rows of one kind (images or texts) across all shards, addressed by global row.

    Shard files are memory-mapped when first used and kept in a small LRU, so a reader of a
    cache with tens of thousands of shards holds a bounded number of open files; arrays
    handed out keep their mapping alive on their own.
    """

    def __init__(self, root: Path, dim: int, files: list[Path], shards: list[int], rows: list[int],
                 storage_dtype: str, sha256: list[str] | None = None, max_open: int = 256):
        self.root, self.dim, self.storage_dtype, self.max_open = root, dim, storage_dtype, max_open
        self.files, self.shard_ids, self.sha256 = files, shards, sha256
        self._starts = np.concatenate([[0], np.cumsum(rows, dtype=np.int64)])[:-1].astype(np.int64)
        self.num_rows = int(sum(rows))
        self._open: OrderedDict[int, CacheShard] = OrderedDict()
        self._fds: OrderedDict[int, int] = OrderedDict()
        # Shards whose sha256 matched, in anonymous shared memory: a shard one DataLoader
        # worker checked counts for the other workers and for later epochs' workers (forked
        # from this process); a spawned worker gets a copy and checks on its own.
        self.checked = np.frombuffer(mmap.mmap(-1, max(len(files), 1)), dtype=np.uint8)[:len(files)]

    def check(self, position: int) -> None:
        """Refuse shard ``position`` with one line unless its file has the manifest's sha256;
        hashed once, before the first of its rows is handed out (see the module docstring)."""
        if self.sha256 is None or self.checked[position]:
            return
        _check_file(self.root, self.files[position], self.sha256[position])
        self.checked[position] = 1

    def checked_shard(self, position: int) -> CacheShard:
        """:meth:`shard`, after :meth:`check`: for a reader that hands its rows on."""
        self.check(position)
        return self.shard(position)

    def __len__(self) -> int:
        return len(self.files)

    def shard(self, position: int) -> CacheShard:
        """The ``position``-th shard, memory-mapped (opened on first use), unchecked: for its
        keys (lookups, layout checks); rows handed on come through :meth:`checked_shard`."""
        if position in self._open:
            self._open.move_to_end(position)
            return self._open[position]
        mapped = pa.memory_map(str(self.files[position]), "r")
        table = pa.ipc.open_file(mapped).read_all()
        combined = table.column("embedding").num_chunks > 1
        if combined:  # written by another tool: combine once (in memory, no longer file-backed)
            table = table.combine_chunks()
        column = table.column("embedding")
        offset = -1
        if len(column) == 0:
            emb = np.zeros((0, column.type.list_size), dtype=fmt.numpy_storage_dtype(self.storage_dtype))
        else:
            emb = fmt.embedding_view(column)
            if not combined:
                mapped.seek(0)
                offset = emb.__array_interface__["data"][0] - mapped.read_buffer(1).address
        opened = CacheShard(self.shard_ids[position], int(self._starts[position]), table, emb,
                            self.files[position], offset)
        self._open[position] = opened
        if len(self._open) > self.max_open:
            self._open.popitem(last=False)
        return opened

    def __iter__(self) -> Iterator[CacheShard]:
        return (self.checked_shard(p) for p in range(len(self)))

    def locate(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard position, row within shard) of global rows."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= self.num_rows):
            raise IndexError(f"row out of range [0, {self.num_rows})")
        position = np.searchsorted(self._starts, rows, side="right") - 1
        return position, rows - self._starts[position]

    def gather(self, rows: np.ndarray) -> np.ndarray:
        """Stored values [n, dim] of global rows (a copy of just those rows).

        Rows are read with ``pread`` rather than through the mapping: a read through the map
        faults in the pages around each row (kernel fault-around and read-ahead), which would
        make a trainer's resident memory grow with the cache; ``pread`` copies just the rows.
        The rows of a call are read in file order, each run of adjacent rows in one call.
        """
        position, local = self.locate(rows)
        out = np.empty((len(local), self.dim), dtype=fmt.numpy_storage_dtype(self.storage_dtype))
        row_bytes = out.itemsize * self.dim
        for p in np.unique(position):
            shard = self.checked_shard(p)
            wanted = np.flatnonzero(position == p)
            if shard.embedding_offset < 0:  # not file-backed (combined chunks)
                out[wanted] = shard.embeddings[local[wanted]]
                continue
            fd = self._fd(p)
            wanted = wanted[np.argsort(local[wanted], kind="stable")]
            rows_in_file = local[wanted]
            # runs of distinct adjacent rows: one read each, straight into a contiguous buffer
            breaks = np.flatnonzero(np.diff(rows_in_file) != 1) + 1
            for run in np.split(np.arange(len(wanted)), breaks):
                first, count = int(rows_in_file[run[0]]), len(run)
                block = np.empty((count, self.dim), dtype=out.dtype)
                os.preadv(fd, [memoryview(block).cast("B")], shard.embedding_offset + first * row_bytes)
                out[wanted[run]] = block
        return out

    def __del__(self) -> None:
        for fd in getattr(self, "_fds", {}).values():
            os.close(fd)

    def _fd(self, position: int) -> int:
        """A read-only descriptor of shard ``position`` (a small LRU, closed on eviction)."""
        if position in self._fds:
            self._fds.move_to_end(position)
            return self._fds[position]
        self._fds[position] = os.open(self.files[position], os.O_RDONLY)
        if len(self._fds) > self.max_open:
            os.close(self._fds.popitem(last=False)[1])
        return self._fds[position]

    def take(self, name: str, rows: np.ndarray, checked: bool = True) -> pa.Array:
        """Column ``name`` at global rows, in the order asked (one ``take`` per shard touched);
        the shards are checked first unless ``checked`` is False (keys read by a lookup)."""
        position, local = self.locate(rows)
        if len(local) == 0:
            return pa.array([], type=self.shard(0).table.schema.field(name).type) if len(self) else pa.array([])
        order = np.argsort(position, kind="stable")
        pieces = []
        for p in np.unique(position):
            shard = self.checked_shard(p) if checked else self.shard(p)
            pieces.append(shard.table.column(name).take(pa.array(local[position == p])))
        grouped = pa.chunked_array(pieces).combine_chunks()
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        return grouped.take(pa.array(inverse))

    def fixed(self, name: str, rows: np.ndarray) -> np.ndarray:
        """A fixed-width column (scalar or fixed-size list) at global rows as numpy."""
        array = self.take(name, rows)
        if pa.types.is_fixed_size_list(array.type):
            return array.flatten().to_numpy(zero_copy_only=False).reshape(len(array), array.type.list_size)
        return array.to_numpy(zero_copy_only=False)


def _check_file(root: Path, path: Path, sha256: str) -> None:
    """Refuse (one line naming the file) a file of the cache at ``root`` whose bytes do not
    have ``sha256``."""
    if fmt.sha256_file(path) != sha256:
        raise UserError(f"teacher cache {root} is damaged: {path.relative_to(root).as_posix()} does not match "
                        f"its sha256 (checked before its contents are used); run `rdkd cache verify {root}` "
                        f"or extract it again")


def _keys_of(shard: CacheShard) -> pa.Array:
    """The key column of a shard as one large-string array (the type dataset keys come in)."""
    column = shard.table.column("key")
    return (column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()).cast(pa.large_string())


def _to_tensor(stored: np.ndarray, storage_dtype: str, as_stored: bool = False) -> torch.Tensor:
    if not as_stored:
        return torch.from_numpy(fmt.from_storage(stored, storage_dtype))
    values = torch.from_numpy(stored)
    return values.view(torch.bfloat16) if storage_dtype == "bfloat16" else values  # bf16 is stored as uint16 bits


def manifest_files(manifest: dict) -> list[dict]:
    """Every file entry of a manifest (``file``, ``rows``, ``bytes``, ``sha256``): the index,
    the rejects, then each shard's images and texts."""
    return [manifest["index"], manifest["rejects"],
            *(s[kind] for s in manifest["shards"] for kind in ("images", "texts"))]


def _check_file_names(root: Path, manifest: dict) -> None:
    """Refuse, with one line and before any file is opened, a manifest naming a file
    outside the cache folder (:func:`rdkd.cache.format.contained_file`)."""
    try:
        entries = manifest_files(manifest)
    except (KeyError, TypeError) as err:
        raise UserError(f"cannot read teacher cache {root}: its manifest lacks {err}") from None
    for entry in entries:
        try:
            fmt.contained_file(root, entry.get("file") if isinstance(entry, dict) else None)
        except ValueError as err:
            raise UserError(f"teacher cache {root} is refused: its manifest's {err}; a cache may only "
                            f"name files inside its folder") from None


class TeacherCache:
    """A complete teacher-embedding cache, opened read-only by memory mapping."""

    def __init__(self, root: Path, manifest: dict, check: bool = True):
        """Use :meth:`open`, which checks the manifest first. ``check``: verify each file's
        sha256 before its contents are used (the module docstring)."""
        self.root = root
        self.manifest = manifest
        self.check = check
        self.storage_dtype: str = manifest["storage_dtype"]
        shards = manifest["shards"]
        dim = int(manifest["dim"])
        self.images, self.texts = (
            _ShardedColumn(root, dim, [fmt.contained_file(root, s[kind]["file"]) for s in shards],
                           [s["shard"] for s in shards], [int(s[kind]["rows"]) for s in shards], self.storage_dtype,
                           [s[kind]["sha256"] for s in shards] if check else None)
            for kind in ("images", "texts"))
        self._index_file = fmt.contained_file(root, manifest["index"]["file"])
        self._index_checked = not check
        index = pa.ipc.open_file(pa.memory_map(str(self._index_file), "r")).read_all()
        if any(index.column(name).num_chunks != 1 for name in index.column_names):
            index = index.combine_chunks()
        # zero-copy views of the mapped index columns; searchsorted runs on the mapped hashes
        self._index = {name: fmt.numeric_view(index.column(name).chunk(0))
                       for name in index.column_names} if index.num_rows else \
            {field.name: np.zeros(0, dtype=field.type.to_pandas_dtype()) for field in fmt.INDEX_SCHEMA}
        self._hashes = self._index["key_hash"]

    # -- opening -------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path, check: bool = True) -> "TeacherCache":
        """Open the cache at ``path``; ``UserError`` when it is absent, incomplete or
        unreadable, or when its manifest names a file outside the folder (before any file
        is opened). ``check``: see the module docstring."""
        root = Path(path)
        manifest_path = root / fmt.MANIFEST
        if not root.is_dir():
            raise UserError(f"no teacher cache at {root} (no such folder)")
        if not manifest_path.is_file():
            raise UserError(f"{root} is not a complete teacher cache (no {fmt.MANIFEST}; "
                            "was extraction interrupted? rerun rdkd extract-teacher to resume)")
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise UserError(f"cannot read {manifest_path}: {err}") from None
        if not isinstance(manifest, dict) or manifest.get("format") != fmt.FORMAT_NAME:
            raise UserError(f"{manifest_path} is not an rdkd teacher-cache manifest")
        if manifest.get("format_version") != fmt.FORMAT_VERSION:
            raise UserError(f"{root} has cache format version {manifest.get('format_version')}; "
                            f"this rdkd reads version {fmt.FORMAT_VERSION}")
        _check_file_names(root, manifest)
        try:
            cache = cls(root, manifest, check)
        except (OSError, KeyError, TypeError, pa.ArrowException, ValueError) as err:
            raise UserError(f"cannot read teacher cache {root}: {err}") from None
        missing = [f for f in cache.images.files + cache.texts.files if not f.is_file()]
        if missing:
            raise UserError(f"teacher cache {root} is damaged: {missing[0].relative_to(root)} is missing "
                            f"({len(missing)} file(s)); run `rdkd cache verify {root}` or extract it again")
        return cache

    # -- what it holds ---------------------------------------------------------------------------

    @property
    def cache_id(self) -> str:
        return self.manifest["cache_id"]

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def views(self) -> int:
        return int(self.manifest["views"]["count"])

    @property
    def logit_scale(self) -> float:
        return float(self.manifest["teacher"]["logit_scale"])

    @property
    def dataset_fingerprint(self) -> str:
        return self.manifest["dataset"]["fingerprint"]

    @property
    def num_images(self) -> int:
        """Distinct images (each has ``views`` image rows)."""
        return int(self.manifest["counts"]["images"])

    @property
    def num_image_rows(self) -> int:
        return self.images.num_rows

    @property
    def num_texts(self) -> int:
        return self.texts.num_rows

    @property
    def num_shards(self) -> int:
        return len(self.images)

    def __len__(self) -> int:
        return self.num_images

    # -- lookup ----------------------------------------------------------------------------------

    def find(self, key: str) -> CacheEntry | None:
        """The rows of ``key``, or None when the key is not in the cache (e.g. rejected)."""
        rows = self._hash_lookup(pa.array([key], pa.large_string()))
        if not rows.found[0]:
            return None
        image_row, text_row = int(rows.image_row[0]), int(rows.text_row[0])
        return CacheEntry(key, range(image_row, image_row + int(rows.image_count[0])),
                          range(text_row, text_row + int(rows.text_count[0])))

    def lookup(self, keys: Sequence[str] | pa.Array | pa.ChunkedArray) -> CacheLookup:
        """The rows of many keys at once, one element per key (what :meth:`find` gives key by key).

        ``keys``: a sequence of str, or an Arrow string array (``rdkd.data.Keys`` converts
        to one). When they are the entries the cache's shards were made from, in order (the
        manifest's shard ``entries`` tile ``[0, len(keys))``), the join runs shard by shard
        with no key hashing: the keys of cache shard ``j`` are looked for among the entries
        of its range and taken only if they line up (all found, in increasing order,
        captions in the same order as the images). Otherwise, or when a shard does not line
        up, every key is hashed and searched in the index at once.
        """
        if isinstance(keys, pa.ChunkedArray):
            keys = keys.combine_chunks()
        array = (keys if isinstance(keys, pa.Array) else pa.array(keys, pa.large_string())).cast(pa.large_string())
        aligned = self._aligned_lookup(array)
        return aligned if aligned is not None else self._hash_lookup(array)

    def _aligned_lookup(self, keys: pa.Array) -> CacheLookup | None:
        """:meth:`lookup` shard by shard, or None when the cache's shards do not follow ``keys``."""
        shards = self.manifest["shards"]
        bounds = [tuple(s["entries"]) for s in shards]
        if not bounds or bounds[0][0] != 0 or bounds[-1][1] != len(keys) or \
                any(a[1] != b[0] for a, b in zip(bounds, bounds[1:])):
            return None
        rows = CacheLookup.empty(len(keys))
        for position, (start, stop) in enumerate(bounds):
            image_shard, text_shard = self.images.shard(position), self.texts.shard(position)
            image_start, image_count, image_keys = fmt.key_runs(_keys_of(image_shard))
            text_start, text_count, text_keys = fmt.key_runs(_keys_of(text_shard))
            if not image_keys.equals(text_keys):
                return None
            entries = keys.slice(start, stop - start)
            if image_keys.equals(entries):  # nothing of this shard was rejected
                at = np.arange(len(entries))
            else:
                found = pc.index_in(image_keys, value_set=entries)
                if found.null_count:
                    return None
                at = found.to_numpy()
                if np.any(np.diff(at) <= 0):
                    return None
            at = at + start
            rows.found[at] = True
            rows.image_row[at] = image_shard.first_row + image_start
            rows.image_count[at] = image_count
            rows.text_row[at] = text_shard.first_row + text_start
            rows.text_count[at] = text_count
        return rows

    def _hash_lookup(self, keys: pa.Array) -> CacheLookup:
        """:meth:`lookup` through the index (checked on first use): hashes, binary search,
        keys compared in bulk."""
        if not self._index_checked:
            _check_file(self.root, self._index_file, self.manifest["index"]["sha256"])
            self._index_checked = True
        hashes = fmt.key_hashes(keys)
        lo = np.searchsorted(self._hashes, hashes, side="left")
        hi = np.searchsorted(self._hashes, hashes, side="right")
        slot = np.full(len(keys), -1, dtype=np.int64)  # the key's index row
        pending = np.flatnonzero(lo < hi)
        tried = 0
        while pending.size:  # more than one round only where 64-bit hashes collide
            at = lo[pending] + tried
            stored = self.images.take("key", self._index["image_row"][at], checked=False).cast(pa.large_string())
            same = pc.equal(stored, keys.take(pa.array(pending))).to_numpy(zero_copy_only=False)
            slot[pending[same]] = at[same]
            tried += 1
            pending = pending[~same]
            pending = pending[lo[pending] + tried < hi[pending]]
        rows = CacheLookup.empty(len(keys))
        found = np.flatnonzero(slot >= 0)
        rows.found[found] = True
        for name in ("image_row", "image_count", "text_row", "text_count"):
            getattr(rows, name)[found] = self._index[name][slot[found]]
        return rows

    def is_rejected(self, keys: Sequence[str] | pa.Array) -> np.ndarray:
        """bool per key: the key is in ``rejects.parquet`` (rejected at indexing or extraction)."""
        array = keys if isinstance(keys, (pa.Array, pa.ChunkedArray)) else pa.array(keys, pa.large_string())
        rejected = self.rejects.column("key").cast(pa.large_string())
        return pc.is_in(array.cast(pa.large_string()), value_set=rejected).to_numpy(zero_copy_only=False)

    def __contains__(self, key: str) -> bool:
        return self.find(key) is not None

    # -- embeddings ------------------------------------------------------------------------------

    def image_embeddings(self, rows, stored: bool = False) -> torch.Tensor:
        """[n, dim] image embeddings of global image rows (L2-normalised before storage):
        float32, or with ``stored`` the storage dtype as a torch tensor (float16, bfloat16 or
        float32: the exact stored values at the fewest bytes, e.g. to ship between processes)."""
        return _to_tensor(self.images.gather(rows), self.storage_dtype, stored)

    def text_embeddings(self, rows, stored: bool = False) -> torch.Tensor:
        """[n, dim] caption embeddings of global text rows (float32, or the storage dtype)."""
        return _to_tensor(self.texts.gather(rows), self.storage_dtype, stored)

    def view_params(self, rows) -> tuple[np.ndarray, np.ndarray]:
        """(crop [n, 4] float32 left/top/right/bottom in original pixels, flip [n] bool) of image rows."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        crop = self.images.fixed("crop", rows).astype(np.float32).reshape(len(rows), 4)
        flip = self.images.fixed("flip", rows).astype(bool).reshape(len(rows))
        return crop, flip

    def image_keys(self, rows) -> list[str]:
        return self.images.take("key", rows).to_pylist()

    def captions(self, rows) -> list[str]:
        return self.texts.take("caption", rows).to_pylist()

    # -- streaming in order ------------------------------------------------------------------------

    def image_shards(self) -> Iterator[CacheShard]:
        """The image shards in order: memory-mapped tables and zero-copy embedding views."""
        return iter(self.images)

    def text_shards(self) -> Iterator[CacheShard]:
        return iter(self.texts)

    def iter_images(self) -> Iterator[tuple[list[str], torch.Tensor]]:
        """(keys, float32 embeddings) per image shard, in cache order (= dataset order)."""
        for shard in self.images:
            yield shard.table.column("key").to_pylist(), _to_tensor(shard.embeddings, self.storage_dtype)

    def iter_texts(self) -> Iterator[tuple[list[str], torch.Tensor]]:
        for shard in self.texts:
            yield shard.table.column("key").to_pylist(), _to_tensor(shard.embeddings, self.storage_dtype)

    def torch_view(self, shard: CacheShard) -> torch.Tensor:
        """A zero-copy, read-only torch view of one shard's stored embeddings (storage dtype).

        bfloat16 caches come back as ``torch.bfloat16``; do not write to the tensor.
        """
        with warnings.catch_warnings():  # the mapped pages are read-only; torch warns about that
            warnings.simplefilter("ignore", UserWarning)
            tensor = torch.from_numpy(shard.embeddings)
        return tensor.view(torch.bfloat16) if self.storage_dtype == "bfloat16" else tensor

    # -- rejects and checks ------------------------------------------------------------------------

    @cached_property
    def rejects(self) -> pa.Table:
        """key, source, reason of every dataset sample that is not in the cache."""
        entry = self.manifest["rejects"]
        path = fmt.contained_file(self.root, entry["file"])
        if self.check:
            _check_file(self.root, path, entry["sha256"])
        return pq.read_table(path)

    @property
    def rejected_keys(self) -> list[str]:
        return self.rejects.column("key").to_pylist()

    def verify(self, sizes_only: bool = False) -> list[str]:
        """The problems found, none when the cache is whole: every file of the manifest must
        be there with its sha256, the shards with the rows and dims it records, the counts
        must add up. ``sizes_only``: only that every file is there with the byte size the
        manifest records, a stat per file whatever the cache's size (what a stage checks
        before it starts: the damage a size cannot show is caught by each file's sha256
        before its contents are used, see the module docstring)."""
        problems: list[str] = []
        for entry in manifest_files(self.manifest):
            path = fmt.contained_file(self.root, entry["file"])
            if not path.is_file():
                problems.append(f"{entry['file']}: missing")
            elif sizes_only:
                if "bytes" in entry and (size := path.stat().st_size) != int(entry["bytes"]):
                    problems.append(f"{entry['file']}: {size} bytes, manifest says {entry['bytes']}")
            elif fmt.sha256_file(path) != entry["sha256"]:
                problems.append(f"{entry['file']}: sha256 mismatch")
        if sizes_only:
            return problems
        for kind, column in (("images", self.images), ("texts", self.texts)):
            for position, s in enumerate(self.manifest["shards"]):
                if not column.files[position].is_file():
                    continue  # reported above
                try:
                    shard = column.shard(position)
                except (OSError, pa.ArrowException) as err:
                    problems.append(f"{s[kind]['file']}: unreadable ({err})")
                    continue
                if shard.table.num_rows != s[kind]["rows"]:
                    problems.append(f"{s[kind]['file']}: {shard.table.num_rows} rows, manifest says {s[kind]['rows']}")
                if shard.embeddings.shape[1] != self.dim:
                    problems.append(f"{s[kind]['file']}: dim {shard.embeddings.shape[1]}, manifest says {self.dim}")
        counts = self.manifest["counts"]  # the shards' rows (checked against the files above) must add up
        if self.images.num_rows != counts["image_rows"]:
            problems.append(f"images: shards hold {self.images.num_rows} rows, manifest counts {counts['image_rows']}")
        if self.texts.num_rows != counts["captions"]:
            problems.append(f"captions: shards hold {self.texts.num_rows} rows, manifest counts {counts['captions']}")
        if len(self._hashes) != counts["images"]:
            problems.append(f"{fmt.INDEX}: {len(self._hashes)} keys, manifest says {counts['images']}")
        if self.images.num_rows != counts["images"] * self.views:
            problems.append(f"images: {self.images.num_rows} rows != {counts['images']} images x {self.views} views")
        rejects = fmt.contained_file(self.root, self.manifest["rejects"]["file"])
        if rejects.is_file() and (found := pq.read_metadata(rejects).num_rows) != counts["rejects"]:
            problems.append(f"{fmt.REJECTS}: {found} rows, manifest says {counts['rejects']}")
        if not problems:  # every file was hashed just now: the reader need not hash them again
            self.images.checked[:] = self.texts.checked[:] = 1
            self._index_checked = True
        return problems

    def require_intact(self, sizes_only: bool = False) -> None:
        """:meth:`verify`, refusing a damaged cache with one line (:class:`UserError`) that
        names the first problem."""
        problems = self.verify(sizes_only)
        if problems:
            more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
            then = f"run `rdkd cache verify {self.root}` or extract it again" if sizes_only else "extract it again"
            raise UserError(f"teacher cache {self.root} is damaged: {problems[0]}{more}; {then}")
