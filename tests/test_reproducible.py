"""What a pipeline hashes is a function of the inputs and the seed: a train-student run folder
(checkpoints, export, run.json) and an evaluation (metrics, run.json, evaluation.json) come
out byte for byte the same on a rerun, whatever the process's own random state; the logs
(wall-clock times, host names) go to a folder of their own."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np

import builders
from rdkd.stages.evaluate import evaluate
from rdkd.stages.train_student import train_student

FAST = builders.TRAIN_FAST


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_rerun_writes_the_same_run_folder(tmp_path, csv_dataset, tiny_clip_config, monkeypatch) -> None:
    runs = []
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
        monkeypatch.chdir(tmp_path / name)  # run.json records the paths as given: relative here
        # what another process would start from: global RNGs in another state
        random.seed(name)
        np.random.seed(len(name) + 7)
        train_student(csv_dataset, str(tiny_clip_config), "clip", steps=3, save_every=2, seed=5,
                      out="run", log_dir="logs", **FAST)
        runs.append(_files(tmp_path / name / "run"))
    assert sorted(runs[0]) == ["checkpoints/step-00000002.pt", "checkpoints/step-00000003.pt",
                               "export/model_config.json", "export/open_clip_config.json",
                               "export/open_clip_model.safetensors", "run.json"]
    for name, data in runs[0].items():
        assert data == runs[1][name], name
    logs = sorted(p.relative_to(tmp_path / "one" / "logs").as_posix()
                  for p in (tmp_path / "one" / "logs").rglob("*") if p.is_file())
    assert logs[:2] == ["metrics.jsonl", "skipped.jsonl"] and logs[2].startswith("tb/events.out.tfevents.")


def test_a_fresh_run_replaces_the_logs_of_an_earlier_one(tmp_path, csv_dataset, tiny_clip_config) -> None:
    logs = tmp_path / "logs"
    for name in ("first", "second"):
        train_student(csv_dataset, str(tiny_clip_config), "clip", steps=2, out=tmp_path / name, log_dir=logs, log_every=1, **FAST)
    assert len(list((logs / "tb").iterdir())) == 1  # one run's events, not two runs' mixed
    assert len((logs / "metrics.jsonl").read_text().splitlines()) == 2


def test_an_evaluation_rerun_writes_the_same_bytes(tmp_path, csv_dataset, tiny_teacher) -> None:
    outs = []
    for name in ("one", "two"):
        out = tmp_path / name / "metrics.json"
        evaluate(out, data=csv_dataset, model=tiny_teacher, workers=0, batch_size=5, device="cpu")
        outs.append(_files(out.parent))
    assert sorted(outs[0]) == ["evaluation.json", "labels.json", "metrics.json"]
    assert outs[0] == outs[1]
