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
    env = dict(os.environ, DVC_NO_ANALYTICS="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=env, timeout=timeout,
                          capture_output=True, text=True)


@pytest.mark.slow
def test_quick_profile_of_the_demo_chain(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    work.mkdir()
    shutil.copy(REPO / "dvc.yaml", work / "dvc.yaml")
    shutil.copy(REPO / ".dvcignore", work / ".dvcignore")  # the dataset index cache beside the demo data
    params = _merge(yaml.safe_load((REPO / "params.yaml").read_text()),
                    yaml.safe_load((REPO / "params-quick.yaml").read_text()))
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert _dvc(["init", "--no-scm", "-q"], work).returncode == 0
    assert _dvc(["config", "core.analytics", "false"], work).returncode == 0

    repro = _dvc(["repro"], work, timeout=DVC_TIMEOUT_S)
    assert repro.returncode == 0, repro.stdout[-4000:] + repro.stderr[-4000:]
    # reading the data wrote its index cache there, which leaves every stage up to date
    assert list((work / "artifacts/demo/data").rglob(".rdkd-index"))
    status = _dvc(["status", "--json"], work)
    assert status.returncode == 0 and json.loads(status.stdout) == {}, status.stdout

    # One cache fed every student; the teacher ran only in extract-teacher.
    runs = list((work / "artifacts/demo/students").glob("*/*/seed*/run.json"))
    assert len(runs) == len(params["matrix"]["loss"]) * len(params["matrix"]["student"]) * len(params["matrix"]["seed"])
    for run in runs:
        assert json.loads(run.read_text())["teacher_forwards"] == 0

    report = (work / "reports/demo/report.md").read_text()
    for preset in params["matrix"]["loss"] + ["teacher"]:
        assert preset in report
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

    # A second repro has nothing to do: every stage is cached.
    again = _dvc(["status"], work)
    assert again.returncode == 0 and "changed" not in again.stdout, again.stdout
