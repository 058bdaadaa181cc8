"""Atomic file writes: a reader sees the whole file or the previous one, never a part.

Every file rdkd writes for others to read (cache shards, manifests, checkpoints, exports,
metrics, reports) goes through :func:`atomic_write`, so an interrupted run loses nothing
that was already written.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> None:
    """Create ``path`` by ``write(tmp)``: a temporary name in the same folder, fsynced,
    renamed over ``path``, and the folder fsynced so that the rename survives a crash."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_bytes(path: str | Path, data: bytes | memoryview | Any) -> None:
    """``data``: anything exposing the buffer protocol (bytes, memoryview, a pyarrow Buffer)."""
    atomic_write(path, lambda tmp: tmp.write_bytes(memoryview(data)))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def atomic_write_csv(path: str | Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            table = csv.writer(handle)
            table.writerow(header)
            table.writerows(rows)

    atomic_write(path, write)
