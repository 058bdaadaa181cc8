"""Atomic file writes: a reader sees the whole file or the previous one, never a part.

Every file rdkd writes for others to read (cache shards, manifests, checkpoints, exports,
metrics, reports) goes through :func:`atomic_write`, so an interrupted run loses nothing
that was already written.

Storage faults (disk or quota full, read-only file system, permission denied) while
writing become one :class:`rdkd.errors.StorageError` naming the final path and the cause
(:func:`writing`, which :func:`atomic_write` uses and every other write site of the stages
wraps itself in); the temporary file of a failed atomic write is removed.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from rdkd.errors import StorageError

# errno values that mean the storage refused the write, not that rdkd or its input is wrong
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM})


def storage_error(err: OSError, path: str | Path | None) -> StorageError | None:
    """``err`` as a :class:`StorageError` naming ``path`` (the file being written), or None
    when ``err`` is not a storage fault."""
    if err.errno not in STORAGE_ERRNOS:
        return None
    return StorageError(f"cannot write {path if path is not None else err.filename}: {os.strerror(err.errno)}")


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Write ``path`` (a file or a folder being filled) inside: a storage fault becomes a
    :class:`StorageError` naming ``path``; other errors pass through."""
    try:
        yield
    except OSError as err:
        wrapped = storage_error(err, path)
        if wrapped is None:
            raise
        raise wrapped from None


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> None:
    """Create ``path`` by ``write(tmp)``: a temporary name in the same folder, fsynced,
    renamed over ``path``, and the folder fsynced so that the rename survives a crash. On
    any failure the temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            write(tmp)
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            # best effort: on a read-only file system the unlink fails too, and the
            # original error is the one to report
            with contextlib.suppress(OSError):
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
