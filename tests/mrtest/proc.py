"""What a relay process (and its workers) holds: memory, open files, and the
file-descriptor limit a test with many sockets needs."""

from __future__ import annotations

import contextlib
import os
import resource
from pathlib import Path

import pytest


def raise_fd_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < wanted:
        pytest.skip(f"cannot raise RLIMIT_NOFILE to {wanted}")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def tree_pids(root: int) -> list[int]:
    """root and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def tree_rss_mb(root: int) -> float:
    total = 0
    for pid in tree_pids(root):
        with contextlib.suppress(OSError, AssertionError):
            total += rss_kib(pid)
    return total / 1024


def tree_fds(root: int) -> int:
    count = 0
    for pid in tree_pids(root):
        with contextlib.suppress(OSError):
            count += len(os.listdir(f"/proc/{pid}/fd"))
    return count


def tree_fd_targets(root: int) -> list[str]:
    """What the open files are (for a failure message): "pid: target" each."""
    out = []
    for pid in tree_pids(root):
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    out.append(f"{pid}: {os.readlink(f'/proc/{pid}/fd/{fd}')}")
    return sorted(out)
