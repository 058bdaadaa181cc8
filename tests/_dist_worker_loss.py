"""One rank of the 2-process loss test; `run_all` in one process is the reference.

Launched by tests/test_distributed_loss.py with torchrun's environment variables (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). Every rank builds the same global batch
and student from fixed seeds, takes its own contiguous slice of rows, computes the loss over
the gathered global batch with the student (and, in the second variant, the loss module)
DDP-wrapped as the trainer does, runs backward, and saves the loss and all gradients. The
ensemble variant distils from two teachers of different widths, each gathered on its own.
"""

from __future__ import annotations

import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from rdkd import distributed
from rdkd.losses import DistillLoss

GLOBAL_BATCH, IN_IMG, IN_TXT, D_S, D_T = 8, 10, 12, 6, 9
D_T2 = 5  # the ensemble's second teacher


class TinyStudent(nn.Module):
    """A linear map per modality and CLIP's logit scale: stands in for an open_clip student."""

    def __init__(self):
        super().__init__()
        self.image = nn.Linear(IN_IMG, D_S)
        self.text = nn.Linear(IN_TXT, D_S)
        self.logit_scale = nn.Parameter(torch.tensor(2.659))

    def forward(self, images, texts):
        return F.normalize(self.image(images), dim=-1), F.normalize(self.text(texts), dim=-1), self.logit_scale


def make_world(ensemble: bool):
    """Inputs, student and loss; the teachers as a list of (t_img, t_txt, tau) per teacher."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(GLOBAL_BATCH, IN_IMG, generator=g, dtype=torch.float64)
    texts = torch.randn(GLOBAL_BATCH, IN_TXT, generator=g, dtype=torch.float64)
    dims = (D_T, D_T2) if ensemble else (D_T,)
    teachers = [
        tuple(F.normalize(torch.randn(GLOBAL_BATCH, d, generator=g, dtype=torch.float64), dim=-1)
              for _ in range(2)) + (tau,)
        for d, tau in zip(dims, (100.0, 30.0))
    ]
    torch.manual_seed(1)
    student = TinyStudent().double()
    loss = DistillLoss.from_preset("cliprd", student_dim=D_S, teacher_dim=list(dims) if ensemble else D_T,
                                   teacher_weights=(0.7, 0.3) if ensemble else None).double()
    with torch.no_grad():  # move the scales off their shared init so each gets its own gradient
        for k, link in enumerate(loss.teachers):
            link.scale_img.fill_(2.0 + k)
            link.scale_txt.fill_(3.0 - k / 2)
            link.scale_cross.fill_(2.5 + k / 3)
    return (images, texts, teachers), student, loss


def step(info, wrap_loss: bool, ensemble: bool = False) -> dict:
    (images, texts, teachers), student, loss = make_world(ensemble)
    rows = slice(info.rank * GLOBAL_BATCH // info.world_size, (info.rank + 1) * GLOBAL_BATCH // info.world_size)
    model, loss_fn = student, loss
    if info.distributed:
        model = DDP(student)
        if wrap_loss:
            loss_fn = DDP(loss)
    s_img, s_txt, log_s = model(images[rows], texts[rows])
    s_img, s_txt = distributed.gather_batch(s_img, s_txt)
    gathered = [distributed.gather_batch(t_img[rows], t_txt[rows]) for t_img, t_txt, _ in teachers]
    if ensemble:
        total, parts = loss_fn([t for t, _ in gathered], [t for _, t in gathered], s_img, s_txt, log_s,
                               [tau for *_, tau in teachers])
    else:  # the single-teacher call as the trainer makes it: bare tensors
        [(g_t_img, g_t_txt)] = gathered
        total, parts = loss_fn(g_t_img, g_t_txt, s_img, s_txt, log_s, teachers[0][2])
    total.backward()
    return {
        "total": total.detach(),
        "parts": parts,
        "student_grads": {n: p.grad.clone() for n, p in student.named_parameters()},
        "loss_grads": {n: p.grad.clone() for n, p in loss.named_parameters()},
    }


def run_all(info) -> dict:
    """The variants: the loss module used as is, DDP-wrapped like the student, and a
    DDP-wrapped two-teacher ensemble."""
    return {"world_size": info.world_size, "plain_loss": step(info, False), "ddp_loss": step(info, True),
            "ensemble_ddp_loss": step(info, True, ensemble=True)}


def main(out_path: str) -> None:
    torch.set_num_threads(1)
    info = distributed.setup(device="cpu")
    results = run_all(info)
    if info.is_main:
        torch.save(results, out_path)
    distributed.barrier()
    distributed.cleanup()


if __name__ == "__main__":
    main(sys.argv[1])
