"""One live run per output directory: `<output_dir>/run.lock`, held with flock for the whole run.

Rank 0 takes it after the config is checked and the plan made, before anything is written; the
file then names the holder (host, pid, start time, command), so a second run is refused with one
line naming the first. The kernel releases an flock when its process ends, however it ends, so a
lock whose holder died (SIGKILL, a crash, a lost node) is taken over, with a message naming the
run that left it. On a filesystem without flock the file's contents decide: a holder on this host
whose process is gone is stale; a holder on another host is believed.

A run that ends releases the lock and empties the file (it is never deleted: a process that
opened the old file could otherwise lock it while another locks a new one).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import time
from pathlib import Path
from typing import Any

from packtune.errors import ConfigError
from packtune.parallel import DistContext

LOCK_NAME = "run.lock"


class RunLock:
    """The lock on one output directory, held by this process until `release()`."""

    def __init__(self, output_dir: Path, fd: int, holder: dict[str, Any], took_over: str | None,
                 flocked: bool = True) -> None:
        self.output_dir, self.fd, self.holder, self.flocked = output_dir, fd, holder, flocked
        self.took_over = took_over
        """A line naming the run whose stale lock this one took over, else None."""

    def follow(self, output_dir: Path) -> None:
        """Lock `output_dir` instead (`--overwrite` moved the locked directory aside), then let go of
        the old one."""
        new = acquire(output_dir, self.holder)
        self.release()
        self.output_dir, self.fd, self.flocked = new.output_dir, new.fd, new.flocked

    def release(self) -> None:
        """Empty the file and unlock it (idempotent)."""
        if self.fd < 0:
            return
        try:
            os.ftruncate(self.fd, 0)
        finally:
            if self.flocked:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = -1


def this_process(command: list[str] | None = None) -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": shlex.join(command if command is not None else [sys.executable, *sys.argv])}


def acquire(output_dir: Path, holder: dict[str, Any] | None = None) -> RunLock:
    """Lock `output_dir` (created if missing) for this process, or raise ConfigError naming the run
    that holds it."""
    holder = holder or this_process()
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    flocked = True
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _held(output_dir, _read(fd)) from None
        except OSError as e:  # no flock on this filesystem: the file's contents decide
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            flocked = False
            if (holder_there := _read(fd)) and not _gone(holder_there):
                raise _held(output_dir, holder_there) from None
        previous = _read(fd)  # what a holder before us left: a run that ended without releasing
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        raise
    took_over = None
    if previous:
        took_over = (f"{output_dir}: took over the lock of a run that is gone ({_describe(previous)}); its "
                     "checkpoints are resumed as usual")
    return RunLock(output_dir, fd, holder, took_over, flocked)


def lock_for_run(output_dir: Path, dist_ctx: DistContext) -> RunLock | None:
    """Rank 0 takes the lock (returned there; None on the other ranks). Every rank learns the outcome,
    so a refusal raises the same ConfigError on all of them, and every other rank checks that the lock
    file, where it sees one, names this job's rank 0 (not another job writing the same directory)."""
    lock, failure = None, ""
    if dist_ctx.is_main:
        try:
            lock = acquire(output_dir)
        except ConfigError as e:
            failure = str(e)
    ((failure, holder), *_) = dist_ctx.all_gather_texts([failure, json.dumps(lock.holder if lock else None)])
    if failure:
        raise ConfigError(failure)
    problem = ""
    seen = None if dist_ctx.is_main else read_holder(output_dir)
    if seen is not None and seen != json.loads(holder):
        problem = (f"train.output_dir: rank {dist_ctx.rank} finds {output_dir} locked by another run "
                   f"({_describe(seen)}), not by this job's rank 0 ({_describe(json.loads(holder))})")
    problems = [texts[0] for texts in dist_ctx.all_gather_texts([problem]) if texts[0]]
    if problems:
        if lock is not None:
            lock.release()
        raise ConfigError(problems[0])
    return lock


def read_holder(output_dir: Path) -> dict[str, Any] | None:
    """Who the lock file names (None: nobody, or no lock file)."""
    try:
        fd = os.open(output_dir / LOCK_NAME, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        return _read(fd)
    finally:
        os.close(fd)


def _read(fd: int) -> dict[str, Any] | None:
    data = os.pread(fd, 1 << 16, 0)
    try:
        holder = json.loads(data) if data.strip() else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {"unreadable": data[:80].decode(errors="replace")}
    return holder if isinstance(holder, dict) else None


def _gone(holder: dict[str, Any]) -> bool:
    """Whether the holder's process is known to have ended: on this host, no process with its pid."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _describe(holder: dict[str, Any] | None) -> str:
    if not holder or "pid" not in holder:
        return "holder unknown"
    return (f"pid {holder['pid']} on {holder.get('host', '?')}, started {holder.get('started', '?')}: "
            f"{holder.get('command', '?')}")


def _held(output_dir: Path, holder: dict[str, Any] | None) -> ConfigError:
    return ConfigError(f"train.output_dir: {output_dir} is in use by another run ({_describe(holder)}); wait "
                       f"for it to end, or stop it, or choose another train.output_dir")
