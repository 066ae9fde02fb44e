"""Redis client factory (redis.asyncio with hiredis when installed)."""

from __future__ import annotations

from redis.asyncio import Redis


def create_redis(url: str) -> Redis:
    return Redis.from_url(url, decode_responses=True, socket_connect_timeout=2,
                          socket_timeout=5, health_check_interval=30, max_connections=256,
                          retry_on_timeout=False)
