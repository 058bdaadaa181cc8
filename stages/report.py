"""Gather evaluation runs into one report (``rdkd report``).

Input: ``metrics.json`` files written by ``rdkd evaluate`` (files, folders searched
recursively, or glob patterns). Each run is labelled by the ``labels.json`` beside its
metrics file (:class:`rdkd.labels.RunLabels`: ``method``, ``student``, ``seed``,
``teacher_forwards``, ``embed_dim``), which ``rdkd evaluate`` writes with the labels of the
``rdkd train-student`` run it scored. A metrics file
without one is labelled by its path: a folder named ``seed<N>`` (or ``seed-<N>``,
``seed_<N>``) gives the seed and the two folders above it the student and the method
(``.../<method>/<student>/seed<N>/metrics.json``); otherwise the method is the metrics
file's folder name and the student ``-``.

What is compared:

- headline metrics: retrieval R@1 both ways, zero-shot top-1 of each task, and the fidelity
  of the image embeddings to the teacher (kNN@k overlap, linear CKA);
- runs distilled from different teacher sets (``teachers``: one cache's teacher or an
  ensemble's, ``a+b``) are told apart: the method becomes ``method [teachers]`` when the
  runs hold more than one teacher set;
- paired comparisons: for every two methods on the same student, the per-seed differences
  of each headline metric over the seeds both ran (same seed: same data order and
  initialisation, so the seed's own luck cancels), their mean and 95% confidence interval
  (Student's t with n - 1 degrees of freedom; none for one seed), and one sentence per pair
  and metric family; a difference is "distinguishable" when its interval excludes 0. The
  later method of :data:`rdkd.losses.PRESETS` comes first (``cliprd - clipkd``);
- the gap closed towards the teacher: (student - no-KD) / (teacher - no-KD), with no-KD the
  ``clip`` method of the same student at the same seeds and the teacher the run labelled
  ``teacher`` (when exactly one teacher is reported).

Output folder (default ``artifacts/report``), byte-identical for the same inputs:

- ``report.md``: the headline table (mean ± std, gap closed, embedding dim, teacher
  forwards of every run), the paired comparisons (sentences and a table), then per section
  (retrieval, zero-shot, fidelity) one table of every metric, a row per (method, student),
  each cell ``mean ± std`` over that row's runs (sample standard deviation, n - 1; a single
  run shows its value alone);
- ``paired.csv``: one row per (student, pair, headline metric): seeds, per-seed differences,
  mean, CI bounds, verdict;
- ``runs.csv``: one row per run (metrics path as given, labels, every metric);
- ``table.csv``: one row per (method, student): ``label``, ``n``, each metric's mean and
  ``<metric>__std`` (what ``dvc plots`` reads, e.g. ``x: label``, ``y: retrieval/i2t_r1``);
  (the CSVs' numbers at ``rdkd.metrics.WRITTEN_DIGITS`` significant digits, like metrics.json);
- ``retrieval.png``, ``zeroshot.png``, ``fidelity.png``: grouped bars with ±std error bars,
  the legend in its own row under the axes.
"""

from __future__ import annotations

import glob
import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any, List, Optional, Sequence

from rdkd.errors import UserError
from rdkd.files import atomic_write, atomic_write_csv, atomic_write_text
from rdkd.labels import LABELS_FILE, RunLabels
from rdkd.options import option

# rdkd.metrics (torch, FAISS) and rdkd.losses are imported where they are used, so that the
# command line learns this stage's options (ReportConfig) without them.

DEFAULT_OUT = Path("artifacts/report")
DEFAULT_INPUTS = ("artifacts/eval/**/metrics.json",)


def _inputs(words: list[str] | None) -> tuple[str, ...]:
    """The command line's input words; none given: :data:`DEFAULT_INPUTS`."""
    return tuple(words) if words else DEFAULT_INPUTS


@dataclass(frozen=True)
class ReportConfig:
    """``rdkd report``'s arguments: what :func:`report` takes."""

    inputs: tuple[str, ...] = option(DEFAULT_INPUTS, "metrics.json files, folders or glob patterns (default "
                                     f"{', '.join(DEFAULT_INPUTS)}).", argument=True, parse=_inputs,
                                     cli_type=Optional[List[str]], cli_default=None)
    out: Path = option(DEFAULT_OUT, "Report folder: report.md, runs.csv, table.csv, PNG plots.", "--out", "-o")


NO_KD_METHOD = "clip"  # the student trained on the task loss alone: the baseline of "gap closed"
TEACHER_METHOD = "teacher"
CONFIDENCE = 0.95
# Bookkeeping keys: counts of what was scored, not quality; kept in runs.csv, not in tables.
_BOOKKEEPING = re.compile(r"/(images|captions|skipped|approximate)$")
_SECTIONS = (("retrieval", "Retrieval"), ("zeroshot", "Zero-shot classification"), ("fidelity", "Geometry fidelity"))
_SEED_DIR = re.compile(r"^seed[-_]?(\d+)$")
# The labels file rdkd evaluate writes beside metrics.json, then its earlier name (still read).
# Headline metrics in the order they are shown: (pattern, family, label template).
_HEADLINE = (
    (re.compile(r"^retrieval/i2t_r1$"), "retrieval", "i2t R@1"),
    (re.compile(r"^retrieval/t2i_r1$"), "retrieval", "t2i R@1"),
    (re.compile(r"^zeroshot/(?P<task>[^/]+)/top1$"), "zero-shot", "{task} top-1"),
    (re.compile(r"^fidelity/knn(?P<k>\d+)_img$"), "fidelity", "kNN@{k} overlap"),
    (re.compile(r"^fidelity/cka_img$"), "fidelity", "CKA"),
)
# PNG metadata: matplotlib writes its version as "Software"; without it the bytes depend on
# the drawing alone.
_PNG_METADATA = {"Software": None}


# --- statistics -----------------------------------------------------------------------------


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0.0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def _t_central_probability(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with integer ``df``: the finite series for odd and even df
    (Abramowitz & Stegun, section 26.7), with theta = atan(t / sqrt(df))."""
    theta = math.atan(t / math.sqrt(df))
    cos2, sin = math.cos(theta) ** 2, math.sin(theta)
    if df % 2 == 0:  # sin(theta) * (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ... up to cos^(df-2))
        term = total = 1.0
        for k in range(1, df // 2):
            term *= cos2 * (2 * k - 1) / (2 * k)
            total += term
        return sin * total
    if df == 1:
        return 2 * theta / math.pi
    # 2/pi * (theta + sin(theta) * (cos + 2/3 cos^3 + 2*4/(3*5) cos^5 + ... up to cos^(df-2)))
    term = total = math.sqrt(cos2)
    for k in range(1, (df - 1) // 2):
        term *= cos2 * (2 * k) / (2 * k + 1)
        total += term
    return 2 / math.pi * (theta + sin * total)


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile (p > 0.5) of Student's t with ``df`` degrees of freedom, by
    bisection on the exact distribution function to a relative 1e-12
    (``t_quantile(0.975, 2)`` = 4.3027)."""
    if not 0.5 < p < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0.5 < p < 1 and df >= 1 (got p={p}, df={df})")
    central = 2 * p - 1
    low, high = 0.0, 1.0
    while _t_central_probability(high, df) < central:
        high *= 2
    while high - low > 1e-12 * high:
        mid = (low + high) / 2
        low, high = (mid, high) if _t_central_probability(mid, df) < central else (low, mid)
    return (low + high) / 2


def mean_ci(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float | None, float | None]:
    """Mean and the Student's t confidence interval of the mean, ``(mean, low, high)``;
    the bounds are None for a single value (no spread to estimate)."""
    n = len(values)
    mean, std = mean_std(values)
    if n < 2:
        return mean, None, None
    half = t_quantile(0.5 + confidence / 2, n - 1) * std / math.sqrt(n)
    return mean, mean - half, mean + half


# --- runs -----------------------------------------------------------------------------------


def _find_metrics_files(inputs: Sequence[str | Path]) -> list[Path]:
    """Metrics files as found (paths as given, relative stays relative), each once."""
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
    unique, seen = [], set()
    for path in found:  # each file once, as first spelled
        if path.resolve() not in seen:
            seen.add(path.resolve())
            unique.append(path)
    if not unique:
        raise UserError("no metrics files to report on")
    return unique


def run_labels(metrics_file: Path) -> dict[str, Any]:
    """``method``, ``student``, ``seed``, ``teacher_forwards``, ``embed_dim`` of one run (see
    the module docstring; None where unknown)."""
    labels_file = metrics_file.parent / LABELS_FILE
    if labels_file.is_file():
        return RunLabels.read(labels_file).to_dict()
    parts = metrics_file.parent.parts
    for i in range(len(parts) - 1, 1, -1):
        match = _SEED_DIR.match(parts[i])
        if match:
            return RunLabels(method=parts[i - 2], student=parts[i - 1], seed=int(match.group(1))).to_dict()
    return RunLabels(method=metrics_file.parent.name, student="-").to_dict()


def _load_metrics(path: Path) -> dict[str, float]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read metrics file {path}: {err}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a flat metrics object")
    return {k: float(v) for k, v in data.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _natural(name: str) -> list:
    """Sort key that puts r5 before r10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def headline_metrics(all_metrics: Sequence[str]) -> list[tuple[str, str, str]]:
    """``(metric, family, label)`` of the headline metrics present, in display order."""
    found = []
    for pattern, family, label in _HEADLINE:
        for metric in sorted(all_metrics, key=_natural):
            match = pattern.match(metric)
            if match:
                found.append((metric, family, label.format(**match.groupdict())))
    return found


def _method_order(methods: Sequence[str]) -> list[str]:
    """Presets in rdkd.losses order (simpler recipes first; a preset's single teachers, then
    its ensembles, by name), then other labels by name."""
    from rdkd.losses import PRESETS

    known = list(PRESETS)

    def key(method: str) -> tuple[int, int, str]:
        preset = method.split(" [")[0]  # "cliprd [a+b]": single teachers before their ensembles
        return (known.index(preset) if preset in known else len(known), method.count("+"), method)

    return sorted(methods, key=key)


def _by_teacher_set(runs: list[dict]) -> list[dict]:
    """The runs, each distilled run's method labelled ``method [teachers]`` when the runs
    come from more than one teacher set (single teachers and ensembles side by side), so
    that they are grouped and paired apart; otherwise as they are."""
    sets = {run.get("teachers") for run in runs if run.get("teachers")}
    if len(sets) > 1:
        for run in runs:
            if run.get("teachers") and run["method"] != TEACHER_METHOD:
                run["method"] = f"{run['method']} [{run['teachers']}]"
    return runs


# --- comparisons ----------------------------------------------------------------------------


def _by_seed(runs: list[dict]) -> dict[tuple[str, str], dict[int, dict]]:
    """(method, student) -> seed -> run, for runs with a seed; two runs with the same three
    labels cannot be paired, so that is an error."""
    table: dict[tuple[str, str], dict[int, dict]] = defaultdict(dict)
    for run in runs:
        if run["seed"] is None or run["method"] == TEACHER_METHOD:
            continue
        seeds = table[(run["method"], run["student"])]
        if run["seed"] in seeds:
            raise UserError(f"two runs are labelled {run['method']} / {run['student']} / seed {run['seed']}: "
                            f"{seeds[run['seed']]['path']} and {run['path']}; report them separately")
        seeds[run["seed"]] = run
    return table


def paired_comparisons(runs: list[dict], headline: list[tuple[str, str, str]]) -> list[dict]:
    """One row per (student, pair of methods, headline metric) over the seeds both methods
    ran: ``seeds``, per-seed ``differences`` (first method minus second), ``mean``, ``low``,
    ``high`` (95% CI, None for one seed), ``distinguishable`` (None for one seed)."""
    table = _by_seed(runs)
    rows = []
    for student in sorted({s for _, s in table}):
        methods = _method_order([m for m, s in table if s == student])
        for earlier, later in combinations(methods, 2):
            a, b = table[(later, student)], table[(earlier, student)]
            for metric, family, label in headline:
                seeds = sorted(s for s in a.keys() & b.keys()
                               if metric in a[s]["metrics"] and metric in b[s]["metrics"])
                if not seeds:
                    continue
                diffs = [a[s]["metrics"][metric] - b[s]["metrics"][metric] for s in seeds]
                mean, low, high = mean_ci(diffs)
                rows.append({"student": student, "a": later, "b": earlier, "metric": metric, "family": family,
                             "label": label, "seeds": seeds, "differences": diffs, "mean": mean, "low": low,
                             "high": high,
                             "distinguishable": None if low is None else bool(low > 0 or high < 0)})
    return rows


def gap_closed(runs: list[dict], groups: list[dict], headline: list[tuple[str, str, str]]) -> dict:
    """(method, student) -> metric -> (student - no-KD) / (teacher - no-KD) over the seeds
    the method shares with the no-KD run of its student. Empty unless exactly one teacher
    is reported; a metric is left out where the teacher does not beat no-KD at all."""
    teachers = [g for g in groups if g["method"] == TEACHER_METHOD]
    if len(teachers) != 1:
        return {}
    teacher = teachers[0]["stats"]
    table = _by_seed(runs)
    gaps: dict[tuple[str, str], dict[str, float]] = {}
    for (method, student), seeds in table.items():
        no_kd = table.get((NO_KD_METHOD, student), {})
        for metric, _, _ in headline:
            shared = [s for s in seeds if s in no_kd and metric in seeds[s]["metrics"]
                      and metric in no_kd[s]["metrics"]]
            if not shared or metric not in teacher:
                continue
            mine = sum(seeds[s]["metrics"][metric] for s in shared) / len(shared)
            base = sum(no_kd[s]["metrics"][metric] for s in shared) / len(shared)
            room = teacher[metric][0] - base
            if room > 1e-12:
                gaps.setdefault((method, student), {})[metric] = (mine - base) / room
    return gaps


def _interval(row: dict) -> str:
    if row["low"] is None:
        return f"{row['mean']:+.3f}"
    return f"{row['mean']:+.3f} [{row['low']:+.3f}, {row['high']:+.3f}]"


def _verdict(row: dict) -> str:
    if row["distinguishable"] is None:
        return "one seed, no CI"
    return "distinguishable" if row["distinguishable"] else "not distinguishable"


def _seed_phrase(seeds: Sequence[int]) -> str:
    return f"over {len(seeds)} seed{'s' if len(seeds) != 1 else ''} ({', '.join(map(str, seeds))})"


def pair_sentences(rows: list[dict]) -> list[str]:
    """One sentence per (student, pair, metric family), e.g. ``cliprd - clipkd on
    demo-student-vit, retrieval over 3 seeds (0, 1, 2): i2t R@1 +0.006 [-0.028, +0.040],
    not distinguishable; ...``."""
    families: dict[tuple[str, str, str, str], list[dict]] = defaultdict(list)
    for row in rows:
        families[(row["student"], row["a"], row["b"], row["family"])].append(row)
    sentences = []
    for (student, a, b, family), members in families.items():
        same_seeds = all(r["seeds"] == members[0]["seeds"] for r in members)
        head = f"{a} - {b} on {student}, {family}" + (f" {_seed_phrase(members[0]['seeds'])}" if same_seeds else "")
        clauses = [f"{r['label']} {_interval(r)}"
                   + (f" {_seed_phrase(r['seeds'])}" if not same_seeds else "")
                   + ("" if r["distinguishable"] is None else f", {_verdict(r)}") for r in members]
        tail = ""
        sizes = {len(r["seeds"]) for r in members}
        if 1 in sizes:
            tail = " (one seed: a difference without a confidence interval, no verdict)"
        elif 2 in sizes:
            tail = f" (2 seeds: t = {t_quantile(0.5 + CONFIDENCE / 2, 1):.1f}, so the intervals are very wide)"
        sentences.append(f"{head}: {'; '.join(clauses)}.{tail}")
    return sentences


# --- the stage ------------------------------------------------------------------------------


def report(inputs: Sequence[str | Path] = DEFAULT_INPUTS, out: str | Path = DEFAULT_OUT) -> dict[str, Any]:
    """Aggregate and compare the runs; write the report files; return ``{"runs", "groups",
    "paired", "gap_closed", "plots"}``."""
    files = _find_metrics_files(inputs)
    runs = _by_teacher_set([{"path": f.as_posix(), **run_labels(f), "metrics": _load_metrics(f)} for f in files])

    grouped: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for run in runs:
        grouped[(run["method"], run["student"])].append(run)
    all_metrics = sorted({m for run in runs for m in run["metrics"]}, key=_natural)
    groups = []
    order = _method_order(sorted({method for method, _ in grouped}))
    # rows by student, methods in preset order within a student, the teacher last
    for (method, student), members in sorted(grouped.items(), key=lambda item: (
            item[0][0] == TEACHER_METHOD, item[0][1], order.index(item[0][0]))):
        members.sort(key=lambda r: (r["seed"] is None, r["seed"] if r["seed"] is not None else 0, r["path"]))
        stats = {}
        for metric in all_metrics:
            values = [r["metrics"][metric] for r in members if metric in r["metrics"]]
            if values:
                stats[metric] = (*mean_std(values), len(values))
        seeds = sorted({r["seed"] for r in members if r["seed"] is not None})
        groups.append({"method": method, "student": student, "n": len(members), "seeds": seeds, "stats": stats,
                       "embed_dims": sorted({r["embed_dim"] for r in members if r["embed_dim"] is not None}),
                       "teacher_forwards": [r["teacher_forwards"] for r in members]})
    headline = headline_metrics(all_metrics)
    paired = paired_comparisons(runs, headline)
    gaps = gap_closed(runs, groups, headline)

    out = Path(out)
    _write_runs_csv(out / "runs.csv", runs, all_metrics)
    _write_table_csv(out / "table.csv", groups, all_metrics)
    _write_paired_csv(out / "paired.csv", paired)
    plots = _plot_sections(out, groups, all_metrics)
    _write_markdown(out / "report.md", groups, all_metrics, headline, paired, gaps, plots, len(runs))
    return {"runs": runs, "groups": groups, "paired": paired, "gap_closed": gaps, "plots": [str(p) for p in plots]}


# --- writing --------------------------------------------------------------------------------


def _section_metrics(all_metrics: list[str], prefix: str) -> list[str]:
    return [m for m in all_metrics if m.startswith(prefix + "/") and not _BOOKKEEPING.search(m)]


def _format(mean: float, std: float, n: int, metric: str) -> str:
    digits = 1 if metric.endswith("_rank") else 4
    return f"{mean:.{digits}f}" if n == 1 else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _row(cells: Sequence[Any]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _joined(values: Sequence[Any]) -> str:
    return ",".join("-" if v is None else str(v) for v in values) or "-"


def _headline_lines(groups: list[dict], headline: list[tuple[str, str, str]], gaps: dict) -> list[str]:
    lines = ["## Headline metrics", "",
             "Mean ± sample std over each row's seeds. *gap*: the gap closed towards the teacher, "
             f"(student - no-KD) / (teacher - no-KD), no-KD being the `{NO_KD_METHOD}` run of the same "
             "student at the same seeds (blank without such a run or where the teacher is not ahead "
             "of it). *dim*: embedding width. *teacher forwards*: forward passes "
             "of an open_clip model other than the student during each run's training, in seed order "
             "(counted by `rdkd train-student`; 0: the student learned from the teacher cache alone).", ""]
    header = ["method", "student", "dim", "n", "seeds", "teacher forwards"]
    for _, _, label in headline:
        header += [label] + (["gap"] if gaps else [])
    lines.append(_row(header))
    lines.append("|" + "|".join(["---"] * 6 + ["---:"] * (len(header) - 6)) + "|")
    for g in groups:
        cells = [g["method"], g["student"], _joined(g["embed_dims"]), g["n"], _joined(g["seeds"]),
                 _joined(g["teacher_forwards"])]
        for metric, _, _ in headline:
            cells.append(_format(*g["stats"][metric], metric) if metric in g["stats"] else "")
            if gaps:
                gap = gaps.get((g["method"], g["student"]), {}).get(metric)
                cells.append("" if gap is None else f"{gap:.0%}")
        lines.append(_row(cells))
    if not gaps:
        lines += ["", f"(No gap closed: it needs exactly one run labelled `{TEACHER_METHOD}`.)"]
    return lines + [""]


def _paired_lines(paired: list[dict]) -> list[str]:
    quantiles = ", ".join(f"n={n}: t={t_quantile(0.5 + CONFIDENCE / 2, n - 1):.2f}" for n in (2, 3, 5))
    lines = ["## Paired comparisons", "",
             "For two methods on the same student, the difference (first minus second) of each headline "
             "metric at every seed both ran (the same seed gives both the same data order and "
             "initialisation), its mean and 95% confidence interval: mean ± t(0.975, n - 1) · s / √n "
             f"(Student's t over the n seeds; {quantiles}). One seed gives no interval; two give a very "
             "wide one; a zero-width one means the same difference at every seed. *Distinguishable*: "
             "the interval excludes 0.", ""]
    if not paired:
        return lines + ["No two methods share a student and a seed.", ""]
    lines += [f"- {sentence}" for sentence in pair_sentences(paired)]
    lines += ["", _row(["student", "comparison", "metric", "n", "per-seed differences", "mean [95% CI]", "verdict"]),
              "|---|---|---|---:|---|---|---|"]
    for r in paired:
        lines.append(_row([r["student"], f"{r['a']} - {r['b']}", r["label"], len(r["seeds"]),
                           ", ".join(f"{d:+.3f}" for d in r["differences"]), _interval(r), _verdict(r)]))
    return lines + [""]


def _write_markdown(path: Path, groups: list[dict], all_metrics: list[str], headline: list[tuple[str, str, str]],
                    paired: list[dict], gaps: dict, plots: list[Path], n_runs: int) -> None:
    lines = ["# rdkd evaluation report", "",
             f"{n_runs} runs in {len(groups)} groups (method x student).", ""]
    if headline:
        lines += _headline_lines(groups, headline, gaps)
    lines += _paired_lines(paired)
    lines += ["## Every metric", "",
              "Cells: mean ± sample std over the group's runs (seeds); a single run shows its value alone.", ""]
    for prefix, title in _SECTIONS:
        metrics = _section_metrics(all_metrics, prefix)
        if not metrics:
            continue
        lines += [f"### {title}", ""]
        lines.append(_row(["method", "student", "n", "seeds"] + [m[len(prefix) + 1:] for m in metrics]))
        lines.append("|" + "|".join(["---"] * 4 + ["---:"] * len(metrics)) + "|")
        for g in groups:
            cells = [_format(*g["stats"][m], m) if m in g["stats"] else "" for m in metrics]
            lines.append(_row([g["method"], g["student"], g["n"], _joined(g["seeds"])] + cells))
        plot = next((p for p in plots if p.stem == prefix), None)
        if plot is not None:
            lines += ["", f"![{title}]({plot.name})"]
        lines.append("")
    atomic_write_text(path, "\n".join(lines))


def _written(cell: Any) -> Any:
    """A CSV cell: floats at the digits rdkd writes every metric with (``rdkd.metrics.as_written``)."""
    from rdkd.metrics import as_written

    return as_written(cell) if isinstance(cell, float) else cell


def _write_runs_csv(path: Path, runs: list[dict], all_metrics: list[str]) -> None:
    labels = ["method", "student", "seed", "teacher_forwards", "embed_dim", "teachers"]
    rows = [[r["path"]] + ["" if r[k] is None else r[k] for k in labels]
            + [r["metrics"].get(m, "") for m in all_metrics] for r in runs]
    atomic_write_csv(path, ["path"] + labels + all_metrics, [[_written(c) for c in row] for row in rows])


def _write_table_csv(path: Path, groups: list[dict], all_metrics: list[str]) -> None:
    header = ["label", "method", "student", "n"]
    for m in all_metrics:
        header += [m, f"{m}__std"]
    rows = []
    for g in groups:
        row = [f"{g['method']} / {g['student']}", g["method"], g["student"], g["n"]]
        for m in all_metrics:
            row += list(g["stats"][m][:2]) if m in g["stats"] else ["", ""]
        rows.append([_written(c) for c in row])
    atomic_write_csv(path, header, rows)


def _write_paired_csv(path: Path, paired: list[dict]) -> None:
    from rdkd.metrics import as_written

    header = ["student", "a", "b", "metric", "n", "seeds", "differences", "mean", "ci_low", "ci_high",
              "distinguishable"]
    rows = [[r["student"], r["a"], r["b"], r["metric"], len(r["seeds"]), " ".join(map(str, r["seeds"])),
             " ".join(repr(as_written(d)) for d in r["differences"]), _written(r["mean"]),
             "" if r["low"] is None else _written(r["low"]), "" if r["high"] is None else _written(r["high"]),
             "" if r["distinguishable"] is None else str(r["distinguishable"]).lower()] for r in paired]
    atomic_write_csv(path, header, rows)


def _plot_sections(out: Path, groups: list[dict], all_metrics: list[str]) -> list[Path]:
    import matplotlib.pyplot as plt

    written = []
    for prefix, title in _SECTIONS:
        metrics = [m for m in _section_metrics(all_metrics, prefix) if not m.endswith("_rank")]
        if not metrics:
            continue
        fig = bar_chart(groups, metrics, prefix, title)
        path = out / f"{prefix}.png"
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png", metadata=_PNG_METADATA))
        plt.close(fig)
        written.append(path)
    return written


def bar_chart(groups: list[dict], metrics: list[str], prefix: str, title: str):
    """Grouped bars (a group per (method, student), ±std error bars) of one section, with
    the legend in rows of its own under the axes and tick labels: it never covers a bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    width = 0.8 / max(1, len(groups))
    x = np.arange(len(metrics))
    # constrained layout reserves the space the "outside" legend needs below the axes
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(metrics) + 2), 4.0 + 0.25 * math.ceil(len(groups) / 2)),
                           layout="constrained")
    for j, g in enumerate(groups):
        means = [g["stats"][m][0] if m in g["stats"] else np.nan for m in metrics]
        stds = [g["stats"][m][1] if m in g["stats"] else 0.0 for m in metrics]
        ax.bar(x + (j - (len(groups) - 1) / 2) * width, means, width, yerr=stds, capsize=2,
               label=f"{g['method']} / {g['student']} (n={g['n']})")
    ax.set_xticks(x, [m[len(prefix) + 1:] for m in metrics], rotation=45, ha="right")
    ax.set_title(title)
    renderer = fig.canvas.get_renderer()
    for columns in range(min(3, len(groups)), 0, -1):  # as many columns as fit the figure's width
        legend = fig.legend(loc="outside lower center", ncol=columns, fontsize="small", frameon=False)
        if columns == 1 or legend.get_window_extent(renderer).width <= fig.bbox.width:
            break
        legend.remove()
    return fig
