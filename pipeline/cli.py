"""The ``rdkd`` command line: a thin typer layer over the stage entry functions.

Each command parses options and calls one function in ``rdkd.stages``; the stages do the
work and raise :class:`rdkd.errors.UserError` for bad input, which ``main`` turns into one
line on stderr and exit code 2.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import List, Optional

import typer

from rdkd.errors import Diverged, UserError

app = typer.Typer(
    help="Distil open_clip teachers into small students from an offline teacher-embedding cache.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
cache_app = typer.Typer(help="Inspect and check a teacher-embedding cache.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")
checkpoint_app = typer.Typer(help="Convert train-student checkpoints.", no_args_is_help=True)
app.add_typer(checkpoint_app, name="checkpoint")

# How to read a dataset: the same options on every command that reads one (rdkd.data.DataSpec).
DATA_FORMAT = typer.Option("auto", "--data-format", help="csv, webdataset, parquet or auto (by suffix).")
IMAGE_COLUMN = typer.Option("filepath", help="CSV: image path column; Parquet: image bytes column.")
CAPTION_COLUMN = typer.Option("title", help="Caption column (CSV/Parquet).")
KEY_COLUMN = typer.Option(None, help="Sample key column (default: derived from the image path).")
DECODE = typer.Option("workers", "--decode", help="Where images are decoded: workers (DataLoader processes, on the CPU) or device (the workers hand over encoded JPEGs; decode, crop and resize run on the model's device, nvJPEG on CUDA). device needs the fast preprocessing.")
SEPARATOR = typer.Option("\t", help="CSV field separator: a character, or tab / comma.")


def _data_spec(data: str, data_format: str, image_column: str, caption_column: str,
               key_column: Optional[str], separator: str):
    from rdkd.data import DataSpec

    return DataSpec(data, format=data_format, image_column=image_column, caption_column=caption_column,
                    key_column=key_column, separator=separator)


# --- extract-teacher (stage one) ---------------------------------------------------------


def _float_pair(text: str, option: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"{option} takes two numbers separated by a comma, e.g. 0.08,1.0; got {text!r}") from None
    return low, high


@app.command("extract-teacher")
def extract_teacher_command(
    data: str = typer.Option(..., "--data", help="Dataset: CSV/TSV, webdataset shards (.tar, brace pattern) or Parquet."),
    data_format: str = DATA_FORMAT,
    image_column: str = IMAGE_COLUMN,
    caption_column: str = CAPTION_COLUMN,
    key_column: Optional[str] = KEY_COLUMN,
    separator: str = SEPARATOR,
    model: str = typer.Option(..., "--model", help="Teacher: open_clip model name (ViT-L-14), hf-hub:org/name, local-dir:PATH or a model-config .json."),
    pretrained: Optional[str] = typer.Option(None, "--pretrained", help="open_clip pretrained tag (openai, laion2b_s32b_b82k) or a local checkpoint file."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Cache folder (default artifacts/cache/<teacher>_<dataset>)."),
    batch_size: int = typer.Option(256, "--batch-size", min=1, help="Images per teacher forward pass (per process)."),
    workers: int = typer.Option(4, "--workers", min=0, help="DataLoader processes that read, decode and preprocess (per process)."),
    device: str = typer.Option("auto", "--device", help="auto (cuda:LOCAL_RANK if present, else cpu), cpu, cuda, cuda:N."),
    precision: str = typer.Option("fp32", "--precision", help="fp32, or bf16 / fp16 autocast (fp16 on CUDA only)."),
    storage_dtype: str = typer.Option("float16", "--storage-dtype", help="Embedding dtype on disk: float16, bfloat16 or float32."),
    views: int = typer.Option(1, "--views", min=1, help="Views per image: view 0 is the teacher's eval view, the rest random-resized-crop + flip."),
    view_scale: str = typer.Option("0.08,1.0", "--view-scale", help="Area fraction range of the random views' crops."),
    view_seed: int = typer.Option(0, "--view-seed", help="Seed of the random views (with the key and view index)."),
    preprocess: str = typer.Option("exact", "--preprocess", help="How images become pixels: exact (open_clip's transforms on the full decode) or fast (JPEGs decoded at reduced size, one crop-resize per view); recorded in the cache, followed by students."),
    decode: str = DECODE,
    rows_per_shard: int = typer.Option(10_000, "--rows-per-shard", min=1, help="Images per cache shard (CSV/Parquet; webdataset follows its data shards)."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Keep and skip shards an interrupted run finished."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a cache of another teacher, preprocessing or dataset at --out."),
    max_reject_fraction: float = typer.Option(0.05, "--max-reject-fraction", min=0.0, max=1.0, help="Fail when more than this fraction of samples is rejected."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Run the teacher once over a dataset and write its embeddings to a cache (stage one)."""
    from rdkd.cache.views import ViewConfig
    from rdkd.models import parse_model_spec
    from rdkd.stages.extract_teacher import extract_teacher

    spec = _data_spec(data, data_format, image_column, caption_column, key_column, separator)
    extract_teacher(
        spec, parse_model_spec(model, pretrained), out, batch_size=batch_size, workers=workers, device=device,
        precision=precision, storage_dtype=storage_dtype,
        views=ViewConfig(count=views, scale=_float_pair(view_scale, "--view-scale"), seed=view_seed),
        preprocess=preprocess, decode=decode, rows_per_shard=rows_per_shard, resume=resume, overwrite=overwrite,
        max_reject_fraction=max_reject_fraction, progress=progress,
    )


# --- cache info / verify -------------------------------------------------------------------


@cache_app.command("info")
def cache_info_command(path: Path = typer.Argument(..., help="Cache folder.")) -> None:
    """Show what a cache holds: teacher, preprocessing, views, dataset, counts."""
    from rdkd.cache.cli import print_info

    print_info(path)


@cache_app.command("verify")
def cache_verify_command(path: Path = typer.Argument(..., help="Cache folder.")) -> None:
    """Check every file's sha256, the row counts and the embedding dims (exit 2 on a problem)."""
    from rdkd.cache.cli import verify

    verify(path)


# --- train-student (stage two) ---------------------------------------------------------------


@app.command("train-student")
def train_student_command(
    data: str = typer.Option(..., "--data", help="Dataset: CSV/TSV, webdataset shards (.tar, brace pattern) or Parquet."),
    data_format: str = DATA_FORMAT,
    image_column: str = IMAGE_COLUMN,
    caption_column: str = CAPTION_COLUMN,
    key_column: Optional[str] = KEY_COLUMN,
    separator: str = SEPARATOR,
    cache: Optional[Path] = typer.Option(None, "--cache", help="Teacher-embedding cache of this dataset (rdkd extract-teacher)."),
    student: str = typer.Option(..., "--student", help="open_clip model name or model-config JSON (e.g. pipeline/model_configs/ViT-T-16.json)."),
    init: Optional[str] = typer.Option(None, "--init", help="Start from these weights (checkpoint path or open_clip tag); default random init."),
    loss: str = typer.Option("cliprd", "--loss", help="Loss preset: clip, crd, fd, icl, clipkd, vrd, xrd, cliprd, distill, tinyclip."),
    weight: Optional[List[str]] = typer.Option(None, "--weight", help="Override one term weight, TERM=VALUE (repeatable), e.g. fd=1000."),
    scale_param: str = typer.Option("raw", "--scale-param", help="The loss's learnable scales a_I, a_T, a_X: raw (used as is, as the reference code) or exp (exp() clamped at 100, like CLIP's logit scale)."),
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
    log_dir: Optional[Path] = typer.Option(None, "--log-dir", help="Where the logs go (default <out>/logs): metrics.jsonl, TensorBoard events, skipped.jsonl. Outside --out, the run folder holds only what the inputs and the seed determine."),
    verify_cache: Optional[bool] = typer.Option(None, "--verify-cache/--no-verify-cache", help="Checksum every cache file first (default: only caches up to 2 GiB; bigger ones get a size check)."),
    log_every: int = typer.Option(50, "--log-every", min=1, help="Steps per log record: loss means, rates, data-wait and compute time, and the non-finite check (the one host-device sync of an interval)."),
    compile_student: bool = typer.Option(False, "--compile/--no-compile", help="torch.compile the student (see BENCHMARKS.md for when it pays)."),
    decode: str = DECODE,
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    stream: Optional[bool] = typer.Option(None, "--stream/--no-stream", help="Read webdataset shards in order beside their cache shards instead of indexing the dataset (no global index in memory). Default: stream webdataset data of more than 2M entries with a shard-aligned cache."),
    shuffle_buffer: int = typer.Option(2000, "--shuffle-buffer", min=1, help="Streaming: raw samples each DataLoader worker holds to shuffle."),
) -> None:
    """Train a student from the cached teacher embeddings (the teacher is never run)."""
    from rdkd.stages.train_student import train_student

    spec = _data_spec(data, data_format, image_column, caption_column, key_column, separator)
    started = time.perf_counter()
    summary = train_student(
        spec, student, loss, cache, init=init, weights=weight, scale_param=scale_param, epochs=epochs, steps=steps,
        batch_size=batch_size, lr=lr, weight_decay=wd, warmup=warmup, grad_clip=grad_clip,
        precision=precision, device=device, workers=workers, seed=seed, save_every=save_every,
        keep_checkpoints=keep_checkpoints, resume=resume, out=out, verify_cache=verify_cache,
        log_every=log_every, log_dir=log_dir, compile=compile_student, decode=decode, progress=progress,
        stream=stream, shuffle_buffer=shuffle_buffer,
    )
    final = f"{summary['final_loss']:.4f}" if summary["final_loss"] is not None else "-"
    print(f"trained {summary['student']} with {summary['method']} for {summary['steps']} steps "
          f"in {time.perf_counter() - started:.1f} s (final loss {final}, teacher forwards "
          f"{summary['teacher_forwards']}, skipped {sum(summary['skipped'].values())}); export: {summary['export']}")


# --- checkpoint upgrade ----------------------------------------------------------------------


@checkpoint_app.command("upgrade")
def checkpoint_upgrade_command(
    old: Path = typer.Argument(..., help="An rdkd-train-checkpoint/1 file (numpy RNG state) that you trust."),
    new: Optional[Path] = typer.Argument(None, help="Where to write the converted checkpoint (default: replace OLD once the new one is written and checked)."),
) -> None:
    """Convert an old train-student checkpoint to the current format, which rdkd loads as data only."""
    from rdkd.checkpoints import OLD_TRAIN_FORMAT, TRAIN_FORMAT, upgrade_train_checkpoint

    written = upgrade_train_checkpoint(old, new)
    typer.echo(f"{old} ({OLD_TRAIN_FORMAT}) -> {written} ({TRAIN_FORMAT})")


# --- evaluate / report -----------------------------------------------------------------------


@app.command("evaluate")
def evaluate_command(
    data: Optional[str] = typer.Option(None, "--data", help="Retrieval eval set: CSV/TSV, webdataset shards or Parquet (several captions per image allowed)."),
    data_format: str = DATA_FORMAT,
    image_column: str = IMAGE_COLUMN,
    caption_column: str = CAPTION_COLUMN,
    key_column: Optional[str] = KEY_COLUMN,
    separator: str = SEPARATOR,
    model: Optional[str] = typer.Option(None, "--model", help="Model to score: open_clip name, hf-hub:org/name, a student export folder (local-dir:), or a model-config JSON."),
    pretrained: Optional[str] = typer.Option(None, "--pretrained", help="open_clip pretrained tag or checkpoint path for --model."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Score a teacher cache's own rows instead of a model (no recomputation)."),
    teacher_cache: Optional[Path] = typer.Option(None, "--teacher-cache", help="Teacher cache of the eval set: adds geometry-fidelity metrics."),
    zeroshot: Optional[List[str]] = typer.Option(None, "--zeroshot", help="Zero-shot task (repeatable): NAME=PATH[;classnames=imagenet|FILE|a,b,c][;templates=openai|simple|FILE|t1{}|t2{}][;label_column=label][;image_column=filepath]. PATH: image-folder tree or CSV."),
    index_factory: Optional[str] = typer.Option(None, "--index-factory", help="FAISS factory string for very large galleries (e.g. IVF4096,Flat, HNSW32): approximate, no ranks. Default: exact IndexFlatIP."),
    search_params: Optional[str] = typer.Option(None, "--search-params", help="FAISS search parameters for --index-factory, e.g. nprobe=64 or efSearch=128."),
    batch_size: int = typer.Option(256, "--batch-size", min=1, help="Encoding batch size."),
    workers: int = typer.Option(4, "--workers", min=0, help="DataLoader worker processes for image decoding."),
    device: str = typer.Option("auto", "--device", help="auto (cuda if present), cpu, cuda, cuda:N."),
    precision: str = typer.Option("fp32", "--precision", help="fp32, or bf16 / fp16 autocast of the model's forward (fp16 on CUDA only)."),
    decode: str = DECODE,
    seed: int = typer.Option(0, "--seed", help="Seed of the fidelity similarity sample."),
    fidelity_sample: int = typer.Option(2000, "--fidelity-sample", min=3, help="Items sampled for the Spearman fidelity correlations."),
    per_class: bool = typer.Option(False, "--per-class", help="Also write zero-shot per-class top-1 accuracy CSVs."),
    ranks: bool = typer.Option(True, "--ranks/--no-ranks", help="Exact mean/median rank (a second gallery scan for queries missed in the top K)."),
    method: Optional[str] = typer.Option(None, "--method", help="Run label for rdkd report (default: from the student's run.json)."),
    student: Optional[str] = typer.Option(None, "--student", help="Run label for rdkd report (default: from run.json or the model name)."),
    run_seed: Optional[int] = typer.Option(None, "--run-seed", help="Training seed label for rdkd report (default: from run.json)."),
    name: Optional[str] = typer.Option(None, "--name", help="Output folder name under artifacts/eval/ (when --out is not given)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Metrics JSON path (default artifacts/eval/<name>/metrics.json)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """Score a model or a cache: FAISS retrieval R@1/5/10, zero-shot accuracy, geometry fidelity."""
    from rdkd.models import parse_model_spec
    from rdkd.stages.evaluate import ZeroShotTask, default_output, evaluate

    if model is None and pretrained is not None:
        raise UserError("--pretrained needs --model")
    spec = parse_model_spec(model, pretrained) if model is not None else None
    data_spec = _data_spec(data, data_format, image_column, caption_column, key_column, separator) if data else None
    tasks = [ZeroShotTask.parse(t) for t in zeroshot or []]
    run_info = {"method": method, "student": student, "seed": run_seed}
    target = out or (default_output(spec, cache, name, run_info) if (spec is not None) != (cache is not None) else None)
    started = time.perf_counter()
    results = evaluate(
        target, data=data_spec, model=spec, cache=cache, teacher_cache=teacher_cache, zeroshot=tasks,
        index_factory=index_factory, search_params=search_params, batch_size=batch_size, workers=workers,
        device=device, precision=precision, decode=decode, seed=seed, fidelity_sample=fidelity_sample,
        per_class=per_class, ranks=ranks, run_info=run_info, progress=progress,
    )
    shown = {k: v for k, v in results.items() if k.endswith(("_r1", "/top1", "knn10_img", "cka_img"))}
    typer.echo(" ".join(f"{k}={v:.4f}" for k, v in shown.items())
               + f" -> {target} (in {time.perf_counter() - started:.1f} s)")


@app.command("report")
def report_command(
    inputs: Optional[List[str]] = typer.Argument(None, help="metrics.json files, folders or glob patterns (default artifacts/eval/**/metrics.json)."),
    out: Path = typer.Option(Path("artifacts/report"), "--out", "-o", help="Report folder: report.md, runs.csv, table.csv, PNG plots."),
) -> None:
    """Gather evaluation runs into one Markdown table (method x student, mean ± std over seeds) and plots."""
    from rdkd.stages.report import DEFAULT_INPUTS, report

    result = report(inputs or DEFAULT_INPUTS, out)
    typer.echo(f"{len(result['runs'])} runs in {len(result['groups'])} groups -> {out / 'report.md'}")


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
    """Console-script entry: run the app, turning user errors into one line and exit code 2
    and a diverged training run into one line and exit code 3."""
    try:
        app()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except Diverged as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(3)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
