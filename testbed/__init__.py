"""Test infrastructure: real redis-server processes and a fault-injecting TCP proxy."""

from testbed.proxy import FaultProxy, ProxyMode
from testbed.redis_server import RedisServer, RedisServerError, find_free_port, redis_server_binary

__all__ = [
    "FaultProxy",
    "ProxyMode",
    "RedisServer",
    "RedisServerError",
    "find_free_port",
    "redis_server_binary",
]
