"""The demo chain of dvc.yaml end to end under `dvc repro`, at the `quick` profile."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DVC_TIMEOUT_S = 900


def _merge(base: dict, overrides: dict) -> dict:
    """params.yaml with params-quick.yaml laid over it (nested keys replaced one by one)."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merged[key] = _merge(base[key], value)
        else:
            merged[key] = value
    return merged


def _dvc(args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    # the stage commands call `rdkd`: the one installed beside this interpreter, this checkout's
    env = dict(os.environ, DVC_NO_ANALYTICS="1", OMP_NUM_THREADS="1",
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=env, timeout=timeout,
                          capture_output=True, text=True)


def _quick_project(work: Path) -> dict:
    """A DVC project in ``work``: this repo's dvc.yaml with params-quick.yaml laid over params.yaml,
    and the code folders its stages list as deps (the commands run the installed rdkd)."""
    work.mkdir(parents=True)
    shutil.copy(REPO / "dvc.yaml", work / "dvc.yaml")
    shutil.copy(REPO / ".dvcignore", work / ".dvcignore")  # the dataset index cache beside the demo data
    for code in ("pipeline", "stages", "cache"):
        shutil.copytree(REPO / code, work / code, ignore=shutil.ignore_patterns("__pycache__"))
    params = _merge(yaml.safe_load((REPO / "params.yaml").read_text()),
                    yaml.safe_load((REPO / "params-quick.yaml").read_text()))
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert _dvc(["init", "--no-scm", "-q"], work).returncode == 0
    assert _dvc(["config", "core.analytics", "false"], work).returncode == 0
    return params


def _repro(work: Path) -> str:
    repro = _dvc(["repro"], work, timeout=DVC_TIMEOUT_S)
    assert repro.returncode == 0, repro.stdout[-4000:] + repro.stderr[-4000:]
    # reading the data wrote its index cache there, which leaves every stage up to date
    assert list((work / "artifacts/demo/data").rglob(".rdkd-index"))
    status = _dvc(["status", "--json"], work)
    assert status.returncode == 0 and json.loads(status.stdout) == {}, status.stdout
    return repro.stdout


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[Path, dict]:
    """The quick profile of the demo chain, run once by `dvc repro` (a few minutes)."""
    work = tmp_path_factory.mktemp("quick") / "demo"
    params = _quick_project(work)
    _repro(work)
    return work, params


@pytest.mark.slow
@pytest.mark.timeout(DVC_TIMEOUT_S + 300)  # the fixture's repro included
def test_quick_profile_of_the_demo_chain(quick_run) -> None:
    work, params = quick_run
    # One cache fed every student; the teacher ran only in extract-teacher.
    runs = list((work / "artifacts/demo/students").glob("*/*/seed*/run.json"))
    matrix = params["matrix"]
    expected = len(matrix["loss"]) * len(matrix["student"]) * len(matrix["seed"])
    assert len(runs) == expected
    for run in runs:
        assert json.loads(run.read_text())["teacher_forwards"] == 0
    dims = {json.loads(r.read_text())["student"]: json.loads(r.read_text())["embed_dim"] for r in runs}
    assert dims == {"demo-student-vit": 128}
    # the logs went beside the run folders, not into what DVC hashes
    assert not list((work / "artifacts/demo/students").glob("*/*/seed*/logs"))
    assert len(list((work / "artifacts/demo/logs/students").glob("*/*/seed*/metrics.jsonl"))) == expected

    report = (work / "reports/demo/report.md").read_text()
    for preset in params["matrix"]["loss"] + ["teacher"]:
        assert preset in report
    assert "## Paired comparisons" in report
    assert "cliprd - clip on demo-student-vit, retrieval over 2 seeds (0, 1): i2t R@1 " in report
    for plot in ("retrieval.png", "zeroshot.png", "fidelity.png"):
        assert (work / "reports/demo" / plot).stat().st_size > 0

    metrics = _dvc(["metrics", "show", "--json"], work)
    assert metrics.returncode == 0, metrics.stderr
    assert "retrieval/i2t_r1" in metrics.stdout

    # The demo teacher is a plain open_clip model: it loads without rdkd.
    export = work / "artifacts/demo/teacher/export"
    load = subprocess.run([sys.executable, "-c", (
        "import sys, open_clip, torch\n"
        f"model, _, preprocess = open_clip.create_model_and_transforms('local-dir:{export}')\n"
        f"tokens = open_clip.get_tokenizer('local-dir:{export}')(['a red circle'])\n"
        "print(model.encode_text(tokens).shape[-1])\n"
        "assert 'rdkd' not in sys.modules\n")], capture_output=True, text=True, timeout=120)
    assert load.returncode == 0, load.stderr[-2000:]
    assert load.stdout.strip() == "128"


@pytest.mark.slow
@pytest.mark.timeout(2 * DVC_TIMEOUT_S + 300)  # two repros from clean when it runs alone
def test_quick_profile_reproduces_itself_byte_for_byte(quick_run, tmp_path: Path) -> None:
    first, _ = quick_run
    # A second repro in the same folder has nothing to do: every hashed output is unchanged.
    status = _dvc(["status"], first)
    assert status.returncode == 0 and "up to date" in status.stdout, status.stdout
    assert "Running stage" not in _repro(first)

    # The same chain from clean in another folder (other absolute paths, other times, other
    # process ids) writes the same bytes: the same dvc.lock, the same report.
    second = tmp_path / "elsewhere" / "demo"
    _quick_project(second)
    _repro(second)
    assert (second / "dvc.lock").read_text() == (first / "dvc.lock").read_text()
    for path in sorted((first / "reports/demo").iterdir()):
        assert path.read_bytes() == (second / "reports/demo" / path.name).read_bytes(), path.name
    # checkpoints included (every RNG state they record is seeded)
    for path in sorted((first / "artifacts/demo/students").rglob("*.pt")):
        assert path.read_bytes() == (second / path.relative_to(first)).read_bytes(), path

    # The code is a dep: a change to the losses makes the training stages (and what follows
    # them) changed, not the data generator's.
    losses = second / "pipeline" / "losses.py"
    losses.write_text(losses.read_text() + "# a change\n")
    status = _dvc(["status", "--json"], second)
    changed = json.loads(status.stdout)
    assert "demo_teacher" in changed and any(stage.startswith("train@") for stage in changed), changed
    assert "demo_data" not in changed


@pytest.mark.slow
@pytest.mark.timeout(DVC_TIMEOUT_S + 300)
def test_ensemble_profile_distils_one_student_from_two_caches(quick_run) -> None:
    """experiments/ensemble on the quick chain: a second architecture from cache A; teacher B
    pretrained and extracted, students from B alone and from A + B, and a report that pairs
    them with the A-alone runs."""
    work, params = quick_run
    profile = work / "experiments" / "ensemble"
    profile.mkdir(parents=True)
    shutil.copy(REPO / "experiments/ensemble/dvc.yaml", profile / "dvc.yaml")
    settings = yaml.safe_load((REPO / "experiments/ensemble/params.yaml").read_text())
    settings["ensemble"]["seed"] = params["matrix"]["seed"]  # the quick chain's seeds
    (profile / "params.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    repro = _dvc(["repro", "experiments/ensemble/dvc.yaml"], work, timeout=DVC_TIMEOUT_S)
    assert repro.returncode == 0, repro.stdout[-4000:] + repro.stderr[-4000:]
    assert "Running stage 'train@" not in repro.stdout  # the default chain's runs are reused

    both = json.loads((work / "artifacts/demo/ensemble/students/ab/seed0/run.json").read_text())
    assert both["cache"] == ["artifacts/demo/cache/train", "artifacts/demo/cache-b/train"]
    assert both["teacher_dim"] == [128, 96] and both["teachers"] == "teacher+teacher-b"
    assert both["teacher_forwards"] == 0 and both["teacher_weights"] == [0.5, 0.5]
    report = (work / "reports/ensemble/report.md").read_text()
    seeds = ", ".join(map(str, params["matrix"]["seed"]))
    for method in ("cliprd [teacher]", "cliprd [teacher-b]", "cliprd [teacher+teacher-b]"):
        assert f"| {method} | demo-student-vit |" in report, method
    assert "| clip | demo-student-vit |" in report  # no-KD: no teacher set
    second = json.loads((work / "artifacts/demo/ensemble/students/second/seed0/run.json").read_text())
    assert second["student"] == "demo-student-resnet" and second["embed_dim"] == 96 and second["teacher_dim"] == 128
    assert "| cliprd [teacher] | demo-student-resnet | 96 |" in report
    assert (f"cliprd [teacher+teacher-b] - cliprd [teacher] on demo-student-vit, retrieval over "
            f"{len(params['matrix']['seed'])} seeds ({seeds})") in report
