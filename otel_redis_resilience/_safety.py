"""The command-safety table: which commands may be sent twice. Pure.

A command that was written to the socket and got no reply may already have run
on the server. Sending it again is only safe if running it twice has the same
effect, and the same reply, as running it once. Anything not listed here is
treated as unsafe.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

#: Read-only commands (the server's ``readonly`` flag, Redis 7) plus
#: administrative reads that change nothing.
READ_COMMANDS: frozenset[str] = frozenset(
    [
        "BITCOUNT",
        "BITFIELD_RO",
        "BITPOS",
        "DBSIZE",
        "DUMP",
        "EVAL_RO",
        "EVALSHA_RO",
        "EXISTS",
        "EXPIRETIME",
        "FCALL_RO",
        "GEODIST",
        "GEOHASH",
        "GEOPOS",
        "GEORADIUS_RO",
        "GEORADIUSBYMEMBER_RO",
        "GEOSEARCH",
        "GET",
        "GETBIT",
        "GETRANGE",
        "HEXISTS",
        "HGET",
        "HGETALL",
        "HKEYS",
        "HLEN",
        "HMGET",
        "HRANDFIELD",
        "HSCAN",
        "HSTRLEN",
        "HVALS",
        "KEYS",
        "LCS",
        "LINDEX",
        "LLEN",
        "LOLWUT",
        "LPOS",
        "LRANGE",
        "MGET",
        "PEXPIRETIME",
        "PFCOUNT",
        "PTTL",
        "RANDOMKEY",
        "SCAN",
        "SCARD",
        "SDIFF",
        "SINTER",
        "SINTERCARD",
        "SISMEMBER",
        "SMEMBERS",
        "SMISMEMBER",
        "SORT_RO",
        "SRANDMEMBER",
        "SSCAN",
        "STRLEN",
        "SUBSTR",
        "SUNION",
        "TOUCH",
        "TTL",
        "TYPE",
        "XLEN",
        "XPENDING",
        "XRANGE",
        "XREAD",
        "XREVRANGE",
        "ZCARD",
        "ZCOUNT",
        "ZDIFF",
        "ZINTER",
        "ZINTERCARD",
        "ZLEXCOUNT",
        "ZMSCORE",
        "ZRANDMEMBER",
        "ZRANGE",
        "ZRANGEBYLEX",
        "ZRANGEBYSCORE",
        "ZRANK",
        "ZREVRANGE",
        "ZREVRANGEBYLEX",
        "ZREVRANGEBYSCORE",
        "ZREVRANK",
        "ZSCAN",
        "ZSCORE",
        "ZUNION",
        "PING",
        "ECHO",
        "TIME",
        "INFO",
        "LASTSAVE",
        "ROLE",
        "COMMAND",
        "XINFO",
        "PUBSUB",
    ]
) | frozenset(
    {
        "CONFIG GET",
        "OBJECT ENCODING",
        "OBJECT FREQ",
        "OBJECT IDLETIME",
        "OBJECT REFCOUNT",
        "MEMORY USAGE",
        "MEMORY STATS",
        "SCRIPT EXISTS",
        "FUNCTION LIST",
        "CLIENT LIST",
        "CLIENT INFO",
        "CLIENT GETNAME",
        "CLIENT ID",
        "SLOWLOG GET",
        "SLOWLOG LEN",
        "XINFO STREAM",
        "XINFO GROUPS",
        "XINFO CONSUMERS",
        "COMMAND COUNT",
        "COMMAND INFO",
        "COMMAND DOCS",
        "PUBSUB CHANNELS",
        "PUBSUB NUMSUB",
        "PUBSUB NUMPAT",
        "JSON.GET",
    }
)

#: Writes whose effect and reply are the same when applied twice in a row.
IDEMPOTENT_WRITES: frozenset[str] = frozenset(
    [
        "SET",
        "SETEX",
        "PSETEX",
        "MSET",
        "DEL",
        "UNLINK",
        "EXPIRE",
        "PEXPIRE",
        "EXPIREAT",
        "PEXPIREAT",
        "PERSIST",
        "GETEX",
        "HSET",
        "HMSET",
        "HDEL",
        "SADD",
        "SREM",
        "ZADD",
        "ZREM",
        "ZREMRANGEBYSCORE",
        "ZREMRANGEBYLEX",
        "SETBIT",
        "SETRANGE",
        "LSET",
        "PFADD",
        "GEOADD",
        "XACK",
        "XDEL",
        "FLUSHDB",
        "FLUSHALL",
    ]
) | frozenset({"SCRIPT LOAD", "CLIENT SETNAME", "CLIENT SETINFO"})

# Options that make an otherwise idempotent write unsafe: SET ... GET returns the
# old value (the second run returns the new one); SET NX decides a lock, and the
# second run would report failure for a lock the first run took; ZADD INCR adds.
_UNSAFE_OPTIONS: dict[str, frozenset[bytes]] = {
    "SET": frozenset({b"GET", b"NX"}),
    "ZADD": frozenset({b"INCR"}),
}

_SCRIPT_COMMANDS = frozenset({"EVAL", "EVALSHA"})

#: Commands that block server-side for a time given in their arguments.
_BLOCK_LAST_SECONDS = frozenset({"BLPOP", "BRPOP", "BRPOPLPUSH", "BLMOVE", "BZPOPMIN", "BZPOPMAX"})
_BLOCK_FIRST_SECONDS = frozenset({"BLMPOP", "BZMPOP"})
_BLOCK_LAST_MILLIS = frozenset({"WAIT", "WAITAOF"})
_BLOCK_OPTION_MILLIS = frozenset({"XREAD", "XREADGROUP"})


def _as_bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    return str(value).encode()


_NAMES: dict[Any, str] = {}


def command_name(args: Sequence[Any]) -> str:
    """The upper-case command name, multi-word commands kept whole (``CONFIG GET``)."""
    first = args[0]
    try:
        return _NAMES[first]
    except (KeyError, TypeError):
        pass
    name = (first.decode() if isinstance(first, bytes) else str(first)).upper()
    if len(_NAMES) < 1024 and isinstance(first, str | bytes):
        _NAMES[first] = name
    return name


def is_idempotent(
    name: str,
    args: Sequence[Any],
    extra_commands: frozenset[str] = frozenset(),
    extra_scripts: frozenset[str] = frozenset(),
) -> bool:
    """Whether ``args`` (a full command, name first) may safely be sent twice."""
    if name in READ_COMMANDS or name in extra_commands:
        return True
    if name in IDEMPOTENT_WRITES:
        unsafe = _UNSAFE_OPTIONS.get(name)
        if unsafe is not None:
            for arg in args[3 if name == "SET" else 2 :]:
                if isinstance(arg, str | bytes) and _as_bytes(arg).upper() in unsafe:
                    return False
        return True
    if name in _SCRIPT_COMMANDS and len(args) > 1 and extra_scripts:
        script = _as_bytes(args[1])
        sha = script.decode().lower() if name == "EVALSHA" else hashlib.sha1(script).hexdigest()
        return sha in extra_scripts
    if " " in name:
        # ``CONFIG GET`` style names: the first word alone may be a known read.
        return name.split(" ", 1)[0] in READ_COMMANDS
    return False


def block_seconds(name: str, args: Sequence[Any]) -> float | None:
    """Seconds a blocking command may legitimately wait server-side.

    ``None`` for a command that does not block; ``0.0`` means "forever" (the
    attempt is then bounded by the deadline only).
    """
    try:
        if name in _BLOCK_LAST_SECONDS:
            return float(args[-1])
        if name in _BLOCK_FIRST_SECONDS:
            return float(args[1])
        if name in _BLOCK_LAST_MILLIS:
            return float(args[-1]) / 1000.0
        if name in _BLOCK_OPTION_MILLIS:
            for i in range(1, len(args) - 1):
                if _as_bytes(args[i]).upper() == b"BLOCK":
                    return float(args[i + 1]) / 1000.0
    except (TypeError, ValueError, IndexError):
        return None
    return None
