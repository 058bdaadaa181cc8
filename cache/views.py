"""Image views of the cache: which region of the original image the teacher embedded.

Every image row of a cache records its view as a crop box in original-image pixels
(left, top, right, bottom; it may reach outside the image where the teacher pads) and a
horizontal flip. A student re-creates the exact pixels with :func:`render_view`: crop box ->
resize to the teacher's input size -> flip, the way MobileCLIP's reinforced datasets store
augmentation parameters instead of pixels.

View 0 of every image is the teacher's deterministic eval view (its own open_clip eval
transform; the box is the equivalent region, e.g. the centre square for resize + centre
crop). Views 1..K-1 are random-resized-crop + flip views drawn from a generator seeded by
(seed, key, view), so any view can be drawn again from the key alone.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


@dataclass(frozen=True)
class ViewConfig:
    """How many views per image and how the random ones (views 1..count-1) are drawn."""

    count: int = 1
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_prob: float = 0.5
    seed: int = 0
    interpolation: str = "bicubic"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["scale"] = list(self.scale)
        d["ratio"] = list(self.ratio)
        d["view0"] = "teacher eval transform"
        return d


def _as_hw(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    return int(size[0]), int(size[1])


def eval_view_box(width: int, height: int, size, resize_mode: str = "shortest") -> tuple[float, ...]:
    """Region of a ``width`` x ``height`` image that open_clip's eval transform shows the model.

    ``shortest``: resize the short side then centre-crop; ``longest``: resize the long side
    then centre-pad (the box reaches outside the image); ``squash``: the whole image.
    """
    out_h, out_w = _as_hw(size)
    if resize_mode == "squash":
        return (0.0, 0.0, float(width), float(height))
    if resize_mode == "shortest":
        scale = max(out_w / width, out_h / height)
    elif resize_mode == "longest":
        scale = min(out_w / width, out_h / height)
    else:
        raise ValueError(f"unknown resize mode {resize_mode!r}")
    box_w, box_h = out_w / scale, out_h / scale
    left, top = (width - box_w) / 2, (height - box_h) / 2
    return (left, top, left + box_w, top + box_h)


def view_rng(key: str, view: int, seed: int) -> np.random.Generator:
    """The generator of one random view: a function of (seed, key, view) only."""
    digest = hashlib.blake2b(f"{seed}\x00{key}\x00{view}".encode("utf-8"), digest_size=16).digest()
    return np.random.Generator(np.random.PCG64(int.from_bytes(digest, "big")))


def random_view(width: int, height: int, rng: np.random.Generator, config: ViewConfig) -> tuple[tuple[float, ...], bool]:
    """A random-resized-crop box (area fraction in ``scale``, aspect in ``ratio``) and a flip."""
    area = width * height
    log_ratio = (math.log(config.ratio[0]), math.log(config.ratio[1]))
    box = None
    for _ in range(10):
        target = area * rng.uniform(config.scale[0], config.scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            box = (float(left), float(top), float(left + w), float(top + h))
            break
    if box is None:  # fall back to the largest centred crop within the ratio bounds
        aspect = width / height
        if aspect < config.ratio[0]:
            w, h = width, round(width / config.ratio[0])
        elif aspect > config.ratio[1]:
            w, h = round(height * config.ratio[1]), height
        else:
            w, h = width, height
        left, top = (width - w) // 2, (height - h) // 2
        box = (float(left), float(top), float(left + w), float(top + h))
    flip = bool(rng.random() < config.flip_prob)
    return box, flip


def render_view(image: Image.Image, box, flip: bool, size, interpolation: str = "bicubic") -> Image.Image:
    """The pixels of a recorded view: crop ``box`` of ``image``, resize to ``size``, flip."""
    out_h, out_w = _as_hw(size)
    left, top, right, bottom = (float(v) for v in box)
    resample = _RESAMPLE[interpolation]
    if left >= 0 and top >= 0 and right <= image.width and bottom <= image.height:
        view = image.resize((out_w, out_h), resample=resample, box=(left, top, right, bottom))
    else:  # the box reaches outside the image: pad with black as open_clip's eval transform does
        padded = image.crop((math.floor(left), math.floor(top), math.ceil(right), math.ceil(bottom)))
        view = padded.resize((out_w, out_h), resample=resample)
    if flip:
        view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return view
