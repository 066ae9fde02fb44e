"""Room kept on the SQLite database's disk for the last writes of a shutdown (issue 12.10).

On a full disk, SQLite refuses every write (`database or disk is full`): the usage events
and audit events waiting in memory could not be written by the shutdown flush, and would be
lost with the process. So a file of `RESERVE_BYTES` (allocated blocks, zeros) sits beside
the database file; a shutdown flush that meets a full disk deletes it and tries again. The
next start allocates it again if there is room (a warning if not). While tessera runs, a
flush that meets a full disk keeps its events in memory and retries, as for a database
that is down; the reserve is only for the last chance.
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
from pathlib import Path

from sqlalchemy.engine import make_url

from tessera.stores.db import exception_chain

log = logging.getLogger("tessera.db")

RESERVE_BYTES = 4 * 1024 * 1024


class DiskReserve:
    def __init__(self, path: Path, size: int = RESERVE_BYTES) -> None:
        self.path = path
        self.size = size

    def ensure(self) -> None:
        """Allocate the reserve (at start-up); no room: a warning, tessera runs without."""
        try:
            if self.path.exists() and self.path.stat().st_blocks * 512 >= self.size:
                return
            fd = os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600)
            try:
                os.posix_fallocate(fd, 0, self.size)
            finally:
                os.close(fd)
        except OSError as exc:
            log.warning("no disk reserve for the shutdown flush (%s): on a full disk, a "
                        "shutdown may lose the usage events waiting in memory", exc.strerror)
            self.path.unlink(missing_ok=True)

    def release(self) -> bool:
        """Free the reserve (a shutdown flush met a full disk): True if there was one."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            return False
        log.error("the disk is full: the disk reserve is freed for the shutdown flush")
        return True


def reserve_for(database_url: str) -> DiskReserve | None:
    """The reserve beside a SQLite database file; None for another database (its disk is
    the database server's) or an in-memory SQLite."""
    url = make_url(database_url)
    if not url.drivername.startswith("sqlite") or not url.database or \
            url.database == ":memory:":
        return None
    database = Path(url.database)
    return DiskReserve(database.with_name(database.name + ".reserve"))


def is_disk_full(exc: BaseException) -> bool:
    """SQLITE_FULL (`database or disk is full`) or ENOSPC, anywhere in the exception's chain."""
    for current in exception_chain(exc):
        if isinstance(current, sqlite3.OperationalError) and (
                getattr(current, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
                or "disk is full" in str(current)):
            return True
        if isinstance(current, OSError) and current.errno == errno.ENOSPC:
            return True
    return False
