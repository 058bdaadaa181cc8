"""Gather evaluation runs into one report (``rdkd report``).

Input: ``metrics.json`` files written by ``rdkd evaluate`` (files, folders searched
recursively, or glob patterns). Each run is labelled by the ``run.json`` beside its metrics
file, ``{"method": ..., "student": ..., "seed": ...}`` (``rdkd evaluate`` writes it, copying
the labels of the ``rdkd train-student`` run it scored). A metrics file without one is
labelled by its path: a folder named ``seed<N>`` (or ``seed-<N>``, ``seed_<N>``) gives the
seed and the two folders above it the student and the method
(``.../<method>/<student>/seed<N>/metrics.json``); otherwise the method is the metrics
file's folder name and the student ``-``.

Output folder (default ``artifacts/report``):

- ``report.md``: per section (retrieval, zero-shot, fidelity) one Markdown table, a row per
  (method, student), a column per metric, each cell ``mean ± std`` over that row's runs
  (sample standard deviation, n - 1; a single run shows its value alone), with n per row;
- ``runs.csv``: one row per run (path, method, student, seed, every metric);
- ``table.csv``: one row per (method, student): ``label``, ``n``, each metric's mean and
  ``<metric>__std`` (what ``dvc plots`` reads, e.g. ``x: label``, ``y: retrieval/i2t_r1``);
- ``retrieval.png``, ``zeroshot.png``, ``fidelity.png``: grouped bars with ±std error bars.
"""

from __future__ import annotations

import glob
import json
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

from rdkd.errors import UserError
from rdkd.files import atomic_write, atomic_write_csv, atomic_write_text

DEFAULT_OUT = Path("artifacts/report")
DEFAULT_INPUTS = ("artifacts/eval/**/metrics.json",)
# Bookkeeping keys: counts of what was scored, not quality; kept in runs.csv, not in tables.
_BOOKKEEPING = re.compile(r"/(images|captions|skipped|approximate)$")
_SECTIONS = (("retrieval", "Retrieval"), ("zeroshot", "Zero-shot classification"), ("fidelity", "Geometry fidelity"))
_SEED_DIR = re.compile(r"^seed[-_]?(\d+)$")
# The labels file rdkd evaluate writes beside metrics.json, then its earlier name (still read).
LABEL_FILES = ("labels.json", "run.json")


def _find_metrics_files(inputs: Sequence[str | Path]) -> list[Path]:
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found += sorted(path.rglob("metrics.json"))
        elif path.is_file():
            found.append(path)
        else:
            matches = sorted(Path(p) for p in glob.glob(str(item), recursive=True) if Path(p).is_file())
            if not matches:
                raise UserError(f"no metrics file matches {item}")
            found += matches
    unique = list(dict.fromkeys(p.resolve() for p in found))
    if not unique:
        raise UserError("no metrics files to report on")
    return unique


def run_labels(metrics_file: Path) -> dict[str, Any]:
    """``method``, ``student``, ``seed`` of one run (see the module docstring)."""
    info_file = next((metrics_file.parent / name for name in LABEL_FILES if (metrics_file.parent / name).is_file()),
                     None)
    if info_file is not None:
        try:
            info = json.loads(info_file.read_text(encoding="utf-8"))
        except ValueError:
            raise UserError(f"{info_file} is not valid JSON") from None
        return {"method": str(info.get("method", "-")), "student": str(info.get("student", "-")),
                "seed": info.get("seed")}
    parts = metrics_file.parent.parts
    for i in range(len(parts) - 1, 1, -1):
        match = _SEED_DIR.match(parts[i])
        if match:
            return {"method": parts[i - 2], "student": parts[i - 1], "seed": int(match.group(1))}
    return {"method": metrics_file.parent.name, "student": "-", "seed": None}


def _load_metrics(path: Path) -> dict[str, float]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read metrics file {path}: {err}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a flat metrics object")
    return {k: float(v) for k, v in data.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0.0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def _format(mean: float, std: float, n: int, metric: str) -> str:
    digits = 1 if metric.endswith("_rank") else 4
    return f"{mean:.{digits}f}" if n == 1 else f"{mean:.{digits}f} ± {std:.{digits}f}"


def report(inputs: Sequence[str | Path] = DEFAULT_INPUTS, out: str | Path = DEFAULT_OUT) -> dict[str, Any]:
    """Aggregate the runs; write the report files; return ``{"runs": [...], "groups": [...]}``."""
    files = _find_metrics_files(inputs)
    runs = [{"path": str(f), **run_labels(f), "metrics": _load_metrics(f)} for f in files]

    grouped: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for run in runs:
        grouped[(run["method"], run["student"])].append(run)
    all_metrics = sorted({m for run in runs for m in run["metrics"]}, key=_natural)
    groups = []
    for (method, student), members in sorted(grouped.items()):
        stats = {}
        for metric in all_metrics:
            values = [r["metrics"][metric] for r in members if metric in r["metrics"]]
            if values:
                stats[metric] = (*mean_std(values), len(values))
        seeds = sorted({r["seed"] for r in members if r["seed"] is not None})
        groups.append({"method": method, "student": student, "n": len(members), "seeds": seeds, "stats": stats})

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _write_runs_csv(out / "runs.csv", runs, all_metrics)
    _write_table_csv(out / "table.csv", groups, all_metrics)
    plots = _plot_sections(out, groups, all_metrics)
    _write_markdown(out / "report.md", groups, all_metrics, plots, len(runs))
    return {"runs": runs, "groups": groups, "plots": [str(p) for p in plots]}


def _natural(name: str) -> list:
    """Sort key that puts r5 before r10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _section_metrics(all_metrics: list[str], prefix: str) -> list[str]:
    return [m for m in all_metrics if m.startswith(prefix + "/") and not _BOOKKEEPING.search(m)]


def _write_markdown(path: Path, groups: list[dict], all_metrics: list[str], plots: list[Path], n_runs: int) -> None:
    lines = ["# rdkd evaluation report", "",
             f"{n_runs} runs in {len(groups)} groups (method x student). Cells: mean ± sample std "
             "over the group's runs (seeds); a single run shows its value alone.", ""]
    for prefix, title in _SECTIONS:
        metrics = _section_metrics(all_metrics, prefix)
        if not metrics:
            continue
        lines += [f"## {title}", ""]
        header = ["method", "student", "n", "seeds"] + [m[len(prefix) + 1:] for m in metrics]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join(["---"] * 4 + ["---:"] * len(metrics)) + "|")
        for g in groups:
            cells = [_format(*g["stats"][m], m) if m in g["stats"] else "" for m in metrics]
            seeds = ",".join(str(s) for s in g["seeds"]) or "-"
            lines.append("| " + " | ".join([g["method"], g["student"], str(g["n"]), seeds] + cells) + " |")
        plot = next((p for p in plots if p.stem == prefix), None)
        if plot is not None:
            lines += ["", f"![{title}]({plot.name})"]
        lines.append("")
    atomic_write_text(path, "\n".join(lines))


def _write_runs_csv(path: Path, runs: list[dict], all_metrics: list[str]) -> None:
    rows = [[r["path"], r["method"], r["student"], "" if r["seed"] is None else r["seed"]]
            + [r["metrics"].get(m, "") for m in all_metrics] for r in runs]
    atomic_write_csv(path, ["path", "method", "student", "seed"] + all_metrics, rows)


def _write_table_csv(path: Path, groups: list[dict], all_metrics: list[str]) -> None:
    header = ["label", "method", "student", "n"]
    for m in all_metrics:
        header += [m, f"{m}__std"]
    rows = []
    for g in groups:
        row = [f"{g['method']} / {g['student']}", g["method"], g["student"], g["n"]]
        for m in all_metrics:
            row += list(g["stats"][m][:2]) if m in g["stats"] else ["", ""]
        rows.append(row)
    atomic_write_csv(path, header, rows)


def _plot_sections(out: Path, groups: list[dict], all_metrics: list[str]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    written = []
    for prefix, title in _SECTIONS:
        metrics = [m for m in _section_metrics(all_metrics, prefix) if not m.endswith("_rank")]
        if not metrics:
            continue
        width = 0.8 / max(1, len(groups))
        x = np.arange(len(metrics))
        fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(metrics) + 2), 4.0))
        for j, g in enumerate(groups):
            means = [g["stats"][m][0] if m in g["stats"] else np.nan for m in metrics]
            stds = [g["stats"][m][1] if m in g["stats"] else 0.0 for m in metrics]
            ax.bar(x + (j - (len(groups) - 1) / 2) * width, means, width, yerr=stds, capsize=2,
                   label=f"{g['method']} / {g['student']} (n={g['n']})")
        ax.set_xticks(x, [m[len(prefix) + 1:] for m in metrics], rotation=45, ha="right")
        ax.set_title(title)
        ax.legend(fontsize="small")
        fig.tight_layout()
        path = out / f"{prefix}.png"
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
        plt.close(fig)
        written.append(path)
    return written


