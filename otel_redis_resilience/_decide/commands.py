"""The command table: everything the library knows of one Redis command. Pure.

One place per kind of knowledge, all here: which commands only read, which may be
sent twice (a command that was written to the socket and got no reply may already
have run; sending it again is only safe if running it twice has the same effect,
and the same reply, as running it once: anything not listed is unsafe), the options
that make a safe command unsafe, where a blocking command's block time is, what a
read answers on a miss, and the one parser of command names. Write-behind's own
rules (which writes it journals) read these tables.

To add a command: put its name in ``READ_COMMANDS`` or ``IDEMPOTENT_WRITES`` (and
``REPLY_UNSTABLE_WRITES`` if a second run answers differently); a read whose missing
key does not answer nil goes in ``_MISS_REPLIES``; a blocking one in ``_BLOCK_*``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

#: Read-only commands (the server's ``readonly`` flag, Redis 7) plus
#: administrative reads that change nothing.
READ_COMMANDS: frozenset[str] = frozenset(
    """
    BITCOUNT BITFIELD_RO BITPOS DBSIZE DUMP EVAL_RO EVALSHA_RO EXISTS EXPIRETIME FCALL_RO GEODIST GEOHASH
    GEOPOS GEORADIUS_RO GEORADIUSBYMEMBER_RO GEOSEARCH GET GETBIT GETRANGE HEXISTS HGET HGETALL HKEYS HLEN
    HMGET HRANDFIELD HSCAN HSTRLEN HVALS KEYS LCS LINDEX LLEN LOLWUT LPOS LRANGE MGET PEXPIRETIME PFCOUNT
    PTTL RANDOMKEY SCAN SCARD SDIFF SINTER SINTERCARD SISMEMBER SMEMBERS SMISMEMBER SORT_RO SRANDMEMBER SSCAN
    STRLEN SUBSTR SUNION TOUCH TTL TYPE XLEN XPENDING XRANGE XREAD XREVRANGE ZCARD ZCOUNT ZDIFF ZINTER
    ZINTERCARD ZLEXCOUNT ZMSCORE ZRANDMEMBER ZRANGE ZRANGEBYLEX ZRANGEBYSCORE ZRANK ZREVRANGE ZREVRANGEBYLEX
    ZREVRANGEBYSCORE ZREVRANK ZSCAN ZSCORE ZUNION PING ECHO TIME INFO LASTSAVE ROLE COMMAND XINFO PUBSUB
    """.split()
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

#: Writes whose *effect* is the same when applied twice in a row (a replayed
#: journal entry may run twice). Not all of them give the same *reply* twice:
#: see :data:`REPLY_UNSTABLE_WRITES`.
IDEMPOTENT_WRITES: frozenset[str] = frozenset(
    """
    SET SETEX PSETEX MSET DEL UNLINK EXPIRE PEXPIRE EXPIREAT PEXPIREAT PERSIST GETEX HSET HMSET HDEL SADD
    SREM ZADD ZREM ZREMRANGEBYSCORE ZREMRANGEBYLEX SETBIT SETRANGE LSET PFADD GEOADD XACK XDEL FLUSHDB
    FLUSHALL
    """.split()
) | frozenset({"SCRIPT LOAD", "CLIENT SETNAME", "CLIENT SETINFO"})

#: Idempotent writes whose second run answers differently from the first: a
#: count of what changed (``DEL`` 1 then 0, ``SADD``, ``HSET``, ``ZADD``...), the
#: old value (``SETBIT``), or whether anything changed (``PERSIST``, ``PFADD``).
#: ``EXPIREAT``/``PEXPIREAT`` are here because a time in the past deletes the key
#: (1, then 0) and only the server's clock knows which times are past. Re-sending
#: one of these after a lost reply would hand the caller the second run's reply,
#: so it is not re-sent: the call raises ``RedisUnavailable(outcome_unknown=True)``.
REPLY_UNSTABLE_WRITES: frozenset[str] = frozenset(
    """
    DEL UNLINK EXPIREAT PEXPIREAT PERSIST HSET HDEL SADD SREM ZADD ZREM ZREMRANGEBYSCORE ZREMRANGEBYLEX
    SETBIT PFADD GEOADD XACK XDEL
    """.split()
)


@dataclass(frozen=True, slots=True)
class CommandSafety:
    """What the table knows of one command: is it a read, and is a second run harmless.

    ``effect_stable``: running it twice leaves the data as running it once.
    ``reply_stable``: the second run answers what the first would have. Only a
    command with both may be re-sent after an attempt that may have run.
    """

    read: bool
    effect_stable: bool
    reply_stable: bool

    @property
    def retry_safe(self) -> bool:
        return self.effect_stable and self.reply_stable


#: Every command the table knows, by upper-case name (multi-word names kept whole).
COMMAND_TABLE: Mapping[str, CommandSafety] = MappingProxyType(
    {
        **{name: CommandSafety(True, True, True) for name in READ_COMMANDS},
        **{name: CommandSafety(False, True, name not in REPLY_UNSTABLE_WRITES) for name in IDEMPOTENT_WRITES},
    }
)

#: Commands that may be re-sent after an attempt that may have run (subject to
#: the options below).
RETRY_SAFE: frozenset[str] = frozenset(name for name, info in COMMAND_TABLE.items() if info.retry_safe)

# Options that make an otherwise retry-safe command unsafe: SET ... GET returns the
# old value (the second run returns the new one); SET NX decides a lock, and the
# second run would report failure for a lock the first run took; EXPIRE NX/GT/LT
# answer 0 the second time; GETEX EXAT/PXAT with a past time deletes the key.
_UNSAFE_OPTIONS: dict[str, frozenset[bytes]] = {
    # IFEQ/IFNE/IFDEQ/IFDNE (Redis 8.4): a compare-and-set that succeeded fails the second time.
    "SET": frozenset({b"GET", b"NX", b"IFEQ", b"IFNE", b"IFDEQ", b"IFDNE"}),
    "EXPIRE": frozenset({b"NX", b"GT", b"LT"}),
    "PEXPIRE": frozenset({b"NX", b"GT", b"LT"}),
    "GETEX": frozenset({b"EXAT", b"PXAT"}),
}
# Where the options start: after the key and value (SET), the key and time (EXPIRE).
_OPTIONS_FROM = {"SET": 3, "EXPIRE": 3, "PEXPIRE": 3, "GETEX": 2}
# A relative expiry of 0 or less deletes the key: 1 the first time, 0 the second.
_POSITIVE_SECOND_ARG = frozenset({"EXPIRE", "PEXPIRE"})

# Commands whose second argument names the subcommand the table knows them by.
_CONTAINERS = frozenset({"OBJECT", "CONFIG", "CLIENT", "MEMORY", "SCRIPT", "SLOWLOG", "FUNCTION"})

_SCRIPT_COMMANDS = frozenset({"EVAL", "EVALSHA"})

#: Commands that block server-side for a time given in their arguments.
_BLOCK_LAST_SECONDS = frozenset({"BLPOP", "BRPOP", "BRPOPLPUSH", "BLMOVE", "BZPOPMIN", "BZPOPMAX"})
_BLOCK_FIRST_SECONDS = frozenset({"BLMPOP", "BZMPOP"})
_BLOCK_LAST_MILLIS = frozenset({"WAIT", "WAITAOF"})
_BLOCK_OPTION_MILLIS = frozenset({"XREAD", "XREADGROUP"})
#: Every command that may block (cheap membership test before parsing its arguments).
BLOCKING_COMMANDS = _BLOCK_LAST_SECONDS | _BLOCK_FIRST_SECONDS | _BLOCK_LAST_MILLIS | _BLOCK_OPTION_MILLIS

# What a read answers when its keys do not exist: what a cache miss looks like
# (``miss_reply``). Reads not listed answer nil. Per key: one reply per key argument.
_MISS_REPLIES: dict[str, str] = {
    **dict.fromkeys(
        """
        LRANGE ZRANGE ZRANGEBYSCORE ZRANGEBYLEX ZREVRANGE ZREVRANGEBYSCORE ZREVRANGEBYLEX KEYS HKEYS HVALS
        XRANGE XREVRANGE SORT_RO GEOPOS GEOHASH
        """.split(),
        "empty_list",
    ),
    **dict.fromkeys("SMEMBERS SINTER SUNION SDIFF".split(), "empty_set"),
    **dict.fromkeys(
        """
        EXISTS SCARD LLEN HLEN ZCARD STRLEN XLEN BITCOUNT PFCOUNT HEXISTS SISMEMBER DBSIZE ZCOUNT ZLEXCOUNT
        GETBIT HSTRLEN TOUCH SINTERCARD ZINTERCARD
        """.split(),
        "zero",
    ),
    "TTL": "no_key",
    "PTTL": "no_key",
    "TYPE": "none_type",
    "HGETALL": "empty_dict",
    "MGET": "nil_per_key",
    "HMGET": "nil_per_field",
    "ZMSCORE": "nil_per_field",
    "SMISMEMBER": "zero_per_field",
}


def _as_bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    return str(value).encode()


_NAMES: dict[Any, str] = {}


def command_name(args: Sequence[Any]) -> str:
    """The upper-case command name, multi-word commands kept whole (``CONFIG GET``).

    The one parser of command names: handles, pipelines' commands, telemetry's
    sanitised statements and write-behind all use it.
    """
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
    """Whether ``args`` (a full command, name first) may be re-sent after it may have run.

    True only when a second run has the same effect *and* the same reply as
    the first: the caller then gets what a single run would have answered.
    """
    if name in RETRY_SAFE:
        unsafe = _UNSAFE_OPTIONS.get(name)
        if unsafe is not None:
            if name in _POSITIVE_SECOND_ARG and not _positive_number(args, 2):
                return False
            for arg in args[_OPTIONS_FROM[name] :]:
                if isinstance(arg, str | bytes) and _as_bytes(arg).upper() in unsafe:
                    return False
        return True
    if name in extra_commands:
        return True
    if name in _SCRIPT_COMMANDS and len(args) > 1 and extra_scripts:
        script = _as_bytes(args[1])
        sha = script.decode().lower() if name == "EVALSHA" else hashlib.sha1(script).hexdigest()
        return sha in extra_scripts
    if " " in name:
        # ``CONFIG GET`` style names: the first word alone may be a known read.
        return name.split(" ", 1)[0] in READ_COMMANDS
    if name in _CONTAINERS:
        return table_name(name, args) in RETRY_SAFE
    return False


def table_name(name: str, args: Sequence[Any]) -> str:
    """The name the table knows a command by: redis-py sends some subcommands as a
    second argument (``("OBJECT", "ENCODING", key)``), the table says ``OBJECT ENCODING``."""
    if name in _CONTAINERS and len(args) > 1 and isinstance(args[1], str | bytes):
        return f"{name} {_as_bytes(args[1]).decode(errors='replace').upper()}"
    return name


def is_read(name: str, args: Sequence[Any]) -> bool:
    """Whether the command only reads (a run that may have happened changed nothing)."""
    info = COMMAND_TABLE.get(name) or COMMAND_TABLE.get(table_name(name, args))
    return info is not None and info.read


def _positive_number(args: Sequence[Any], index: int) -> bool:
    try:
        return float(args[index]) > 0
    except (IndexError, TypeError, ValueError):
        return False


def _block_index(name: str, args: Sequence[Any]) -> int | None:
    """Where a blocking command's block time is in ``args``, or None."""
    if name in _BLOCK_LAST_SECONDS or name in _BLOCK_LAST_MILLIS:
        return len(args) - 1
    if name in _BLOCK_FIRST_SECONDS:
        return 1
    if name in _BLOCK_OPTION_MILLIS:
        # Only among the options: a stream key, a group or a consumer may be named "block".
        i = 4 if name == "XREADGROUP" else 1  # XREADGROUP GROUP <group> <consumer> ...
        while i < len(args) - 1:
            word = _as_bytes(args[i]).upper()
            if word == b"BLOCK":
                return i + 1
            if word == b"STREAMS":
                return None
            i += 2 if word in (b"COUNT", b"CLAIM") else 1
    return None


def block_seconds(name: str, args: Sequence[Any]) -> float | None:
    """Seconds a blocking command may legitimately wait server-side.

    ``None`` for a command that does not block; ``0.0`` means "forever" (the
    attempt is then bounded by the deadline only).
    """
    index = _block_index(name, args)
    if index is None or index < 1:
        return None
    try:
        value = float(args[index])
    except (TypeError, ValueError, IndexError):
        return None
    millis = name in _BLOCK_LAST_MILLIS or name in _BLOCK_OPTION_MILLIS
    return value / 1000.0 if millis else value


def with_block(name: str, args: Sequence[Any], seconds: float) -> tuple[Any, ...]:
    """``args`` with the block time of a blocking command replaced by ``seconds``.

    Used to shorten a block to what the caller's deadline leaves, so the server
    itself answers its timeout reply (nil) in time: the connection stays in sync
    and nothing popped is lost to a client-side timeout.
    """
    index = _block_index(name, args)
    out = list(args)
    if index is not None and index >= 1:
        if name in _BLOCK_LAST_MILLIS or name in _BLOCK_OPTION_MILLIS:
            out[index] = max(1, int(seconds * 1000))
        else:
            out[index] = _seconds_text(seconds)
    return tuple(out)


def relative_ttl(name: str, args: Sequence[Any]) -> float | None:
    """The time to live, in seconds, that a retry-safe write sets from now, or None.

    A retry of ``EXPIRE k 1`` sent after the first run's second has passed finds
    the key gone and answers 0: such a write is re-sent only while its TTL cannot
    have run out (the engine compares it with the operation's age).
    """
    try:
        if name == "EXPIRE":
            return float(args[2])
        if name == "PEXPIRE":
            return float(args[2]) / 1000.0
        if name == "GETEX":
            for i in range(2, len(args) - 1):
                word = _as_bytes(args[i]).upper()
                if word == b"EX":
                    return float(args[i + 1])
                if word == b"PX":
                    return float(args[i + 1]) / 1000.0
    except (TypeError, ValueError, IndexError):
        return None
    return None


def _seconds_text(seconds: float) -> str:
    # Redis takes fractional seconds (6.0+); never 0, which would mean "forever".
    return f"{max(seconds, 0.001):.3f}"


def miss_reply(name: str, args: Sequence[Any], *, decode: bool = False) -> Any:
    """The reply of ``args`` as if every key it reads were missing.

    ``decode``: the client has ``decode_responses=True``, so strings are ``str``.
    """
    kind = _MISS_REPLIES.get(name)
    if kind is None:
        return None
    if kind == "empty_list":
        return []
    if kind == "zero":
        return 0
    if kind == "empty_set":
        return set()
    if kind == "empty_dict":
        return {}
    if kind == "no_key":
        return -2
    if kind == "none_type":
        return "none" if decode else b"none"
    if kind == "nil_per_key":
        return [None] * (len(args) - 1)
    return [0 if kind == "zero_per_field" else None] * (len(args) - 2)


#: Single-key write commands that can be written behind (the key is the first argument).
WRITE_BEHIND_COMMANDS: frozenset[str] = frozenset(
    """
    SET SETEX PSETEX SETNX SETRANGE SETBIT APPEND INCR INCRBY INCRBYFLOAT DECR DECRBY GETDEL
    LPUSH RPUSH LPUSHX RPUSHX LREM LSET LTRIM HSET HMSET HSETNX HDEL HINCRBY HINCRBYFLOAT
    SADD SREM ZADD ZREM ZINCRBY ZREMRANGEBYSCORE ZREMRANGEBYLEX ZREMRANGEBYRANK
    DEL UNLINK EXPIRE PEXPIRE EXPIREAT PEXPIREAT PERSIST XADD XDEL XTRIM PFADD GEOADD
    """.split()
)
# Of those, the ones that take several keys: written behind only with one.
_MULTI_KEY_WRITES = frozenset({"DEL", "UNLINK"})


def journal_key(name: str, args: Sequence[Any]) -> tuple[Any, str | None]:
    """(the key a write-behind command writes, None) or (None, what is wrong); (None, None) for a read."""
    if name in READ_COMMANDS:
        return None, None
    if name not in WRITE_BEHIND_COMMANDS:
        return None, (
            f"write_behind() takes single-key write commands; {name} is not one "
            "(use the plain handle for reads, scripts and multi-key commands)"
        )
    if len(args) < 2 or (name in _MULTI_KEY_WRITES and len(args) > 2):
        return None, f"write_behind() takes single-key writes; this {name} names {len(args) - 1} keys"
    return args[1], None
