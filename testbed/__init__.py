"""The project's test bed: real redis-server processes and a fault-injecting TCP proxy.

One module that the tests (``tests/``), the benchmarks (``bench/``) and the demo (``demo/``)
all import, so there is one way to run a throw-away Redis and to break the network in front
of it.  Nothing here is mocked: every server is a genuine ``redis-server`` (Debian's
binary), every fault a real process signal or a real socket doing something rude.

What it offers:

- :class:`RedisServer`: a ``redis-server`` on a free ``127.0.0.1`` port, no persistence,
  its own temp dir and log (:attr:`RedisServer.log_path`); crash it (``kill``), freeze and
  thaw it (``pause`` / ``resume``), bring it back on the same port (``restart``, or
  ``start`` after ``kill``); ``start(wait=False)`` + ``ready()`` for a caller that must not
  block or that times the way back.  Never leaked (atexit, and a parent-death signal).
  :class:`RedisServerError` when the binary is missing or the server will not start.
- :class:`FaultProxy` (modes :data:`ProxyMode`): a TCP proxy between a client and a server
  that adds latency, blackholes, resets, refuses, or drops replies after the command ran,
  switched at runtime.
- :class:`RedisClusterBed` (:mod:`testbed.cluster`): a real Redis Cluster on loopback
  (3 primaries, a replica each, joined by ``redis-cli --cluster create``): kill, pause,
  restart nodes, wait for a promotion, reshard a slot live, put the layout back.
- :mod:`testbed.server_states`: servers put into each error-reply state (LOADING, BUSY,
  READONLY, OOM, ... :data:`~testbed.server_states.STATES`), imported on its own.
- :func:`find_free_port`, :func:`redis_server_binary`, :func:`pdeathsig_prefix` (the
  ``setpriv --pdeathsig`` prefix, for any child process that must not outlive us).

It is importable from the project's virtualenv (``scripts/bootstrap``), whose editable
install puts the checkout on ``sys.path``: no ``sys.path`` patching anywhere.
"""

from testbed.cluster import ClusterNodeInfo, RedisClusterBed, redis_cli_binary
from testbed.proxy import FaultProxy, ProxyMode
from testbed.redis_server import (
    RedisServer,
    RedisServerError,
    find_free_port,
    pdeathsig_prefix,
    redis_server_binary,
)

__all__ = [
    "ClusterNodeInfo",
    "FaultProxy",
    "ProxyMode",
    "RedisClusterBed",
    "RedisServer",
    "RedisServerError",
    "find_free_port",
    "pdeathsig_prefix",
    "redis_cli_binary",
    "redis_server_binary",
]
