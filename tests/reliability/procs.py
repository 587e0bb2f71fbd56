"""Finding this test's own processes in /proc (other agents' Ray processes on the machine are never touched)."""

from __future__ import annotations

import os
from pathlib import Path


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, session id), or None if the process is gone (or a zombie waiting to be reaped)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in "ZX" else (int(fields[1]), int(fields[3]))


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def descendants(root: int) -> list[int]:
    parent = {pid: st[0] for pid in _pids() if (st := _stat(pid))}
    out, frontier = [], {root}
    while frontier:
        frontier = {pid for pid, pp in parent.items() if pp in frontier}
        out.extend(frontier)
    return out


def descendant_named(root: int, needle: str) -> int | None:
    """A live descendant of `root` whose command line contains `needle` (Ray sets 'ray::<Class>' titles)."""
    return next((pid for pid in descendants(root) if needle in cmdline(pid)), None)


def in_session(sid: int) -> list[int]:
    """Processes of a session (a `start_new_session` child and everything it started)."""
    return [pid for pid in _pids() if (st := _stat(pid)) and st[1] == sid]
