"""Where and how a stage computes: what extract-teacher, train-student and evaluate share.

- :func:`resolve_device` and :func:`check_precision`: ``--device`` / ``--precision`` to a
  torch device and a checked precision, one-line :class:`UserError` otherwise.
- :func:`autocast`: the autocast context of a precision (a no-op for fp32).
- Compact image transport. DataLoader workers hand images to the main process as
  ``uint8`` CHW tensors at the model's input size (:func:`uint8_transform` strips the
  to-float and normalise steps from an open_clip transform), a quarter of the bytes of
  float32; :class:`DeviceNormalize` turns them into the model's normalised float input on
  the device, with the same arithmetic as torchvision's ``ToTensor`` + ``Normalize``
  (``x / 255``, ``- mean``, ``/ std`` in float32), so the values are the ones the
  host-side transform gives.
- :func:`decode_or_reason`: one dataset item that either decodes and transforms or
  carries the reason it was skipped, never raising for a bad sample.
- :func:`progress`: a rich progress display (or a silent one) shared by the stages.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
from torchvision import transforms

from rdkd.errors import SampleError, UserError

PRECISIONS = ("fp32", "bf16", "fp16")
_AUTOCAST_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str | None, local_rank: int = 0) -> torch.device:
    """``auto``/None: ``cuda:LOCAL_RANK`` when CUDA is present, else CPU; otherwise the
    device named (``cpu``, ``cuda``, ``cuda:N``), refused in one line when it is not here."""
    if device in (None, "auto"):
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA device is available here (use --device cpu)")
    if resolved.type == "cuda" and resolved.index is None:
        resolved = torch.device("cuda", local_rank)
    return resolved


def check_precision(precision: str, device: torch.device, *, fp16_on_cpu: bool = False) -> str:
    """``precision`` if it is one of :data:`PRECISIONS` and runs on ``device``. fp16 autocast
    is CUDA-only (CPU autocast is bf16); bf16 runs on both."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and device.type != "cuda" and not fp16_on_cpu:
        raise UserError("--precision fp16 needs a CUDA device (use bf16 or fp32 on CPU)")
    return precision


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed-precision autocast for bf16/fp16 on ``device``; nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_AUTOCAST_DTYPE[precision])


def uint8_transform(transform: transforms.Compose) -> transforms.Compose:
    """An open_clip image transform that stops before the float conversion: its geometric
    steps, then ``PILToTensor`` (uint8 CHW). Normalise on the device with
    :class:`DeviceNormalize` built from the dropped ``Normalize``."""
    steps = list(transform.transforms)
    if not steps or not isinstance(steps[-1], transforms.Normalize):
        raise ValueError("expected an open_clip transform ending in ToTensor + Normalize")
    return transforms.Compose(steps[:-2] + [transforms.PILToTensor()])


def normalize_of(transform: transforms.Compose) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of the ``Normalize`` an open_clip transform ends with."""
    last = transform.transforms[-1]
    return tuple(float(m) for m in last.mean), tuple(float(s) for s in last.std)


class DeviceNormalize:
    """uint8 ``[N, 3, H, W]`` pixels -> the model's normalised float32 input, on the device.
    The same float32 operations as ``ToTensor`` then ``Normalize`` on the host."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], device: torch.device):
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.float().div_(255).sub_(self.mean).div_(self.std)


def decode_or_reason(read_bytes: Callable[[], bytes], transform: Callable[[Any], torch.Tensor]
                     ) -> tuple[torch.Tensor | None, str | None]:
    """(transformed image, None), or (None, reason) for a sample that cannot be read or
    decoded: what a DataLoader item returns so that a bad sample is skipped, not fatal."""
    from rdkd.data import decode_image

    try:
        return transform(decode_image(read_bytes())), None
    except SampleError as err:
        return None, err.reason


@contextlib.contextmanager
def progress(enabled: bool, description: str, total: int | None, completed: int = 0,
             unit: str = "", fields: dict[str, str] | None = None) -> Iterator[Callable[..., None]]:
    """A rich progress bar; yields ``advance(n=1, **fields)``. ``fields`` name extra text
    columns shown after the count (e.g. ``{"loss": "-"}``); disabled: a no-op."""
    if not enabled:
        yield lambda n=1, **values: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = [TextColumn(f"[bold]{description}"), BarColumn(), MofNCompleteColumn()]
    if unit:
        columns.append(TextColumn(unit))
    columns += [TextColumn(f"{name} {{task.fields[{name}]}}") for name in (fields or {})]
    columns.append(TimeRemainingColumn())
    with Progress(*columns) as bar:
        task = bar.add_task(description, total=total, completed=completed, **(fields or {}))
        yield lambda n=1, **values: bar.update(task, advance=n, **values)
