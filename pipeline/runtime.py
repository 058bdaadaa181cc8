"""Where and how a stage computes: what extract-teacher, train-student and evaluate share.

- :func:`resolve_device` and :func:`check_precision`: ``--device`` / ``--precision`` to a
  torch device and a checked precision, one-line :class:`UserError` otherwise.
- :func:`autocast`: the autocast context of a precision (a no-op for fp32).
- Compact image transport. DataLoader workers hand images to the main process as
  ``uint8`` CHW tensors at the model's input size (:func:`uint8_transform` strips the
  to-float and normalise steps from an open_clip transform), a quarter of the bytes of
  float32; :class:`DeviceNormalize` turns them into the model's normalised float input on
  the device, bitwise equal to torchvision's ``ToTensor`` + ``Normalize`` on the host on
  any device (it looks each pixel up in the host transform's 3 x 256 table of values).
- :func:`decode_or_reason`: one dataset item that either reads, decodes and transforms or
  carries the reason it was skipped, never raising for a bad sample.
- :func:`device_batches`: a loader's batches on the device, copied from pinned memory
  on a side stream (CUDA) while the previous step runs, pieces of a batch joined there;
  :func:`prefetch_factor` sizes the DataLoader's prefetch by bytes in flight, not by batches.
- :class:`HostSyncCounter`: counts the operations that make the host wait for the device
  (``.item()``, ``float(t)``, ``bool(t)``, ``nonzero``, copies to the CPU), to keep them
  out of a training step. It counts on any device, so a CPU test sees them too.
- :func:`progress`: a rich progress display (or a silent one) shared by the stages.
- :data:`DEFAULT_ARTIFACTS` (where outputs go by default) and :data:`PREFETCH_BUDGET_BYTES`.
"""

from __future__ import annotations

import contextlib
import itertools
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

import numpy as np
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision import transforms

from rdkd.errors import SampleError, UserError

PRECISIONS = ("fp32", "bf16", "fp16")
# Where a stage writes when no output is given: artifacts/cache, students, eval.
DEFAULT_ARTIFACTS = Path("artifacts")
# Bytes of finished batches (or pieces) the DataLoader workers of one process may hold ready.
PREFETCH_BUDGET_BYTES = 2 << 30
T = TypeVar("T")
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
    """uint8 ``[N, C, H, W]`` pixels -> the model's normalised float32 input, on the device,
    bitwise equal to ``ToTensor`` then ``Normalize`` on the host.

    A uint8 channel takes 256 values, so the host transform is applied once to each level
    (a ``C x 256`` table, computed by torchvision itself on the CPU) and the device only
    looks pixels up. Arithmetic on the device would not do: CUDA divides by a scalar as a
    multiplication by its reciprocal, and ``x * (1 / 255)`` rounds differently from
    ``x / 255`` for 126 of the 256 levels.
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], device: torch.device):
        channels = len(mean)
        levels = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], channels, axis=2)  # a 1 x 256 image
        image = Image.fromarray(levels if channels > 1 else levels[..., 0])
        table = transforms.functional.normalize(transforms.functional.to_tensor(image), list(mean), list(std))
        self.table = table.reshape(channels * 256).to(device)  # [channel * 256 + level]
        self.offsets = (torch.arange(channels, dtype=torch.int32) * 256).view(1, channels, 1, 1).to(device)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.table[pixels.int() + self.offsets]


def decode_or_reason(read_bytes: Callable[[], bytes], render: Callable[[bytes], T]
                     ) -> tuple[T | None, str | None]:
    """(``render(bytes)``, None), or (None, reason) for a sample that cannot be read or
    decoded: what a DataLoader item returns so that a bad sample is skipped, not fatal.
    ``render`` decodes (e.g. :meth:`rdkd.pixels.ViewRenderer.render`) and raises
    :class:`SampleError` for bytes that do not; its other errors are not the sample's
    fault and propagate."""
    try:
        data = read_bytes()
    except SampleError as err:
        return None, err.reason
    except Exception as err:  # storage libraries raise their own types; one odd sample must not end a run
        return None, f"unreadable image: {type(err).__name__}: {err}"
    try:
        return render(data), None
    except SampleError as err:
        return None, err.reason


def prefetch_factor(batch_bytes: int, workers: int, budget_bytes: int) -> int | None:
    """Batches each DataLoader worker may have ready, so that all workers together keep at
    most ``budget_bytes`` of finished batches queued (at least one each, at most four)."""
    if workers == 0:
        return None
    return max(1, min(4, budget_bytes // max(1, workers * batch_bytes)))


def to_device(batch: dict, device: torch.device, non_blocking: bool = True) -> dict:
    """The batch with every tensor moved to ``device`` (other values as they are)."""
    return {k: v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


def join_batches(parts: Sequence[dict]) -> dict:
    """Pieces of one batch as one: tensors concatenated along the first dimension, lists
    joined, in order."""
    if len(parts) == 1:
        return parts[0]
    return {k: torch.cat([p[k] for p in parts]) if isinstance(v, torch.Tensor) else
            [x for p in parts for x in p[k]] for k, v in parts[0].items()}


def worker_error_line(err: Exception) -> str:
    """The message of an exception as raised, also when a DataLoader re-raised it from a
    worker: the DataLoader appends the worker's traceback, whose last line is
    ``module.Type: message``."""
    last = [line for line in str(err).splitlines() if line.strip()][-1]
    name = f"{type(err).__module__}.{type(err).__qualname__}: "
    return last[len(name):] if last.startswith(name) else last


def device_batches(loader: Any, device: torch.device, pieces: int = 1) -> Iterator[dict]:
    """The loader's dict batches on ``device``, every ``pieces`` consecutive items joined
    into one (:func:`join_batches`, on the device). On CUDA, batch i+1 is copied and joined
    on a side stream while the caller's step on batch i runs; the compute stream waits for
    it before use, and its tensors are marked as used by that stream so the allocator does
    not reuse their memory early."""
    items = iter(loader)

    def take() -> list[dict] | None:
        try:
            parts = list(itertools.islice(items, pieces))
        except UserError as err:  # e.g. a damaged cache shard found by a DataLoader worker
            raise type(err)(worker_error_line(err)) from None
        return parts if len(parts) == pieces else None

    if device.type != "cuda":
        while (parts := take()) is not None:
            yield join_batches([to_device(p, device) for p in parts])
        return
    copy_stream = torch.cuda.Stream(device)

    def stage(parts: list[dict] | None) -> dict | None:
        if parts is None:
            return None
        with torch.cuda.stream(copy_stream):
            return join_batches([to_device(p, device) for p in parts])

    staged = stage(take())
    while staged is not None:
        compute = torch.cuda.current_stream(device)
        compute.wait_stream(copy_stream)
        for value in staged.values():
            if isinstance(value, torch.Tensor):
                value.record_stream(compute)
        current, staged = staged, stage(take())
        yield current


class HostSyncCounter(TorchDispatchMode):
    """Counts, while active, the tensor operations after which the host must wait for the
    device: reading a value (``_local_scalar_dense``: ``.item()``, ``float``, ``int``,
    ``bool``), ``nonzero`` (its output size), ``equal``, and copies to the CPU. ``count``
    is the total, ``ops`` the names seen. ``.tolist()`` does not dispatch: read through
    ``.cpu()``/``.to("cpu")`` to be counted."""

    SYNCING = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.equal.default"}

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.ops: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        to_host = name == "aten._to_copy.default" and str(kwargs.get("device", "")) == "cpu"
        if name in self.SYNCING or to_host:
            self.count += 1
            self.ops[name] = self.ops.get(name, 0) + 1
        return func(*args, **kwargs)


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
