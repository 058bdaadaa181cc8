"""The labels of a run: how reports name a trained (or evaluated) model.

One record, :class:`RunLabels`, from start to end: ``rdkd train-student`` writes its fields
at the top of ``run.json``; ``rdkd evaluate`` finds that file beside the student's export
(or is given the labels, or labels a cache as the teacher) and writes them as
``labels.json`` beside ``metrics.json``; ``rdkd report`` reads ``labels.json``.

A student distilled from a cache is labelled by its teacher set too (:func:`teacher_set`:
``teacher-a`` or, for an ensemble, ``teacher-a+teacher-b``), so that a report can tell
students of one method and architecture apart by the teachers they learned from.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from rdkd.errors import UserError

LABELS_FILE = "labels.json"  # beside an evaluation's metrics.json
RUN_FILE = "run.json"  # beside a train-student run's export/


@dataclass(frozen=True)
class RunLabels:
    """``method`` (a loss preset, ``teacher`` or ``open_clip``), ``student`` (a short model
    label), the training ``seed``, the teacher forwards the training ran (0 from a cache),
    the model's ``embed_dim`` and the ``teachers`` it was distilled from
    (:func:`teacher_set`); None where unknown or not distilled."""

    method: str
    student: str
    seed: int | None = None
    teacher_forwards: int | None = None
    embed_dim: int | None = None
    teachers: str | None = None

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
                       teacher_forwards=record.get("teacher_forwards"), embed_dim=record.get("embed_dim"),
                       teachers=record.get("teachers"))
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


def teacher_label(teacher: dict) -> str:
    """A short name of the teacher a cache manifest records (its ``teacher`` object): the
    open_clip name and tag (``ViT-L-14/openai``), or for a local model the folder's name
    (its parent's when the folder is an rdkd ``export``)."""
    spec = teacher.get("spec") or {}
    name = spec.get("name") or spec.get("config") or teacher.get("open_clip_name") or "?"
    if name.startswith("local-dir:") or name.lower().endswith(".json"):
        path = Path(name.removeprefix("local-dir:"))
        folder = path.parent if path.suffix else path
        return (folder.parent.name if folder.name == "export" else folder.name) or str(path)
    tag = spec.get("pretrained")
    return f"{name}/{tag}" if tag and not Path(tag).suffix else name


def teacher_set(teachers: Sequence[dict]) -> str | None:
    """The label of a teacher set: its teachers' :func:`teacher_label` joined by ``+`` in
    cache order; None for no teacher."""
    return "+".join(teacher_label(t) for t in teachers) or None
