"""Redis client factory (redis.asyncio with hiredis when installed).

`TESSERA_REDIS_URL` forms:
- `redis://host:port/db`, `rediss://…` (TLS), `unix:///path/redis.sock?db=0`: one Redis;
- `redis+cluster://host:port[,host:port…]`, `rediss+cluster://…` (TLS): a Redis Cluster,
  given one or more seed nodes (the others are discovered); no database number.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError

# What create_redis() returns: both speak the same commands for keys of one hash slot.
AnyRedis = Redis | RedisCluster

CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


def create_redis(url: str) -> AnyRedis:
    scheme = urlsplit(url).scheme.lower()
    if scheme in CLUSTER_SCHEMES:
        return _create_cluster(url, CLUSTER_SCHEMES[scheme])
    # A burst beyond the pool waits (up to 5 s) for a connection instead of failing at once.
    pool = BlockingConnectionPool.from_url(
        url, decode_responses=True, socket_connect_timeout=2, socket_timeout=5,
        health_check_interval=30, max_connections=256, timeout=5)
    return Redis.from_pool(pool)


def _create_cluster(url: str, plain_scheme: str) -> RedisCluster:
    parts = urlsplit(url)
    credentials, _, hosts = parts.netloc.rpartition("@")
    seeds = [_host_port(h) for h in hosts.split(",") if h.strip()]
    if not seeds:
        raise ValueError("a redis+cluster:// URL needs at least one host:port")
    first = (f"{credentials}@" if credentials else "") + f"{seeds[0][0]}:{seeds[0][1]}"
    single = urlunsplit((plain_scheme, first, parts.path, parts.query, parts.fragment))
    return RedisCluster.from_url(
        single, startup_nodes=[ClusterNode(host, port) for host, port in seeds[1:]] or None,
        decode_responses=True, socket_connect_timeout=2, socket_timeout=5,
        health_check_interval=30, max_connections=64)  # max_connections is per node here


def _host_port(value: str) -> tuple[str, int]:
    value = value.strip()
    if value.startswith("["):  # [IPv6]:port
        host, _, port = value[1:].partition("]:")
    else:
        host, _, port = value.rpartition(":") if ":" in value else (value, "", "")
    return host, int(port or 6379)


class ReadBatcher:
    """Coalesces the concurrent token checks' MGETs into one MGET per event-loop turn.

    Every request that asks within the same turn of the loop joins one command, so a
    busy server pays redis-py's per-command cost (pool checkout, timeouts, packing, one
    write and one read) once per batch instead of once per request: "auto-pipelining",
    as ioredis and coredis do it. One Redis only: on a Redis Cluster the keys of a batch
    live in many slots, so each read there is its own MGET (`batching` is False).

    Reads see every write acknowledged before they are sent, as a direct MGET would: a
    read joins a batch that is sent at the latest one loop turn later, never an older one.
    """

    MAX_KEYS = 512  # one batch's keys; a bigger burst is split over several commands

    def __init__(self, redis: AnyRedis) -> None:
        self.redis = redis
        self.batching = not isinstance(redis, RedisCluster)
        self._pending: list[tuple[list[str], asyncio.Future[list[Any]]]] = []
        self._pending_keys = 0
        self._inflight: set[asyncio.Task[None]] = set()

    async def mget(self, keys: list[str]) -> list[Any]:
        if not keys:
            return []
        if not all(key.isascii() for key in keys):  # would fail the whole shared command
            raise ValueError("Redis keys of a batched read must be ASCII")
        if not self.batching:
            return list(await self.redis.mget(keys))
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Any]] = loop.create_future()
        if not self._pending:
            loop.call_soon(self._send)
        self._pending.append((keys, future))
        self._pending_keys += len(keys)
        if self._pending_keys >= self.MAX_KEYS:
            self._send()
        return await future

    def _send(self) -> None:
        batch, self._pending, self._pending_keys = self._pending, [], 0
        if batch:
            task = asyncio.ensure_future(self._run(batch))
            self._inflight.add(task)  # a reference, so the task is not collected mid-flight
            task.add_done_callback(self._inflight.discard)

    async def _run(self, batch: list[tuple[list[str], asyncio.Future[list[Any]]]]) -> None:
        keys = [key for wanted, _ in batch for key in wanted]
        try:
            values = await self.redis.mget(keys)
        except BaseException as exc:  # every waiter gets the error (503 `unavailable`)
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc if isinstance(exc, Exception)
                                         else RedisConnectionError("redis read cancelled"))
            if not isinstance(exc, Exception):
                raise
            return
        start = 0
        for wanted, future in batch:
            end = start + len(wanted)
            if not future.done():  # its request may have been cancelled meanwhile
                future.set_result(values[start:end])
            start = end
