"""P6: Recall@K at 100k x 100k, rdkd's FAISS retrieval against a chunked torch brute force.

Both sides compute image-to-text and text-to-image Recall@1/5/10 over the same L2-normalised
float32 embeddings (1:1 image/caption pairs; each caption is its image plus Gaussian noise,
so recalls sit in a realistic middle range) with the same hit rule as ``rdkd.metrics``
(hit at K when fewer than K items score strictly higher than the pair).

- FAISS side: what ``rdkd evaluate`` runs for exact search with ranks off
  (:func:`rdkd.metrics.build_index`, exact ``IndexFlatIP``; :func:`rdkd.metrics.search` for
  the top 10; the recall from the listed scores);
- torch side: each query chunk multiplied against the whole gallery, ``topk``, the pair's
  score read from the same product.

The queries are cut into slices and the two sides alternate slice by slice, so that a busy
spell of a shared machine hits both alike. Reported: wall and process CPU time per side and
their ratios; the target is time(FAISS) / time(torch) <= 1.0 with equal recalls.

    python bench/retrieval_faiss.py                 # 100k x 100k, dim 512 (minutes on 2 cores)
    python bench/retrieval_faiss.py --n 20000       # a quick run
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np


def make_pairs(n: int, dim: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from rdkd.metrics import as_normalized

    rng = np.random.default_rng(seed)
    images = as_normalized(rng.standard_normal((n, dim), dtype=np.float32))
    texts = as_normalized(images + noise * rng.standard_normal((n, dim), dtype=np.float32) / np.sqrt(dim))
    return images, texts


def faiss_hits(index, gallery: np.ndarray, queries: np.ndarray, first: int, ks: tuple[int, ...]) -> np.ndarray:
    """Hits per K of queries ``first..`` (query i's pair is gallery row i), as rdkd.metrics counts."""
    import torch

    from rdkd import metrics

    top_scores, top_ids = metrics.search(index, queries, max(ks))
    pair = np.arange(first, first + len(queries))
    pair_scores = np.einsum("ij,ij->i", queries, gallery[first : first + len(queries)])
    ranks = metrics.top_list_ranks(queries, gallery, top_scores, top_ids, pair_scores,
                                   lambda rows, ids: ids == pair[rows, None], False, torch.device("cpu"))
    return np.array([(ranks <= k).sum() for k in ks])


def torch_hits(queries, gallery, first: int, ks: tuple[int, ...], chunk: int, device: str) -> np.ndarray:
    """Brute force: query chunks x full gallery, ``topk``, the pair's score from the same product."""
    import torch

    hits = torch.zeros(len(ks), dtype=torch.int64, device=device)
    for start in range(0, len(queries), chunk):
        q = queries[start : start + chunk]
        scores = q @ gallery.T
        top = scores.topk(max(ks), dim=1).values
        rows = torch.arange(len(q), device=device)
        pair = scores[rows, first + start + rows]
        for j, k in enumerate(ks):
            hits[j] += (pair >= top[:, k - 1]).sum()
    if device == "cuda":
        torch.cuda.synchronize()
    return hits.cpu().numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000, help="images = captions (gallery and queries)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--noise", type=float, default=5.0, help="norm of the caption noise (image norm 1)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--chunk", type=int, default=1024, help="torch query chunk (scores: chunk x n floats)")
    parser.add_argument("--slices", type=int, default=10, help="alternate the two sides this many times per direction")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--database-block", type=int, default=None,
                        help="gallery rows per FAISS BLAS block (default rdkd's 4096; FAISS's own is 1024)")
    args = parser.parse_args()

    import faiss
    import torch

    from rdkd import metrics

    if args.database_block:
        metrics._FLAT_DATABASE_BLOCK = args.database_block
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    ks = (1, 5, 10)
    images, texts = make_pairs(args.n, args.dim, args.noise, args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"P6 retrieval: {args.n} x {args.n}, dim {args.dim}, float32, {args.threads} threads, "
          f"{platform.machine()}, faiss {faiss.__version__} (GPUs: {faiss.get_num_gpus()}), "
          f"torch {torch.__version__} on {device}, FAISS gallery block {metrics._FLAT_DATABASE_BLOCK} rows")

    wall = {"faiss": 0.0, "torch": 0.0}
    cpu = {"faiss": 0.0, "torch": 0.0}
    recalls: dict[str, dict[str, float]] = {"faiss": {}, "torch": {}}

    def timed(side: str, fn):
        w0, c0 = time.perf_counter(), time.process_time()
        result = fn()
        wall[side] += time.perf_counter() - w0
        cpu[side] += time.process_time() - c0
        return result

    slice_size = -(-args.n // args.slices)
    for name, queries, gallery in (("i2t", images, texts), ("t2i", texts, images)):
        index = timed("faiss", lambda: metrics.build_index(gallery, use_gpu=device == "cuda"))
        gallery_t = timed("torch", lambda: torch.from_numpy(gallery).to(device))
        hits = {"faiss": np.zeros(len(ks), np.int64), "torch": np.zeros(len(ks), np.int64)}
        for first in range(0, args.n, slice_size):
            q = queries[first : first + slice_size]
            hits["faiss"] += timed("faiss", lambda: faiss_hits(index, gallery, q, first, ks))
            q_t = torch.from_numpy(q).to(device)
            hits["torch"] += timed("torch", lambda: torch_hits(q_t, gallery_t, first, ks, args.chunk, device))
        for side in hits:
            recalls[side].update({f"{name}_r{k}": hits[side][j] / args.n for j, k in enumerate(ks)})

    for key in recalls["torch"]:
        print(f"  {key:7s} faiss {recalls['faiss'][key]:.5f}  torch {recalls['torch'][key]:.5f}")
    differ = sum(abs(recalls["faiss"][k] - recalls["torch"][k]) * args.n for k in recalls["torch"])
    print(f"wall: faiss {wall['faiss']:.2f} s, torch brute force {wall['torch']:.2f} s, "
          f"ratio faiss/torch {wall['faiss'] / wall['torch']:.3f} (target <= 1.0)")
    print(f"process CPU time: faiss {cpu['faiss']:.2f} s, torch {cpu['torch']:.2f} s, "
          f"ratio {cpu['faiss'] / cpu['torch']:.3f}")
    # Scores computed by two BLAS libraries differ in the last bits; a pair that sits exactly at
    # the tie tolerance of the K-th score can land on either side.
    print(f"recalls {'equal' if differ == 0 else f'differ by {differ:.0f} query-hits in total'}")


if __name__ == "__main__":
    main()
