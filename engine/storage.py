"""Writes that fail for want of storage: a full disk, a quota, no permission, a read-only or failing
device. What the writers raise is uneven (an OSError from Python's files, DCP's
CheckpointException around a rank's error, `RuntimeError: ... unexpected pos` from torch.save's
zip writer, which loses the errno, safetensors' `SafetensorError: ... (os error 28)`), so
`os_error_behind` finds the OSError in the exception or its message, and otherwise asks the
directory itself by writing a small probe file there. `storage_error` words the one line the user
gets: what happened, where, and what to free or change.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path

from torch.distributed.checkpoint.api import CheckpointException

from packtune.errors import StorageError

_OS_ERROR_IN_TEXT = re.compile(r"os error (\d+)")
_PROBE_BYTES = 1 << 20


def os_error_behind(e: BaseException, directory: Path) -> OSError | None:
    """The storage failure behind `e`, raised while writing into `directory`; None if there is none
    (then `e` is a bug to report as it is)."""
    found = _os_error_in(e)
    if found is not None:
        return found
    return probe(directory)


def _os_error_in(e: BaseException | None) -> OSError | None:
    if e is None:
        return None
    if isinstance(e, OSError):
        return e
    if isinstance(e, CheckpointException):
        for failure, _ in e.failures.values():
            found = _os_error_in(failure)
            if found is not None:
                return found
    match = _OS_ERROR_IN_TEXT.search(str(e))
    if match:
        code = int(match.group(1))
        return OSError(code, os.strerror(code))
    return _os_error_in(e.__cause__ or e.__context__)


def probe(directory: Path) -> OSError | None:
    """Write (and sync) 1 MiB into `directory`: the OSError that raises, None if it succeeds."""
    path = directory / f".write-test-{os.getpid()}"  # a name packtune.rundir knows as its own
    try:
        with open(path, "wb") as f:
            f.write(bytes(_PROBE_BYTES))
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        return e
    finally:
        path.unlink(missing_ok=True)
    return None


def storage_error(action: str, where: Path, e: OSError, after: str) -> StorageError:
    """'<action>: <where>: <what happened>; <what to do>; <after>' as one StorageError."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        what = (f"no space left on the device{_free_space(where)}; free space there or set train.output_dir "
                "to a larger disk")
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        what = f"{e.strerror or 'not writable'}; make it writable or set train.output_dir elsewhere"
    elif e.errno == errno.EIO:
        what = ("an I/O error (a failing disk or a lost network mount); check the disk (dmesg) or set "
                "train.output_dir elsewhere")
    elif e.errno == errno.EFBIG:
        what = "a file grew past the file size limit (ulimit -f); raise the limit"
    else:
        what = e.strerror or str(e)
    return StorageError(f"{action}: {where}: {what}; {after}")


def _free_space(path: Path) -> str:
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return f" ({shutil.disk_usage(path).free / 1e6:.0f} MB free)"
    except OSError:
        return ""
