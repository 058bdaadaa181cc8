"""Evaluation metrics: FAISS retrieval, zero-shot accuracy and geometry fidelity.

Pure functions on embeddings (numpy arrays or torch tensors, one row per item); every
function L2-normalises its inputs, so scores are cosine similarities.

Ranking convention (the field's, as clip_benchmark scores retrieval; used by retrieval and
zero-shot alike): a query's rank is ``1 + #{gallery items scoring strictly higher than its
best correct item}``, and "hit at K" means ``rank <= K``. No tolerance favours the correct
item: a wrong item that beats it by one rounding step ranks above it. Both sides of every
comparison come from the same arithmetic (the correct item's score is read from the same
FAISS result list or the same score matrix as the others), so FAISS and the brute-force
count agree. Exact ties (bit-identical scores, e.g. the same caption under two images) go
to the correct item; clip_benchmark's ``topk`` breaks them arbitrarily, so the two can
differ only there.

Memory stays bounded for any gallery size: FAISS searches the top-K in query chunks, and
exact ranks beyond the searched depth are counted against the gallery in query chunks of
at most ``score_budget_bytes`` of scores, never the full similarity matrix.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import faiss
import numpy as np
import torch

from rdkd.errors import UserError

DEFAULT_KS = (1, 5, 10)
_SCORE_BUDGET_BYTES = 256 * 2**20
_BEYOND = np.iinfo(np.int64).max
# A correct item missing from a full top-K list whose score (computed apart from the list)
# is this close to the list's last score may tie it: such queries are scored again with
# the whole gallery in one matrix, where the comparison is exact. A filter, not a tolerance.
_NEAR_CUTOFF = 1e-4
# FAISS's exact CPU search multiplies 4096-query blocks by 1024-row gallery blocks by default;
# 4096-row gallery blocks (64 MiB of scores) cost ~20% fewer CPU seconds (bench/retrieval_faiss.py).
_FLAT_DATABASE_BLOCK = 4096


# Significant digits of every metric rdkd writes (metrics.json, the report's tables): what
# the numbers can mean, far above the last-bit differences of float reductions whose order
# depends on the CPU's BLAS kernels or thread count, so outputs are the same bytes anywhere.
WRITTEN_DIGITS = 6


def as_written(value: float) -> float:
    """``value`` rounded to :data:`WRITTEN_DIGITS` significant digits (NaN and inf kept)."""
    return float(f"{value:.{WRITTEN_DIGITS}g}")


def as_normalized(x: np.ndarray | torch.Tensor) -> np.ndarray:
    """Rows of ``x`` as a C-contiguous float32 array with unit L2 norm (zero rows stay zero)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D array of embeddings, got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, 1e-12), dtype=np.float32)


# --- FAISS index ----------------------------------------------------------------------------


@dataclass
class GalleryIndex:
    """A FAISS inner-product index over a gallery, and whether its search is exact."""

    index: faiss.Index
    exact: bool
    on_gpu: bool
    gpu_resources: object = None  # must outlive a GPU index

    @property
    def size(self) -> int:
        return int(self.index.ntotal)


def build_index(
    gallery: np.ndarray,
    index_factory: str | None = None,
    use_gpu: bool | None = None,
    search_params: str | None = None,
) -> GalleryIndex:
    """Index the (normalised) gallery for inner-product search.

    ``index_factory=None`` gives the exact ``IndexFlatIP``; a FAISS factory string such as
    ``IVF4096,Flat`` or ``HNSW32`` builds an approximate index, trained on the gallery
    itself. ``use_gpu=None`` moves the index to GPU 0 when FAISS sees a GPU (indexes FAISS
    cannot run on the GPU, such as HNSW, stay on the CPU). ``search_params`` is a FAISS
    ParameterSpace string such as ``nprobe=64`` or ``efSearch=128``. Factory strings or
    parameters FAISS rejects raise :class:`UserError`.
    """
    dim = gallery.shape[1]
    if use_gpu is None:
        use_gpu = faiss.get_num_gpus() > 0
    exact = index_factory is None or index_factory.strip() == "Flat"
    try:
        if exact:
            index = faiss.IndexFlatIP(dim)
        else:
            index = faiss.index_factory(dim, index_factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        raise UserError(f"FAISS rejects index factory {index_factory!r}: {_faiss_reason(err)}") from None
    on_gpu, resources = False, None
    if use_gpu:
        try:
            resources = faiss.StandardGpuResources()
            index, on_gpu = faiss.index_cpu_to_gpu(resources, 0, index), True
        except RuntimeError:
            resources = None  # this index type (e.g. HNSW) has no GPU implementation: stay on the CPU
    try:
        if not index.is_trained:
            index.train(gallery)
        index.add(gallery)
        if search_params:
            space = faiss.GpuParameterSpace() if on_gpu else faiss.ParameterSpace()
            space.set_index_parameters(index, search_params)
    except RuntimeError as err:
        raise UserError(f"FAISS cannot build index {index_factory or 'Flat'!r}: {_faiss_reason(err)}") from None
    return GalleryIndex(index=index, exact=exact, on_gpu=on_gpu, gpu_resources=resources)


def check_index_factory(index_factory: str, dim: int) -> None:
    """Raise :class:`UserError` now when FAISS cannot parse ``index_factory`` (before encoding)."""
    if index_factory.strip() == "Flat":
        return
    try:
        faiss.index_factory(dim, index_factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        raise UserError(f"FAISS rejects index factory {index_factory!r}: {_faiss_reason(err)}") from None


def _faiss_reason(err: RuntimeError) -> str:
    """The last line of a FAISS C++ error, without the file and function prefix."""
    text = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
    return text.split(": ", 1)[-1] if " at /" in text else text


@contextlib.contextmanager
def _blas_database_blocks(rows: int) -> Iterator[None]:
    """Let exact CPU search multiply query blocks against ``rows`` gallery rows at a time."""
    previous = faiss.cvar.distance_compute_blas_database_bs
    faiss.cvar.distance_compute_blas_database_bs = rows
    try:
        yield
    finally:
        faiss.cvar.distance_compute_blas_database_bs = previous


def search(
    index: GalleryIndex,
    queries: np.ndarray,
    k: int,
    chunk_size: int = 16384,
    progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` scores and ids per query (``[nq, k]``), searched in query chunks.

    Missing results (a gallery smaller than ``k``, an approximate index returning fewer)
    have id -1 and score -inf.
    """
    k = max(1, min(k, index.size)) if index.size else 1
    scores = np.empty((len(queries), k), dtype=np.float32)
    ids = np.empty((len(queries), k), dtype=np.int64)
    with _blas_database_blocks(_FLAT_DATABASE_BLOCK):
        for start in range(0, len(queries), chunk_size):
            stop = min(start + chunk_size, len(queries))
            scores[start:stop], ids[start:stop] = index.index.search(queries[start:stop], k)
            if progress is not None:
                progress(stop - start)
    scores[ids < 0] = -np.inf
    return scores, ids


# --- retrieval ------------------------------------------------------------------------------


def ranks_from_scores(scores: torch.Tensor, target_scores: torch.Tensor) -> torch.Tensor:
    """Rank (1-based) of each row's ground-truth score among the row's scores (taken from
    ``scores`` itself: the comparison must not mix arithmetic)."""
    return 1 + (scores > target_scores.unsqueeze(1)).sum(dim=1)


# correct(query rows [n], gallery ids [n, m]) -> bool [n, m]: which ids are a query's correct items
Correct = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _ranks_within_depth(top_scores: np.ndarray, top_correct: np.ndarray) -> np.ndarray:
    """Ranks of queries with a correct item in their searched top list (its score is read
    from the list, so both sides of the comparison come from the same arithmetic); others
    _BEYOND."""
    found = top_correct.any(axis=1)
    target = np.where(top_correct, top_scores, -np.inf).max(axis=1)
    greater = (top_scores > target[:, None]).sum(axis=1)
    return np.where(found, 1 + greater, _BEYOND)


def _count_ranks(
    queries: np.ndarray,
    rows: np.ndarray,
    gallery: np.ndarray,
    correct: Correct,
    device: torch.device,
) -> np.ndarray:
    """Exact ranks of the queries ``rows`` against the whole gallery, in bounded query
    chunks: one score matrix per chunk, the correct items' scores read from it."""
    if len(rows) == 0:
        return np.zeros(0, dtype=np.int64)
    gallery_t = torch.from_numpy(gallery).to(device)
    all_ids = np.arange(len(gallery), dtype=np.int64)
    chunk = max(1, _SCORE_BUDGET_BYTES // (4 * max(1, len(gallery))))
    ranks = []
    for start in range(0, len(rows), chunk):
        part = rows[start : start + chunk]
        scores = torch.from_numpy(queries[part]).to(device) @ gallery_t.T
        is_correct = torch.from_numpy(correct(part, np.broadcast_to(all_ids, (len(part), len(all_ids))))).to(device)
        target = scores.masked_fill(~is_correct, -torch.inf).amax(dim=1)
        ranks.append(ranks_from_scores(scores, target).cpu())
    return torch.cat(ranks).numpy().astype(np.int64)


def _direction(
    queries: np.ndarray,
    gallery: np.ndarray,
    index: GalleryIndex,
    target_scores: np.ndarray,
    correct: Correct,
    ks: Sequence[int],
    with_ranks: bool,
    device: torch.device,
    progress: Callable[[int], None] | None,
) -> dict[str, float]:
    """Recall@K (and exact mean/median rank) for one retrieval direction."""
    top_scores, top_ids = search(index, queries, max(ks), progress=progress)
    ranks = top_list_ranks(queries, gallery, top_scores, top_ids, target_scores, correct, with_ranks, device)
    out = {f"r{k}": float(np.mean(ranks <= k)) for k in ks}
    if with_ranks:
        out["mean_rank"] = float(np.mean(ranks))
        out["median_rank"] = float(np.median(ranks))
    return out


def top_list_ranks(
    queries: np.ndarray,
    gallery: np.ndarray,
    top_scores: np.ndarray,
    top_ids: np.ndarray,
    target_scores: np.ndarray,
    correct: Correct,
    exact_beyond: bool,
    device: torch.device,
) -> np.ndarray:
    """Each query's rank from its searched top list; queries whose correct items are not
    listed get their exact rank from the whole gallery when ``exact_beyond``, else only
    those whose correct item may tie the list's last score (the rest: beyond the list,
    ``np.iinfo(np.int64).max``). ``target_scores`` (each query's best correct score,
    computed apart from the list) only picks those queries."""
    rows = np.arange(len(queries))
    ranks = _ranks_within_depth(top_scores, correct(rows, top_ids))
    missing = ranks == _BEYOND
    if not exact_beyond:
        full = np.isfinite(top_scores[:, -1])
        missing &= full & (target_scores >= top_scores[:, -1] - _NEAR_CUTOFF)
    again = np.flatnonzero(missing)
    ranks[again] = _count_ranks(queries, again, gallery, correct, device)
    return ranks


def retrieval_metrics(
    image_embeddings: np.ndarray | torch.Tensor,
    text_embeddings: np.ndarray | torch.Tensor,
    text_image: np.ndarray | Sequence[int],
    ks: Sequence[int] = DEFAULT_KS,
    index_factory: str | None = None,
    use_gpu: bool | None = None,
    search_params: str | None = None,
    with_ranks: bool = True,
    device: str | torch.device = "cpu",
    progress: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Image-to-text and text-to-image Recall@K, mean and median rank.

    ``text_image[t]`` is the image row of caption ``t`` (several captions per image allowed:
    image-to-text is a hit when any of the image's captions ranks within K). Images without a
    caption are left out of image-to-text. Keys: ``i2t_r1``, ..., ``i2t_mean_rank``,
    ``i2t_median_rank``, ``t2i_*`` likewise, and ``approximate`` (1.0 when an index factory
    other than ``Flat`` was used). Ranks are exact and reported only for exact search (for
    an approximate index they would need the exhaustive scan that index exists to avoid).
    """
    images = as_normalized(image_embeddings)
    texts = as_normalized(text_embeddings)
    text_image = np.asarray(text_image, dtype=np.int64)
    if len(text_image) != len(texts):
        raise ValueError("text_image needs one image row per caption")
    if len(images) == 0 or len(texts) == 0:
        raise UserError("retrieval needs at least one image and one caption")
    ks = sorted({int(k) for k in ks})
    device = torch.device(device)

    # Ground-truth score of each caption with its own image; an image's is its best caption's
    # (which images have a caption; which queries to score against the whole gallery).
    pair_scores = np.einsum("ij,ij->i", texts, images[text_image])
    image_target = np.full(len(images), -np.inf, dtype=np.float32)
    np.maximum.at(image_target, text_image, pair_scores)
    with_caption = np.flatnonzero(np.isfinite(image_target))

    text_index = build_index(texts, index_factory, use_gpu, search_params)
    with_ranks = with_ranks and text_index.exact
    i2t = _direction(
        images[with_caption], texts, text_index, image_target[with_caption],
        lambda rows, ids: np.where(ids >= 0, text_image[np.maximum(ids, 0)], -1) == with_caption[rows, None],
        ks, with_ranks, device, progress,
    )
    del text_index
    image_index = build_index(images, index_factory, use_gpu, search_params)
    t2i = _direction(
        texts, images, image_index, pair_scores,
        lambda rows, ids: ids == text_image[rows, None],
        ks, with_ranks, device, progress,
    )
    metrics = {f"i2t_{name}": value for name, value in i2t.items()}
    metrics.update({f"t2i_{name}": value for name, value in t2i.items()})
    metrics["approximate"] = 0.0 if image_index.exact else 1.0
    return metrics


# --- zero-shot classification ---------------------------------------------------------------


def zero_shot_metrics(
    image_embeddings: np.ndarray | torch.Tensor,
    classifier: np.ndarray | torch.Tensor,
    labels: np.ndarray | Sequence[int],
    ks: Sequence[int] = (1, 5),
) -> tuple[dict[str, float], np.ndarray]:
    """Top-K accuracy of a zero-shot classifier, and per-class top-1 accuracy.

    ``classifier`` holds one class embedding per row (``[num_classes, dim]``; transpose the
    ``[dim, num_classes]`` weights of ``open_clip.build_zero_shot_classifier``). K is capped at
    the number of classes; the key keeps the requested K (``top5`` with 3 classes is top-3).
    Per-class accuracy is NaN for classes without images; ``mean_per_class_top1`` averages
    the others.
    """
    images = torch.from_numpy(as_normalized(image_embeddings))
    classes = torch.from_numpy(as_normalized(classifier))
    labels_t = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    num_classes = len(classes)
    if len(images) == 0:
        raise UserError("zero-shot evaluation needs at least one image")
    if labels_t.min() < 0 or labels_t.max() >= num_classes:
        raise UserError(f"zero-shot labels must lie in [0, {num_classes}) for {num_classes} classes")
    logits = images @ classes.T
    ranks = ranks_from_scores(logits, logits.gather(1, labels_t[:, None]).squeeze(1))
    metrics = {f"top{k}": float((ranks <= min(k, num_classes)).double().mean()) for k in ks}
    hits = (ranks == 1).double()
    per_class_total = torch.bincount(labels_t, minlength=num_classes).double()
    per_class_hits = torch.bincount(labels_t, weights=hits, minlength=num_classes)
    per_class = (per_class_hits / per_class_total).numpy()  # NaN where a class has no images
    metrics["mean_per_class_top1"] = float(np.nanmean(per_class))
    return metrics, per_class


# --- geometry fidelity ----------------------------------------------------------------------


def knn_overlap(
    student_queries: np.ndarray | torch.Tensor,
    student_gallery: np.ndarray | torch.Tensor,
    teacher_queries: np.ndarray | torch.Tensor,
    teacher_gallery: np.ndarray | torch.Tensor,
    k: int = 10,
    exclude_self: bool = False,
    use_gpu: bool | None = None,
) -> float:
    """Mean fraction of each query's k nearest gallery items shared by student and teacher.

    Each side is searched in its own space (dimensions may differ). With ``exclude_self``
    (queries and gallery are the same items) a query's own row is not its neighbour.
    """
    neighbours = []
    for queries, gallery in ((student_queries, student_gallery), (teacher_queries, teacher_gallery)):
        q, g = as_normalized(queries), as_normalized(gallery)
        depth = min(k + int(exclude_self), len(g))
        _, ids = search(build_index(g, use_gpu=use_gpu), q, depth)
        if exclude_self:
            ids = _drop_self(ids, k)
        neighbours.append(ids)
    student_ids, teacher_ids = neighbours
    width = student_ids.shape[1]
    if width == 0:
        raise UserError("kNN overlap needs at least two items")
    shared = (student_ids[:, :, None] == teacher_ids[:, None, :]) & (student_ids[:, :, None] >= 0)
    return float(shared.any(axis=2).sum(axis=1).mean() / width)


def _drop_self(ids: np.ndarray, k: int) -> np.ndarray:
    """Remove each row's own id from its neighbour list (or its last entry when absent)."""
    rows = np.arange(len(ids))[:, None]
    is_self = ids == rows
    drop = np.where(is_self.any(axis=1), is_self.argmax(axis=1), ids.shape[1] - 1)
    keep = np.ones_like(ids, dtype=bool)
    keep[np.arange(len(ids)), drop] = False
    return ids[keep].reshape(len(ids), ids.shape[1] - 1)[:, :k]


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks of ``values`` with ties given the mean of their positions (as Spearman needs)."""
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(values)]
    group_rank = (starts + ends - 1) / 2.0
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.repeat(group_rank, ends - starts)
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two equally long 1-D arrays (average ranks for ties)."""
    ra, rb = _average_ranks(np.asarray(a, dtype=np.float64)), _average_ranks(np.asarray(b, dtype=np.float64))
    ra -= ra.mean()
    rb -= rb.mean()
    denom = np.sqrt((ra @ ra) * (rb @ rb))
    return float(ra @ rb / denom) if denom > 0 else float("nan")


def similarity_spearman(
    student_a: np.ndarray | torch.Tensor,
    student_b: np.ndarray | torch.Tensor,
    teacher_a: np.ndarray | torch.Tensor,
    teacher_b: np.ndarray | torch.Tensor,
    same_items: bool,
    sample_size: int = 2000,
    seed: int = 0,
) -> float:
    """Spearman correlation of student and teacher pairwise similarities on a seeded sample.

    ``a`` and ``b`` are row-aligned sets (images and images, or images and their captions);
    the sample takes the same ``sample_size`` row indices on both sides and compares the
    off-diagonal pairs: ``i < j`` when ``same_items``, otherwise all ``i != j`` (the
    diagonal of a cross-modal set is its matched pairs).
    """
    n = len(student_a)
    rows = np.random.default_rng(seed).permutation(n)[: min(n, sample_size)]
    if len(rows) < 2 + int(not same_items):
        raise UserError("a similarity correlation needs at least three items")
    pick = np.triu(np.ones((len(rows), len(rows)), dtype=bool), 1) if same_items else ~np.eye(len(rows), dtype=bool)
    sims = []
    for a, b in ((student_a, student_b), (teacher_a, teacher_b)):
        a, b = as_normalized(a)[rows], as_normalized(b)[rows]
        sims.append((a.astype(np.float64) @ b.T.astype(np.float64))[pick])
    return spearman(*sims)


def linear_cka(x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor, chunk_size: int = 65536) -> float:
    """Linear CKA between row-aligned representations (dimensions may differ).

    ``||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` on column-centred, L2-normalised
    rows; the Gram matrices are feature-by-feature, accumulated in float64 over row chunks,
    so memory does not grow with the number of rows.
    """
    x, y = as_normalized(x), as_normalized(y)
    if len(x) != len(y) or len(x) < 2:
        raise ValueError("linear CKA needs two row-aligned sets of at least two rows")
    x_mean, y_mean = x.mean(axis=0, dtype=np.float64), y.mean(axis=0, dtype=np.float64)
    xx = np.zeros((x.shape[1], x.shape[1]))
    yy = np.zeros((y.shape[1], y.shape[1]))
    yx = np.zeros((y.shape[1], x.shape[1]))
    for start in range(0, len(x), chunk_size):
        xc = x[start : start + chunk_size].astype(np.float64) - x_mean
        yc = y[start : start + chunk_size].astype(np.float64) - y_mean
        xx += xc.T @ xc
        yy += yc.T @ yc
        yx += yc.T @ xc
    denom = np.linalg.norm(xx) * np.linalg.norm(yy)
    return float(np.linalg.norm(yx) ** 2 / denom) if denom > 0 else float("nan")


def fidelity_metrics(
    student_images: np.ndarray | torch.Tensor,
    student_texts: np.ndarray | torch.Tensor,
    teacher_images: np.ndarray | torch.Tensor,
    teacher_texts: np.ndarray | torch.Tensor,
    text_image: np.ndarray | Sequence[int],
    k: int = 10,
    sample_size: int = 2000,
    seed: int = 0,
    use_gpu: bool | None = None,
) -> dict[str, float]:
    """How well the student keeps the teacher's geometry on the same (row-aligned) items.

    Keys: ``knn{k}_img``, ``knn{k}_txt``, ``knn{k}_img_txt`` (neighbour-set overlap),
    ``spearman_img``, ``spearman_txt``, ``spearman_img_txt`` (pairwise similarities of a
    seeded sample; image-text pairs each image with its first caption), ``cka_img``,
    ``cka_txt`` (linear CKA). All are 1.0 for a student equal to the teacher.
    """
    text_image = np.asarray(text_image, dtype=np.int64)
    captioned, pairs = np.unique(text_image, return_index=True)  # each image's first caption
    si, st, ti, tt = (as_normalized(v) for v in (student_images, student_texts, teacher_images, teacher_texts))
    return {
        f"knn{k}_img": knn_overlap(si, si, ti, ti, k, exclude_self=True, use_gpu=use_gpu),
        f"knn{k}_txt": knn_overlap(st, st, tt, tt, k, exclude_self=True, use_gpu=use_gpu),
        f"knn{k}_img_txt": knn_overlap(si, st, ti, tt, k, use_gpu=use_gpu),
        "spearman_img": similarity_spearman(si, si, ti, ti, True, sample_size, seed),
        "spearman_txt": similarity_spearman(st, st, tt, tt, True, sample_size, seed),
        "spearman_img_txt": similarity_spearman(
            si[captioned], st[pairs], ti[captioned], tt[pairs], False, sample_size, seed
        ),
        "cka_img": linear_cka(si, ti),
        "cka_txt": linear_cka(st, tt),
    }
