"""Differential test of the command-safety table (issue 9, point 1).

Contract: after an attempt that may have run, a command is re-sent only if a second run
gives the same reply as the first would have; otherwise the call raises
``RedisUnavailable(outcome_unknown=True)``.

For every command the table knows, on identical fresh data, the command runs once straight
on a plain client and once through the handle with the proxy dropping the handle's reply
(the command runs on the server, the client times out, the library decides whether to
re-send). The final data must be identical, and the handle must either return the direct
reply (it re-sent, and the re-send was harmless) or raise ``outcome_unknown=True`` (it did
not re-send: the command ran exactly once).

The command list comes from redis-py: every command method is called on a recorder whose
``execute_command`` notes the command name; recipes (setup + call) are then needed for every
table entry, and each recipe is checked to really issue its command through its method.
To keep the run short the recipes are spread over a few lanes (a redis-server and a proxy
each, shared by the whole module) that run concurrently.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import queue
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis
import redis.asyncio
import redis.exceptions

import otel_redis_resilience._decide.commands as safety
from otel_redis_resilience import BreakerPolicy, RedisUnavailable, Resilience, RetryPolicy, RetryScheduled
from testbed import FaultProxy, RedisServer
from tests.support import Recorder

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

LANES = 4
ATTEMPT_TIMEOUT = 0.2


# ---------------------------------------------------------------------------------------
# The table under test
# ---------------------------------------------------------------------------------------


def table_commands() -> set[str]:
    """Every command the safety table knows (reads and writes)."""
    table = getattr(safety, "COMMAND_TABLE", None)
    if table is not None:
        return {str(name).upper() for name in table}
    return set(safety.READ_COMMANDS | safety.IDEMPOTENT_WRITES)


# ---------------------------------------------------------------------------------------
# redis-py's command methods, introspected
# ---------------------------------------------------------------------------------------


class _Recorded(Exception):
    pass


class CommandRecorder(redis.Redis):  # type: ignore[type-arg]
    """A client whose execute_command records the command instead of sending it."""

    def __init__(self) -> None:  # a pool that never connects: some methods read its kwargs
        self.connection_pool = redis.ConnectionPool()
        self.calls: list[tuple[Any, ...]] = []

    def execute_command(self, *args: Any, **options: Any) -> Any:
        self.calls.append(args)
        raise _Recorded


def recorded_args(method: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> tuple[Any, ...] | None:
    """The command ``redis.Redis.<method>(*args, **kwargs)`` sends, or None."""
    rec = CommandRecorder()
    try:
        getattr(rec, method)(*args, **kwargs)
    except _Recorded:
        pass
    except Exception:
        return None
    return rec.calls[0] if rec.calls else None


def recorded_name(method: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> str | None:
    """The command name the library sees for that call (``command_name``), or None."""
    sent = recorded_args(method, args, kwargs)
    return None if sent is None else safety.command_name(sent)


def wire_words(sent: tuple[Any, ...], n: int) -> str:
    """The first ``n`` words of a command as the server parses it (``OBJECT ENCODING``)."""
    words: list[str] = []
    for a in sent[:n]:
        words.extend((a.decode("latin-1") if isinstance(a, bytes) else str(a)).split(" "))
    return " ".join(words[:n]).upper()


_GUESSES: dict[str, Any] = {
    "mapping": {"f": "v"},
    "keys": ["k"],
    "names": ["k"],
    "values": ["v"],
    "fields": ["f"],
    "members": ["m"],
    "streams": {"k": "0"},
}


def redis_py_commands() -> tuple[dict[str, set[str]], list[str]]:
    """{command name: {redis-py method names}} for every command method of redis.Redis,
    and the methods whose command could not be determined by calling them."""
    found: dict[str, set[str]] = {}
    unknown: list[str] = []
    for attr in sorted(dir(redis.Redis)):
        if attr.startswith("_") or attr == "execute_command":
            continue
        func = getattr(redis.Redis, attr)
        if not inspect.isfunction(func) or not func.__module__.startswith("redis.commands"):
            continue
        params = [
            p
            for p in list(inspect.signature(func).parameters.values())[1:]
            if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY, p.POSITIONAL_ONLY)
        ]
        name = None
        for default in ("x", 1, ["x"], {"x": 1}):
            kwargs = {p.name: (_GUESSES.get(p.name, default) if default == "x" else default) for p in params}
            name = recorded_name(attr, (), kwargs)
            if name is not None:
                break
        if name is None:
            unknown.append(attr)
        else:
            found.setdefault(name, set()).add(attr)
    return found, unknown


# ---------------------------------------------------------------------------------------
# Recipes
# ---------------------------------------------------------------------------------------

SCRIPT = "return redis.call('GET', KEYS[1])"
SCRIPT_SHA = hashlib.sha1(SCRIPT.encode()).hexdigest()
WSCRIPT = "return redis.call('INCR', KEYS[1])"
WSCRIPT_SHA = hashlib.sha1(WSCRIPT.encode()).hexdigest()
LIB = (
    "#!lua name=difflib\n"
    "redis.register_function{function_name='ro', callback=function(keys, args) "
    "return redis.call('GET', keys[1]) end, flags={'no-writes'}}\n"
    "redis.register_function('incr', function(keys, args) return redis.call('INCR', keys[1]) end)"
)
LIB2 = "#!lua name=difflib2\nredis.register_function('two', function(keys, args) return 2 end)"

S = ("SET", "s", "hello")
S2 = ("SET", "s2", "help")
N = ("SET", "n", "10")
L = ("RPUSH", "l", "a", "b", "c")
H = ("HSET", "h", "f", "v", "g", "5")
SET = ("SADD", "st", "a", "b", "c")
SET2 = ("SADD", "st2", "b", "c", "d")
Z = ("ZADD", "z", "1", "a", "2", "b", "3", "c")
Z2 = ("ZADD", "z2", "2", "b", "3", "c", "4", "d")
ZL = ("ZADD", "zl", "0", "a", "0", "b", "0", "c")
GEO = ("GEOADD", "geo", "13.361389", "38.115556", "Palermo", "15.087269", "37.502669", "Catania")
HLL = ("PFADD", "hll", "a", "b")
HLL2 = ("PFADD", "hll2", "c")
X = (("XADD", "x", "1-1", "f", "v"), ("XADD", "x", "2-1", "f", "w"), ("XGROUP", "CREATE", "x", "g", "0"))
XREAD = (*X, ("XREADGROUP", "GROUP", "g", "c1", "STREAMS", "x", ">"))
TTL = ("SET", "s", "hello", "EX", "1000")


def _type(v: Any) -> str:
    return type(v).__name__


def _scan(v: Any) -> Any:
    cursor, items = v
    if isinstance(items, dict):
        return cursor, sorted(items.items())
    return cursor, sorted(items)


def _sorted(v: Any) -> Any:
    return sorted(v)


def _ttl(v: Any) -> Any:
    # A TTL read a few milliseconds later is the same TTL.
    return round(v / 10_000) if isinstance(v, int) and v > 0 else v


def _consumers(v: Any) -> Any:
    return [{k: x for k, x in c.items() if k not in ("idle", "inactive")} for c in v]


@dataclass(frozen=True)
class Recipe:
    command: str
    method: str
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    setup: tuple[tuple[Any, ...], ...] = ()
    norm: Callable[[Any], Any] | None = None

    def normalise(self, value: Any) -> Any:
        return self.norm(value) if self.norm is not None else value


def R(
    command: str,
    method: str,
    *args: Any,
    setup: tuple[Any, ...] = (),
    norm: Callable[[Any], Any] | None = None,
    **kwargs: Any,
) -> Recipe:
    steps = tuple(setup) if setup and isinstance(setup[0], tuple) else ((setup,) if setup else ())
    return Recipe(command, method, args, kwargs, steps, norm)


def _flat(*parts: Any) -> tuple[tuple[Any, ...], ...]:
    out: list[tuple[Any, ...]] = []
    for p in parts:
        if p and isinstance(p[0], tuple):
            out.extend(p)
        else:
            out.append(p)
    return tuple(out)


EX = "execute_command"

RECIPES: list[Recipe] = [
    # -- strings and bits -----------------------------------------------------------
    R("GET", "get", "s", setup=S),
    R("SET", "set", "s", "new", setup=S),
    R("SETEX", "setex", "s", 1000, "new", setup=S),
    R("PSETEX", "psetex", "s", 1_000_000, "new", setup=S),
    R("MSET", "mset", {"s": "1", "t": "2"}, setup=S),
    R("MSETNX", "msetnx", {"a": "1", "b": "2"}),
    R("SETNX", "setnx", "s", "v"),
    R("GETSET", "getset", "s", "new", setup=S),
    R("GETDEL", "getdel", "s", setup=S),
    R("GETEX", "getex", "s", ex=1000, setup=S),
    R("MGET", "mget", ["s", "nope"], setup=S),
    R("APPEND", "append", "s", "!", setup=S),
    R("INCR", EX, "INCR", "n", setup=N),  # redis-py's incr() sends INCRBY
    R("INCRBY", "incrby", "n", 5, setup=N),
    R("INCRBYFLOAT", "incrbyfloat", "n", 1.5, setup=N),
    R("DECR", EX, "DECR", "n", setup=N),
    R("DECRBY", "decrby", "n", 3, setup=N),
    R("STRLEN", "strlen", "s", setup=S),
    R("GETRANGE", "getrange", "s", 0, 2, setup=S),
    R("SUBSTR", "substr", "s", 0, 2, setup=S),
    R("SETRANGE", "setrange", "s", 0, "J", setup=S),
    R("LCS", "lcs", "s", "s2", setup=(S, S2)),
    R("SETBIT", "setbit", "b", 7, 1),
    R("GETBIT", "getbit", "s", 1, setup=S),
    R("BITCOUNT", "bitcount", "s", setup=S),
    R("BITPOS", "bitpos", "s", 1, setup=S),
    R("BITOP", "bitop", "OR", "dest", "s", "s2", setup=(S, S2)),
    R("BITFIELD", EX, "BITFIELD", "s", "INCRBY", "u8", "0", "1", setup=S),
    R("BITFIELD_RO", "bitfield_ro", "s", "u8", 0, setup=S),
    # -- keys -----------------------------------------------------------------------
    R("DEL", "delete", "s", setup=S),
    R("UNLINK", "unlink", "s", setup=S),
    R("EXISTS", "exists", "s", "nope", setup=S),
    R("TOUCH", "touch", "s", "nope", setup=S),
    R("TYPE", "type", "s", setup=S),
    R("EXPIRE", "expire", "s", 1000, setup=S),
    R("PEXPIRE", "pexpire", "s", 1_000_000, setup=S),
    R("EXPIREAT", "expireat", "s", 4_000_000_000, setup=S),
    R("PEXPIREAT", "pexpireat", "s", 4_000_000_000_000, setup=S),
    R("EXPIRETIME", "expiretime", "s", setup=("SET", "s", "v", "EXAT", "4000000000")),
    R("PEXPIRETIME", "pexpiretime", "s", setup=("SET", "s", "v", "EXAT", "4000000000")),
    R("TTL", "ttl", "s", setup=TTL, norm=lambda v: round(v / 10)),
    R("PTTL", "pttl", "s", setup=TTL, norm=_ttl),
    R("PERSIST", "persist", "s", setup=TTL),
    R("RENAME", "rename", "s", "t", setup=S),
    R("RENAMENX", "renamenx", "s", "t", setup=S),
    R("COPY", "copy", "s", "t", setup=S),
    R("MOVE", "move", "s", 1, setup=S),
    R("DUMP", "dump", "s", setup=S),
    R("RESTORE", "restore", "t", 0, b"\x00\x05hello\n\x00\xd4\xd3\xe3\xb2\xd3\xb2\xce\xa0"),
    R("KEYS", "keys", "*", setup=(S, S2), norm=_sorted),
    R("SCAN", "scan", setup=(S, S2), norm=_scan),
    R("RANDOMKEY", "randomkey", setup=S),
    R("DBSIZE", "dbsize", setup=(S, S2)),
    R("SORT", "sort", "l", alpha=True, setup=L),
    R("SORT_RO", EX, "SORT_RO", "l", "ALPHA", setup=L),
    R("OBJECT", EX, "OBJECT", "ENCODING", "s", setup=S),
    R("OBJECT ENCODING", "object", "encoding", "s", setup=S),
    R("OBJECT REFCOUNT", "object", "refcount", "s", setup=S),
    R("OBJECT IDLETIME", "object", "idletime", "s", setup=S, norm=_type),
    R(
        "OBJECT FREQ",
        "object",
        "freq",
        "s",
        setup=(("CONFIG", "SET", "maxmemory-policy", "allkeys-lfu"), S),
        norm=_type,
    ),
    R("MEMORY USAGE", "memory_usage", "s", setup=S),
    # -- lists ----------------------------------------------------------------------
    R("LPUSH", "lpush", "l", "z", setup=L),
    R("RPUSH", "rpush", "l", "z", setup=L),
    R("LPUSHX", "lpushx", "l", "z", setup=L),
    R("RPUSHX", "rpushx", "l", "z", setup=L),
    R("LPOP", "lpop", "l", setup=L),
    R("RPOP", "rpop", "l", setup=L),
    R("LINDEX", "lindex", "l", 1, setup=L),
    R("LLEN", "llen", "l", setup=L),
    R("LRANGE", "lrange", "l", 0, -1, setup=L),
    R("LPOS", "lpos", "l", "b", setup=L),
    R("LSET", "lset", "l", 0, "z", setup=L),
    R("LINSERT", "linsert", "l", "BEFORE", "b", "z", setup=L),
    R("LREM", "lrem", "l", 1, "b", setup=L),
    R("LTRIM", "ltrim", "l", 1, -1, setup=L),
    R("LMOVE", "lmove", "l", "l2", "LEFT", "RIGHT", setup=L),
    R("RPOPLPUSH", "rpoplpush", "l", "l2", setup=L),
    R("LMPOP", "lmpop", 1, "l", direction="LEFT", setup=L),
    R("BLPOP", "blpop", ["l"], 1, setup=L),
    R("BRPOP", "brpop", ["l"], 1, setup=L),
    R("BLMOVE", "blmove", "l", "l2", 1, "LEFT", "RIGHT", setup=L),
    R("BRPOPLPUSH", "brpoplpush", "l", "l2", 1, setup=L),
    R("BLMPOP", "blmpop", 1, 1, "l", direction="LEFT", setup=L),
    # -- hashes ---------------------------------------------------------------------
    R("HSET", "hset", "h", "n", "x", setup=H),
    R("HMSET", "hmset", "h", {"n": "x"}, setup=H),
    R("HSETNX", "hsetnx", "h", "n", "x", setup=H),
    R("HGET", "hget", "h", "f", setup=H),
    R("HMGET", "hmget", "h", ["f", "g"], setup=H),
    R("HGETALL", "hgetall", "h", setup=H),
    R("HDEL", "hdel", "h", "f", setup=H),
    R("HEXISTS", "hexists", "h", "f", setup=H),
    R("HKEYS", "hkeys", "h", setup=H, norm=_sorted),
    R("HVALS", "hvals", "h", setup=H, norm=_sorted),
    R("HLEN", "hlen", "h", setup=H),
    R("HSTRLEN", "hstrlen", "h", "f", setup=H),
    R("HINCRBY", "hincrby", "h", "g", 2, setup=H),
    R("HINCRBYFLOAT", "hincrbyfloat", "h", "g", 0.5, setup=H),
    R("HRANDFIELD", "hrandfield", "h1", setup=("HSET", "h1", "f", "v")),
    R("HSCAN", "hscan", "h", setup=H, norm=_scan),
    # -- sets -----------------------------------------------------------------------
    R("SADD", "sadd", "st", "n", setup=SET),
    R("SREM", "srem", "st", "a", setup=SET),
    R("SPOP", "spop", "st1", setup=("SADD", "st1", "a")),
    R("SMOVE", "smove", "st", "st2", "a", setup=(SET, SET2)),
    R("SCARD", "scard", "st", setup=SET),
    R("SISMEMBER", "sismember", "st", "a", setup=SET),
    R("SMISMEMBER", "smismember", "st", ["a", "z"], setup=SET),
    R("SMEMBERS", "smembers", "st", setup=SET),
    R("SRANDMEMBER", "srandmember", "st1", setup=("SADD", "st1", "a")),
    R("SDIFF", "sdiff", ["st", "st2"], setup=(SET, SET2)),
    R("SINTER", "sinter", ["st", "st2"], setup=(SET, SET2)),
    R("SUNION", "sunion", ["st", "st2"], setup=(SET, SET2)),
    R("SINTERCARD", "sintercard", 2, ["st", "st2"], setup=(SET, SET2)),
    R("SDIFFSTORE", "sdiffstore", "dest", ["st", "st2"], setup=(SET, SET2)),
    R("SINTERSTORE", "sinterstore", "dest", ["st", "st2"], setup=(SET, SET2)),
    R("SUNIONSTORE", "sunionstore", "dest", ["st", "st2"], setup=(SET, SET2)),
    R("SSCAN", "sscan", "st", setup=SET, norm=_scan),
    # -- sorted sets ----------------------------------------------------------------
    R("ZADD", "zadd", "z", {"n": 5}, setup=Z),
    R("ZINCRBY", "zincrby", "z", 1, "a", setup=Z),
    R("ZREM", "zrem", "z", "a", setup=Z),
    R("ZCARD", "zcard", "z", setup=Z),
    R("ZCOUNT", "zcount", "z", 0, 10, setup=Z),
    R("ZSCORE", "zscore", "z", "a", setup=Z),
    R("ZMSCORE", "zmscore", "z", ["a", "b"], setup=Z),
    R("ZRANK", "zrank", "z", "b", setup=Z),
    R("ZREVRANK", "zrevrank", "z", "b", setup=Z),
    R("ZRANGE", "zrange", "z", 0, -1, setup=Z),
    R("ZREVRANGE", "zrevrange", "z", 0, -1, setup=Z),
    R("ZRANGEBYSCORE", "zrangebyscore", "z", 0, 10, setup=Z),
    R("ZREVRANGEBYSCORE", "zrevrangebyscore", "z", 10, 0, setup=Z),
    R("ZRANGEBYLEX", "zrangebylex", "zl", "-", "+", setup=ZL),
    R("ZREVRANGEBYLEX", "zrevrangebylex", "zl", "+", "-", setup=ZL),
    R("ZLEXCOUNT", "zlexcount", "zl", "-", "+", setup=ZL),
    R("ZRANGESTORE", "zrangestore", "dest", "z", 0, -1, setup=Z),
    R("ZREMRANGEBYSCORE", "zremrangebyscore", "z", 0, 1, setup=Z),
    R("ZREMRANGEBYLEX", "zremrangebylex", "zl", "[a", "[a", setup=ZL),
    R("ZREMRANGEBYRANK", "zremrangebyrank", "z", 0, 0, setup=Z),
    R("ZPOPMIN", "zpopmin", "z", setup=Z),
    R("ZPOPMAX", "zpopmax", "z", setup=Z),
    R("BZPOPMIN", "bzpopmin", ["z"], 1, setup=Z),
    R("BZPOPMAX", "bzpopmax", ["z"], 1, setup=Z),
    R("ZMPOP", "zmpop", 1, ["z"], min=True, setup=Z),
    R("BZMPOP", "bzmpop", 1, 1, ["z"], min=True, setup=Z),
    R("ZRANDMEMBER", "zrandmember", "z1", setup=("ZADD", "z1", "1", "a")),
    R("ZDIFF", "zdiff", ["z", "z2"], setup=(Z, Z2)),
    R("ZINTER", "zinter", ["z", "z2"], setup=(Z, Z2)),
    R("ZUNION", "zunion", ["z", "z2"], setup=(Z, Z2)),
    R("ZINTERCARD", "zintercard", 2, ["z", "z2"], setup=(Z, Z2)),
    R("ZDIFFSTORE", "zdiffstore", "dest", ["z", "z2"], setup=(Z, Z2)),
    R("ZINTERSTORE", "zinterstore", "dest", ["z", "z2"], setup=(Z, Z2)),
    R("ZUNIONSTORE", "zunionstore", "dest", ["z", "z2"], setup=(Z, Z2)),
    R("ZSCAN", "zscan", "z", setup=Z, norm=_scan),
    # -- hyperloglog, geo -----------------------------------------------------------
    R("PFADD", "pfadd", "hll", "c", setup=HLL),
    R("PFCOUNT", "pfcount", "hll", setup=HLL),
    R("PFMERGE", "pfmerge", "dest", "hll", "hll2", setup=(HLL, HLL2)),
    R("GEOADD", "geoadd", "geo", (13.5, 38.5, "Cefalu"), setup=GEO),
    R("GEODIST", "geodist", "geo", "Palermo", "Catania", setup=GEO),
    R("GEOHASH", "geohash", "geo", "Palermo", setup=GEO),
    R("GEOPOS", "geopos", "geo", "Palermo", setup=GEO),
    R("GEOSEARCH", "geosearch", "geo", member="Palermo", radius=200, unit="km", setup=GEO),
    R(
        "GEOSEARCHSTORE",
        "geosearchstore",
        "dest",
        "geo",
        member="Palermo",
        radius=200,
        unit="km",
        setup=GEO,
    ),
    R("GEORADIUS", "georadius", "geo", 15, 37, 200, unit="km", setup=GEO),
    R("GEORADIUSBYMEMBER", "georadiusbymember", "geo", "Palermo", 200, unit="km", setup=GEO),
    R("GEORADIUS_RO", EX, "GEORADIUS_RO", "geo", 15, 37, 200, "km", setup=GEO),
    R("GEORADIUSBYMEMBER_RO", EX, "GEORADIUSBYMEMBER_RO", "geo", "Palermo", 200, "km", setup=GEO),
    # -- streams --------------------------------------------------------------------
    R("XADD", "xadd", "x", {"f": "z"}, id="3-1", setup=X),
    R("XLEN", "xlen", "x", setup=X),
    R("XRANGE", "xrange", "x", setup=X),
    R("XREVRANGE", "xrevrange", "x", setup=X),
    R("XREAD", "xread", {"x": "0"}, setup=X),
    R("XREADGROUP", "xreadgroup", "g", "c1", {"x": ">"}, setup=X),
    R("XACK", "xack", "x", "g", "1-1", setup=XREAD),
    R("XDEL", "xdel", "x", "1-1", setup=X),
    R("XTRIM", "xtrim", "x", maxlen=1, approximate=False, setup=X),
    R("XPENDING", "xpending", "x", "g", setup=XREAD),
    R("XCLAIM", "xclaim", "x", "g", "c2", 0, ["1-1"], justid=True, setup=XREAD),
    R("XAUTOCLAIM", "xautoclaim", "x", "g", "c2", 0, justid=True, setup=XREAD),
    R("XINFO", EX, "XINFO", "STREAM", "x", setup=X),
    R("XINFO STREAM", "xinfo_stream", "x", setup=X),
    R("XINFO GROUPS", "xinfo_groups", "x", setup=X),
    R("XINFO CONSUMERS", "xinfo_consumers", "x", "g", setup=XREAD, norm=_consumers),
    R("XGROUP CREATE", "xgroup_create", "x", "g2", "0", setup=X),
    R("XGROUP DESTROY", "xgroup_destroy", "x", "g", setup=X),
    R("XGROUP SETID", "xgroup_setid", "x", "g", "1-1", setup=X),
    R("XGROUP CREATECONSUMER", "xgroup_createconsumer", "x", "g", "c9", setup=X),
    R("XGROUP DELCONSUMER", "xgroup_delconsumer", "x", "g", "c1", setup=XREAD),
    # -- scripting and functions ----------------------------------------------------
    R("EVAL", "eval", WSCRIPT, 1, "n", setup=N),
    R("EVALSHA", "evalsha", WSCRIPT_SHA, 1, "n", setup=(N, ("SCRIPT", "LOAD", WSCRIPT))),
    R("EVAL_RO", "eval_ro", SCRIPT, 1, "s", setup=S),
    R("EVALSHA_RO", "evalsha_ro", SCRIPT_SHA, 1, "s", setup=(S, ("SCRIPT", "LOAD", SCRIPT))),
    R("SCRIPT LOAD", "script_load", SCRIPT),
    R("SCRIPT EXISTS", "script_exists", SCRIPT_SHA, setup=("SCRIPT", "LOAD", SCRIPT)),
    R("SCRIPT FLUSH", "script_flush", setup=("SCRIPT", "LOAD", SCRIPT)),
    R("FCALL", "fcall", "incr", 1, "n", setup=(N, ("FUNCTION", "LOAD", LIB))),
    R("FCALL_RO", "fcall_ro", "ro", 1, "s", setup=(S, ("FUNCTION", "LOAD", LIB))),
    R("FUNCTION LOAD", "function_load", LIB2),
    R("FUNCTION LIST", "function_list", setup=("FUNCTION", "LOAD", LIB)),
    R("FUNCTION DELETE", "function_delete", "difflib", setup=("FUNCTION", "LOAD", LIB)),
    R("FUNCTION FLUSH", "function_flush", setup=("FUNCTION", "LOAD", LIB)),
    # -- server, connection, pub/sub ------------------------------------------------
    R("PING", "ping"),
    R("ECHO", "echo", "hi"),
    R("TIME", "time", norm=_type),
    R("INFO", "info", norm=_type),
    R("LASTSAVE", "lastsave", norm=_type),
    R("ROLE", "role"),
    R("LOLWUT", "lolwut", norm=_type),
    R("COMMAND", "command", norm=_type),
    R("COMMAND COUNT", "command_count"),
    R("COMMAND INFO", EX, "COMMAND INFO", "get"),
    R("COMMAND DOCS", EX, "COMMAND DOCS", "get"),
    R("COMMAND GETKEYS", "command_getkeys", "GET", "s"),
    R("COMMAND LIST", "command_list", norm=_sorted),
    R("CONFIG GET", "config_get", "maxmemory-samples"),
    R("CONFIG SET", "config_set", "maxmemory-samples", 7),
    R("CONFIG RESETSTAT", "config_resetstat"),
    R("MEMORY STATS", "memory_stats", norm=_type),
    R("CLIENT LIST", "client_list", norm=_type),
    R("CLIENT INFO", "client_info", norm=_type),
    R("CLIENT ID", "client_id", norm=_type),
    R("CLIENT GETNAME", "client_getname"),
    R("CLIENT SETNAME", "client_setname", "diff"),
    R("CLIENT SETINFO", "client_setinfo", "LIB-VER", "1.0"),
    R("SLOWLOG GET", "slowlog_get", norm=_type),
    R("SLOWLOG LEN", "slowlog_len", norm=_type),
    R("SLOWLOG RESET", "slowlog_reset"),
    R("FLUSHDB", "flushdb", setup=(S, S2)),
    R("FLUSHALL", "flushall", setup=(S, S2)),
    R("SWAPDB", "swapdb", 1, 2, setup=(("SELECT", "1"), S, ("SELECT", "0"))),
    R("SELECT", EX, "SELECT", "0"),
    R("WAIT", "wait", 0, 0),
    R("PUBLISH", "publish", "chan", "msg"),
    R("SPUBLISH", "spublish", "chan", "msg"),
    R("PUBSUB", EX, "PUBSUB", "CHANNELS"),
    R("PUBSUB CHANNELS", "pubsub_channels"),
    R("PUBSUB NUMSUB", "pubsub_numsub", "chan"),
    R("PUBSUB NUMPAT", "pubsub_numpat"),
    R("PUBSUB SHARDCHANNELS", "pubsub_shardchannels"),
    R("PUBSUB SHARDNUMSUB", "pubsub_shardnumsub", "chan"),
    R("ACL WHOAMI", "acl_whoami"),
    R("ACL USERS", "acl_users"),
    R("ACL CAT", "acl_cat", norm=_sorted),
    R("ACL SETUSER", "acl_setuser", "difftester", enabled=True),
    R("ACL DELUSER", "acl_deluser", "difftester", setup=("ACL", "SETUSER", "difftester")),
    R("ACL GETUSER", "acl_getuser", "default"),
    R("ACL LIST", "acl_list"),
    R("ACL GENPASS", "acl_genpass", norm=_type),
]

#: Option variants of table commands whose second run answers differently: a table
#: that only looks at the command name would re-send them. Run in the differential
#: too, labelled ``NAME#variant``.
VARIANTS: list[tuple[str, Recipe]] = [
    ("SET#GET", R("SET", "set", "s", "new", get=True, setup=S)),
    ("SET#NX", R("SET", "set", "s", "new", nx=True)),
    ("SET#KEEPTTL-GET", R("SET", EX, "SET", "s", "new", "KEEPTTL", "GET", setup=TTL)),
    ("EXPIRE#NX", R("EXPIRE", "expire", "s", 1000, nx=True, setup=S)),
    ("EXPIRE#GT", R("EXPIRE", "expire", "s", 2000, gt=True, setup=TTL)),
    ("EXPIRE#0", R("EXPIRE", "expire", "s", 0, setup=S)),
    ("EXPIRE#negative", R("EXPIRE", "expire", "s", -5, setup=S)),
    ("PEXPIRE#0", R("PEXPIRE", "pexpire", "s", 0, setup=S)),
    ("EXPIREAT#past", R("EXPIREAT", "expireat", "s", 1000, setup=S)),
    ("GETEX#EXAT-past", R("GETEX", "getex", "s", exat=1000, setup=S)),
    ("GETEX#PERSIST", R("GETEX", "getex", "s", persist=True, setup=TTL)),
    ("ZADD#INCR", R("ZADD", "zadd", "z", {"a": 1}, incr=True, setup=Z)),
    ("ZADD#CH-existing", R("ZADD", "zadd", "z", {"a": 9}, ch=True, setup=Z)),
    ("HSET#existing", R("HSET", "hset", "h", "f", "v", setup=H)),
    ("MSET#three", R("MSET", "mset", {"a": "1", "b": "2", "c": "3"})),
    ("FLUSHDB#ASYNC", R("FLUSHDB", "flushdb", asynchronous=True, setup=S)),
]

RECIPE_BY_NAME: dict[str, Recipe] = {}
for _r in RECIPES:
    assert _r.command not in RECIPE_BY_NAME, f"two recipes for {_r.command}"
    RECIPE_BY_NAME[_r.command] = _r

# Reset before every run (both runs of a recipe start from this, then the recipe's setup).
RESET: tuple[tuple[Any, ...], ...] = (
    ("FLUSHALL",),
    ("SCRIPT", "FLUSH"),
    ("FUNCTION", "FLUSH"),
    ("CONFIG", "SET", "maxmemory-policy", "noeviction"),
    ("CONFIG", "SET", "maxmemory-samples", "5"),
    ("SLOWLOG", "RESET"),
    ("ACL", "DELUSER", "difftester"),
)


#: Real Redis commands that arrived after 7.0 (the Debian server may be older): the
#: version that added them. A table entry the server lacks must be one of these or a
#: module command.
NEWER_THAN_SERVER = {"CLIENT SETINFO": (7, 2), "WAITAOF": (7, 2), "CLIENT NO-TOUCH": (7, 2)}


def module_command(name: str) -> bool:
    """A module command (``JSON.GET``): only there when the server loaded the module."""
    return "." in name.split(" ", 1)[0]


# ---------------------------------------------------------------------------------------
# Lanes: a server, a proxy, plain clients, and the handles under test
# ---------------------------------------------------------------------------------------


class Lane:
    def __init__(self) -> None:
        self.server = RedisServer().start()
        self.proxy = FaultProxy(self.server.host, self.server.port).start()
        self.dbs = [self.server.client(db=i) for i in range(3)]

    @property
    def admin(self) -> redis.Redis:  # type: ignore[type-arg]
        return self.dbs[0]

    def close(self) -> None:
        self.proxy.stop()
        self.server.stop()

    def prepare(self, setup: tuple[tuple[Any, ...], ...]) -> None:
        # One connection, so a SELECT in a setup applies to the commands after it.
        with self.admin.client() as c:
            for step in (*RESET, *setup):
                c.execute_command(*step)

    def dump(self) -> Any:
        """Every key of db 0..2 (type, content, TTL rounded) and the server-wide state."""
        out: dict[str, Any] = {}
        for i, c in enumerate(self.dbs):
            for key in sorted(c.scan_iter(count=1000)):
                out[f"{i}:{key!r}"] = _dump_key(c, key)
        a = self.admin
        out["scripts"] = a.script_exists(SCRIPT_SHA, WSCRIPT_SHA)
        out["functions"] = a.function_list()
        out["config"] = a.config_get("maxmemory-samples")
        out["users"] = sorted(a.acl_users())
        return out


class _Ttl:
    """A key's PTTL that equals another within a few seconds: the two runs are dumped at
    different moments (the handle's run waits out a dropped reply), so an absolute expiry
    reads a little less the second time; rounding to buckets flipped at bucket edges."""

    __slots__ = ("ms",)
    TOLERANCE_MS = 5_000

    def __init__(self, ms: int) -> None:
        self.ms = ms

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _Ttl):
            return NotImplemented
        if self.ms < 0 or other.ms < 0:  # -1 no expiry, -2 no key: exact
            return self.ms == other.ms
        return abs(self.ms - other.ms) <= self.TOLERANCE_MS

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"pttl~{self.ms}"


def _dump_key(c: redis.Redis, key: bytes) -> Any:  # type: ignore[type-arg]
    kind = c.type(key)
    ttl = _Ttl(c.pttl(key))
    if kind == b"string":
        content: Any = c.get(key)
    elif kind == b"list":
        content = c.lrange(key, 0, -1)
    elif kind == b"set":
        content = sorted(c.smembers(key))
    elif kind == b"hash":
        content = sorted(c.hgetall(key).items())
    elif kind == b"zset":
        content = c.zrange(key, 0, -1, withscores=True)
    elif kind == b"stream":
        info = c.xinfo_stream(key)
        groups = []
        for g in c.xinfo_groups(key):
            consumers = sorted((x["name"], x["pending"]) for x in c.xinfo_consumers(key, g["name"]))
            pending = [
                (p["message_id"], p["consumer"], p["times_delivered"])
                for p in c.xpending_range(key, g["name"], "-", "+", 100)
            ]
            groups.append((g["name"], g["last-delivered-id"], g.get("entries-read"), consumers, pending))
        content = (
            c.xrange(key),
            info["last-generated-id"],
            info.get("entries-added"),
            info.get("max-deleted-entry-id"),
            sorted(groups),
        )
    else:
        content = kind
    return kind, ttl, content


@dataclass
class Outcome:
    label: str
    recipe: Recipe
    direct: Any
    handle: Any
    retries: int
    dropped: int
    direct_data: Any
    handle_data: Any

    def problems(self) -> list[str]:
        out = []
        if self.dropped != 1:
            out.append(f"the proxy dropped {self.dropped} replies, not 1 (the test did not bite)")
        if self.direct_data != self.handle_data:
            out.append(
                f"data differs: single run {self.direct_data!r}, through the handle {self.handle_data!r}"
            )
        h = self.handle
        if h[0] == "unavailable":
            if not h[1]:
                out.append(f"raised RedisUnavailable({h[2]!r}) with outcome_unknown=False, but it had run")
        elif h != self.direct:
            out.append(f"reply differs: direct {self.direct!r}, through the handle {h!r}")
        return out


def _capture(recipe: Recipe, call: Callable[[], Any]) -> Any:
    try:
        return ("ok", recipe.normalise(call()))
    except RedisUnavailable as e:
        return ("unavailable", e.outcome_unknown, e.reason)
    except redis.exceptions.ResponseError as e:
        return ("error", type(e).__name__, str(e))


async def _acapture(recipe: Recipe, call: Callable[[], Any]) -> Any:
    try:
        return ("ok", recipe.normalise(await call()))
    except RedisUnavailable as e:
        return ("unavailable", e.outcome_unknown, e.reason)
    except redis.exceptions.ResponseError as e:
        return ("error", type(e).__name__, str(e))


def _policies(recorder: Recorder) -> dict[str, Any]:
    return {
        # The retry budget and the breaker are not under test here: every recipe drops a
        # reply, and neither may turn a decision about re-sending into a rejection.
        "retry": RetryPolicy(
            attempt_timeout=ATTEMPT_TIMEOUT, max_attempts=3, budget_ratio=10.0, budget_min_per_second=1000.0
        ),
        "breaker": BreakerPolicy(
            failure_threshold=1_000_000, failure_rate_threshold=1.0, minimum_calls=1_000_000
        ),
        "hooks": [recorder],
    }


class SyncLane:
    def __init__(self, lane: Lane) -> None:
        self.lane = lane
        self.recorder = Recorder()
        self.plain = lane.server.client()
        self.client = redis.Redis(host=lane.proxy.host, port=lane.proxy.port)
        self.res = Resilience(self.client, **_policies(self.recorder))

    def close(self) -> None:
        self.res.close()
        self.client.close()

    def run(self, label: str, recipe: Recipe) -> Outcome:
        lane = self.lane
        lane.prepare(recipe.setup)
        direct = _capture(recipe, lambda: getattr(self.plain, recipe.method)(*recipe.args, **recipe.kwargs))
        direct_data = lane.dump()
        lane.prepare(recipe.setup)
        with self.res.request(deadline=2) as r:
            r.ping()  # a connected, handshaken connection, so the drop hits the command's reply
            before_drop, before_retry = lane.proxy.replies_dropped, len(self.recorder.of(RetryScheduled))
            lane.proxy.set_mode("drop_replies", count=1, sever=True)
            try:
                handle = _capture(recipe, lambda: getattr(r, recipe.method)(*recipe.args, **recipe.kwargs))
            finally:
                lane.proxy.set_mode("pass")
        return Outcome(
            label,
            recipe,
            direct,
            handle,
            len(self.recorder.of(RetryScheduled)) - before_retry,
            lane.proxy.replies_dropped - before_drop,
            direct_data,
            lane.dump(),
        )


class AsyncLane:
    def __init__(self, lane: Lane) -> None:
        self.lane = lane
        self.recorder = Recorder()
        self.plain = redis.asyncio.Redis(host=lane.server.host, port=lane.server.port, socket_timeout=5.0)
        self.client = redis.asyncio.Redis(host=lane.proxy.host, port=lane.proxy.port)
        self.res = Resilience(self.client, **_policies(self.recorder))  # built inside the loop

    async def close(self) -> None:
        self.res.close()
        await self.client.aclose()
        await self.plain.aclose()

    async def run(self, label: str, recipe: Recipe) -> Outcome:
        lane = self.lane
        lane.prepare(recipe.setup)
        direct = await _acapture(
            recipe, lambda: getattr(self.plain, recipe.method)(*recipe.args, **recipe.kwargs)
        )
        direct_data = lane.dump()
        lane.prepare(recipe.setup)
        async with self.res.request(deadline=2) as r:
            await r.ping()
            before_drop, before_retry = lane.proxy.replies_dropped, len(self.recorder.of(RetryScheduled))
            lane.proxy.set_mode("drop_replies", count=1, sever=True)
            try:
                handle = await _acapture(
                    recipe, lambda: getattr(r, recipe.method)(*recipe.args, **recipe.kwargs)
                )
            finally:
                lane.proxy.set_mode("pass")
        return Outcome(
            label,
            recipe,
            direct,
            handle,
            len(self.recorder.of(RetryScheduled)) - before_retry,
            lane.proxy.replies_dropped - before_drop,
            direct_data,
            lane.dump(),
        )


@pytest.fixture(scope="module")
def lanes() -> Iterator[list[Lane]]:
    made: list[Lane] = []
    try:
        for _ in range(LANES):
            made.append(Lane())
        yield made
    finally:
        for lane in made:
            lane.close()


@pytest.fixture(scope="module")
def server_commands(lanes: list[Lane]) -> dict[str, Any]:
    """{table entry: does the server have it (COMMAND INFO)}, and the server's version."""
    out: dict[str, Any] = {}
    # Raw replies: redis-py's COMMAND parser fails on the nil a missing command gets.
    conn = redis.Connection(host=lanes[0].server.host, port=lanes[0].server.port, socket_timeout=5.0)
    try:
        for name in sorted(table_commands()):
            conn.send_command("COMMAND", "INFO", name.lower().replace(" ", "|"))
            info = conn.read_response()
            out[name] = bool(info) and info[0] is not None
    finally:
        conn.disconnect()
    out["__version__"] = lanes[0].admin.info("server")["redis_version"]
    return out


def _to_run(server_commands: Mapping[str, Any]) -> list[tuple[str, Recipe]]:
    table = table_commands()
    missing = sorted(n for n in table if server_commands[n] and n not in RECIPE_BY_NAME)
    assert not missing, f"table commands with no recipe (add one to RECIPES): {missing}"
    run = [(n, RECIPE_BY_NAME[n]) for n in sorted(table) if server_commands[n]]
    return run + [(label, r) for label, r in VARIANTS if r.command in table]


def _report(flavour: str, outcomes: list[Outcome]) -> None:
    returned = [o for o in outcomes if o.handle[0] != "unavailable"]
    matched = [o for o in returned if not o.problems()]
    unknown = [o for o in outcomes if o.handle[0] == "unavailable" and o.handle[1]]
    bad = [o for o in outcomes if o.problems()]
    print(
        f"\n[differential {flavour}] commands covered: {len({o.recipe.command for o in outcomes})} "
        f"({len(outcomes)} recipes with option variants); re-sent and answered: {len(returned)} "
        f"(matched the single run: {len(matched)}); raised outcome_unknown=True: {len(unknown)}; "
        f"violations: {len(bad)}"
    )
    if bad:
        lines = [f"  {o.label}: {'; '.join(o.problems())}" for o in bad]
        pytest.fail(
            f"{len(bad)} of {len(outcomes)} commands break 'a command is re-sent only if a second run gives "
            "the same reply and data as the first; otherwise RedisUnavailable(outcome_unknown=True)':\n"
            + "\n".join(lines),
            pytrace=False,
        )


# ---------------------------------------------------------------------------------------
# Tests: the command list
# ---------------------------------------------------------------------------------------


def test_every_recipe_issues_its_command_through_its_redis_py_method() -> None:
    wrong = []
    for r in RECIPES + [v for _, v in VARIANTS]:
        sent = recorded_args(r.method, r.args, r.kwargs)
        if sent is None or wire_words(sent, len(r.command.split())) != r.command:
            wrong.append(f"{r.command}: {r.method}{r.args} sends {sent}")
    assert not wrong, wrong


def unreachable_table_entries() -> list[str]:
    """Retry-safe table entries the library does not treat as such for the redis-py call
    that issues them (e.g. redis-py sends ``OBJECT``, ``encoding``: a lookup by the first
    word alone misses ``OBJECT ENCODING``)."""
    table = getattr(safety, "COMMAND_TABLE", None)
    out = []
    for r in RECIPES:
        if r.method == EX or r.command not in table_commands():
            continue
        safe = table[r.command].retry_safe if table is not None else True
        sent = recorded_args(r.method, r.args, r.kwargs)
        if safe and sent is not None and not safety.is_idempotent(safety.command_name(sent), sent):
            out.append(f"{r.command} (sent as {safety.command_name(sent)})")
    return out


def lanes_version(server_commands: Mapping[str, Any]) -> str:
    return str(server_commands["__version__"])


def test_the_command_list_comes_from_redis_py_and_every_table_entry_has_a_recipe(
    server_commands: dict[str, Any],
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # redis-py warns on calls to its experimental methods
        py_commands, undetermined = redis_py_commands()
    table = table_commands()
    not_in_table = sorted(set(py_commands) - table)
    lacking = sorted(n for n, have in server_commands.items() if not have and n in table)
    print(
        f"\n[command list] redis-py command methods: {sum(len(v) for v in py_commands.values())} "
        f"issuing {len(py_commands)} commands; table entries: {len(table)}; "
        f"redis-py commands the table does not know (never re-sent): {len(not_in_table)}: "
        f"{' '.join(not_in_table)}\n[command list] methods whose command could not be recorded: "
        f"{' '.join(undetermined)}\n[command list] table entries this server lacks (COMMAND INFO): {lacking}"
        f"\n[command list] retry-safe table entries the library misses for redis-py's call "
        f"(so never re-sent): {unreachable_table_entries()}"
    )
    version = tuple(int(x) for x in lanes_version(server_commands).split(".")[:2])
    not_real = [
        n for n in lacking if not module_command(n) and not version < NEWER_THAN_SERVER.get(n, (0, 0))
    ]
    assert not not_real, f"table entries that are not commands of this redis-server: {not_real}"
    assert len(py_commands) > 200, "introspecting redis-py found too few commands"
    # Every table entry reachable through a redis-py method has a recipe using that path.
    missing = sorted(n for n in table if server_commands[n] and n not in RECIPE_BY_NAME)
    assert not missing, f"table commands with no recipe (add one to RECIPES): {missing}"


# ---------------------------------------------------------------------------------------
# Tests: the differential, sync and asyncio
# ---------------------------------------------------------------------------------------


def test_differential_sync(lanes: list[Lane], server_commands: dict[str, Any]) -> None:
    recipes = _to_run(server_commands)
    work: queue.Queue[tuple[str, Recipe]] = queue.Queue()
    for r in recipes:
        work.put(r)
    outcomes: list[Outcome] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker(lane: Lane) -> None:
        sl = SyncLane(lane)
        try:
            while True:
                try:
                    label, recipe = work.get_nowait()
                except queue.Empty:
                    return
                o = sl.run(label, recipe)
                with lock:
                    outcomes.append(o)
        except BaseException as e:
            errors.append(e)
        finally:
            sl.close()

    threads = [threading.Thread(target=worker, args=(lane,), daemon=True) for lane in lanes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a lane hung"
    if errors:
        raise errors[0]
    outcomes.sort(key=lambda o: o.label)
    assert len(outcomes) == len(recipes)
    _report("sync", outcomes)


def test_differential_asyncio(lanes: list[Lane], server_commands: dict[str, Any]) -> None:
    recipes = _to_run(server_commands)

    async def main() -> list[Outcome]:
        work: asyncio.Queue[tuple[str, Recipe]] = asyncio.Queue()
        for r in recipes:
            work.put_nowait(r)
        outcomes: list[Outcome] = []

        async def worker(lane: Lane) -> None:
            al = AsyncLane(lane)
            try:
                while not work.empty():
                    outcomes.append(await al.run(*work.get_nowait()))
            finally:
                await al.close()

        async with asyncio.timeout(120):
            await asyncio.gather(*(worker(lane) for lane in lanes))
        return outcomes

    outcomes = asyncio.run(main())
    outcomes.sort(key=lambda o: o.label)
    assert len(outcomes) == len(recipes)
    _report("asyncio", outcomes)


# ---------------------------------------------------------------------------------------
# Tests: pipelines and transactions
# ---------------------------------------------------------------------------------------

Step = tuple[str, tuple[Any, ...]]

PIPELINES: dict[str, tuple[tuple[tuple[Any, ...], ...], list[Step]]] = {
    # Reads and writes whose second run answers like the first: may be re-sent.
    "stable": (_flat(S, H), [("set", ("s", "new")), ("get", ("s",)), ("hget", ("h", "f"))]),
    # SADD answers 1, then 0: must not be re-sent.
    "unstable_sadd": (_flat(S, SET), [("set", ("s", "new")), ("sadd", ("st", "n")), ("get", ("s",))]),
    # DEL of an existing key answers 1, then 0.
    "unstable_del": (_flat(S, S2), [("get", ("s",)), ("delete", ("s2",)), ("get", ("s2",))]),
    # INCR is not idempotent at all.
    "unstable_incr": (_flat(N), [("get", ("n",)), ("incr", ("n",)), ("get", ("n",))]),
}


def _build(p: Any, steps: list[Step]) -> None:
    for method, args in steps:
        getattr(p, method)(*args)


def _run_pipelines(flavour: str, lane: Lane, *, transaction: bool) -> list[str]:
    problems: list[str] = []
    for label, (setup, steps) in PIPELINES.items():
        lane.prepare(setup)
        p = lane.admin.pipeline(transaction=transaction)
        _build(p, steps)
        direct = ("ok", p.execute())
        direct_data = lane.dump()
        lane.prepare(setup)
        lane.admin.config_resetstat()
        dropped0 = lane.proxy.replies_dropped
        handle = _pipeline_through_handle(flavour, lane, steps, transaction=transaction)
        dropped = lane.proxy.replies_dropped - dropped0
        handle_data = lane.dump()
        name = f"{'transaction' if transaction else 'pipeline'} {label}"
        if dropped != 1:
            problems.append(f"{name}: {dropped} replies dropped, not 1")
        if handle_data != direct_data:
            problems.append(f"{name}: data differs: single run {direct_data!r}, handle {handle_data!r}")
        if transaction:
            execs = lane.server.command_count("exec")
            if handle != ("unavailable", True) or execs != 1:
                problems.append(
                    f"{name}: a MULTI/EXEC that may have run must never be re-sent and must raise "
                    f"outcome_unknown=True; got {handle!r}, EXEC ran {execs} times"
                )
        elif handle[0] == "unavailable":
            if not handle[1]:
                problems.append(f"{name}: raised outcome_unknown=False although it ran")
        elif handle != direct:
            problems.append(f"{name}: reply differs: direct {direct!r}, handle {handle!r}")
    return problems


def _pipeline_through_handle(flavour: str, lane: Lane, steps: list[Step], *, transaction: bool) -> Any:
    recorder = Recorder()
    if flavour == "sync":
        client = redis.Redis(host=lane.proxy.host, port=lane.proxy.port)
        res = Resilience(client, **_policies(recorder))
        try:
            with res.request(deadline=2) as r:
                r.ping()
                lane.proxy.set_mode("drop_replies", count=1, sever=True)
                try:
                    p = r.pipeline(transaction=transaction)
                    _build(p, steps)
                    return ("ok", p.execute())
                except RedisUnavailable as e:
                    return ("unavailable", e.outcome_unknown)
                finally:
                    lane.proxy.set_mode("pass")
        finally:
            res.close()
            client.close()

    async def go() -> Any:
        client = redis.asyncio.Redis(host=lane.proxy.host, port=lane.proxy.port)
        res = Resilience(client, **_policies(recorder))
        try:
            async with res.request(deadline=2) as r:
                await r.ping()
                lane.proxy.set_mode("drop_replies", count=1, sever=True)
                try:
                    p = r.pipeline(transaction=transaction)
                    _build(p, steps)
                    return ("ok", await p.execute())
                except RedisUnavailable as e:
                    return ("unavailable", e.outcome_unknown)
                finally:
                    lane.proxy.set_mode("pass")
        finally:
            res.close()
            await client.aclose()

    return asyncio.run(go())


@pytest.mark.parametrize("flavour", ["sync", "asyncio"])
def test_pipeline_is_resent_only_if_every_reply_is_stable(lanes: list[Lane], flavour: str) -> None:
    problems = _run_pipelines(flavour, lanes[0], transaction=False)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("flavour", ["sync", "asyncio"])
def test_transaction_is_never_resent_once_it_may_have_run(lanes: list[Lane], flavour: str) -> None:
    problems = _run_pipelines(flavour, lanes[0], transaction=True)
    assert not problems, "\n".join(problems)
