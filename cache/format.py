"""The on-disk layout of a teacher-embedding cache (see ``cache/FORMAT.md``).

Everything both the writer and the reader need to agree on lives here: file names, Arrow
schemas, the storage dtypes, the key hash of the lookup index and the atomic file write.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

FORMAT_NAME = "rdkd-teacher-cache"
FORMAT_VERSION = 1

MANIFEST = "manifest.json"
INDEX = "index.arrow"
REJECTS = "rejects.parquet"
IMAGES_DIR = "images"
TEXTS_DIR = "texts"
PARTS_DIR = "parts"

# Storage dtypes of the embedding column. bfloat16 has no Arrow type: its raw 16 bits are
# stored as uint16 and the manifest's ``storage_dtype`` says how to read them.
STORAGE_DTYPES = ("float16", "bfloat16", "float32")
_ARROW_VALUE_TYPE = {"float16": pa.float16(), "bfloat16": pa.uint16(), "float32": pa.float32()}
_NUMPY_DTYPE = {"float16": np.float16, "bfloat16": np.uint16, "float32": np.float32}


def shard_name(shard: int) -> str:
    return f"part-{shard:05d}"


def image_file(root: Path, shard: int) -> Path:
    return root / IMAGES_DIR / f"{shard_name(shard)}.arrow"


def text_file(root: Path, shard: int) -> Path:
    return root / TEXTS_DIR / f"{shard_name(shard)}.arrow"


def part_file(root: Path, shard: int) -> Path:
    """The per-shard commit record: rows, checksums and rejects of one finished shard."""
    return root / PARTS_DIR / f"{shard_name(shard)}.json"


def embedding_type(dim: int, storage_dtype: str) -> pa.DataType:
    return pa.list_(_ARROW_VALUE_TYPE[storage_dtype], dim)


def image_schema(dim: int, storage_dtype: str) -> pa.Schema:
    return pa.schema(
        [
            pa.field("key", pa.string(), nullable=False),
            pa.field("view", pa.int16(), nullable=False),
            pa.field("crop", pa.list_(pa.float32(), 4), nullable=False),
            pa.field("flip", pa.bool_(), nullable=False),
            pa.field("embedding", embedding_type(dim, storage_dtype), nullable=False),
        ]
    )


def text_schema(dim: int, storage_dtype: str) -> pa.Schema:
    return pa.schema(
        [
            pa.field("key", pa.string(), nullable=False),
            pa.field("caption_index", pa.int16(), nullable=False),
            pa.field("caption", pa.string(), nullable=False),
            pa.field("embedding", embedding_type(dim, storage_dtype), nullable=False),
        ]
    )


INDEX_SCHEMA = pa.schema(
    [
        pa.field("key_hash", pa.uint64(), nullable=False),
        pa.field("image_row", pa.int64(), nullable=False),
        pa.field("image_count", pa.int32(), nullable=False),
        pa.field("text_row", pa.int64(), nullable=False),
        pa.field("text_count", pa.int32(), nullable=False),
    ]
)

REJECTS_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string()),
        pa.field("source", pa.string()),
        pa.field("reason", pa.string()),
    ]
)


def key_hashes(keys: Sequence[str] | pa.Array | pa.ChunkedArray) -> np.ndarray:
    """64-bit lookup hashes of keys (BLAKE2b, 8 bytes, big-endian) as uint64; collisions are checked.

    One hashlib call per key (about 0.5 us): the format fixes BLAKE2b, which numpy and
    Arrow cannot compute column-wise.
    """
    values = keys.to_pylist() if isinstance(keys, (pa.Array, pa.ChunkedArray)) else keys
    digests = b"".join([hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest() for key in values])
    return np.frombuffer(digests, dtype=">u8").astype(np.uint64)


def key_hash(key: str) -> int:
    """The lookup hash of one key (see :func:`key_hashes`)."""
    return int(key_hashes([key])[0])


def key_runs(keys: pa.Array) -> tuple[np.ndarray, np.ndarray, pa.Array]:
    """(first row, row count, key) of each run of equal consecutive keys: the images (or
    captions) of a shard, whose rows are consecutive per key."""
    n = len(keys)
    if n == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), keys
    changed = pc.not_equal(keys.slice(1), keys.slice(0, n - 1)).to_numpy(zero_copy_only=False)
    starts = np.flatnonzero(np.concatenate([[True], changed]))
    return starts, np.diff(np.append(starts, n)), keys.take(pa.array(starts))


def to_storage(embeddings: np.ndarray, storage_dtype: str) -> np.ndarray:
    """Cast L2-normalised float32 embeddings [n, dim] to the storage dtype (bf16 as uint16 bits)."""
    emb = np.ascontiguousarray(embeddings, dtype=np.float32)
    if storage_dtype == "bfloat16":
        # round to nearest even, as torch's float32 -> bfloat16 cast does
        bits = emb.view(np.uint32)
        rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
        return ((bits + rounding) >> 16).astype(np.uint16)
    return emb.astype(_NUMPY_DTYPE[storage_dtype])


def from_storage(stored: np.ndarray, storage_dtype: str) -> np.ndarray:
    """Stored values (any shape) as float32."""
    if storage_dtype == "bfloat16":
        return (stored.astype(np.uint32) << 16).view(np.float32)
    return stored.astype(np.float32)


def numpy_storage_dtype(storage_dtype: str) -> type:
    return _NUMPY_DTYPE[storage_dtype]


def embedding_array(values: np.ndarray, storage_dtype: str) -> pa.FixedSizeListArray:
    """A [n, dim] array of stored values as the Arrow embedding column (no copy)."""
    dim = values.shape[1]
    flat = pa.array(np.ascontiguousarray(values).reshape(-1), type=_ARROW_VALUE_TYPE[storage_dtype])
    return pa.FixedSizeListArray.from_arrays(flat, dim)


def numeric_view(array: pa.Array) -> np.ndarray:
    """Zero-copy numpy view of a primitive Arrow array without nulls.

    Built on the data buffer directly: ``Array.to_numpy`` reads every page of a memory-mapped
    buffer, which would pull a whole shard or index into memory.
    """
    if array.null_count:
        raise ValueError("numeric_view needs an array without nulls")
    dtype = np.dtype(array.type.to_pandas_dtype())
    data = array.buffers()[1]
    if data is None or len(array) == 0:
        return np.zeros(0, dtype=dtype)
    return np.frombuffer(data, dtype=dtype, count=len(array), offset=array.offset * dtype.itemsize)


def embedding_view(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Zero-copy [n, dim] numpy view of one chunk of an embedding column (storage dtype)."""
    if isinstance(column, pa.ChunkedArray):
        if column.num_chunks != 1:
            raise ValueError("embedding column must be a single chunk for a zero-copy view")
        column = column.chunk(0)
    dim = column.type.list_size
    # .values ignores the list array's own offset; slice the child to this array's rows
    values = column.values.slice(column.offset * dim, len(column) * dim)
    return numeric_view(values).reshape(len(column), dim)


def contained_file(root: Path, name: Any) -> Path:
    """``root / name`` for a file name from a manifest or shard record; ``ValueError`` unless
    it stays inside the cache folder: a relative POSIX path (no absolute path, no ``..``, no
    backslash) that does not resolve outside ``root`` through a symlink. Nothing is opened
    (symlinks are followed with ``readlink``), so a refused name is never read."""
    if not isinstance(name, str) or not name or "\\" in name or "\0" in name:
        raise ValueError(f"file name {name!r} is not a relative path")
    if posixpath.isabs(name) or ".." in name.split("/"):
        raise ValueError(f"file name {name!r} points outside the cache folder")
    base = os.path.realpath(root)
    if os.path.commonpath([base, os.path.realpath(os.path.join(base, name))]) != base:
        raise ValueError(f"file name {name!r} leads outside the cache folder through a symlink")
    return root / name


def sha256_bytes(data: bytes | memoryview | pa.Buffer) -> str:
    return hashlib.sha256(memoryview(data)).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def canonical_json(obj: Any) -> bytes:
    """JSON with sorted keys and a final newline: equal content gives equal bytes."""
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def ipc_bytes(table: pa.Table) -> pa.Buffer:
    """An uncompressed Arrow IPC file of ``table`` as one record batch (memory-mappable)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=max(table.num_rows, 1))
    return sink.getvalue()
