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
