"""The ``rdkd`` command line: a thin typer layer over the stage entry functions.

Each command parses options and calls one function in ``rdkd.stages``; the stages do the
work and raise :class:`rdkd.errors.UserError` for bad input, which ``main`` turns into one
line on stderr and exit code 2. Exit codes: 0 done, 2 bad input (the command or its
input), 3 a training run diverged, 4 the storage refused a write (disk or quota full,
read-only, permission denied: free space or fix the folder and rerun, which resumes),
130 interrupted.
"""

from __future__ import annotations

import inspect
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import typer

from rdkd.errors import Diverged, StorageError, UserError
from rdkd.files import storage_error

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

def _options(config_cls: type, skip: tuple[str, ...] = ()) -> list[inspect.Parameter]:
    """The options (and positional arguments) a config declares (:mod:`rdkd.options`) as
    typer parameters."""
    from rdkd.options import cli_fields

    return [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=f.annotation,
                              default=typer.Argument(f.default, help=f.cli.help, **f.cli.checks) if f.cli.argument
                              else typer.Option(f.default, *f.flags, help=f.cli.help, **f.cli.checks))
            for f in cli_fields(config_cls) if f.name not in skip]


def _option(name: str, annotation: Any, default: Any, *flags: str, **settings: Any) -> inspect.Parameter:
    """A command's own option (one that fills no config field)."""
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                             default=typer.Option(default, *flags, **settings))


# Stage commands whose options come from config dataclasses: name -> (options, run). Their
# options are built when a command line names them (registered_app), so that `rdkd report`
# does not import torch, open_clip and FAISS to learn train-student's options.
_STAGE_COMMANDS: dict[str, tuple[Callable[[], list[inspect.Parameter]], Callable[[dict], None]]] = {}


def _command(name: str, options: Callable[[], list[inspect.Parameter]]) -> Callable[[Callable[[dict], None]], Callable]:
    """Declare ``run(values)`` as ``rdkd <name>``, taking the parameters ``options()`` makes;
    ``values`` holds them by name. The help is ``run``'s docstring."""
    def declare(run: Callable[[dict], None]) -> Callable:
        _STAGE_COMMANDS[name] = (options, run)
        return run

    return declare


def registered_app(names: Iterable[str] | None = None) -> typer.Typer:
    """The app with the stage commands ``names`` (default: all) registered."""
    registered = {info.name for info in app.registered_commands}
    for name in _STAGE_COMMANDS if names is None else names:
        if name in registered or name not in _STAGE_COMMANDS:
            continue
        options, run = _STAGE_COMMANDS[name]
        parameters = options()

        def command(_run: Callable[[dict], None] = run, **values: Any) -> None:
            _run(values)

        command.__signature__ = inspect.Signature(parameters)
        command.__annotations__ = {p.name: p.annotation for p in parameters}
        command.__doc__, command.__name__ = run.__doc__, run.__name__
        app.command(name)(command)
    return app


# --- extract-teacher (stage one) ---------------------------------------------------------


def _extract_options() -> list[inspect.Parameter]:
    from rdkd.data import DataSpec
    from rdkd.stages.extract_teacher import ExtractConfig

    return _options(DataSpec) + [
        _option("model", str, ..., "--model", help="Teacher: open_clip model name (ViT-L-14), hf-hub:org/name, "
                "local-dir:PATH or a model-config .json."),
        _option("pretrained", Optional[str], None, "--pretrained", help="open_clip pretrained tag (openai, "
                "laion2b_s32b_b82k) or a local checkpoint file."),
        _option("out", Optional[Path], None, "--out", "-o", help="Cache folder (default "
                "artifacts/cache/<teacher>_<dataset>)."),
    ] + _options(ExtractConfig)


@_command("extract-teacher", _extract_options)
def extract_teacher_command(values: dict) -> None:
    """Run the teacher once over a dataset and write its embeddings to a cache (stage one)."""
    from rdkd.data import DataSpec
    from rdkd.models import parse_model_spec
    from rdkd.options import config_values
    from rdkd.stages.extract_teacher import ExtractConfig, extract_teacher

    extract_teacher(DataSpec(**config_values(DataSpec, values)), parse_model_spec(values["model"], values["pretrained"]),
                    values["out"], **config_values(ExtractConfig, values))


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


def _train_options() -> list[inspect.Parameter]:
    from rdkd.data import DataSpec
    from rdkd.stages.train_student import TrainConfig

    return _options(DataSpec) + _options(TrainConfig)


@_command("train-student", _train_options)
def train_student_command(values: dict) -> None:
    """Train a student from the cached teacher embeddings (the teacher is never run)."""
    from rdkd.data import DataSpec
    from rdkd.options import config_values
    from rdkd.stages.train_student import TrainConfig, train_student

    started = time.perf_counter()
    summary = train_student(DataSpec(**config_values(DataSpec, values)), **config_values(TrainConfig, values))
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


def _evaluate_options() -> list[inspect.Parameter]:
    from rdkd.data import DataSpec
    from rdkd.stages.evaluate import EvalConfig

    return [
        _option("data", Optional[str], None, "--data", help="Retrieval eval set: CSV/TSV, webdataset shards or "
                "Parquet (several captions per image allowed)."),
        *_options(DataSpec, skip=("path",)),
        _option("model", Optional[str], None, "--model", help="Model to score: open_clip name, hf-hub:org/name, a "
                "student export folder (local-dir:), or a model-config JSON."),
        _option("pretrained", Optional[str], None, "--pretrained", help="open_clip pretrained tag or checkpoint "
                "path for --model."),
        *_options(EvalConfig),
        _option("method", Optional[str], None, "--method", help="Run label for rdkd report (default: from the "
                "student's run.json)."),
        _option("student", Optional[str], None, "--student", help="Run label for rdkd report (default: from "
                "run.json or the model name)."),
        _option("run_seed", Optional[int], None, "--run-seed", help="Training seed label for rdkd report (default: "
                "from run.json)."),
        _option("name", Optional[str], None, "--name", help="Output folder name under artifacts/eval/ (when --out "
                "is not given)."),
        _option("out", Optional[Path], None, "--out", "-o", help="Metrics JSON path (default "
                "artifacts/eval/<name>/metrics.json)."),
    ]


@_command("evaluate", _evaluate_options)
def evaluate_command(values: dict) -> None:
    """Score a model or a cache: FAISS retrieval R@1/5/10, zero-shot accuracy, geometry fidelity."""
    from rdkd.data import DataSpec
    from rdkd.models import parse_model_spec
    from rdkd.options import config_values
    from rdkd.stages.evaluate import EvalConfig, default_output, evaluate

    if values["model"] is None and values["pretrained"] is not None:
        raise UserError("--pretrained needs --model")
    spec = parse_model_spec(values["model"], values["pretrained"]) if values["model"] is not None else None
    data = DataSpec(**{**config_values(DataSpec, values), "path": values["data"]}) if values["data"] else None
    run_info = {"method": values["method"], "student": values["student"], "seed": values["run_seed"]}
    cache = values["cache"]
    target = values["out"] or (default_output(spec, cache, values["name"], run_info)
                               if (spec is not None) != (cache is not None) else None)
    started = time.perf_counter()
    results = evaluate(target, **{**config_values(EvalConfig, values), "data": data, "model": spec,
                                  "run_info": run_info})
    shown = {k: v for k, v in results.items() if k.endswith(("_r1", "/top1", "knn10_img", "cka_img"))}
    typer.echo(" ".join(f"{k}={v:.4f}" for k, v in shown.items())
               + f" -> {target} (in {time.perf_counter() - started:.1f} s)")


def _report_options() -> list[inspect.Parameter]:
    from rdkd.stages.report import ReportConfig

    return _options(ReportConfig)


@_command("report", _report_options)
def report_command(values: dict) -> None:
    """Gather evaluation runs into one Markdown table (method x student, mean ± std over seeds) and plots."""
    from rdkd.options import config_values
    from rdkd.stages.report import ReportConfig, report

    config = ReportConfig(**config_values(ReportConfig, values))
    result = report(config.inputs, config.out)
    typer.echo(f"{len(result['runs'])} runs in {len(result['groups'])} groups -> {config.out / 'report.md'}")


# --- demo-data -------------------------------------------------------------------------------


def _demo_data_options() -> list[inspect.Parameter]:
    from rdkd.stages.demo_data import DemoDataConfig

    return _options(DemoDataConfig)


@_command("demo-data", _demo_data_options)
def demo_data_command(values: dict) -> None:
    """Generate the demo world: seeded captioned scenes as webdataset shards, CSV and zero-shot trees."""
    from rdkd.options import config_values
    from rdkd.stages.demo_data import DemoDataConfig, demo_data

    options = config_values(DemoDataConfig, values)
    world = demo_data(**options)
    splits = ", ".join(f"{name} {s['images']} ({s['format']}: {s['path']})" for name, s in world["splits"].items())
    tasks = ", ".join(f"{name} {t['images']}" for name, t in world["zeroshot"].items())
    timing = f" in {world['seconds']:.1f} s" if "seconds" in world else " (already up to date)"
    typer.echo(f"demo world in {options['out']}{timing}: {splits}; zero-shot: {tasks or 'none'}")


def main() -> None:
    """Console-script entry: run the app, turning user errors into one line and exit code 2,
    a diverged training run into one line and exit code 3 and a storage fault into one line
    and exit code 4."""
    named = [arg for arg in sys.argv[1:] if not arg.startswith("-")][:1]
    try:
        registered_app(named or None)()  # no command named (rdkd --help): all of them
    except OSError as err:  # a storage fault outside the stages' own write sites: still one line
        wrapped = storage_error(err, None)
        if wrapped is None:
            raise
        print(f"error: {wrapped}", file=sys.stderr)
        sys.exit(4)
    except StorageError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(4)
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
