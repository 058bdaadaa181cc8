"""How an image's bytes become a model's uint8 input: the one place extraction, a student's
replay of cached views and evaluation make pixels.

A *view* is a crop box in original-image pixels and a horizontal flip (see
:mod:`rdkd.cache.views`); ``None`` stands for the model's eval view. :class:`ViewRenderer`
turns bytes and views into uint8 CHW tensors at the model's input size, in one of two ways,
which a cache records in its manifest (``image_preprocess``; a manifest without it is
``exact``) and every user of that cache follows:

- ``exact``: the whole image is decoded; the eval view is open_clip's own eval transform
  (resize, centre-crop or pad), other views :func:`rdkd.cache.views.render_view` (crop,
  PIL's antialiased filter, flip). What caches were before the choice existed, byte for byte.
- ``fast``: a JPEG is decoded at reduced size with libjpeg's DCT scaling (PIL's ``draft``:
  1/2, 1/4 or 1/8 of each side), the largest reduction that still leaves every requested box
  at least the output size, and the boxes are divided by the same factor (DCT pixel i
  covers original pixels [i*s, (i+1)*s)). Every view, the eval view included (its box is
  :func:`rdkd.cache.views.eval_view_box`), is then :func:`crop_resize`: the box rounded to
  whole pixels of the decoded image, torch's antialiased :data:`FAST_FILTER`, the flip.
  Other formats are decoded whole. :class:`DeviceDecoder` (``--decode device``) makes the
  same views from a full decode on the GPU. The distance to ``exact`` is measured, not
  assumed: ``python bench/photos.py fidelity`` (BENCHMARKS.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torchvision import transforms

from rdkd.errors import SampleError, UserError

MODES = ("exact", "fast")
# Where images are decoded: in the DataLoader workers (the renderer, on the CPU) or on the
# model's device from the encoded bytes (:class:`DeviceDecoder`).
DECODE_PLACES = ("workers", "device")
DEFAULT_MODE = "exact"
# --decode's help, the same on every stage that decodes images
DECODE_HELP = ("Where images are decoded: workers (DataLoader processes, on the CPU) or device (the workers hand "
               "over encoded JPEGs; decode, crop and resize run on the model's device, nvJPEG on CUDA). device needs "
               "the fast preprocessing.")
MANIFEST_FIELD = "image_preprocess"
# The fast path's filter: torch's antialiased bilinear, which has a vectorised uint8 kernel
# on the CPU (bicubic runs in float there, ~4x slower); its distance to the model's own
# filter is part of what bench/photos.py fidelity measures.
FAST_FILTER = "bilinear"
# libjpeg's DCT scaling factors that PIL's draft offers.
_DCT_SCALES = (8, 4, 2)

Box = Sequence[float]
View = tuple[Box, bool] | None  # (crop box in original pixels, flip); None: the model's eval view


def check_mode(mode: str) -> str:
    """``mode`` if it is one of :data:`MODES`, else a one-line :class:`UserError`."""
    if mode not in MODES:
        raise UserError(f"unknown image preprocessing {mode!r}; choose one of {', '.join(MODES)}")
    return mode


def check_decode(place: str) -> str:
    """``place`` if it is one of :data:`DECODE_PLACES`, else a one-line :class:`UserError`."""
    if place not in DECODE_PLACES:
        raise UserError(f"unknown --decode {place!r}; choose one of {', '.join(DECODE_PLACES)}")
    return place


def checked_bytes(data: bytes) -> bytes:
    """``data`` once its header reads as an image of acceptable size (what a DataLoader worker
    checks before handing encoded bytes to a :class:`DeviceDecoder`), else :class:`SampleError`."""
    from rdkd.data import open_image

    open_image(data)
    return data


def mode_of(manifest: dict) -> str:
    """The preprocessing a cache was made with: its manifest's field, ``exact`` without it."""
    return check_mode(manifest.get(MANIFEST_FIELD, "exact"))


def dct_scale(width: int, height: int, boxes: Sequence[Box], size: tuple[int, int]) -> int:
    """The largest DCT reduction (1, 2, 4 or 8) that leaves every box at least ``size``
    (height, width) pixels in the reduced image."""
    out_h, out_w = size
    room = min(min((b[2] - b[0]) / out_w, (b[3] - b[1]) / out_h) for b in boxes)
    room = min(room, width, height)  # and the reduced image keeps at least one pixel a side
    return next((s for s in _DCT_SCALES if room >= s), 1)


class ViewRenderer:
    """The uint8 views of images at one model's input size, made the ``exact`` or the
    ``fast`` way (the module docstring). ``eval_transform``: the model's open_clip eval
    transform (``ToTensor`` + ``Normalize`` at the end are dropped here; normalise on the
    device with :class:`rdkd.runtime.DeviceNormalize`)."""

    def __init__(self, eval_transform: transforms.Compose, size, interpolation: str = "bicubic",
                 resize_mode: str = "shortest", mode: str = DEFAULT_MODE):
        from rdkd.runtime import uint8_transform

        self.size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        self.interpolation = interpolation
        self.resize_mode = resize_mode
        self.mode = check_mode(mode)
        self._eval = uint8_transform(eval_transform)

    @classmethod
    def of_model(cls, preprocess: transforms.Compose, preprocess_cfg: dict, mode: str = DEFAULT_MODE
                 ) -> "ViewRenderer":
        """From a loaded open_clip model's eval transform and its ``preprocess_cfg``."""
        return cls(preprocess, preprocess_cfg["size"], preprocess_cfg.get("interpolation") or "bicubic",
                   preprocess_cfg.get("resize_mode") or "shortest", mode)

    def eval_box(self, width: int, height: int) -> tuple[float, ...]:
        """The region of a ``width`` x ``height`` image the eval view shows."""
        from rdkd.cache.views import eval_view_box

        return eval_view_box(width, height, self.size, self.resize_mode)

    def render(self, data: bytes, views: Callable[[int, int], Sequence[View]]
               ) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        """Decode ``data`` once and render the views ``views(width, height)`` asks for (it
        sees the original size from the header, before any pixel is decoded): uint8
        [K, 3, H, W], their boxes in original pixels [K, 4] float32 (the eval view's
        filled in), flips [K]. Raises :class:`rdkd.errors.SampleError` for bytes that do
        not decode."""
        pixels, boxes, flips = self._render(data, views)
        return torch.stack(pixels), np.array(boxes, dtype=np.float32), np.array(flips, dtype=bool)

    def eval_pixels(self, data: bytes) -> torch.Tensor:
        """The eval view of one image, uint8 [3, H, W] (what evaluation encodes)."""
        return self._render(data, _eval_only)[0][0]

    def view_pixels(self, data: bytes, view: View) -> torch.Tensor:
        """One view of one image, uint8 [3, H, W] (a student's replay of a cached view)."""
        return self._render(data, lambda width, height: (view,))[0][0]

    def _render(self, data: bytes, views: Callable[[int, int], Sequence[View]]
                ) -> tuple[list[torch.Tensor], list[tuple[float, ...]], list[bool]]:
        """:meth:`render` with the views as a list (one view needs no stacking copy)."""
        from rdkd.cache.views import render_view
        from rdkd.data import load_image, open_image

        image = open_image(data)
        width, height = image.size
        wanted = list(views(width, height))
        boxes = [self.eval_box(width, height) if v is None else tuple(float(x) for x in v[0]) for v in wanted]
        flips = [False if v is None else bool(v[1]) for v in wanted]
        scale = 1
        if self.mode == "fast" and image.format == "JPEG":
            scale = dct_scale(width, height, boxes, self.size)
            if scale > 1:
                # Pillow rounds the reduced size up: ceil(width / scale) x ceil(height / scale)
                image.draft(None, (width // scale, height // scale))
        image = load_image(image)
        if self.mode == "fast":
            tensor = transforms.functional.pil_to_tensor(image)
            pixels = [crop_resize(tensor, [x / scale for x in box], flip, self.size) for box, flip in zip(boxes, flips)]
        else:
            pixels = [self._eval(image) if view is None else transforms.functional.pil_to_tensor(
                render_view(image, box, flip, self.size, self.interpolation))
                for view, box, flip in zip(wanted, boxes, flips)]
        return pixels, boxes, flips


def _eval_only(width: int, height: int) -> tuple[View]:
    return (None,)


class DeviceDecoder:
    """Views made on ``device`` from encoded bytes (``--decode device``): JPEGs decoded in one
    batched ``torchvision.io.decode_jpeg`` call (nvJPEG on CUDA, libjpeg-turbo on the CPU),
    every view :func:`crop_resize` on the device: the ``fast`` views, from a full decode
    instead of a DCT-scaled one. Bytes that are not JPEG, or that the decode refuses, go
    through the renderer's CPU path for that image (``fallbacks`` counts them); an image
    neither path decodes is reported, its rows left black. The boxes come from the host, so
    nothing here waits for the device. DataLoader workers only read the bytes and check the
    header (:func:`rdkd.data.open_image`: not an image, too large).
    """

    def __init__(self, renderer: ViewRenderer, device: torch.device):
        if renderer.mode != "fast":
            raise UserError("--decode device makes the fast views (rdkd.pixels); this run's preprocessing is exact: "
                            "extract with --preprocess fast, or decode in the workers")
        self.renderer, self.device = renderer, device
        self.fallbacks = 0  # images that went through the CPU path

    def decode(self, encoded: Sequence[bytes], views: Sequence[Sequence[View]]
               ) -> tuple[torch.Tensor, list[tuple[int, str]]]:
        """uint8 [sum of len(views[i]), 3, H, W] on the device: the views ``views[i]`` of
        image ``encoded[i]``, image after image; and (i, reason) of the images that no path
        decodes (their rows are black: drop or replace them)."""
        from torchvision.io import ImageReadMode, decode_jpeg

        firsts = np.cumsum([0] + [len(v) for v in views])
        out = torch.zeros((int(firsts[-1]), 3, *self.renderer.size), dtype=torch.uint8, device=self.device)
        failed: list[tuple[int, str]] = []
        jpegs = [i for i, data in enumerate(encoded) if data[:3] == b"\xff\xd8\xff"]
        tensors = [torch.frombuffer(bytearray(encoded[i]), dtype=torch.uint8) for i in jpegs]
        try:
            images = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=self.device) if tensors else []
        except RuntimeError:  # one image the batch refused: decode them one by one
            images = []
            for tensor in tensors:
                try:
                    images.append(decode_jpeg(tensor, mode=ImageReadMode.RGB, device=self.device))
                except RuntimeError:
                    images.append(None)
        decoded = dict(zip(jpegs, images))
        for i, data in enumerate(encoded):
            rows = slice(int(firsts[i]), int(firsts[i + 1]))
            image = decoded.get(i)
            if image is not None:
                height, width = image.shape[-2:]
                out[rows] = torch.stack([
                    crop_resize(image, *((self.renderer.eval_box(width, height), False) if v is None else v),
                                self.renderer.size) for v in views[i]])
                continue
            self.fallbacks += 1
            try:
                out[rows] = self.renderer.render(data, lambda w, h, v=views[i]: v)[0].to(self.device)
            except SampleError as err:
                failed.append((i, err.reason))
        return out, failed


def crop_resize(image: torch.Tensor, box: Box, flip: bool, size: tuple[int, int]) -> torch.Tensor:
    """The ``fast`` view of a uint8 [3, H, W] image on any device: ``box`` (rounded to whole
    pixels; black outside the image) resized to ``size`` with :data:`FAST_FILTER`,
    antialiased, then flipped. uint8 in and out: on the CPU torch's uint8 kernel, elsewhere
    in float, rounded."""
    import torch.nn.functional as F

    height, width = image.shape[-2:]
    left, top, right, bottom = (round(float(x)) for x in box)
    right, bottom = max(right, left + 1), max(bottom, top + 1)
    crop = image[:, max(top, 0):min(bottom, height), max(left, 0):min(right, width)]
    if crop.shape[-2:] != (bottom - top, right - left):
        crop = F.pad(crop, (max(-left, 0), max(right - width, 0), max(-top, 0), max(bottom - height, 0)))
    if image.device.type == "cpu":  # the uint8 kernel is fastest on a dense channels-last input
        crop = crop[None].contiguous(memory_format=torch.channels_last)
        resized = F.interpolate(crop, size=size, mode=FAST_FILTER, antialias=True, align_corners=False)[0]
    else:
        resized = F.interpolate(crop[None].float(), size=size, mode=FAST_FILTER, antialias=True,
                                align_corners=False)[0].round_().clamp_(0, 255).to(torch.uint8)
    return resized.flip(-1) if flip else resized
