"""Errors that reach the user as one line and exit code 2."""

import errno
import os
import shutil
from pathlib import Path


class QuantkitError(Exception):
    """Bad input or environment: the message names the problem and the fix."""

    exit_code = 2


class ArtifactLoadError(Exception):
    """An artifact quantkit wrote that its runtime refuses to open: rejected (exit code 1), never shipped."""


class GateFailure(Exception):
    """At least one artifact failed its accuracy gate (exit code 1)."""

    exit_code = 1


# A write that failed for want of room: a full disk, a quota, or the process's file-size limit (ulimit -f)
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


# How libraries that are not Python spell those errors (safetensors' Rust io errors, C++ writers): strerror text
RUST_IO_KINDS = {errno.ENOSPC: "StorageFull", errno.EDQUOT: "QuotaExceeded", errno.EFBIG: "FileTooLarge"}


def _says(exc: BaseException, errnos: frozenset[int]) -> bool:
    """Whether ``exc`` is one of ``errnos``: by its errno, or, from a native writer, by its words."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno in errnos
    return any(word in str(exc) for n in errnos for word in (os.strerror(n), RUST_IO_KINDS[n]))


def is_disk_full(exc: BaseException) -> bool:
    return _says(exc, DISK_ERRNOS)


def disk_full_error(exc: BaseException, out: Path, staging: Path, needed_bytes: int | None) -> QuantkitError:
    """The one line for a write that ran out of room: which path (as the user will find it: inside ``out``, not
    the staging folder beside it), how much the run needs, what to do."""
    where = Path(exc.filename) if getattr(exc, "filename", None) else out
    if where.is_relative_to(staging):
        where = out / where.relative_to(staging)
    need = f"about {_mib(needed_bytes)} for this run's artifacts" if needed_bytes else "room for this run's artifacts"
    if _says(exc, frozenset({errno.EFBIG})):
        return QuantkitError(f"writing {where} hit this process's file-size limit (ulimit -f); it needs {need}: "
                             "raise the limit (ulimit -f unlimited) and run again")
    free = shutil.disk_usage(_existing_parent(where)).free
    return QuantkitError(f"no space left writing {where} ({_mib(free)} free there; it needs {need}): free some "
                         "space or pass --out on a disk with more room, and run again")


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
