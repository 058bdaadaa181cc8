"""Known-answer and reference tests for rdkd.metrics (retrieval, zero-shot, fidelity)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rdkd import metrics
from rdkd.errors import UserError


def unit(*rows: list[float]) -> np.ndarray:
    return metrics.as_normalized(np.array(rows, dtype=np.float32))


def brute_force_ranks(queries: np.ndarray, gallery: np.ndarray, correct: np.ndarray) -> np.ndarray:
    """Reference: the full similarity matrix in torch, rank of the best correct item."""
    scores = torch.from_numpy(queries) @ torch.from_numpy(gallery).T
    target = torch.where(torch.from_numpy(correct), scores, torch.tensor(-np.inf)).amax(dim=1)
    return (1 + (scores > target[:, None]).sum(dim=1)).numpy()


def brute_force_retrieval(images, texts, text_image, ks):
    images, texts = metrics.as_normalized(images), metrics.as_normalized(texts)
    i2t_correct = text_image[None, :] == np.arange(len(images))[:, None]
    t2i_correct = np.arange(len(images))[None, :] == text_image[:, None]
    out = {}
    for name, ranks in (
        ("i2t", brute_force_ranks(images, texts, i2t_correct)),
        ("t2i", brute_force_ranks(texts, images, t2i_correct)),
    ):
        out.update({f"{name}_r{k}": float(np.mean(ranks <= k)) for k in ks})
        out[f"{name}_mean_rank"] = float(np.mean(ranks))
        out[f"{name}_median_rank"] = float(np.median(ranks))
    return out


def test_retrieval_known_answer_multi_caption():
    # Three images on the axes; captions: image 0 has two (one points away, one close),
    # image 1 has one pointing at image 2, image 2 has one exact.
    images = unit([1, 0, 0], [0, 1, 0], [0, 0, 1])
    texts = unit([-1, 0.1, 0], [1, 0.1, 0], [0, 0.2, 1], [0, 0, 1])
    text_image = np.array([0, 0, 1, 2])
    m = metrics.retrieval_metrics(images, texts, text_image, ks=(1, 2, 5))
    # i2t: image 0 -> caption 1 first (hit@1). image 1 -> scores [0.0995, 0.0995, 0.196, 0]:
    # its caption 2 is best (rank 1). image 2 -> caption 3 (1.0) rank 1.
    assert m["i2t_r1"] == 1.0
    # t2i: caption 0 ([-1, .1, 0]) prefers image 1 over image 0: rank 3 (image 2 scores 0,
    # image 0 scores -0.995). caption 1 -> image 0 rank 1. caption 2 -> image 2 first, so
    # its image 1 has rank 2. caption 3 -> image 2 rank 1.
    assert m["t2i_r1"] == pytest.approx(2 / 4)
    assert m["t2i_r2"] == pytest.approx(3 / 4)
    assert m["t2i_r5"] == 1.0
    assert m["t2i_mean_rank"] == pytest.approx((3 + 1 + 2 + 1) / 4)
    assert m["t2i_median_rank"] == pytest.approx(1.5)
    assert m["approximate"] == 0.0


def test_retrieval_ties_resolve_for_the_ground_truth():
    # Two images with bit-identical captions: each image ties its own caption with the
    # other's, so both count as rank 1 in both directions.
    images = unit([1, 0], [0, 1])
    texts = unit([1, 1], [1, 1])
    m = metrics.retrieval_metrics(images, texts, np.array([0, 1]), ks=(1,))
    assert m["i2t_r1"] == 1.0 and m["t2i_r1"] == 1.0
    assert m["i2t_mean_rank"] == 1.0 and m["t2i_mean_rank"] == 1.0


@pytest.mark.parametrize("with_ranks", [True, False])
def test_retrieval_a_wrong_item_ahead_by_a_rounding_step_ranks_first(with_ranks):
    """The field's rule: no tolerance in favour of the correct item. Image 0's own caption
    scores 7e-7 (a few float32 steps) below another image's caption, so it ranks second; the
    other direction is decided by far larger margins."""
    angle = np.pi / 3
    images = np.zeros((10, 3), dtype=np.float32)
    images[:, 2] = np.arange(10) / 10.0  # other images, far from both captions
    images[0] = [1, 0, 0]
    images[1] = [np.cos(angle - 4e-7), np.sin(angle - 4e-7), 0]
    texts = unit([np.cos(angle), np.sin(angle), 0], [np.cos(angle - 8e-7), np.sin(angle - 8e-7), 0])
    m = metrics.retrieval_metrics(images, texts, np.array([0, 1]), ks=(1, 2), with_ranks=with_ranks)
    # i2t: image 0 scores caption 1 (cos(angle - 8e-7)) above its own caption (cos(angle))
    assert m["i2t_r1"] == 0.5 and m["i2t_r2"] == 1.0
    # t2i: caption 0 scores image 1 (cos 4e-7 apart from it) far above image 0
    assert m["t2i_r1"] == 0.5
    if with_ranks:
        assert m["i2t_mean_rank"] == 1.5


class _Rows(torch.nn.Module):
    """A "model" for clip_benchmark that encodes an image or caption number as its row."""

    def __init__(self, images: np.ndarray, texts: np.ndarray):
        super().__init__()
        self.images, self.texts = torch.from_numpy(images), torch.from_numpy(texts)

    def encode_image(self, numbers: torch.Tensor) -> torch.Tensor:
        return self.images[numbers]

    def encode_text(self, numbers: torch.Tensor) -> torch.Tensor:
        return self.texts[numbers]


def test_retrieval_equals_clip_benchmark_on_the_same_embeddings_with_near_ties():
    """clip_benchmark (the field's evaluator) on the very embeddings rdkd scores: 60 images,
    2 captions each, and for 20 captions an impostor image planted a few float32 steps
    (~2e-7) closer to the caption than its own image, so that a tolerance in favour of the
    correct item would change Recall@1. Equal hits at 1, 5 and 10 in both directions."""
    zeroshot_retrieval = pytest.importorskip("clip_benchmark.metrics.zeroshot_retrieval")
    rng = np.random.default_rng(0)
    n, dim = 60, 8
    images = metrics.as_normalized(rng.standard_normal((n, dim)).astype(np.float32))
    text_image = np.repeat(np.arange(n), 2)
    texts = metrics.as_normalized(images[text_image] + 0.8 * rng.standard_normal((2 * n, dim)).astype(np.float32))
    for t in range(0, 40, 2):  # caption t's impostor: the image after its own, moved next to it
        own, impostor = images[text_image[t]].astype(np.float64), text_image[t] + 20
        toward = texts[t] - (texts[t] @ own) * own
        images[impostor] = (own + 3e-7 * toward / np.linalg.norm(toward)).astype(np.float32)
    images = metrics.as_normalized(images)
    ours = metrics.retrieval_metrics(images, texts, text_image, ks=(1, 5, 10), with_ranks=False)

    loader = [(torch.arange(start, start + 10), [[2 * i, 2 * i + 1] for i in range(start, start + 10)])
              for start in range(0, n, 10)]
    theirs = zeroshot_retrieval.evaluate(_Rows(images, texts), loader, torch.tensor, "cpu", amp=False,
                                         recall_k_list=[1, 5, 10])
    for k in (1, 5, 10):  # hits counted: clip_benchmark averages in float32; its "image retrieval" is t2i
        assert round(ours[f"t2i_r{k}"] * 2 * n) == round(theirs[f"image_retrieval_recall@{k}"] * 2 * n), k
        assert round(ours[f"i2t_r{k}"] * n) == round(theirs[f"text_retrieval_recall@{k}"] * n), k
    scores = texts[:40:2] @ images.T  # the planted impostors do win (the test sees the tie rule)
    assert (scores[np.arange(20), text_image[:40:2] + 20] > scores[np.arange(20), text_image[:40:2]]).sum() >= 10


def test_retrieval_gallery_smaller_than_k():
    images = unit([1, 0], [0, 1])
    texts = unit([0, 1], [1, 0])  # every caption points at the wrong image
    m = metrics.retrieval_metrics(images, texts, np.array([0, 1]), ks=(1, 5, 10))
    assert m["i2t_r1"] == 0.0 and m["i2t_r5"] == 1.0 and m["i2t_r10"] == 1.0
    assert m["t2i_r1"] == 0.0 and m["t2i_r5"] == 1.0
    assert m["i2t_mean_rank"] == 2.0 and m["t2i_median_rank"] == 2.0


@pytest.mark.parametrize("captions_per_image", [1, 3])
def test_retrieval_faiss_equals_brute_force(captions_per_image):
    rng = np.random.default_rng(captions_per_image)
    n_images, dim = 300, 16
    images = rng.standard_normal((n_images, dim)).astype(np.float32)
    text_image = np.repeat(np.arange(n_images), captions_per_image)
    # Captions near their image so that ranks spread from 1 to deep in the gallery.
    texts = images[text_image] + 1.5 * rng.standard_normal((len(text_image), dim)).astype(np.float32)
    ks = (1, 5, 10, 50)
    got = metrics.retrieval_metrics(images, texts, text_image, ks=ks)
    want = brute_force_retrieval(images, texts, text_image, ks)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key
    assert 0.0 < got["t2i_r1"] < got["t2i_r10"] < 1.0  # a test that exercises every branch


def test_retrieval_in_small_score_chunks_equals_one_chunk(monkeypatch):
    # The exact-rank pass holds at most budget/4 scores at once: force 7-query chunks.
    rng = np.random.default_rng(5)
    images = rng.standard_normal((120, 8)).astype(np.float32)
    texts = images + 2.0 * rng.standard_normal((120, 8)).astype(np.float32)
    whole = metrics.retrieval_metrics(images, texts, np.arange(120))
    monkeypatch.setattr(metrics, "_SCORE_BUDGET_BYTES", 4 * 120 * 7)
    assert metrics.retrieval_metrics(images, texts, np.arange(120)) == whole
    assert whole["i2t_mean_rank"] > 10  # most ranks come from the counting pass


def test_retrieval_approximate_index_is_marked_and_has_no_ranks():
    rng = np.random.default_rng(0)
    images = rng.standard_normal((200, 8)).astype(np.float32)
    texts = images + 0.1 * rng.standard_normal((200, 8)).astype(np.float32)
    m = metrics.retrieval_metrics(images, texts, np.arange(200), index_factory="HNSW16")
    assert m["approximate"] == 1.0
    assert "i2t_mean_rank" not in m and "t2i_median_rank" not in m
    assert m["i2t_r10"] > 0.9  # HNSW at this size finds almost every true neighbour


def test_bad_index_factory_is_a_user_error():
    with pytest.raises(UserError, match="FAISS rejects index factory 'Bogus42'"):
        metrics.build_index(unit([1, 0], [0, 1]), index_factory="Bogus42")
    with pytest.raises(UserError, match="cannot build"):  # more clusters than points
        metrics.build_index(unit([1, 0], [0, 1]), index_factory="IVF64,Flat")


def test_zero_shot_known_answer_and_k_capped():
    classes = unit([1, 0, 0], [0, 1, 0], [0, 0, 1])
    images = unit([1, 0.2, 0.1], [0.9, 1, 0], [0, 0.5, 1], [1, 0, 0.3])
    labels = np.array([0, 1, 1, 2])
    m, per_class = metrics.zero_shot_metrics(images, classes, labels, ks=(1, 2, 5))
    # predictions: 0, 1, 2, 0 -> top1 2/4; the misses rank second -> top2 1.0
    assert m["top1"] == pytest.approx(0.5)
    assert m["top2"] == 1.0
    assert m["top5"] == 1.0  # capped at 3 classes
    np.testing.assert_allclose(per_class, [1.0, 0.5, 0.0])
    assert m["mean_per_class_top1"] == pytest.approx(0.5)


def test_zero_shot_class_without_images_is_nan_and_skipped():
    classes = unit([1, 0], [0, 1], [1, 1])
    m, per_class = metrics.zero_shot_metrics(unit([1, 0.1]), classes, [0])
    assert np.isnan(per_class[1]) and m["mean_per_class_top1"] == 1.0 == m["top1"]


def _noisy(x: np.ndarray, level: float, seed: int) -> np.ndarray:
    return x + level * np.random.default_rng(seed).standard_normal(x.shape).astype(np.float32)


@pytest.fixture(scope="module")
def teacher_set():
    rng = np.random.default_rng(7)
    # Clustered data, like real embeddings: neighbour structure worth keeping.
    centres = rng.standard_normal((20, 32)).astype(np.float32)
    images = centres[rng.integers(0, 20, 300)] + 0.4 * rng.standard_normal((300, 32)).astype(np.float32)
    text_image = np.repeat(np.arange(300), 2)
    texts = images[text_image] + 0.3 * rng.standard_normal((600, 32)).astype(np.float32)
    return images, texts, text_image


def test_fidelity_is_one_for_the_teacher_itself(teacher_set):
    images, texts, text_image = teacher_set
    m = metrics.fidelity_metrics(images, texts, images, texts, text_image, sample_size=200)
    for key, value in m.items():
        assert value == pytest.approx(1.0, abs=1e-6), key


def test_fidelity_across_dimensions_is_one_for_a_rotation(teacher_set):
    # A student with a different width that is an isometry of the teacher keeps everything.
    images, texts, text_image = teacher_set
    q, _ = np.linalg.qr(np.random.default_rng(1).standard_normal((48, 48)))
    lift = q[:, :32].T.astype(np.float32)  # 32 -> 48, orthonormal columns
    m = metrics.fidelity_metrics(images @ lift, texts @ lift, images, texts, text_image, sample_size=200)
    for key, value in m.items():
        assert value == pytest.approx(1.0, abs=1e-5), key


def test_fidelity_falls_monotonically_with_noise(teacher_set):
    images, texts, text_image = teacher_set
    levels = [0.0, 0.2, 0.5, 1.0, 2.0]
    rows = [
        metrics.fidelity_metrics(
            _noisy(images, s, 1), _noisy(texts, s, 2), images, texts, text_image, sample_size=200
        )
        for s in levels
    ]
    for key in rows[0]:
        series = [r[key] for r in rows]
        assert all(a > b for a, b in zip(series, series[1:])), (key, series)


def test_spearman_handles_ties_like_the_textbook():
    # Pearson of average ranks: x = [1, 2, 2, 3] -> ranks [0, 1.5, 1.5, 3]; y increasing.
    assert metrics.spearman(np.array([1, 2, 2, 3]), np.array([1, 2, 3, 4])) == pytest.approx(
        np.corrcoef([0, 1.5, 1.5, 3], [0, 1, 2, 3])[0, 1]
    )


def test_linear_cka_matches_the_definition_on_small_data():
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((50, 6)), rng.standard_normal((50, 4))
    xn, yn = metrics.as_normalized(x).astype(np.float64), metrics.as_normalized(y).astype(np.float64)
    xc, yc = xn - xn.mean(0), yn - yn.mean(0)
    kx, ky = xc @ xc.T, yc @ yc.T  # the kernel (Gram over examples) form of linear CKA
    want = (kx * ky).sum() / (np.linalg.norm(kx) * np.linalg.norm(ky))
    assert metrics.linear_cka(x, y, chunk_size=7) == pytest.approx(want, rel=1e-9)
