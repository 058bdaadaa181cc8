"""The DVC pipelines resolve, and every rdkd command in them parses against the real CLI.

The paper pipeline (experiments/paper) cannot run here (no GPUs, no CC3M/CC12M, no
downloads); this checks that it is complete and valid as written.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from dvc.repo import Repo

from rdkd.cli import registered_app

REPO = Path(__file__).resolve().parents[1]


def _stage_commands(pipeline_dir: Path) -> dict[str, str]:
    with Repo(str(REPO)) as repo:
        return {stage.name: stage.cmd for stage in repo.index.stages
                if Path(stage.path).parent == pipeline_dir}


def _rdkd_args(cmd: str) -> list[str]:
    """The rdkd part of a stage command: after `rdkd` or `-m rdkd.cli` (torchrun)."""
    words = shlex.split(cmd)
    for marker in ("rdkd.cli", "rdkd"):
        if marker in words:
            return words[words.index(marker) + 1:]
    raise AssertionError(f"no rdkd command in {cmd!r}")


def _parse(args: list[str]) -> None:
    group = typer.main.get_command(registered_app())
    name, rest = args[0], args[1:]
    assert name in group.commands, f"no command rdkd {name}"
    group.commands[name].make_context(name, rest)


@pytest.mark.parametrize("pipeline_dir", [REPO, REPO / "experiments/paper", REPO / "experiments/ensemble"],
                         ids=["demo", "paper", "ensemble"])
def test_every_stage_command_parses(pipeline_dir: Path) -> None:
    commands = _stage_commands(pipeline_dir)
    assert commands
    for address, cmd in commands.items():
        try:
            _parse(_rdkd_args(cmd))
        except Exception as err:  # typer's click raises its own usage errors
            pytest.fail(f"{address}: {err} in {cmd!r}")


def test_paper_pipeline_uses_the_papers_setting() -> None:
    commands = _stage_commands(REPO / "experiments/paper")
    train = commands["train@cliprd-0"]
    for flag in ("--student ViT-T-16", "--epochs 32", "--batch-size 1024", "--lr 0.001",
                 "--wd 0.1", "--warmup 10000", "--precision bf16", "torchrun --nproc_per_node"):
        assert flag in train, flag
    assert "--model ViT-B-16 --pretrained laion400m_e32" in commands["extract_train"]
    assert {"train@clip-0", "train@clipkd-0", "train@cliprd-0"} <= set(commands)
    assert any("classnames=imagenet;templates=openai" in c for c in commands.values())


def test_dvc_dag_of_the_paper_pipeline() -> None:
    dag = subprocess.run([sys.executable, "-m", "dvc", "dag", "--md"], cwd=REPO / "experiments/paper",
                         capture_output=True, text=True, timeout=120)
    assert dag.returncode == 0, dag.stderr
    assert "extract_train" in dag.stdout and "report@" in dag.stdout
