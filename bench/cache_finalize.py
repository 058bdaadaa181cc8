"""extract-teacher's finalize at scale: rank 0 writes ``index.arrow``, ``rejects.parquet`` and
the manifest over all shards. Target (issue #11): <= 10 s at 1M images.

Writes ``--images`` images (default 1,000,000) as cache shards of ``--per-shard`` images
(default 10,000, img2dataset's shard size) with ``--views`` rows each and one caption each,
embedding dim 8 (float16: the embeddings do not enter the index, only the key columns do),
keys as img2dataset makes them (``SSSSSIIII``), then times ``writer.finalize`` over the
shard records, as rank 0 does at the end of ``rdkd extract-teacher``, and checks the index
it wrote with a few lookups. Figures are wall-clock seconds of this process.

    python bench/cache_finalize.py                    # 1M images, ~1-2 min to write the shards
    python bench/cache_finalize.py --images 100000    # quicker
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from rdkd.cache import TeacherCache
from rdkd.cache import format as fmt
from rdkd.cache import writer


def write_shards(root: Path, images: int, per_shard: int, views: int, dim: int = 8) -> list[dict]:
    """Shard records of a synthetic cache (rows as extract-teacher lays them out)."""
    rng = np.random.default_rng(0)
    parts = []
    for shard, start in enumerate(range(0, images, per_shard)):
        n = min(per_shard, images - start)
        keys = [f"{shard:05d}{i:04d}" for i in range(n)]
        emb = fmt.to_storage(rng.normal(size=(n * views, dim)).astype(np.float32), "float16")
        image_rows = writer.image_table([k for k in keys for _ in range(views)], np.tile(np.arange(views), n),
                                        np.zeros((n * views, 4)), np.zeros(n * views, bool), emb, "float16")
        texts = writer.text_table(keys, np.zeros(n), [f"caption of {k}" for k in keys], emb[::views], "float16")
        parts.append(writer.write_shard(root, shard, range(start, start + n), "bench", image_rows, texts, []))
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1_000_000)
    parser.add_argument("--per-shard", type=int, default=10_000)
    parser.add_argument("--views", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rdkd-bench-finalize-") as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        parts = write_shards(root, args.images, args.per_shard, args.views)
        written = time.perf_counter() - start
        header = {"cache_id": "bench", "dim": 8, "storage_dtype": "float16", "views": {"count": args.views},
                  "dataset": {"fingerprint": "bench"}}
        start = time.perf_counter()
        index = writer.build_index(root, parts)
        index_s = time.perf_counter() - start
        start = time.perf_counter()
        manifest = writer.finalize(root, header, parts, [])
        finalize_s = time.perf_counter() - start
        cache = TeacherCache.open(root)
        probe = [f"{s:05d}{i:04d}" for s, i in ((0, 0), (len(parts) - 1, 0), (len(parts) // 2, 17))]
        assert all(cache.find(k) is not None for k in probe) and cache.find("absent") is None
        assert manifest["counts"]["images"] == index.num_rows == args.images
    print(f"{args.images} images in {len(parts)} shards x {args.views} views written in {written:.1f} s")
    print(f"build_index: {index_s:.2f} s ({index_s / args.images * 1e6:.2f} us an image)")
    print(f"finalize (index + rejects + manifest, atomic writes): {finalize_s:.2f} s "
          f"({finalize_s / args.images * 1e6:.2f} us an image; target <= 10 s at 1M)")


if __name__ == "__main__":
    main()
