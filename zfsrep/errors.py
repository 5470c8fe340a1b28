"""Domain exceptions, their exit codes, and the one mapping from exceptions to errno values.

Every user-facing failure is a :class:`ZfsrepError` carrying a one-line message and an exit
code; the CLI prints ``zfsrep: <message>`` and exits with that code, never a traceback.
The exit codes are documented in the README.
"""

from __future__ import annotations

import errno
import os


def shown(value: object) -> str:
    """``value`` quoted for a one-line message, control characters escaped; a name in bytes
    is decoded as the file system's names are (an undecodable byte shows as ``\\udcXX``),
    not shown as a Python bytes literal."""
    if isinstance(value, bytes):
        value = os.fsdecode(value)
    return repr(value)


class ExitCode:
    OK = 0
    FAILURE = 1  # unexpected internal error (a bug: the traceback goes to the log)
    USAGE = 2  # bad command line (argparse uses 2 as well)
    NOT_FOUND = 3  # a named thing (directory, spool, file) does not exist
    BAD_STATE = 4  # the thing exists but is not in a state that allows the command
    CORRUPT = 5  # malformed, truncated, oversized or inconsistent data
    IO = 6  # an operating-system error while doing the work
    UNSAFE = 7  # refused because it would escape a directory or overwrite data
    UNREACHABLE = 8  # the journal server cannot be reached or stopped answering
    SCRIPT = 9  # a command the administrator gave (tag --pre/--post) failed


class ZfsrepError(Exception):
    """A user-facing error: one line of text and an exit code."""

    exit_code = ExitCode.FAILURE

    def __init__(self, message: str, *, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(ZfsrepError):
    exit_code = ExitCode.USAGE


class NotFoundError(ZfsrepError):
    exit_code = ExitCode.NOT_FOUND


class StateError(ZfsrepError):
    exit_code = ExitCode.BAD_STATE


class CorruptDataError(ZfsrepError):
    """Malformed, truncated, oversized or checksum-failing data (frames, spool files)."""

    exit_code = ExitCode.CORRUPT


class FrameError(CorruptDataError):
    """A frame that cannot be decoded: the message says which check failed."""


class UnsafePathError(ZfsrepError):
    exit_code = ExitCode.UNSAFE


class OSFailure(ZfsrepError):
    exit_code = ExitCode.IO


class ScriptError(ZfsrepError):
    """A command given on the command line to run around an operation failed."""

    exit_code = ExitCode.SCRIPT


def errno_of(exc: BaseException) -> int:
    """The errno a FUSE request should fail with for ``exc`` (one table, unit-tested)."""
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    if isinstance(exc, NotFoundError):
        return errno.ENOENT
    if isinstance(exc, UnsafePathError):
        return errno.EACCES
    if isinstance(exc, StateError):
        return errno.EROFS
    if isinstance(exc, CorruptDataError):
        return errno.EIO
    return errno.EIO
