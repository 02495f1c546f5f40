"""The host's state around one benchmark run, to tell drift from noise.

`snapshot(folder)` reads what a run may leave behind for the next one or what
the host may take away from it: CPU ticks from /proc/stat (steal among them),
the pressure-stall totals, Dirty and Writeback from /proc/meminfo, the load
average, TCP sockets by state (TIME-WAIT on loopback), conntrack entries, and
the folders under a system's scratch folder whose own size grew past one block
(ext4 never shrinks a directory) and its large files (logs). `delta(a, b)`
turns two snapshots into per-run figures for results.json.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Any, Self

CPU_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
CLK_TCK = os.sysconf("SC_CLK_TCK")
TCP_STATES = {"01": "estab", "06": "time_wait", "08": "close_wait", "0A": "listen"}


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def cpu_ticks() -> dict[str, int]:
    first = _read("/proc/stat").split("\n", 1)[0].split()[1:]
    return {name: int(v) for name, v in zip(CPU_FIELDS, first, strict=False)}


def pressure_us() -> dict[str, int]:
    """Stall totals in µs: cpu some, io some/full, memory some."""
    out: dict[str, int] = {}
    for res in ("cpu", "io", "memory"):
        for line in _read(f"/proc/pressure/{res}").splitlines():
            kind, *fields = line.split()
            total = dict(f.split("=") for f in fields).get("total")
            if total is not None and (kind == "some" or res == "io"):
                out[f"{res}_{kind}"] = int(total)
    return out


def meminfo_kb(*keys: str) -> dict[str, int]:
    out = {}
    for line in _read("/proc/meminfo").splitlines():
        name, _, rest = line.partition(":")
        if name in keys:
            out[name.lower()] = int(rest.split()[0])
    return out


def tcp_states() -> dict[str, int]:
    counts = dict.fromkeys(TCP_STATES.values(), 0)
    for line in _read("/proc/net/tcp").splitlines()[1:]:
        state = TCP_STATES.get(line.split()[3])
        if state:
            counts[state] += 1
    return counts


def folder_sizes(folder: Path) -> dict[str, int]:
    """Directories (own size) over one block and files over 1 MB, up to 3 levels down."""
    out: dict[str, int] = {}
    root_depth = str(folder).count(os.sep)
    for here, dirs, files in os.walk(folder):
        depth = here.count(os.sep) - root_depth
        if depth >= 3:
            dirs[:] = []
        rel = os.path.relpath(here, folder)
        try:
            if depth and os.stat(here).st_size > 4096:
                out[rel + "/"] = os.stat(here).st_size
            for name in files:
                size = os.stat(os.path.join(here, name)).st_size
                if size > 1 << 20:
                    out[os.path.join(rel, name)] = size
        except OSError:
            continue
    return out


def reference_ms(rounds: int = 5) -> float:
    """The host's speed: the best of `rounds` timings of a fixed piece of work
    (SHA-256 of 4 MB in C, then a Python loop), one thread. It drifts when the
    host gives the guest slower or busier cores, whatever the benchmark does."""
    data = b"x" * (4 << 20)
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        hashlib.sha256(data).digest()
        total = 0
        for i in range(200_000):
            total += i & 7
        best = min(best, time.perf_counter() - t0)
    return round(1000 * best, 2)


def _reference_work() -> float:
    """CPU seconds (this thread's) for a fixed piece of work: waiting for a core
    does not count, a slower or shared core does."""
    t0 = time.thread_time()
    hashlib.sha256(b"x" * (1 << 20)).digest()
    total = 0
    for i in range(50_000):
        total += i & 7
    return time.thread_time() - t0


class Sampler:
    """Calls sample() every `interval` seconds in a thread, inside a with block."""

    interval = 0.25

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


class ReferenceDuring(Sampler):
    """The fixed work every 0.25 s in a thread during a run (about 1% of a
    core): its median CPU time in ms says how fast the cores were meanwhile."""

    def __init__(self) -> None:
        super().__init__()
        self.samples: list[float] = []

    def sample(self) -> None:
        self.samples.append(_reference_work())

    def median_ms(self) -> float:
        return round(1000 * statistics.median(self.samples), 3) if self.samples else 0.0


SETTLE_SECONDS = 5.0  # --settle: at most this long before each run; 0 skips it


def add_settle_option(parser: argparse.ArgumentParser) -> None:
    """--settle, for every benchmark that settles its runs (main() sets SETTLE_SECONDS)."""
    parser.add_argument(
        "--settle",
        type=float,
        default=SETTLE_SECONDS,
        help="before each run: sync, then wait up to this many seconds for idle cores (0: no)",
    )


def settle(limit: float | None = None) -> float:
    """Before a run, the same for every system: sync() so that the previous run's
    dirty pages (its logs above all) are not written back during this one, then
    wait, up to `limit` seconds in all, until the 2 cores were idle for 0.5 s
    (less than 20% busy) so that the previous run's tail (queue removals, Postfix's
    processes) is over. Returns the seconds waited."""
    limit = SETTLE_SECONDS if limit is None else limit
    if limit <= 0:
        return 0.0
    t0 = time.monotonic()
    os.sync()
    while time.monotonic() - t0 < limit:
        if meminfo_kb("Writeback").get("writeback", 0) == 0:
            break
        time.sleep(0.05)
    while time.monotonic() - t0 < limit:
        a = cpu_ticks()
        time.sleep(0.5)
        b = cpu_ticks()
        ticks = {k: b[k] - a[k] for k in b}
        busy = sum(ticks.values()) - ticks["idle"] - ticks.get("iowait", 0)
        if busy < 0.2 * (sum(ticks.values()) or 1):
            break
    return round(time.monotonic() - t0, 2)


def snapshot(folder: Path | None = None) -> dict[str, Any]:
    conntrack = _read("/proc/sys/net/netfilter/nf_conntrack_count").strip()
    return {
        "cpu": cpu_ticks(),
        "pressure": pressure_us(),
        "mem": meminfo_kb("Dirty", "Writeback", "Cached", "MemFree"),
        "load": os.getloadavg()[0],
        "tcp": tcp_states(),
        "conntrack": int(conntrack) if conntrack else None,
        "folders": folder_sizes(folder) if folder is not None else {},
    }


def delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Per run: steal and iowait as % of all CPU ticks, pressure stalls in ms, and
    the state before (what the run started from) and after."""
    ticks = {k: after["cpu"][k] - before["cpu"].get(k, 0) for k in after["cpu"]}
    total = sum(ticks.values()) or 1
    return {
        "steal_pct": round(100 * ticks.get("steal", 0) / total, 2),
        "iowait_pct": round(100 * ticks.get("iowait", 0) / total, 2),
        "busy_pct": round(100 * (total - ticks["idle"] - ticks.get("iowait", 0)) / total, 1),
        "stall_ms": {
            k: round((after["pressure"][k] - before["pressure"].get(k, 0)) / 1000)
            for k in after["pressure"]
        },
        "before": {k: before[k] for k in ("mem", "load", "tcp", "conntrack", "folders")},
        "busy_s": round((total - ticks["idle"] - ticks.get("iowait", 0)) / CLK_TCK, 2),
        "after": {k: after[k] for k in ("mem", "load", "tcp", "folders")},
    }


def brief(host: dict[str, Any]) -> str:
    """One line for the console: what the run started from and what the host took."""
    if not host:
        return ""
    before = host["before"]
    dirs = sum(v for k, v in before["folders"].items() if k.endswith("/")) // 1024
    return (
        f"[start: load {before['load']:.1f}, dirty {before['mem'].get('dirty', 0) // 1024} MB, "
        f"TIME-WAIT {before['tcp']['time_wait']}, queue dirs {dirs} KB, "
        f"processes {host.get('processes', '')}; "
        f"run: busy {host['busy_pct']}%, steal {host['steal_pct']}%, "
        f"iowait {host['iowait_pct']}%, others {host.get('foreign_s', 0)} s CPU, "
        f"reference {host.get('reference_ms', 0)} ms before, "
        f"{host.get('reference_during_ms', 0)} ms CPU during]"
    )
