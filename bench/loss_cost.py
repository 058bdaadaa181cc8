"""P7: what the CLIP-RD loss costs next to the student it trains.

Times all terms of a loss preset (default ``cliprd``: task, CRD, FD, ICL, VRD, XRD),
forward + backward through `rdkd.losses.DistillLoss`, at a global batch (default 1024) and
embedding dim (default 512, student and teacher alike as in the paper's ViT-B/16 -> ViT-T/16
setting), and one training-mode forward of the shipped ViT-T-16 student (open_clip, random
init) in the same run, and prints their ratio.

On CUDA both run at the full batch (the student forward under bf16 autocast, as training
runs it). On CPU a ViT-T forward at batch 1024 takes minutes, so the student runs at
``--student-batch`` (default 32): the ratio is measured at that batch (loss timed there too),
and the ratio at the full batch is given with the student's forward time scaled linearly
from it (a ViT forward is linear in the batch; the loss is not: its similarity matrices
grow with the square of the batch). Every figure is the median of ``--repeats`` timed runs
after one warm-up, with min-max; inputs come from ``--seed``.

    python bench/loss_cost.py                      # CPU: 1 thread, student batch 32
    python bench/loss_cost.py --device cuda        # GPU: everything at batch 1024

P15 (``--ensemble 512,768``, the default): the same loss with an ensemble of two teachers
(widths 512 and 768, e.g. ViT-B/16 and ViT-L/14, each with its own heads into the student's
512-d space where they differ) against one teacher of the student's width.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from importlib import resources
from typing import Callable, Sequence

import open_clip
import torch
import torch.nn.functional as F

from rdkd.losses import TERMS, DistillLoss, weights_for


def timed(fn: Callable[[], None], repeats: int, device: torch.device) -> tuple[float, float, float]:
    """(median, min, max) wall time in ms over ``repeats`` runs after one warm-up."""

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), min(times), max(times)


def loss_step(preset: str, batch: int, dim: int, device: torch.device, seed: int,
              shared: bool = True, teacher_dims: Sequence[int] = ()) -> Callable[[], None]:
    """One forward + backward of the preset. ``shared=False`` evaluates each term on its own
    `Relations` (what calling the pure functions one by one costs: no shared matrices).
    ``teacher_dims``: an ensemble of teachers of these widths (default: one teacher of the
    student's width ``dim``), each with its own projection heads where its width differs."""
    g = torch.Generator(device=device).manual_seed(seed)

    def unit(width: int):
        return F.normalize(torch.randn(batch, width, device=device, generator=g), dim=-1)

    dims = list(teacher_dims) or [dim]
    t_img, t_txt = [unit(d) for d in dims], [unit(d) for d in dims]
    if len(dims) == 1:
        t_img, t_txt = t_img[0], t_txt[0]
    s_img, s_txt = unit(dim).requires_grad_(), unit(dim).requires_grad_()
    log_s = torch.tensor(2.659, device=device, requires_grad=True)
    loss = DistillLoss(weights_for(preset), student_dim=dim, teacher_dim=dims if len(dims) > 1 else dims[0]).to(device)

    def run():
        if shared:
            total, _ = loss(t_img, t_txt, s_img, s_txt, log_s, 100.0)
        else:
            total = sum(w * TERMS[name].compute(loss.relations(t_img, t_txt, s_img, s_txt, log_s, 100.0))
                        for name, w in loss.weights.items())
        total.backward()
        for p in (s_img, s_txt, log_s, *loss.parameters()):
            p.grad = None

    return run


def student_forward(batch: int, device: torch.device, seed: int) -> tuple[Callable[[], None], int]:
    cfg = json.loads(resources.files("rdkd").joinpath("model_configs/ViT-T-16.json").read_text())
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**cfg).to(device).train()
    size = cfg["vision_cfg"]["image_size"]
    images = torch.randn(batch, 3, size, size, device=device)
    texts = torch.randint(0, cfg["text_cfg"]["vocab_size"], (batch, cfg["text_cfg"]["context_length"]),
                          device=device)

    def run():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            model(images, texts)

    return run, cfg["embed_dim"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cliprd")
    parser.add_argument("--batch", type=int, default=1024, help="global batch of the loss")
    parser.add_argument("--dim", type=int, default=512, help="embedding dim (student = teacher)")
    parser.add_argument("--ensemble", default="512,768",
                        help="teacher widths of an ensemble timed against one teacher of --dim (P15; '' to skip)")
    parser.add_argument("--student-batch", type=int, default=None,
                        help="batch of the student forward (default: --batch on CUDA, 32 on CPU)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (the CPU run only)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    student_batch = args.student_batch or (args.batch if device.type == "cuda" else 32)

    student_run, embed_dim = student_forward(student_batch, device, args.seed)
    student_ms = timed(student_run, args.repeats, device)
    del student_run
    loss_ms = timed(loss_step(args.preset, args.batch, args.dim, device, args.seed), args.repeats, device)
    unshared_ms = timed(loss_step(args.preset, args.batch, args.dim, device, args.seed, shared=False),
                        args.repeats, device)

    terms = ", ".join(weights_for(args.preset))
    where = f"{device.type}" + (f" ({torch.get_num_threads()} threads)" if device.type == "cpu" else
                                f" ({torch.cuda.get_device_name(device)})")
    print(f"P7 loss cost on {where}, torch {torch.__version__}, seed {args.seed}, "
          f"median of {args.repeats} (min-max)")
    print(f"  loss '{args.preset}' [{terms}] fwd+bwd, batch {args.batch}, dim {args.dim}: "
          f"{loss_ms[0]:.2f} ms ({loss_ms[1]:.2f}-{loss_ms[2]:.2f})")
    print(f"  the same terms each on its own similarity matrices (pure functions one by one): "
          f"{unshared_ms[0]:.2f} ms ({unshared_ms[1]:.2f}-{unshared_ms[2]:.2f}); "
          f"shared / unshared {loss_ms[0] / unshared_ms[0]:.2f}")
    print(f"  student ViT-T-16 (embed {embed_dim}) train-mode forward, batch {student_batch}: "
          f"{student_ms[0]:.1f} ms ({student_ms[1]:.1f}-{student_ms[2]:.1f})")
    if args.ensemble:
        dims = [int(d) for d in args.ensemble.split(",")]
        ensemble_ms = timed(loss_step(args.preset, args.batch, args.dim, device, args.seed, teacher_dims=dims),
                            args.repeats, device)
        print(f"  P15 loss '{args.preset}' fwd+bwd, batch {args.batch}, student dim {args.dim}, {len(dims)} teachers "
              f"(dims {args.ensemble}): {ensemble_ms[0]:.2f} ms ({ensemble_ms[1]:.2f}-{ensemble_ms[2]:.2f}); "
              f"/ one teacher {ensemble_ms[0] / loss_ms[0]:.2f}; teacher bytes per sample (float16 rows, "
              f"image + text) {4 * args.dim} -> {4 * sum(dims)}")
    if student_batch == args.batch:
        print(f"  ratio loss / student forward at batch {args.batch}: {loss_ms[0] / student_ms[0]:.4f}")
        return
    small_ms = timed(loss_step(args.preset, student_batch, args.dim, device, args.seed), args.repeats, device)
    scaled_student = student_ms[0] * args.batch / student_batch
    print(f"  loss '{args.preset}' fwd+bwd, batch {student_batch}: "
          f"{small_ms[0]:.2f} ms ({small_ms[1]:.2f}-{small_ms[2]:.2f})")
    print(f"  ratio loss / student forward at batch {student_batch} (both measured): "
          f"{small_ms[0] / student_ms[0]:.4f}")
    print(f"  ratio loss / student forward at batch {args.batch} (student forward scaled linearly "
          f"from batch {student_batch} to {scaled_student:.0f} ms): {loss_ms[0] / scaled_student:.4f}")


if __name__ == "__main__":
    main()
