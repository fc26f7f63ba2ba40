"""Test infrastructure: real redis-server processes and a fault-injecting TCP proxy."""

from tests.infra.proxy import FaultProxy, ProxyMode
from tests.infra.redis_server import RedisServer, RedisServerError, find_free_port, redis_server_binary

__all__ = [
    "FaultProxy",
    "ProxyMode",
    "RedisServer",
    "RedisServerError",
    "find_free_port",
    "redis_server_binary",
]
