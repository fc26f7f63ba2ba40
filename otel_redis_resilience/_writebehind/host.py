"""What this host says about a process: the /proc reads behind the lease take-over rules."""

from __future__ import annotations

import os

from .rules import dead_by_stat, pid_to_judge

__all__ = ["holder_is_dead", "host_identity", "proc_stat"]


def host_identity() -> str:
    """This kernel boot and pid namespace: only there does a pid name the same process for us."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as fh:
            boot = fh.read().strip()
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""
    return f"{boot}/{namespace}"


def proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks) of process ``pid``; None if it does not exist.

    Raises OSError if it cannot be told (no ``/proc``, or it is hidden from us).
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        return None
    # The command name (field 2) may hold spaces and parentheses; the fields after its last
    # ")" are plain: state is field 3, the start time field 22.
    fields = data[data.rfind(b")") + 2 :].split()
    if len(fields) < 20:
        raise OSError(f"unexpected /proc/{pid}/stat")
    return fields[0].decode("ascii", "replace"), fields[19].decode("ascii", "replace")


def holder_is_dead(owner: str) -> bool:
    """Whether the process named by a lease owner token surely no longer runs (False when in doubt)."""
    pid = pid_to_judge(owner, host_identity(), os.getpid())
    if pid is None:
        return False
    try:
        stat = proc_stat(pid)
    except OSError:
        return False
    return dead_by_stat(owner, stat)
