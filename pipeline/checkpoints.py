"""Checkpoint files are data, never code: every ``.pt`` rdkd reads is unpickled with
``torch.load(weights_only=True)``.

A PyTorch checkpoint is a pickle, and unpickling a pickle may call any function the file
names. :func:`load` uses PyTorch's restricted unpickler (tensors, dicts, lists, tuples,
numbers, strings, None) for ``--init``, ``--resume`` and every weights file rdkd hands to
open_clip, and refuses a file that needs more with one line (:class:`UserError`, exit 2),
before anything is written.

What rdkd writes loads that way: train-student checkpoints (:data:`TRAIN_FORMAT`) hold
tensors and plain data only; the RNG states of numpy and Python, which their libraries
return as numpy arrays and tuples, are stored as tensors and numbers
(:func:`numpy_rng_as_data`, :func:`python_rng_as_data`).

Format ``rdkd-train-checkpoint/1`` stored numpy's RNG state as a numpy array, which the
restricted unpickler refuses. :func:`upgrade_train_checkpoint` (``rdkd checkpoint
upgrade``) converts such a file once: a deliberate step the user takes on a file they
trust, never something rdkd does on its own.
"""

from __future__ import annotations

import contextlib
import os
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rdkd.errors import UserError
from rdkd.files import atomic_write

TRAIN_FORMAT = "rdkd-train-checkpoint/2"
OLD_TRAIN_FORMAT = "rdkd-train-checkpoint/1"
# What a /1 checkpoint needs beyond the restricted unpickler: numpy's array unpickling
# function (``ndarray.__reduce__``'s; numpy 2 moved it from numpy.core to numpy._core,
# files name either), the array, the dtype and the class of its one dtype (the uint32 key
# of MT19937), whose state the unpickler sets.
_reconstruct = np.zeros(0).__reduce__()[0]
_NUMPY_ARRAY_GLOBALS = {
    "numpy.core.multiarray._reconstruct": _reconstruct,
    "numpy._core.multiarray._reconstruct": _reconstruct,
    "numpy.ndarray": np.ndarray,
    "numpy.dtype": np.dtype,
    "numpy.dtypes.UInt32DType": type(np.dtype(np.uint32)),
}


def save(state: Any, path: Path) -> None:
    """``torch.save`` through a Python file object: a write that fails (disk full) raises
    the OSError that :func:`rdkd.files.writing` reports (given a path, torch's C++ writer
    raises a RuntimeError instead), and the archive's inner folder is ``archive`` rather
    than the (temporary, per-process) file name, so equal states give equal bytes."""
    with open(path, "wb") as handle:
        try:
            torch.save(state, handle)
        except RuntimeError as err:
            # torch, closing the archive after a write failed, raises a RuntimeError of its
            # own; the write's OSError (its context) is the one that says what happened
            if isinstance(err.__context__, OSError):
                raise err.__context__ from None
            raise


def load(path: str | Path, what: str = "checkpoint", *, lazy: bool = False) -> Any:
    """Read a torch checkpoint as data only (``weights_only=True``, on the CPU).

    ``what`` names the file in messages (``--init checkpoint``). ``lazy``: map the tensors
    of a zip-format file from disk instead of reading them (a look at a large file's
    structure; the unpickling is the same). Raises :class:`UserError` with one line for a
    missing or unreadable file, a file that would need more than the restricted unpickler
    (code, custom classes, numpy objects) and an rdkd checkpoint of the old format (the
    message names the command that converts it).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True,
                          mmap=lazy and zipfile.is_zipfile(path))
    except Exception as err:  # any failure of a user-supplied file is that file's problem
        raise UserError(_refusal(path, what, err)) from None


def ensure_loads_as_data(path: str | Path, what: str = "checkpoint") -> None:
    """Refuse a weights file that open_clip would unpickle unless it loads as data only.

    open_clip 3 reads ``.pt/.pth/.bin`` files with ``weights_only=True`` but retries a
    ``TypeError`` with torch's default, which is ``weights_only=False`` on torch < 2.6 or
    under ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``; a crafted file can take that path. A file
    this accepts cannot: the very same unpickling succeeded here.
    """
    # open_clip's own tests, case-sensitive: safetensors files, and numpy weights that
    # np.load reads without pickles (allow_pickle=False)
    if not (str(path).endswith(".safetensors") or Path(path).suffix in (".npz", ".npy")):
        load(path, what, lazy=True)


@contextlib.contextmanager
def weights_only_loads():
    """Inside, every ``torch.load`` reads data only, whatever its caller asks for (torch's
    documented ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` switch). For code rdkd calls but does not
    own: open_clip's retry after a ``TypeError`` on the weights it downloads itself."""
    names = ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    saved = {name: os.environ.get(name) for name in names}
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)  # torch refuses both set
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _refusal(path: Path, what: str, err: BaseException) -> str:
    """The one line that says why ``path`` was not loaded."""
    unsafe = _unsafe_globals(path, err)
    if unsafe and set(unsafe) <= set(_NUMPY_ARRAY_GLOBALS) and _mentions(path, OLD_TRAIN_FORMAT):
        return (f"{what} {path} is an old rdkd checkpoint ({OLD_TRAIN_FORMAT}, with numpy RNG state) that "
                f"rdkd no longer unpickles; if you trust the file, convert it once with "
                f"`rdkd checkpoint upgrade {path}` (add a second path to keep the old file)")
    if unsafe:
        shown = ", ".join(unsafe[:3]) + (f" and {len(unsafe) - 3} more" if len(unsafe) > 3 else "")
        return (f"{what} {path} is refused: it is not plain data (loading it would call {shown}); "
                f"rdkd loads checkpoints with torch.load(weights_only=True) and never runs code from a file")
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    detail = f"{type(err).__name__}: {lines[0][:200]}" if lines else type(err).__name__
    return f"cannot load {what} {path} (read as data, torch.load weights_only=True): {detail}"


def _unsafe_globals(path: Path, err: BaseException | None = None) -> list[str]:
    """Functions and classes the file's pickle names beyond the restricted unpickler's,
    read from its opcodes without running them (zip format), else from torch's message."""
    try:
        if zipfile.is_zipfile(path):
            return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # a damaged archive: fall back to what the load said
        pass
    return re.findall(r"GLOBAL ([\w.]+)", str(err or ""))[:1]


def _mentions(path: Path, text: str) -> bool:
    """Whether the pickle of a zip-format torch file holds the string ``text`` (a look at
    the bytes, without unpickling)."""
    try:
        with zipfile.ZipFile(path) as archive:
            name = next((n for n in archive.namelist() if n.endswith("/data.pkl")), None)
            return name is not None and text.encode() in archive.read(name)
    except (OSError, zipfile.BadZipFile):
        return False


def numpy_rng_as_data(state: tuple) -> dict:
    """``np.random.get_state()`` (bit generator name, uint32 key array, position, cached
    Gaussian) as a string, an int64 tensor and numbers."""
    name, key, pos, has_gauss, gauss = state
    return {"bit_generator": str(name), "key": torch.from_numpy(np.asarray(key, dtype=np.int64)),
            "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)}


def numpy_rng_from_data(data: dict) -> tuple:
    """The inverse of :func:`numpy_rng_as_data`, for ``np.random.set_state``."""
    return (data["bit_generator"], data["key"].numpy().astype(np.uint32), data["pos"],
            data["has_gauss"], data["gauss"])


def python_rng_as_data(state: tuple) -> dict:
    """``random.getstate()`` (version, 625 words, cached Gaussian) with the words as an int64 tensor."""
    version, words, gauss_next = state
    return {"version": int(version), "words": torch.tensor(words, dtype=torch.int64),
            "gauss_next": gauss_next}


def python_rng_from_data(data: dict) -> tuple:
    """The inverse of :func:`python_rng_as_data`, for ``random.setstate``."""
    return (data["version"], tuple(data["words"].tolist()), data["gauss_next"])


def upgrade_train_checkpoint(old: str | Path, new: str | Path | None = None) -> Path:
    """Convert an ``rdkd-train-checkpoint/1`` file to :data:`TRAIN_FORMAT`; return the path written.

    ``new`` defaults to ``old`` (replaced atomically once the converted file is written and
    checked); another existing file is never overwritten. The old file is read with the
    restricted unpickler widened by numpy's array reconstructors only (what its numpy RNG
    state needs), so a file that names anything else is refused; numpy arrays are still
    more than plain tensors: run this on files you trust. The converted checkpoint is
    verified to load with ``weights_only=True`` before it replaces anything.
    """
    old = Path(old)
    new = Path(new) if new is not None else old
    if not old.is_file():
        raise UserError(f"checkpoint {old}: no such file")
    if new != old and new.exists():
        raise UserError(f"{new} already exists; choose another path or remove it")
    unsafe = _unsafe_globals(old)
    if not set(unsafe) <= set(_NUMPY_ARRAY_GLOBALS):
        raise UserError(f"{old} is refused: it needs more than numpy arrays ({', '.join(unsafe[:3])}), "
                        f"so it is no {OLD_TRAIN_FORMAT} file")
    allowed = [(obj, name) for name, obj in _NUMPY_ARRAY_GLOBALS.items()]
    try:
        with torch.serialization.safe_globals(allowed):
            state = torch.load(old, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(_refusal(old, "checkpoint", err)) from None
    found = state.get("format") if isinstance(state, dict) else None
    if found == TRAIN_FORMAT:
        raise UserError(f"{old} is already an {TRAIN_FORMAT} checkpoint; nothing to do")
    if found != OLD_TRAIN_FORMAT:
        raise UserError(f"{old} is not an {OLD_TRAIN_FORMAT} checkpoint (format {found!r})")
    try:
        upgraded = dict(state, format=TRAIN_FORMAT, rng=[
            dict(rank, numpy=numpy_rng_as_data(rank["numpy"]), python=python_rng_as_data(rank["python"]))
            for rank in state["rng"]])
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"{old} is a damaged {OLD_TRAIN_FORMAT} checkpoint: its RNG states do not "
                        f"read ({type(err).__name__}: {err})") from None

    def write_and_check(tmp: Path) -> None:
        save(upgraded, tmp)
        load(tmp, f"converted checkpoint (from {old})")

    atomic_write(new, write_and_check)
    return new
