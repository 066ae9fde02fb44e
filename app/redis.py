"""Redis client factory (redis.asyncio with hiredis when installed).

`TESSERA_REDIS_URL` forms:
- `redis://host:port/db`, `rediss://…` (TLS), `unix:///path/redis.sock?db=0`: one Redis;
- `redis+cluster://host:port[,host:port…]`, `rediss+cluster://…` (TLS): a Redis Cluster,
  given one or more seed nodes (the others are discovered); no database number.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster

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
