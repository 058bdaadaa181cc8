"""The ``rdkd`` command line: a thin typer layer over the stage entry functions.

Each command parses options and calls one function in ``rdkd.stages``; the stages do the
work and raise :class:`rdkd.errors.UserError` for bad input, which ``main`` turns into one
line on stderr and exit code 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from rdkd.errors import UserError

app = typer.Typer(
    help="Distil open_clip teachers into small students from an offline teacher-embedding cache.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
cache_app = typer.Typer(help="Inspect and check a teacher-embedding cache.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")


# --- extract-teacher (stage one) ---------------------------------------------------------


# --- cache info / verify -------------------------------------------------------------------


# --- train-student (stage two) ---------------------------------------------------------------


@app.command("train-student")
def train_student_command(
    data: str = typer.Option(..., "--data", help="Dataset: CSV/TSV, webdataset shards (.tar, brace pattern) or Parquet."),
    data_format: str = typer.Option("auto", "--data-format", help="csv, webdataset, parquet or auto (by suffix)."),
    image_column: str = typer.Option("filepath", help="CSV: image path column; Parquet: image bytes column."),
    caption_column: str = typer.Option("title", help="Caption column (CSV/Parquet)."),
    key_column: Optional[str] = typer.Option(None, help="Sample key column (default: derived from the image path)."),
    separator: str = typer.Option("\t", help="CSV field separator."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Teacher-embedding cache of this dataset (rdkd extract-teacher)."),
    student: str = typer.Option(..., "--student", help="open_clip model name or model-config JSON (e.g. pipeline/model_configs/ViT-T-16.json)."),
    init: Optional[str] = typer.Option(None, "--init", help="Start from these weights (checkpoint path or open_clip tag); default random init."),
    loss: str = typer.Option("cliprd", "--loss", help="Loss preset: clip, crd, fd, icl, clipkd, vrd, xrd, cliprd, distill, tinyclip."),
    weight: Optional[List[str]] = typer.Option(None, "--weight", help="Override one term weight, TERM=VALUE (repeatable), e.g. fd=1000."),
    epochs: Optional[int] = typer.Option(None, "--epochs", min=1, help="Train this many epochs (or give --steps)."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Train this many optimizer steps (or give --epochs)."),
    batch_size: int = typer.Option(256, "--batch-size", min=2, help="Global batch size (split over torchrun processes)."),
    lr: float = typer.Option(1e-3, "--lr", min=0.0, help="Peak learning rate of AdamW."),
    wd: float = typer.Option(0.1, "--wd", min=0.0, help="Weight decay on weight matrices (not gains, biases, scales)."),
    warmup: Optional[int] = typer.Option(None, "--warmup", min=0, help="Linear warm-up steps before the cosine decay (default min(10000, steps/10))."),
    grad_clip: Optional[float] = typer.Option(None, "--grad-clip", min=0.0, help="Clip the global gradient norm to this value."),
    precision: str = typer.Option("fp32", "--precision", help="fp32, bf16 (autocast) or fp16 (autocast + GradScaler, CUDA only)."),
    device: str = typer.Option("auto", "--device", help="auto (cuda:LOCAL_RANK if present, else cpu), cpu, cuda, cuda:N."),
    workers: int = typer.Option(4, "--workers", min=0, help="DataLoader worker processes per rank."),
    seed: int = typer.Option(0, "--seed", help="Seed of the data order, caption and view choices and augmentation."),
    save_every: int = typer.Option(1000, "--save-every", min=1, help="Write a checkpoint every N steps (and at the end)."),
    keep_checkpoints: int = typer.Option(2, "--keep-checkpoints", min=1, help="Keep the newest N checkpoints."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue from a checkpoint file or a run folder (its latest checkpoint)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder (default artifacts/students/<student>-<loss>-seed<seed>)."),
    verify_cache: Optional[bool] = typer.Option(None, "--verify-cache/--no-verify-cache", help="Checksum every cache file first (default: only caches up to 2 GiB; bigger ones get a size check)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Train a student from the cached teacher embeddings (the teacher is never run)."""
    from rdkd.data import DataSpec
    from rdkd.stages.train_student import train_student

    spec = DataSpec(data, format=data_format, image_column=image_column, caption_column=caption_column,
                    key_column=key_column, separator=separator)
    summary = train_student(
        spec, student, loss, cache, init=init, weights=weight, epochs=epochs, steps=steps,
        batch_size=batch_size, lr=lr, weight_decay=wd, warmup=warmup, grad_clip=grad_clip,
        precision=precision, device=device, workers=workers, seed=seed, save_every=save_every,
        keep_checkpoints=keep_checkpoints, resume=resume, out=out, verify_cache=verify_cache,
        progress=progress,
    )
    print(f"trained {summary['student']} with {summary['method']} for {summary['steps']} steps "
          f"(final loss {summary['final_loss']:.4f}, teacher forwards {summary['teacher_forwards']}, "
          f"skipped {sum(summary['skipped'].values())}); export: {summary['export']}")


# --- evaluate / report -----------------------------------------------------------------------


# --- demo-data -------------------------------------------------------------------------------


@app.command("demo-data")
def demo_data_command(
    out: Path = typer.Option(Path("artifacts/demo/data"), "--out", "-o", help="Output folder of the world."),
    profile: str = typer.Option("demo", help="Size preset: 'demo' (the dvc demo) or 'quick' (a few hundred images, CI)."),
    seed: Optional[int] = typer.Option(None, help="World seed (profile default 0)."),
    image_size: Optional[int] = typer.Option(None, min=16, help="Image side in pixels (default 32)."),
    pretrain: Optional[int] = typer.Option(None, min=0, help="Images in the teacher's pretraining split."),
    train: Optional[int] = typer.Option(None, min=0, help="Images in the distillation split."),
    test: Optional[int] = typer.Option(None, min=0, help="Images in the multi-caption test split."),
    test_captions: Optional[int] = typer.Option(None, min=1, help="Paraphrased captions per test image."),
    zeroshot_task: Optional[List[str]] = typer.Option(
        None, "--zeroshot-task", help="Zero-shot task (repeatable): shape, colour, size, position."
    ),
    zeroshot_per_class: Optional[int] = typer.Option(None, min=0, help="Images per class of each zero-shot task."),
    min_objects: Optional[int] = typer.Option(None, min=1, max=3, help="Fewest objects in a scene."),
    max_objects: Optional[int] = typer.Option(None, min=1, max=3, help="Most objects in a scene."),
    relations: Optional[bool] = typer.Option(None, "--relations/--no-relations", help="Captions with 'left of', 'above', ..."),
    noise: Optional[float] = typer.Option(None, min=0.0, help="Max Gaussian pixel-noise std (0-255 units)."),
    pretrain_format: Optional[str] = typer.Option(None, help="'webdataset' or 'csv'."),
    train_format: Optional[str] = typer.Option(None, help="'webdataset' or 'csv'."),
    test_format: Optional[str] = typer.Option(None, help="'webdataset' or 'csv'."),
    shard_size: Optional[int] = typer.Option(None, min=1, max=10000, help="Samples per webdataset shard."),
    workers: Optional[int] = typer.Option(None, min=1, help="Rendering processes (default: CPU count, max 8)."),
    overwrite: bool = typer.Option(False, help="Replace an existing world with other settings."),
) -> None:
    """Generate the demo world: seeded captioned scenes as webdataset shards, CSV and zero-shot trees."""
    from rdkd.stages.demo_data import demo_data

    world = demo_data(
        out, profile, seed=seed, image_size=image_size, pretrain=pretrain, train=train, test=test,
        test_captions=test_captions, zeroshot_tasks=zeroshot_task or None,
        zeroshot_per_class=zeroshot_per_class, min_objects=min_objects, max_objects=max_objects,
        relations=relations, noise=noise, pretrain_format=pretrain_format, train_format=train_format,
        test_format=test_format, shard_size=shard_size, workers=workers, overwrite=overwrite,
    )
    splits = ", ".join(f"{name} {s['images']} ({s['format']}: {s['path']})" for name, s in world["splits"].items())
    tasks = ", ".join(f"{name} {t['images']}" for name, t in world["zeroshot"].items())
    timing = f" in {world['seconds']:.1f} s" if "seconds" in world else " (already up to date)"
    typer.echo(f"demo world in {out}{timing}: {splits}; zero-shot: {tasks or 'none'}")


def main() -> None:
    """Console-script entry: run the app, turning user errors into one line and exit code 2."""
    try:
        app()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
