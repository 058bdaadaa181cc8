"""The labels of a run: how reports name a trained (or evaluated) model.

One record, :class:`RunLabels`, from start to end: ``rdkd train-student`` writes its fields
at the top of ``run.json``; ``rdkd evaluate`` finds that file beside the student's export
(or is given the labels, or labels a cache as the teacher) and writes them as
``labels.json`` beside ``metrics.json``; ``rdkd report`` reads ``labels.json``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rdkd.errors import UserError

LABELS_FILE = "labels.json"  # beside an evaluation's metrics.json
RUN_FILE = "run.json"  # beside a train-student run's export/


@dataclass(frozen=True)
class RunLabels:
    """``method`` (a loss preset, ``teacher`` or ``open_clip``), ``student`` (a short model
    label), the training ``seed``, the teacher forwards the training ran (0 from a cache) and
    the model's ``embed_dim``; None where unknown."""

    method: str
    student: str
    seed: int | None = None
    teacher_forwards: int | None = None
    embed_dim: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def given(self, **labels: Any) -> "RunLabels":
        """These labels with every one of ``labels`` that is not None put in."""
        return dataclasses.replace(self, **{k: v for k, v in labels.items() if v is not None})

    @classmethod
    def from_dict(cls, record: dict[str, Any], where: str) -> "RunLabels":
        """The labels among a record's keys (``run.json`` holds more); one line naming
        ``where`` when they are missing."""
        try:
            return cls(method=str(record["method"]), student=str(record["student"]), seed=record.get("seed"),
                       teacher_forwards=record.get("teacher_forwards"), embed_dim=record.get("embed_dim"))
        except (KeyError, TypeError):
            raise UserError(f"{where} holds no run labels (method, student)") from None

    @classmethod
    def read(cls, path: Path) -> "RunLabels":
        """The labels in the JSON file ``path`` (``labels.json`` or a run's ``run.json``)."""
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            raise UserError(f"{path} is not valid JSON") from None
        except OSError as err:
            raise UserError(f"cannot read {path}: {err.strerror or err}") from None
        return cls.from_dict(record, str(path))
