"""Async engine and the `db` unit of work."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlmodel.ext.asyncio.session import AsyncSession

from tessera.config import normalise_database_url


def create_engine(url: str, *, connect_timeout: float = 5.0,
                  statement_timeout: float | None = None) -> AsyncEngine:
    """The engine; on PostgreSQL, connecting gives up after `connect_timeout` and each
    statement after `statement_timeout` (the server cancels it, and the client stops
    waiting a second later), so a network partition answers 503 within seconds instead of
    hanging for its whole length. None: no statement timeout (the command line's purges)."""
    url = normalise_database_url(url)
    # hide_parameters: a database error never carries an email or a hash into the logs.
    kwargs: dict[str, Any] = {"pool_pre_ping": True, "hide_parameters": True}
    if url.startswith("sqlite"):
        kwargs = {"connect_args": {"timeout": 15}, "hide_parameters": True}
    else:
        connect_args: dict[str, Any] = {"timeout": connect_timeout}
        if statement_timeout is not None:
            connect_args["command_timeout"] = statement_timeout + 1.0
            connect_args["server_settings"] = {
                "statement_timeout": str(int(statement_timeout * 1000))}
        kwargs.update(pool_size=10, max_overflow=20, pool_timeout=connect_timeout,
                      connect_args=connect_args)
    engine = create_async_engine(url, **kwargs)
    if url.startswith("sqlite"):

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            # Deleted rows are overwritten with zeros, not left in free pages (issue 12.7).
            cursor.execute("PRAGMA secure_delete=ON")
            cursor.close()

    return engine


# SQLSTATEs of a lost or refused connection, a server shutting down or a cancelled statement.
_UNAVAILABLE_SQLSTATES = ("08", "57P01", "57P02", "57P03", "53300", "57014")
_UNAVAILABLE_NAMES = {"ConnectionDoesNotExistError", "ConnectionFailureError",
                      "ConnectionRejectionError", "InterfaceError", "InternalClientError",
                      "CannotConnectNowError", "AdminShutdownError", "CrashShutdownError",
                      "TooManyConnectionsError", "QueryCanceledError"}


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception, its DBAPI original (`orig`) and their causes and contexts, each once:
    asyncpg's and sqlite3's errors reach SQLAlchemy wrapped in its own."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        todo += [getattr(current, "orig", None), current.__cause__, current.__context__]


def is_unavailable(exc: BaseException) -> bool:
    """Is this the database being unreachable (a restart, a partition, a timeout), rather
    than a statement it refused? Anywhere in the exception's chain."""
    for current in exception_chain(exc):
        if getattr(current, "connection_invalidated", False) or isinstance(current, (
                sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.DisconnectionError,
                sa_exc.TimeoutError)):
            return True
        if isinstance(current, OSError | TimeoutError | ConnectionError):
            return True
        sqlstate = getattr(current, "sqlstate", None) or getattr(current, "pgcode", None)
        if isinstance(sqlstate, str) and sqlstate.startswith(_UNAVAILABLE_SQLSTATES):
            return True
        if type(current).__name__ in _UNAVAILABLE_NAMES and \
                type(current).__module__.startswith("asyncpg"):
            return True
    return False


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, class_=AsyncSession, expire_on_commit=False)


async def db_session(factory: async_sessionmaker[AsyncSession]) -> AsyncIterator[AsyncSession]:
    db = factory()
    try:
        yield db
    finally:
        try:
            await db.close()
        except Exception as exc:
            # The connection died under the request (a database restart), after its answer
            # was sent: nothing to answer any more; the pool drops the connection.
            if not is_unavailable(exc):
                raise
