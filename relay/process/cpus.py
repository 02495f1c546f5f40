"""How many CPUs this process may use: `--workers auto` and `spec.workers: auto`.

The smallest of:
- the CPUs in this process's affinity mask (taskset, cpuset, a pinned pod);
- the cgroup CPU quota, rounded up: cgroup v2 `cpu.max` ("max 100000" means
  none), or v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us` (-1 means none) —
  what a container's CPU limit becomes;
- MAILRELAY_CPU_LIMIT, if set: the pod's CPU limit or request as the operator
  passes it through the downward API (in whole CPUs, rounded up; "0" ignored).
Never less than 1. os.cpu_count() alone would see every CPU of the node.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from mailrelay_api.pod_env import CPU_LIMIT_ENV

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _cgroup_paths(root: Path) -> tuple[Path | None, Path | None]:
    """This process's cgroup v2 folder and v1 cpu controller folder, when mounted."""
    v2 = v1 = None
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None, None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            v2 = root / path.lstrip("/")
        elif "cpu" in controllers.split(","):
            for mount in ("cpu,cpuacct", "cpu", "cpuacct,cpu"):
                if (root / mount).is_dir():
                    v1 = root / mount / path.lstrip("/")
                    break
    return v2, v1


def cgroup_quota(root: Path = CGROUP_ROOT) -> float | None:
    """The CPU quota in CPUs (1.5 for "150000 100000"), or None without one."""
    v2, v1 = _cgroup_paths(root)
    for folder in (v2, root) if v2 is not None else (root,):
        try:
            quota, period = (folder / "cpu.max").read_text().split()
        except (OSError, ValueError):
            continue
        return None if quota == "max" else int(quota) / int(period)
    for folder in (v1, root / "cpu") if v1 is not None else (root / "cpu",):
        try:
            quota_us = int((folder / "cpu.cfs_quota_us").read_text())
            period_us = int((folder / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    return None


def available_cpus(root: Path = CGROUP_ROOT) -> int:
    """See the module header."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        count = os.cpu_count() or 1
    quota = cgroup_quota(root)
    if quota is not None:
        count = min(count, math.ceil(quota))
    limit = os.environ.get(CPU_LIMIT_ENV, "").strip()
    try:
        value = float(limit) if limit else 0.0
    except ValueError:
        value = 0.0
    if value > 0:
        count = min(count, math.ceil(value))
    return max(1, count)
