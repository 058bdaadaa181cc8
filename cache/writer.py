"""Writing a teacher-embedding cache: one shard at a time, then the index and the manifest.

A shard is committed in three atomic steps: ``texts/part-j.arrow``, ``images/part-j.arrow``,
then ``parts/part-j.json`` (rows, checksums and rejects of the shard). Only a shard with its
record is complete, so an interrupted run redoes at most the shards it was writing, and a
reader never sees a partial file. :func:`finalize` writes ``index.arrow``,
``rejects.parquet`` and, last, ``manifest.json``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rdkd.cache import format as fmt
from rdkd.files import atomic_write_bytes


def image_table(
    keys: Sequence[str],
    views: np.ndarray,
    crops: np.ndarray,
    flips: np.ndarray,
    embeddings: np.ndarray,
    storage_dtype: str,
) -> pa.Table:
    """Image rows; ``embeddings`` [n, dim] already in the storage dtype (see ``fmt.to_storage``)."""
    dim = embeddings.shape[1]
    crop_values = pa.array(np.ascontiguousarray(crops, dtype=np.float32).reshape(-1), pa.float32())
    return pa.Table.from_arrays(
        [
            pa.array(list(keys), pa.string()),
            pa.array(np.asarray(views, dtype=np.int16), pa.int16()),
            pa.FixedSizeListArray.from_arrays(crop_values, 4),
            pa.array(np.asarray(flips, dtype=bool), pa.bool_()),
            fmt.embedding_array(embeddings, storage_dtype),
        ],
        schema=fmt.image_schema(dim, storage_dtype),
    )


def text_table(
    keys: Sequence[str],
    caption_index: np.ndarray,
    captions: Sequence[str],
    embeddings: np.ndarray,
    storage_dtype: str,
) -> pa.Table:
    """Caption rows; ``embeddings`` [n, dim] already in the storage dtype."""
    dim = embeddings.shape[1]
    return pa.Table.from_arrays(
        [
            pa.array(list(keys), pa.string()),
            pa.array(np.asarray(caption_index, dtype=np.int16), pa.int16()),
            pa.array(list(captions), pa.string()),
            fmt.embedding_array(embeddings, storage_dtype),
        ],
        schema=fmt.text_schema(dim, storage_dtype),
    )


def write_shard(
    root: Path,
    shard: int,
    entries: range,
    cache_id: str,
    images: pa.Table,
    texts: pa.Table,
    rejects: Sequence[dict],
) -> dict:
    """Write one shard atomically and return its commit record (also written to ``parts/``)."""
    record = {"shard": shard, "entries": [entries.start, entries.stop], "cache_id": cache_id}
    for kind, table, path in (
        ("texts", texts, fmt.text_file(root, shard)),
        ("images", images, fmt.image_file(root, shard)),
    ):
        data = fmt.ipc_bytes(table)
        atomic_write_bytes(path, data)
        record[kind] = {
            "file": path.relative_to(root).as_posix(),
            "rows": table.num_rows,
            "bytes": data.size,
            "sha256": fmt.sha256_bytes(data),
        }
    record["rejects"] = [dict(r) for r in rejects]
    atomic_write_bytes(fmt.part_file(root, shard), fmt.canonical_json(record))
    return record


def read_part(root: Path, shard: int) -> dict | None:
    """The commit record of a finished shard, or None when the shard is absent or incomplete
    (or its record names a file outside the cache folder: then the shard is redone)."""
    try:
        record = json.loads(fmt.part_file(root, shard).read_text(encoding="utf-8"))
        for kind in ("images", "texts"):
            if fmt.contained_file(root, record[kind]["file"]).stat().st_size != record[kind]["bytes"]:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return record


def _key_column(path: Path) -> pa.Array:
    """The ``key`` column of a shard file, memory-mapped (only its pages are read)."""
    table = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
    column = table.column("key")
    return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()


def build_index(root: Path, parts: Sequence[dict]) -> pa.Table:
    """The key lookup table over all shards, sorted by key hash (stable).

    Column-wise per shard: the runs of equal keys in its image and caption files give each
    image's rows and its key hash; then everything is sorted at once.
    """
    hashes, image_rows, image_counts, text_rows, text_counts = [], [], [], [], []
    image_offset = text_offset = 0
    for part in parts:
        image_start, image_count, image_keys = fmt.key_runs(_key_column(root / part["images"]["file"]))
        text_start, text_count, text_keys = fmt.key_runs(_key_column(root / part["texts"]["file"]))
        if not text_keys.equals(image_keys):  # every image has its captions, in the same order
            raise ValueError(f"shard {part['shard']}: the image and caption files list different keys")
        hashes.append(fmt.key_hashes(image_keys))
        image_rows.append(image_offset + image_start)
        image_counts.append(image_count)
        text_rows.append(text_offset + text_start)
        text_counts.append(text_count)
        image_offset += part["images"]["rows"]
        text_offset += part["texts"]["rows"]

    def column(pieces: list[np.ndarray], dtype) -> np.ndarray:
        return np.concatenate(pieces).astype(dtype) if pieces else np.zeros(0, dtype)

    key_hash = column(hashes, np.uint64)
    order = np.argsort(key_hash, kind="stable")
    columns = (key_hash, column(image_rows, np.int64), column(image_counts, np.int32),
               column(text_rows, np.int64), column(text_counts, np.int32))
    return pa.Table.from_arrays([pa.array(c[order]) for c in columns], schema=fmt.INDEX_SCHEMA)


def rejects_table(rejects: Sequence[dict]) -> pa.Table:
    return pa.Table.from_pylist([dict(r) for r in rejects], schema=fmt.REJECTS_SCHEMA)


def write_rejects(root: Path, rejects: Sequence[dict]) -> dict:
    """``rejects.parquet`` (key, source, reason), written atomically."""
    sink = pa.BufferOutputStream()
    pq.write_table(rejects_table(rejects), sink)
    data = sink.getvalue()
    atomic_write_bytes(root / fmt.REJECTS, data)
    return {"file": fmt.REJECTS, "rows": len(rejects), "bytes": data.size, "sha256": fmt.sha256_bytes(data)}


def all_rejects(parts: Sequence[dict], index_rejects: Sequence[dict]) -> list[dict]:
    """Rejects found while indexing the dataset, then those of each shard in shard order."""
    merged = [dict(r) for r in index_rejects]
    for part in parts:
        merged.extend(part["rejects"])
    return merged


def finalize(root: Path, header: dict, parts: Sequence[dict], index_rejects: Sequence[dict]) -> dict:
    """Write ``index.arrow``, ``rejects.parquet`` and, last, ``manifest.json``; return the manifest.

    ``header`` carries the cache id, teacher, preprocessing, views, dataset and layout; the
    counts and the per-file rows and checksums are added here from the shard records.
    """
    parts = sorted(parts, key=lambda p: p["shard"])
    index = build_index(root, parts)
    index_data = fmt.ipc_bytes(index)
    atomic_write_bytes(root / fmt.INDEX, index_data)
    rejects = all_rejects(parts, index_rejects)
    manifest = dict(header)
    manifest.update(
        {
            "format": fmt.FORMAT_NAME,
            "format_version": fmt.FORMAT_VERSION,
            "counts": {
                "images": index.num_rows,
                "image_rows": sum(p["images"]["rows"] for p in parts),
                "captions": sum(p["texts"]["rows"] for p in parts),
                "rejects": len(rejects),
            },
            "shards": [
                {"shard": p["shard"], "entries": p["entries"], "images": p["images"], "texts": p["texts"]}
                for p in parts
            ],
            "index": {"file": fmt.INDEX, "rows": index.num_rows, "bytes": index_data.size,
                      "sha256": fmt.sha256_bytes(index_data)},
            "rejects": write_rejects(root, rejects),
        }
    )
    atomic_write_bytes(root / fmt.MANIFEST, fmt.canonical_json(manifest))
    return manifest
