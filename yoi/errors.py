"""Typed errors. Each class carries its exit code once; the CLI edge applies it.

Exit codes (DESIGN.md): 0 done, 1 failed, 2 usage, 3 not found, 4 refused,
5 unreachable, 6 busy.
"""

from __future__ import annotations


class YoiError(Exception):
    """Base class: a failure with a one-line message and an exit code."""

    exit_code = 1
    code = "failed"

    def __init__(self, message: str, *, data: dict | None = None, **details):
        """DETAILS go into the error object; DATA (a command's report, e.g. the
        status it found) into the top level of the ``--json`` failure document."""
        super().__init__(message)
        self.message = message
        self.details = details
        self.data = data

    def to_json(self) -> dict:
        err = {"code": self.code, "message": self.message, "exit_code": self.exit_code}
        err.update(self.details)
        return err


class Failed(YoiError):
    exit_code = 1
    code = "failed"


class AlreadyExists(YoiError):
    exit_code = 1
    code = "exists"


class CorruptMetadata(YoiError):
    """A metadata or journal file that does not parse or fails the schema."""

    exit_code = 1
    code = "corrupt"


class StorageError(YoiError):
    """An I/O error while reading or writing state."""

    exit_code = 1
    code = "io_error"


class UsageError(YoiError):
    exit_code = 2
    code = "usage"


class NotFound(YoiError):
    exit_code = 3
    code = "not_found"


class Refused(YoiError):
    exit_code = 4
    code = "refused"


class Unreachable(YoiError):
    exit_code = 5
    code = "unreachable"


class TimedOutWaiting(Unreachable):
    """Nothing that was waited for came in time (exit 5)."""

    code = "timed_out"


class Pending(Unreachable):
    """A peer request waits for the asked Pod's decision (exit 5, as a request that
    was not decided in time): ``yoi up`` could not finish a relation by itself."""

    code = "pending"


class Busy(YoiError):
    exit_code = 6
    code = "busy"


class Interrupted(YoiError):
    """Stopped by SIGINT/SIGTERM/SIGHUP (exit 130, as a shell reports SIGINT)."""

    exit_code = 130
    code = "interrupted"
