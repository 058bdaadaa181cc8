"""P6: Recall@K at 100k x 100k, rdkd's FAISS retrieval against a chunked torch brute force.

Both sides compute image-to-text and text-to-image Recall@1/5/10 over the same L2-normalised
float32 embeddings (1:1 image/caption pairs; each caption is its image plus Gaussian noise,
so recalls sit in a realistic middle range). The FAISS side is what ``rdkd evaluate`` runs
(:func:`rdkd.metrics.retrieval_metrics`, exact ``IndexFlatIP``, ranks off: Recall@K only);
the torch side multiplies query chunks against the whole gallery and takes ``topk``. The
recalls must agree; the target is time(FAISS) / time(torch) <= 1.0, measured in one run with
the same thread count.

    python bench/retrieval_faiss.py                 # 100k x 100k, dim 512 (several minutes on 2 cores)
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


def torch_recalls(images: np.ndarray, texts: np.ndarray, ks: tuple[int, ...], chunk: int) -> dict[str, float]:
    """Brute force: query chunks x full gallery in torch, top-K ids, hit when the pair is in them."""
    import torch

    out = {}
    for name, queries, gallery in (("i2t", images, texts), ("t2i", texts, images)):
        q_all, g = torch.from_numpy(queries), torch.from_numpy(gallery)
        hits = torch.zeros(len(ks))
        for start in range(0, len(q_all), chunk):
            q = q_all[start : start + chunk]
            top = (q @ g.T).topk(max(ks), dim=1).indices
            target = torch.arange(start, start + len(q))[:, None]
            for j, k in enumerate(ks):
                hits[j] += (top[:, :k] == target).any(dim=1).sum()
        out.update({f"{name}_r{k}": float(hits[j]) / len(q_all) for j, k in enumerate(ks)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000, help="images = captions (gallery and queries)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--noise", type=float, default=5.0, help="caption noise (std x sqrt(dim))")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--chunk", type=int, default=1024, help="torch query chunk (scores: chunk x n floats)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per side (best is kept)")
    args = parser.parse_args()

    import faiss
    import torch

    from rdkd.metrics import retrieval_metrics

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    ks = (1, 5, 10)
    images, texts = make_pairs(args.n, args.dim, args.noise, args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"P6 retrieval: {args.n} x {args.n}, dim {args.dim}, float32, {args.threads} threads, "
          f"{platform.processor() or platform.machine()}, faiss {faiss.__version__} "
          f"(GPUs: {faiss.get_num_gpus()}), torch {torch.__version__} on {device}")

    brute_force = torch_recalls_cuda if device == "cuda" else torch_recalls
    wall = {"faiss": [], "torch": []}
    cpu = {"faiss": [], "torch": []}
    for _ in range(args.repeats):  # alternate the sides so that a busy spell hits both
        for side in ("faiss", "torch"):
            w0, c0 = time.perf_counter(), time.process_time()
            if side == "faiss":
                ours = retrieval_metrics(images, texts, np.arange(args.n), ks=ks, with_ranks=False, device=device)
            else:
                reference = brute_force(images, texts, ks, args.chunk)
            wall[side].append(time.perf_counter() - w0)
            cpu[side].append(time.process_time() - c0)

    for key in reference:
        print(f"  {key:7s} faiss {ours[key]:.5f}  torch {reference[key]:.5f}")
    same = all(abs(ours[k] - reference[k]) <= 1.5 / args.n for k in reference)  # one query of slack for a float near-tie
    w_f, w_t, c_f, c_t = min(wall["faiss"]), min(wall["torch"]), min(cpu["faiss"]), min(cpu["torch"])
    print(f"wall (best of {args.repeats}): faiss {w_f:.2f} s, torch brute force {w_t:.2f} s, "
          f"ratio faiss/torch {w_f / w_t:.3f} (target <= 1.0)")
    print(f"process CPU time: faiss {c_f:.2f} s, torch {c_t:.2f} s, ratio {c_f / c_t:.3f} "
          f"(steadier than wall time on a shared machine)")
    print(f"recalls {'equal' if same else 'DIFFER'}")
    if not same:
        raise SystemExit(1)


def torch_recalls_cuda(images: np.ndarray, texts: np.ndarray, ks: tuple[int, ...], chunk: int) -> dict[str, float]:
    """The same brute force on the GPU (tensors moved once, synchronised before timing ends)."""
    import torch

    out = {}
    for name, queries, gallery in (("i2t", images, texts), ("t2i", texts, images)):
        q_all, g = torch.from_numpy(queries).cuda(), torch.from_numpy(gallery).cuda()
        hits = torch.zeros(len(ks), device="cuda")
        for start in range(0, len(q_all), chunk * 8):
            q = q_all[start : start + chunk * 8]
            top = (q @ g.T).topk(max(ks), dim=1).indices
            target = torch.arange(start, start + len(q), device="cuda")[:, None]
            for j, k in enumerate(ks):
                hits[j] += (top[:, :k] == target).any(dim=1).sum()
        out.update({f"{name}_r{k}": float(hits[j]) / len(q_all) for j, k in enumerate(ks)})
    torch.cuda.synchronize()
    return out


if __name__ == "__main__":
    main()
