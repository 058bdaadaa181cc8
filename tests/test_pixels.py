"""rdkd.pixels: the exact path is open_clip's transforms; the fast path and the device path
make the same views within stated tolerances; a cache records its way and students follow it."""

from __future__ import annotations

import io

import numpy as np
import open_clip
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from rdkd.cache.views import render_view
from rdkd.data import decode_image
from rdkd.errors import UserError
from rdkd.pixels import DeviceDecoder, ViewRenderer, dct_scale, mode_of

SIZE = 64


def photo(width: int = 640, height: int = 480, seed: int = 0, fmt: str = "JPEG") -> bytes:
    """A smooth, photo-like image (gradients, blobs, mild noise) as JPEG q90 or PNG."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    channels = []
    for c in range(3):
        f = rng.uniform(2, 6, size=2)
        channels.append(128 + 80 * np.sin(f[0] * 6 * x + c) * np.cos(f[1] * 6 * y - c))
    pixels = np.stack(channels, -1) + rng.normal(0, 4, (height, width, 3))
    buffer = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def renderer(mode: str, size: int = SIZE) -> ViewRenderer:
    return ViewRenderer(open_clip.image_transform(size, is_train=False), size, "bicubic", "shortest", mode)


def diff(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    return (a.int() - b.int()).abs().numpy()


def test_exact_is_open_clips_eval_transform_and_render_view():
    """exact: view 0 is open_clip's own eval transform, other views render_view, bit for bit
    (what caches held before the choice existed)."""
    data = photo()
    image = decode_image(data)
    box = (100.0, 50.0, 420.0, 400.0)
    pixels, boxes, flips = renderer("exact").render(data, lambda w, h: [None, (box, True)])
    reference = open_clip.image_transform(SIZE, is_train=False)(image)  # float, normalised
    mean, std = torch.tensor(open_clip.OPENAI_DATASET_MEAN), torch.tensor(open_clip.OPENAI_DATASET_STD)
    assert torch.allclose(pixels[0].float() / 255, reference * std[:, None, None] + mean[:, None, None], atol=1e-6)
    assert torch.equal(pixels[1], TF.pil_to_tensor(render_view(image, box, True, SIZE)))
    assert boxes[0].tolist() == [80.0, 0.0, 560.0, 480.0] and flips.tolist() == [False, True]


@pytest.mark.parametrize("box", [(80.0, 0.0, 560.0, 480.0), (10.0, 30.0, 300.0, 330.0), (400.0, 300.0, 470.0, 380.0)])
def test_fast_views_match_the_exact_crop_of_the_original_box(box):
    """fast decodes at 1/8, 1/4 or 1/1 for these boxes and scales them by the same factor:
    the view shows the same region as the exact render of the original box. Tolerance: mean
    absolute difference <= 3 levels of 255 (filter and DCT-scaling differences; a box
    misplaced by 1/8 of its size measures > 6 here)."""
    data = photo()
    fast = renderer("fast").view_pixels(data, (box, False))
    exact = TF.pil_to_tensor(render_view(decode_image(data), box, False, SIZE))
    assert diff(fast, exact).mean() <= 3.0
    shift = (box[2] - box[0]) / 8
    moved = TF.pil_to_tensor(render_view(decode_image(data), (box[0] + shift, box[1], box[2] + shift, box[3]),
                                         False, SIZE))
    assert diff(fast, moved).mean() > 2 * diff(fast, exact).mean()


def test_dct_scale_keeps_every_box_at_least_the_output_size():
    assert dct_scale(640, 480, [(80, 0, 560, 480)], (SIZE, SIZE)) == 4  # 480 / 64 = 7.5 -> 4
    assert dct_scale(640, 480, [(80, 0, 560, 480), (0, 0, 130, 130)], (SIZE, SIZE)) == 2
    assert dct_scale(640, 480, [(0, 0, 100, 100)], (SIZE, SIZE)) == 1
    assert dct_scale(4000, 3000, [(0, 0, 4000, 3000)], (224, 224)) == 8


def test_fast_decodes_a_jpeg_at_reduced_size(monkeypatch):
    """The fast path asks PIL for a DCT-scaled decode: the image it crops from is 1/4 of the side."""
    seen = []
    real = TF.pil_to_tensor
    monkeypatch.setattr(TF, "pil_to_tensor", lambda image: (seen.append(image.size), real(image))[1])
    renderer("fast").eval_pixels(photo())
    assert seen == [(160, 120)]


def test_png_and_padded_boxes_on_the_fast_path():
    """Other formats decode whole; a box reaching outside the image (resize mode longest) is padded black."""
    data = photo(fmt="PNG")
    box = (-40.0, -40.0, 680.0, 680.0)
    fast = renderer("fast").view_pixels(data, (box, False))
    exact = TF.pil_to_tensor(render_view(decode_image(data), box, False, SIZE))
    assert diff(fast, exact).mean() <= 3.0 and int(fast[:, :2, :].max()) == 0


def test_device_decoder_on_cpu_matches_the_fast_path():
    """The --decode device path (torchvision's decode_jpeg, crop, resize; here on CPU tensors)
    gives the fast path's pixels: identical decode when no DCT scaling applies (max 1 level:
    float against uint8 resize kernels), mean <= 3 levels when the fast path decoded at 1/4."""
    data = photo()
    fast = renderer("fast")
    decoder = DeviceDecoder(fast, torch.device("cpu"))
    small = ((400.0, 300.0, 470.0, 380.0), True)
    got, failed = decoder.decode([data, data], [[small], [None, small]])
    assert got.shape == (3, 3, SIZE, SIZE) and failed == [] and decoder.fallbacks == 0
    assert diff(got[0], fast.view_pixels(data, small)).max() <= 1
    assert diff(got[1], fast.eval_pixels(data)).mean() <= 3.0
    assert torch.equal(got[2], got[0])


def test_device_decoder_falls_back_per_image_and_reports_what_no_path_decodes():
    png, jpeg = photo(fmt="PNG"), photo()
    decoder = DeviceDecoder(renderer("fast"), torch.device("cpu"))
    got, failed = decoder.decode([jpeg, png, jpeg[: len(jpeg) // 3], b"not an image"], [[None]] * 4)
    assert decoder.fallbacks == 3 and torch.equal(got[1], renderer("fast").eval_pixels(png))
    assert [i for i, _ in failed] == [2, 3] and int(got[2:].max()) == 0
    with pytest.raises(UserError):
        DeviceDecoder(renderer("exact"), torch.device("cpu"))


def test_old_manifests_mean_exact():
    assert mode_of({}) == "exact" and mode_of({"image_preprocess": "fast"}) == "fast"
