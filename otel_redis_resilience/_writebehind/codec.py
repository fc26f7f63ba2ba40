"""How a journaled command is stored: its arguments encoded like redis-py, packed into one blob. Pure."""

from __future__ import annotations

import struct
from collections.abc import Sequence

__all__ = ["encode_arg", "encode_key", "error_code_of", "pack_args", "unpack_args"]

Arg = bytes | bytearray | memoryview | str | int | float


def encode_arg(value: Arg) -> bytes:
    """Encode one command argument exactly like redis-py's ``Encoder`` (UTF-8 strings, ``repr`` numbers)."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    if isinstance(value, bool):
        # redis-py refuses bools too: True would silently become b"True", not b"1".
        raise TypeError("invalid command argument of type bool; convert it to bytes, str, int or float")
    if isinstance(value, int | float):
        return repr(value).encode("ascii")
    if isinstance(value, str):
        return value.encode("utf-8")
    raise TypeError(f"invalid command argument of type {type(value).__name__}; use bytes, str, int or float")


def encode_key(key: bytes | str) -> bytes:
    """The journal's form of a key: bytes, str as UTF-8 (as redis-py sends it)."""
    if isinstance(key, bytes):
        return key
    if isinstance(key, str):
        return key.encode("utf-8")
    raise TypeError(f"journal key must be bytes or str, got {type(key).__name__}")


def pack_args(args: Sequence[bytes | str | int | float]) -> bytes:
    """One blob holding the whole command: a count, each length, then the bytes (big-endian)."""
    # A bare bytes/str is a Sequence too; iterating it would journal single characters.
    if isinstance(args, str | bytes | bytearray | memoryview):
        raise TypeError("args must be a sequence of command arguments, e.g. (b'SET', b'k', b'v')")
    parts = [encode_arg(a) for a in args]
    if not parts:
        raise ValueError("args must contain at least the command name")
    return struct.pack(f">I{len(parts)}I", len(parts), *(len(p) for p in parts)) + b"".join(parts)


def unpack_args(blob: bytes) -> tuple[bytes, ...] | None:
    """The command :func:`pack_args` packed; None if ``blob`` is not such a blob (corruption)."""
    try:
        (count,) = struct.unpack_from(">I", blob, 0)
        lengths = struct.unpack_from(f">{count}I", blob, 4)
    except struct.error:
        return None
    pos = 4 + 4 * count
    if pos + sum(lengths) != len(blob) or count == 0:
        return None
    out: list[bytes] = []
    for n in lengths:
        out.append(blob[pos : pos + n])
        pos += n
    return tuple(out)


def error_code_of(error: str) -> str:
    """The Redis error code a dead letter's error text starts with (``WRONGTYPE``), or ``""``.

    Redis error replies start with an upper-case code; what follows may quote the command,
    so operators are shown the code and the text only on request.
    """
    first = error.split(" ", 1)[0]
    return first if first.isalpha() and first.isupper() else ""
