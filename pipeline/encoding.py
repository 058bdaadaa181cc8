"""An open_clip model over images and texts: the one encoder of extract-teacher and evaluate.

Both stages embed with :class:`Encoder`, so the rows a cache stores and the embeddings
evaluate compares with them are made the same way:

- **Inputs.** Pixels come as ``uint8`` ``[N, 3, H, W]`` at the model's input size (what
  DataLoader workers hand over: a quarter of float32's bytes; pinned on CUDA), token ids as
  the model's tokenizer makes them. Both are copied to the device without waiting, and the
  pixels are normalised there by :class:`rdkd.runtime.DeviceNormalize` (bitwise the values
  of the model's host transform).
- **Precision.** The forward runs under ``torch.inference_mode`` and
  :func:`rdkd.runtime.autocast` of the precision (nothing for fp32; bf16/fp16 autocast).
- **Normalisation.** The forward's output is cast to float32 and L2-normalised in float32,
  after the autocast region: one rule whatever the precision. In fp32 this is bitwise
  open_clip's ``encode_image(normalize=True)`` / ``encode_text(normalize=True)``.
- **Overlap.** :meth:`Encoder.start` queues a batch's forward and the copies of its
  embeddings back to the host, and on CUDA returns at once; :meth:`Encoder.stream` waits
  for batch i only after batch i+1 is queued, so the device keeps working while the caller
  reads the next batch and stores the last one. That wait is the one wait on the device per
  batch. On a CPU device the forward runs synchronously and the embeddings are ready when
  :meth:`Encoder.start` returns.

What a caller sends along with a batch (its keys, its entry indices) comes back with the
batch's embeddings, untouched, as :attr:`Encoded.tag`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from rdkd import runtime

if TYPE_CHECKING:  # rdkd.models imports open_clip; an annotation does not need it
    from rdkd.models import LoadedClip

T = TypeVar("T")


@dataclass(frozen=True)
class Encoded(Generic[T]):
    """One batch's embeddings on the host, with the tag it was sent with."""

    tag: T
    images: np.ndarray | None  # [images, dim] float32, L2-normalised; None when the batch had no pixels
    texts: np.ndarray | None  # [texts, dim] float32, L2-normalised; None when it had no tokens
    ready_at: float  # time.perf_counter() when the embeddings were on the host


@dataclass
class InFlight(Generic[T]):
    """A batch whose embeddings are on their way to the host."""

    tag: T
    images: torch.Tensor | None  # host tensors, filled once ``done`` has passed
    texts: torch.Tensor | None
    done: torch.cuda.Event | None  # CUDA: recorded after the copies back were queued
    ready_at: float | None  # on other devices the forward ran synchronously: ready when it returned

    def wait(self) -> Encoded[T]:
        """The embeddings on the host; waits for the device (the one wait per batch)."""
        if self.done is not None:
            self.done.synchronize()
        ready_at = self.ready_at if self.ready_at is not None else time.perf_counter()
        return Encoded(self.tag, None if self.images is None else self.images.numpy(),
                       None if self.texts is None else self.texts.numpy(), ready_at)


class Encoder:
    """A loaded open_clip model on its device: uint8 pixels and token ids in, L2-normalised
    float32 embeddings back on the host, without the host waiting for the device (the
    module docstring gives the rules)."""

    def __init__(self, loaded: LoadedClip, device: torch.device, precision: str):
        self.model, self.tokenizer, self.dim = loaded.model, loaded.tokenizer, loaded.embed_dim
        self.device, self.precision = device, precision
        self.normalize = runtime.DeviceNormalize(*runtime.normalize_of(loaded.preprocess), device)

    def start(self, tag: T, pixels: torch.Tensor | None, tokens: torch.Tensor | None) -> InFlight[T]:
        """Queue the forward of ``pixels`` and/or ``tokens`` (None: nothing of that kind) and
        the copies back; on CUDA return at once."""
        if pixels is None and tokens is None:  # nothing queued: nothing to wait for
            return InFlight(tag, None, None, None, time.perf_counter())
        with torch.inference_mode():
            with runtime.autocast(self.device, self.precision):
                images = None if pixels is None else \
                    self.model.encode_image(self.normalize(pixels.to(self.device, non_blocking=True)))
                texts = None if tokens is None else \
                    self.model.encode_text(tokens.to(self.device, non_blocking=True))
            images, texts = (None if x is None else F.normalize(x.float(), dim=-1).to("cpu", non_blocking=True)
                             for x in (images, texts))
        if self.device.type != "cuda":
            return InFlight(tag, images, texts, None, time.perf_counter())
        done = torch.cuda.Event()
        done.record()
        return InFlight(tag, images, texts, done, None)

    def stream(self, batches: Iterable[tuple[T, torch.Tensor | None, torch.Tensor | None]]) -> Iterator[Encoded[T]]:
        """Each ``(tag, pixels, tokens)`` batch's embeddings on the host, in order and one
        batch late: batch i+1 is queued on the device before batch i's embeddings are waited
        for."""
        in_flight = None
        for tag, pixels, tokens in batches:
            queued = self.start(tag, pixels, tokens)
            if in_flight is not None:
                yield in_flight.wait()
            in_flight = queued
        if in_flight is not None:
            yield in_flight.wait()
