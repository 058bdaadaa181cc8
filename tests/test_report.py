"""`rdkd report`: paired comparisons over seeds, the gap closed, byte-stable outputs, plots."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rdkd.stages.report import bar_chart, mean_ci, report, t_quantile

# i2t R@1 per seed: (clip, clipkd, cliprd) of the vit student; the teacher scores 0.30.
VIT = {0: (0.02, 0.14, 0.15), 1: (0.01, 0.12, 0.14), 2: (0.03, 0.16, 0.15)}


def _write_run(root: Path, labels: dict, metrics: dict) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "metrics.json").write_text(json.dumps(metrics))
    (root / "labels.json").write_text(json.dumps(labels))


def _demo_runs(root: Path) -> None:
    """3 methods x 3 seeds of a 128-d student, clipkd/cliprd at seed 0 of a 96-d one, a teacher."""
    for seed, values in VIT.items():
        for method, r1 in zip(("clip", "clipkd", "cliprd"), values):
            _write_run(root / method / "vit" / f"seed{seed}",
                       {"method": method, "student": "vit", "seed": seed, "teacher_forwards": 0, "embed_dim": 128},
                       {"retrieval/i2t_r1": r1, "retrieval/t2i_r1": r1 / 2, "retrieval/images": 100,
                        "zeroshot/shape/top1": 0.5, "fidelity/knn10_img": r1 * 3, "fidelity/cka_img": 0.5 + r1})
    for method, r1 in (("clipkd", 0.10), ("cliprd", 0.11)):
        _write_run(root / method / "resnet" / "seed0",
                   {"method": method, "student": "resnet", "seed": 0, "teacher_forwards": 0, "embed_dim": 96},
                   {"retrieval/i2t_r1": r1})
    _write_run(root / "teacher", {"method": "teacher", "student": "big", "seed": 0, "teacher_forwards": 0,
                                  "embed_dim": 128},
               {"retrieval/i2t_r1": 0.30, "retrieval/t2i_r1": 0.15, "zeroshot/shape/top1": 0.6,
                "fidelity/knn10_img": 1.0, "fidelity/cka_img": 1.0})


def test_t_quantiles_against_tables() -> None:
    # two-sided 95% critical values of Student's t (any statistics table)
    for df, expected in ((1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764), (9, 2.2622), (30, 2.0423)):
        assert t_quantile(0.975, df) == pytest.approx(expected, abs=1e-4), df
    assert t_quantile(0.95, 5) == pytest.approx(2.0150, abs=1e-4)
    with pytest.raises(ValueError):
        t_quantile(0.975, 0)


def test_mean_ci_by_hand() -> None:
    # mean 0.03, s = sqrt((0.02^2 + 0.01^2 + 0.03^2) / 2) = sqrt(7e-4), half width t_{.975,2} s / sqrt(3)
    mean, low, high = mean_ci([0.01, 0.02, 0.06])
    half = 4.302653 * math.sqrt(7e-4) / math.sqrt(3)
    assert mean == pytest.approx(0.03)
    assert (low, high) == pytest.approx((0.03 - half, 0.03 + half), abs=1e-6)
    assert mean_ci([0.2]) == (0.2, None, None)


def test_paired_comparisons_gap_closed_and_sentences(tmp_path: Path) -> None:
    _demo_runs(tmp_path / "eval")
    result = report([tmp_path / "eval"], tmp_path / "report")
    rows = {(r["student"], r["a"], r["b"], r["metric"]): r for r in result["paired"]}

    # later preset minus earlier one, per seed, over the shared seeds
    kd = rows[("vit", "cliprd", "clipkd", "retrieval/i2t_r1")]
    diffs = [VIT[s][2] - VIT[s][1] for s in (0, 1, 2)]  # +0.01, +0.02, -0.01
    assert kd["seeds"] == [0, 1, 2] and kd["differences"] == pytest.approx(diffs)
    mean, sd = sum(diffs) / 3, math.sqrt(sum((d - sum(diffs) / 3) ** 2 for d in diffs) / 2)
    half = 4.302653 * sd / math.sqrt(3)
    assert (kd["mean"], kd["low"], kd["high"]) == pytest.approx((mean, mean - half, mean + half), abs=1e-6)
    assert kd["distinguishable"] is False
    clip = rows[("vit", "cliprd", "clip", "retrieval/i2t_r1")]  # +0.13, +0.13, +0.12: clearly above 0
    assert clip["distinguishable"] is True and clip["low"] > 0
    assert ("vit", "clip", "cliprd", "retrieval/i2t_r1") not in rows
    # one shared seed: a difference, no interval, no verdict; no pair with a missing metric
    resnet = rows[("resnet", "cliprd", "clipkd", "retrieval/i2t_r1")]
    assert resnet["differences"] == pytest.approx([0.01]) and resnet["low"] is None
    assert resnet["distinguishable"] is None
    assert ("resnet", "cliprd", "clipkd", "retrieval/t2i_r1") not in rows
    assert not any(r["student"] == "big" for r in result["paired"])

    # gap closed = (student - no-KD) / (teacher - no-KD) over the seeds shared with clip
    gap = result["gap_closed"][("cliprd", "vit")]["retrieval/i2t_r1"]
    assert gap == pytest.approx((0.44 / 3 - 0.02) / (0.30 - 0.02))
    assert result["gap_closed"][("clip", "vit")]["retrieval/i2t_r1"] == pytest.approx(0.0)
    assert ("cliprd", "resnet") not in result["gap_closed"]  # no clip run of the resnet
    md = (tmp_path / "report" / "report.md").read_text()
    low, high = kd["low"], kd["high"]
    assert (f"- cliprd - clipkd on vit, retrieval over 3 seeds (0, 1, 2): i2t R@1 {mean:+.3f} "
            f"[{low:+.3f}, {high:+.3f}], not distinguishable;") in md
    assert "- cliprd - clipkd on resnet, retrieval over 1 seed (0): i2t R@1 +0.010. (one seed" in md
    assert "- cliprd - clip on vit, retrieval over 3 seeds (0, 1, 2): i2t R@1 +0.127 [" in md
    assert "| cliprd | vit | 128 | 3 | 0,1,2 | 0,0,0 | 0.1467 ± 0.0058 | 45% |" in md
    assert "| cliprd | resnet | 96 | 1 | 0 | 0 | 0.1100 |  |" in md

    with open(tmp_path / "report" / "paired.csv") as f:
        paired = list(csv.DictReader(f))
    assert len(paired) == len(result["paired"])
    row = next(r for r in paired if r["student"] == "vit" and r["a"] == "cliprd" and r["b"] == "clipkd"
               and r["metric"] == "retrieval/i2t_r1")
    assert row["seeds"] == "0 1 2" and row["distinguishable"] == "false"
    assert float(row["ci_low"]) == float(f"{low:.6g}")  # the CSVs' numbers at 6 significant digits


def test_shape_zero_shot_gap(tmp_path: Path) -> None:
    _demo_runs(tmp_path / "eval")
    result = report([tmp_path / "eval"], tmp_path / "report")
    # every student scores 0.5 on shape, the teacher 0.6: the gap closed is 0 for each
    assert result["gap_closed"][("cliprd", "vit")].get("zeroshot/shape/top1") == pytest.approx(0.0)


def test_two_runs_with_the_same_labels_are_refused(tmp_path: Path) -> None:
    from rdkd.errors import UserError

    labels = {"method": "clip", "student": "vit", "seed": 0}
    _write_run(tmp_path / "a", labels, {"retrieval/i2t_r1": 0.1})
    _write_run(tmp_path / "b", labels, {"retrieval/i2t_r1": 0.2})
    with pytest.raises(UserError, match="two runs are labelled clip / vit / seed 0"):
        report([tmp_path / "a", tmp_path / "b"], tmp_path / "report")


def test_report_bytes_do_not_depend_on_where_or_when(tmp_path: Path, monkeypatch) -> None:
    _demo_runs(tmp_path / "eval")
    monkeypatch.chdir(tmp_path)
    report(["eval"], "one")
    report([str(tmp_path / "eval")], tmp_path / "two")  # the same runs, spelled absolute
    report(["eval"], "three")
    names = sorted(os.listdir("one"))
    assert names == ["fidelity.png", "paired.csv", "report.md", "retrieval.png", "runs.csv", "table.csv",
                     "zeroshot.png"]
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "three" / name).read_bytes(), name
        if name != "runs.csv":  # paths as given
            assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    with open("one/runs.csv") as f:
        runs = list(csv.DictReader(f))
    assert {r["path"] for r in runs} >= {"eval/teacher/metrics.json", "eval/cliprd/vit/seed2/metrics.json"}
    assert all(r["teacher_forwards"] == "0" for r in runs)
    png = (tmp_path / "one" / "retrieval.png").read_bytes()
    assert b"tEXt" not in png and b"matplotlib" not in png.lower()  # no software/version text chunk


def test_legend_sits_outside_the_axes(tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    groups = [{"method": f"m{i}", "student": "a-long-student-name", "n": 3,
               "stats": {"fidelity/cka_img": (0.9, 0.05, 3), "fidelity/knn10_img": (0.8, 0.1, 3)}}
              for i in range(7)]
    fig = bar_chart(groups, ["fidelity/cka_img", "fidelity/knn10_img"], "fidelity", "Geometry fidelity")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    axes_box = fig.axes[0].get_window_extent(renderer)
    legend_box = fig.legends[0].get_window_extent(renderer)
    ticks_box = fig.axes[0].get_tightbbox(renderer)  # axes with its tick labels and title
    assert legend_box.y1 <= axes_box.y0 and legend_box.y1 <= ticks_box.y0 + 1  # under the tick labels
    assert fig.bbox.contains(legend_box.x0, legend_box.y0) and fig.bbox.contains(legend_box.x1, legend_box.y1)
    plt.close(fig)


def test_students_of_other_teacher_sets_are_grouped_and_paired_apart(tmp_path) -> None:
    """cliprd from teacher a, from b and from a+b over seeds 0-2 (and no-KD clip): three
    methods, paired seed by seed; one teacher set alone keeps the plain method names."""
    r1 = {"a": (0.10, 0.12, 0.11), "b": (0.08, 0.09, 0.07), "a+b": (0.13, 0.12, 0.14)}
    for teachers, values in r1.items():
        for seed, value in enumerate(values):
            _write_run(tmp_path / "runs" / teachers / f"seed{seed}",
                       {"method": "cliprd", "student": "vit", "seed": seed, "teacher_forwards": 0,
                        "embed_dim": 128, "teachers": teachers}, {"retrieval/i2t_r1": value})
    for seed in range(3):
        _write_run(tmp_path / "runs" / "clip" / f"seed{seed}",
                   {"method": "clip", "student": "vit", "seed": seed, "teacher_forwards": 0, "embed_dim": 128,
                    "teachers": None}, {"retrieval/i2t_r1": 0.02})
    result = report([tmp_path / "runs"], tmp_path / "out")
    assert [g["method"] for g in result["groups"]] == ["clip", "cliprd [a]", "cliprd [b]", "cliprd [a+b]"]
    pair = next(r for r in result["paired"] if (r["a"], r["b"]) == ("cliprd [a+b]", "cliprd [a]"))
    assert pair["seeds"] == [0, 1, 2]
    assert pair["differences"] == pytest.approx([0.03, 0.0, 0.03])
    alone = report([tmp_path / "runs" / "a", tmp_path / "runs" / "clip"], tmp_path / "alone")
    assert [g["method"] for g in alone["groups"]] == ["clip", "cliprd"]
    with open(tmp_path / "out" / "runs.csv") as f:
        assert {row["teachers"] for row in csv.DictReader(f)} == {"a", "b", "a+b", ""}


def test_command_line_is_built_without_torch_faiss_or_open_clip() -> None:
    """`rdkd report` learns its arguments from ReportConfig without the heavy libraries."""
    check = ("import sys, typer\n"
             "from rdkd.cli import registered_app\n"
             "typer.main.get_command(registered_app(['report']))\n"
             "print(sorted({'torch', 'faiss', 'open_clip'} & set(sys.modules)))\n")
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
