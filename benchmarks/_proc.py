"""Ports and process memory, as the serving benchmarks read them (serve.py, serve_llm.py,
serve_abuse.py). They run as scripts, so they import this sibling as `_proc`."""

from __future__ import annotations

import socket
from pathlib import Path

HOST = "127.0.0.1"
MiB = 1 << 20


def free_ports(n: int) -> list[int]:
    """n distinct free ports on HOST (held together while they are picked)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind((HOST, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


def vm_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, in bytes (from /proc/<pid>/status)."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def rss_mib(pid: int) -> float:
    """The process's resident memory in MiB (NaN where /proc does not say)."""
    rss = vm_status(pid).get("VmRSS")
    return float("nan") if rss is None else rss / MiB
