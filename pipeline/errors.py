"""Errors that reach the user as one line and a non-zero exit, never a traceback."""


class UserError(Exception):
    """Bad input from the user (a missing file, a wrong option, a mismatched cache).

    The CLI prints ``error: <message>`` on one line and exits with code 2.
    Raise it before anything is written, so that nothing already on disk is lost.
    """


class StorageError(UserError):
    """The storage refused a write: the disk or the quota is full, the file system is
    read-only, or permission is denied. The input was fine: the CLI prints
    ``error: cannot write <path>: <cause>`` on one line and exits with code 4 (not 2), so a
    script can tell "free some space and rerun" from "fix the command". Raised by
    :func:`rdkd.files.writing`; nothing half-written is left under a final name, and a rerun
    after the fault is cleared resumes.
    """


class SampleError(Exception):
    """One sample of a dataset cannot be used; ``reason`` is recorded in the rejects table."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Diverged(Exception):
    """A run that was started correctly stopped because its numbers went bad (a loss or a
    weight became NaN or inf). Not the user's typo: the CLI prints one line and exits 3."""
