"""Child processes die with their parent: Linux's PR_SET_PDEATHSIG.

A `kill -9` of `tessera serve` runs no cleanup of its own, so without this its embedded
redis-server and its uvicorn workers (`--workers N`) would live on, the workers still
holding the port. With it, the kernel sends each of them SIGTERM when their parent dies;
they shut down as on any SIGTERM (redis-server fsyncs its append-only file, a worker
drains its requests and flushes its usage events). Elsewhere than Linux: a no-op.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

PR_SET_PDEATHSIG = 1
# The environment variable by which `tessera serve --workers N` tells its workers its pid.
SUPERVISOR_PID_ENV = "TESSERA_INTERNAL_SUPERVISOR_PID"


def _load_prctl() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl()  # loaded once here: a forked child must not import or load anything


def die_with_parent(parent_pid: int, sig: int = signal.SIGTERM) -> bool:
    """Have the kernel send `sig` to this process when its parent ends; if the parent is
    already gone (it died before this call), send it now. False where unsupported."""
    if _PRCTL is None or _PRCTL(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return False
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), sig)
    return True


def preexec_die_with_parent() -> Callable[[], None] | None:
    """A `preexec_fn` for subprocess.Popen: the child dies with this process. Note that the
    kernel ties it to the thread that starts the child; tessera starts its children from
    threads that live as long as the children should."""
    if _PRCTL is None:
        return None
    parent = os.getpid()

    def preexec() -> None:
        die_with_parent(parent)

    return preexec


def worker_dies_with_supervisor() -> None:
    """In a uvicorn worker of `tessera serve --workers N`: die with the supervisor."""
    supervisor = os.environ.get(SUPERVISOR_PID_ENV)
    if supervisor and supervisor.isdigit() and int(supervisor) != os.getpid():
        die_with_parent(int(supervisor))  # already gone (died while we started): end now
