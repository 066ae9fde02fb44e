"""The outbox worker's cost per mail (issue 13, speed): a batch of mails is claimed with one
statement and its outcomes written with one commit, whatever its size, on a real engine;
and the directly built message is the one EmailMessage would write."""

from __future__ import annotations

import email
import email.policy
import re
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event
from sqlmodel import col, select

from tessera.config import Settings
from tessera.domain.mail import FileTransport, MailWorker, build_message, message_bytes, queue_mail
from tessera.metrics import Metrics
from tessera.stores.db import create_engine, session_factory
from tessera.stores.mail import OutboxMail
from tessera.stores.models import utcnow
from tests.mailbox import SmtpServer


@pytest.fixture(scope="module")
def own_db(base_settings: dict[str, Any],
           tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A database of these tests' own: the suite's shared one has live outbox workers (the
    session's app polls every 0.2 s) that would claim these tests' mails first."""
    from tessera.ops.migrate import upgrade

    path = tmp_path_factory.mktemp("outbox") / "outbox.db"
    settings = {**base_settings, "database_url": f"sqlite+aiosqlite:///{path}"}
    upgrade(Settings(**settings))
    return settings


class _Counter:
    """Statements touching the outbox, and commits, seen by a real engine."""

    def __init__(self, engine: Any) -> None:
        self.statements: list[str] = []
        self.commits = 0
        event.listen(engine.sync_engine, "before_cursor_execute", self._statement)
        event.listen(engine.sync_engine, "commit", self._commit)

    def _statement(self, _conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if "mail_outbox" in statement:
            self.statements.append(statement.split(None, 1)[0].upper())

    def _commit(self, _conn: Any) -> None:
        self.commits += 1

    def reset(self) -> None:
        self.statements.clear()
        self.commits = 0


def _files(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in folder.glob("*-test.eml")}


async def _queue(factory: Any, settings: Settings, n: int) -> list[int]:
    async with factory() as db:
        rows = [queue_mail(db, settings, user_id=None, to=f"batch{i}@example.com", kind="test",
                           context={}) for i in range(n)]
        await db.commit()
    return [row.id for row in rows if row.id is not None]


async def test_a_batch_of_files_costs_one_claim_and_one_commit(
        own_db: dict[str, Any], tmp_path: Path) -> None:
    settings = Settings(**{**own_db, "smtp_url": None})
    engine = create_engine(settings.resolved_database_url)
    factory = session_factory(engine)
    try:
        ids = await _queue(factory, settings, 40)
        counter = _Counter(engine)
        worker = MailWorker(factory, settings, Metrics(), transport=FileTransport(tmp_path))
        assert await worker.run_once() == 40
        # one UPDATE ... RETURNING claims them, one DELETE marks them sent (rows of no account)
        assert counter.statements == ["UPDATE", "DELETE"]
        assert counter.commits == 2
        assert len(_files(tmp_path)) == 40
        counter.reset()
        assert await worker.run_once() == 0  # all sent: nothing claimed the second time
        async with factory() as db:  # sent mails of no account are gone
            assert (await db.exec(select(OutboxMail).where(col(OutboxMail.id).in_(ids)))
                    ).all() == []
    finally:
        await engine.dispose()


async def test_a_batch_over_smtp_commits_once_per_chunk(
        own_db: dict[str, Any], smtp: SmtpServer) -> None:
    settings = Settings(**own_db)
    engine = create_engine(settings.resolved_database_url)
    factory = session_factory(engine)
    try:
        await _queue(factory, settings, 25)
        counter = _Counter(engine)
        worker = MailWorker(factory, settings, Metrics())
        assert await worker.run_once() == 25
        chunks = -(-25 // worker.transport.chunk)
        assert counter.commits == 1 + chunks  # the claim, then one per chunk of hand-overs
        assert counter.statements == ["UPDATE"] + ["DELETE"] * chunks
        for i in range(25):
            assert len(await smtp.wait_for(f"batch{i}@example.com", "test")) == 1
    finally:
        await engine.dispose()


class _Collector:
    def add(self, row: Any) -> None:
        self.row = row


_BOUNDARY = re.compile(rb'={15}\d{19}==')


@pytest.mark.parametrize(("kind", "to", "context"), [
    ("test", "plain@example.com", {}),
    ("reset", "plain@example.com", {"email": "plain@example.com", "token": "T0k" * 14,
                                    "link": "http://127.0.0.1:8000/reset-password#token=x",
                                    "ttl_minutes": 60}),
    ("email_change_notice", "plain@example.com",  # a non-ASCII body: quoted-printable
     {"email": "plain@example.com", "new_email": "zoë@example.com"}),
    ("verify", "plain@example.com", {"email": "plain@example.com", "token": "t",  # a long line
                                     "link": "http://x/" + "y" * 1200, "ttl_hours": 1}),
])
def test_the_direct_rendering_is_what_email_message_writes(
        base_settings: dict[str, Any], kind: str, to: str, context: dict[str, Any]) -> None:
    settings = Settings(**base_settings)
    row = queue_mail(_Collector(), settings, user_id=None, to=to, kind=kind,  # type: ignore[arg-type]
                     context=context)
    row.id, row.created_at = 42, utcnow()
    direct = message_bytes(settings, row)
    assert direct is not None
    assert _BOUNDARY.sub(b"B", direct) == _BOUNDARY.sub(b"B", build_message(settings, row)
                                                         .as_bytes())
    parsed = email.message_from_bytes(direct, policy=email.policy.default)
    assert parsed["To"] == to and parsed["Message-ID"].startswith("<tessera.42.")
    assert parsed.get_body(("plain",)).get_content() == "\n".join(  # type: ignore[union-attr]
        row.text_body.splitlines()) + "\n"


async def test_two_mails_of_one_second_with_a_reused_id_make_two_files(
        own_db: dict[str, Any], tmp_path: Path) -> None:
    # Mails of no account are deleted once sent, and SQLite gives the next row the freed id:
    # the file name and Message-ID must still tell the two mails apart (no .eml overwritten).
    settings = Settings(**{**own_db, "smtp_url": None})
    engine = create_engine(settings.resolved_database_url)
    factory = session_factory(engine)
    worker = MailWorker(factory, settings, Metrics(), transport=FileTransport(tmp_path))
    second = utcnow().replace(microsecond=0)
    ids = []
    try:
        for micro in (1000, 2000):
            async with factory() as db:
                row = queue_mail(db, settings, user_id=None, to="again@example.com",
                                 kind="test", context={})
                row.created_at = second.replace(microsecond=micro)
                await db.commit()
                ids.append(row.id)
            assert await worker.run_once() == 1
    finally:
        await engine.dispose()
    files = _files(tmp_path)
    assert len(files) == 2, (ids, list(files))
    message_ids = {email.message_from_bytes(data)["Message-ID"] for data in files.values()}
    assert len(message_ids) == 2


def test_a_non_ascii_address_is_left_to_email_message(base_settings: dict[str, Any]) -> None:
    settings = Settings(**base_settings)
    row = queue_mail(_Collector(), settings, user_id=None, to="zoë@example.com",  # type: ignore[arg-type]
                     kind="test", context={})
    row.id, row.created_at = 43, utcnow()
    assert message_bytes(settings, row) is None  # sent with send_message (SMTPUTF8)


def test_the_outbox_worker_rests_only_while_the_process_is_saturated() -> None:
    """TESSERA_MAIL_BUSY_SHARE: under a request flood (CPU time ~ wall time) mail takes at
    most its share; with CPU to spare it never waits."""
    from tessera.domain.mail import BusyPacer

    wall, cpu = [100.0], [10.0]
    pacer = BusyPacer(0.03, clock=lambda: wall[0], cpu=lambda: cpu[0])
    wall[0] += 1.0
    cpu[0] += 0.2  # 20 % busy: no rest
    assert pacer.rest_after(0.02) == 0.0
    wall[0] += 1.0
    cpu[0] += 0.97  # saturated: 20 ms of mail work buys 20 ms * (1/0.03 - 1) of rest
    assert pacer.rest_after(0.02) == pytest.approx(0.02 * (1 / 0.03 - 1))
    assert pacer.rest_after(10.0) == BusyPacer.MAX_REST_SECONDS
    wall[0] += 1.0
    cpu[0] += 0.3  # the flood is over
    assert pacer.rest_after(0.02) == 0.0
    unlimited = BusyPacer(1.0, clock=lambda: wall[0], cpu=lambda: cpu[0])
    wall[0] += 1.0
    cpu[0] += 1.0
    assert unlimited.rest_after(0.02) == 0.0
