"""A rank that is gone: the others stop with one line naming it, instead of a transport traceback.

When one rank of a run dies (SIGKILL, the OOM killer, a crash, an error of its own), its sockets
close and every other rank's next collective fails at once with a gloo transport error
("Connection closed by peer"). `lost_rank_error` turns that into a TrainingError naming the ranks
whose processes are gone (those on this host are looked up by pid; `DistContext.processes` holds
every rank's host and pid from the start), and the run ends on every rank without waiting for the
others (`parallel.shutdown(clean=False)`): torchrun then reports the job as failed, and the newest
checkpoint resumes it.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

from packtune.errors import PacktuneError, TrainingError
from packtune.parallel import DistContext

_TRANSPORT_ERRORS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                     "Connection refused", "Socket Timeout", "Timed out waiting")


def lost_rank_error(dist_ctx: DistContext, e: BaseException, settle: float = 2.0) -> TrainingError | None:
    """The one-line error for a collective that failed because another rank is gone; None when `e`
    is something else. A rank that just died may take a moment to be reaped: its pid is looked up
    for up to `settle` seconds."""
    if dist_ctx.mesh is None or not isinstance(e, RuntimeError) or isinstance(e, PacktuneError):
        return None  # a PacktuneError is this rank's own one-line report
    transport = any(text in str(e) for text in _TRANSPORT_ERRORS)
    deadline = time.monotonic() + (settle if transport else 0.0)
    while True:
        gone = gone_ranks(dist_ctx)
        if gone or time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    if not gone and not transport:
        return None
    if gone:
        who = ", ".join(f"rank {r} (pid {dist_ctx.processes[r][1]})" for r in gone)
        what = f"{who} ended: killed, out of memory, or stopped by an error of its own (see its output)"
    else:
        what = ("lost contact with another rank (on another host, or still ending: see the other ranks' "
                "output)")
    return TrainingError(f"rank {dist_ctx.rank}: {what}; stopping this rank too. The newest checkpoint "
                         "resumes the run")


def gone_ranks(dist_ctx: DistContext) -> list[int]:
    """The other ranks on this host whose process has ended (or is a zombie, not yet reaped)."""
    host = socket.gethostname()
    return [rank for rank, (their_host, pid) in enumerate(dist_ctx.processes)
            if rank != dist_ctx.rank and their_host == host and _ended(pid)]


def _ended(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")
