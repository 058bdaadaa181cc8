"""torchrun setup and the global-batch gather that the distillation losses need.

Every CLIP-RD term is computed over the global batch: each rank gathers the student and
teacher embeddings of all ranks (`gather_batch`) and evaluates the same loss on them. The
local slice of the student tensors keeps its gradient through the gather.

Gradient scaling under DDP (why the loss is *not* multiplied by the world size W):
every rank computes the identical global loss L. The gather's backward sums, over all W
ranks, the gradient each rank's copy of L sends to a slice, so rank r receives
W * dL/dS_r for its own slice S_r. DDP then averages the student's parameter gradients
over ranks: (1/W) * sum_r W * dL/dS_r * dS_r/dtheta = dL/dtheta, exactly the gradient of one
process on the same global batch. (open_clip's default ``gather_with_grad=False`` keeps
only the rank's own dL/dS_r, which after DDP's average is 1/W of that gradient.)
The loss module's own parameters (heads, scales) see the whole gathered batch on every
rank, so their gradient is already the full dL/dparam, the same on every rank; averaging
it (DDP-wrapping the loss module) or not gives the same value.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from rdkd import runtime

__all__ = [
    "DistInfo", "setup", "cleanup", "barrier", "is_distributed", "gather_batch",
    "all_reduce_mean",
]

# torch >= 2.10 names the tensor collectives *_single; older versions only have the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: its rank among ``world_size`` and the device it uses."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def is_distributed() -> bool:
    """True when a process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def setup(device: str | torch.device | None = None, timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group that torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK).

    Not launched by torchrun (or WORLD_SIZE=1): a single process, nothing initialised.
    ``device``: as :func:`rdkd.runtime.resolve_device` reads it (None or ``auto``:
    ``cuda:LOCAL_RANK`` when CUDA is present, else CPU; refused in one line when absent); the backend
    is nccl on CUDA and gloo on CPU. Calling it again in an initialised process returns the
    same info without initialising twice.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():
        world_size, rank = dist.get_world_size(), dist.get_rank()
    device = runtime.resolve_device(device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
            **({"device_id": device} if device.type == "cuda" else {}),
        )
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def cleanup() -> None:
    """Leave the process group, if one is running."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for all ranks; a no-op in one process."""
    if is_distributed():
        dist.barrier()


def all_reduce_mean(value: torch.Tensor | float) -> torch.Tensor:
    """The mean of ``value`` over ranks (a new tensor; ``value`` itself in one process)."""
    tensor = torch.as_tensor(value)
    if not is_distributed():
        return tensor
    if dist.get_backend() == "nccl":
        tensor = tensor.to("cuda")
    tensor = tensor.detach().clone().float()
    dist.all_reduce(tensor)
    return tensor / dist.get_world_size()


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward returns this rank's slice of the summed gradient."""

    @staticmethod
    def forward(ctx, local: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size()
        gathered = local.new_empty((world * local.shape[0], *local.shape[1:]))
        _all_gather_single(gathered, local.contiguous())
        return gathered

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size()
        local = grad.new_empty((grad.shape[0] // world, *grad.shape[1:]))
        _reduce_scatter_single(local, grad.contiguous())
        return local


def _gather_plain(local: torch.Tensor) -> torch.Tensor:
    gathered = local.new_empty((dist.get_world_size() * local.shape[0], *local.shape[1:]))
    _all_gather_single(gathered, local.detach().contiguous())
    return gathered


def gather_batch(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The global batch: each tensor concatenated over ranks along dim 0, in rank order.

    Tensors that require grad are gathered so the local slice keeps its gradient (see the
    module docstring for why the loss needs no rescaling under DDP); the others (teacher
    embeddings) are gathered plainly. All ranks must pass the same number of rows. In one
    process the tensors are returned unchanged.
    """
    if not is_distributed():
        return tuple(tensors)
    return tuple(
        _GatherWithGrad.apply(t) if t.requires_grad else _gather_plain(t) for t in tensors
    )
