#!/usr/bin/env python3
"""mailrelay against mailrelay: CPU per message of two (or more) source trees, interleaved.

On a shared machine throughput says little, but CPU time per message holds
up: this runs the plain-relay load of bench/relay_vs_postfix.py (smtp-source
-> relay -> smtp-sink, 5 KB messages over 20 sessions, the attachment filter
on as shipped) against one mailrelay per source tree, in interleaved runs,
and reports user and system CPU per message of all the relay's processes,
with the spread, the load average and peak PSS.

    git worktree add --detach /tmp/base main
    .venv/bin/python bench/cpu_ab.py --tree /tmp/base --tree . [--messages 3000] [--runs 3]

With --milter every relay gets the tests' rspamd (tests/mrtest/realmilters.py,
as bench/milter_vs_postfix.py) as its milter: the milter client's CPU A/B.

Each tree's code runs with this tree's .venv (PYTHONPATH=<tree>), so both
must need the same dependencies. A tree may carry environment variables
for its relay after a colon: `--tree .:MAILRELAY_X=1`.

Results: bench/results/<time>-cpu-ab/results.json and summary.md. Needs root
(smtp-sink -u).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # mrtest: rspamd
from mrtest.realmilters import rspamd
from relay_vs_postfix import (  # bench/ is not a package
    CLK_TCK,
    RESULTS,
    ROOT,
    Mailrelay,
    Sink,
    commit_measured,
    load,
    process_tree,
)


def tree_user_sys(root: int) -> tuple[float, float]:
    """User and system CPU seconds of a process tree so far (reaped children too)."""
    user = system = 0
    for pid in process_tree(root):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        user += int(fields[11]) + int(fields[13])
        system += int(fields[12]) + int(fields[14])
    return user / CLK_TCK, system / CLK_TCK


class TreeRelay(Mailrelay):
    """mailrelay from another source tree, run by this tree's interpreter."""

    def __init__(self, spec: str, workdir: Path, sink: Sink, milter: str = "") -> None:
        super().__init__(workdir, sink, workers=0, content_filter=True, milter=milter)
        tree, _, env = spec.partition(":")
        self.spec = spec
        self.tree = str(Path(tree).resolve())
        self.env = env.split(",") if env else []

    def _command(self) -> list[str]:
        python = ROOT / ".venv" / "bin" / "python"
        return ["env", f"PYTHONPATH={self.tree}", *self.env, str(python), "-m", "relay.process.cli"]


def measure(relay: TreeRelay, messages: int) -> dict[str, Any]:
    load_average = os.getloadavg()[0]
    user0, sys0 = tree_user_sys(relay.root_pid())
    run = load(relay, messages, 5120, 20)
    user1, sys1 = tree_user_sys(relay.root_pid())
    return {
        "tree": relay.spec,
        "ok": run.ok,
        "error": run.error,
        "user_ms": round(1000 * (user1 - user0) / messages, 3),
        "sys_ms": round(1000 * (sys1 - sys0) / messages, 3),
        "cpu_ms": round(1000 * (user1 - user0 + sys1 - sys0) / messages, 3),
        "end_to_end_rate": round(run.end_to_end_rate, 1),
        "peak_mb": round(run.peak_mb, 1),
        "load_average": round(load_average, 1),
    }


def summary(results: dict[str, Any]) -> str:
    lines = [
        f"CPU A/B {results['started']} on {results['machine']}: {results['messages']} x 5 KB "
        f"over 20 sessions per run, {results['rounds']} interleaved runs, attachment filter on"
        f"{', rspamd as milter' if results.get('milter') else ''}; "
        f"load average {results['load_average_start'][0]:.1f} at the start, "
        f"{results['load_average_end'][0]:.1f} at the end. Commit of this tree: "
        f"{results['commit']}.",
        "",
        "| tree | CPU per message (median) | user | system | spread | peak PSS |",
        "|---|---|---|---|---|---|",
    ]
    for spec, runs in results["runs"].items():
        ok = [r for r in runs if r["ok"]]
        if not ok:
            lines.append(f"| {spec} | failed | | | | |")
            continue
        cpu = [r["cpu_ms"] for r in ok]
        lines.append(
            f"| {spec} | {statistics.median(cpu):.2f} ms | "
            f"{statistics.median(r['user_ms'] for r in ok):.2f} ms | "
            f"{statistics.median(r['sys_ms'] for r in ok):.2f} ms | "
            f"{min(cpu):.2f}-{max(cpu):.2f} ms | {max(r['peak_mb'] for r in ok):.0f} MB |"
        )
    for spec, peak in results.get("memory", {}).items():
        lines.append(f"20 x {results['memory_size']} B at once, {spec}: peak PSS {peak} MB")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tree", action="append", required=True, help="a source tree[:ENV=V,...]")
    p.add_argument("--messages", type=int, default=3000)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument(
        "--memory-size", type=int, default=25_000_000, help="then 20 such messages at once; 0: no"
    )
    p.add_argument(
        "--milter", action="store_true", help="every relay with the tests' rspamd as its milter"
    )
    args = p.parse_args(argv)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    workdir = Path(tempfile.mkdtemp(prefix="mailrelay-cpu-ab-"))
    results: dict[str, Any] = {
        "started": stamp,
        "machine": f"{os.cpu_count()} cores, {os.uname().release}",
        "commit": commit_measured(),
        "messages": args.messages,
        "rounds": args.runs,
        "memory_size": args.memory_size,
        "load_average_start": os.getloadavg(),
        "milter": args.milter,
    }
    results["runs"] = {spec: [] for spec in args.tree}
    started: list[Any] = []
    with contextlib.ExitStack() as milter_running:  # rspamd stops after the relays
        try:
            milter = ""
            if args.milter:
                milter = milter_running.enter_context(rspamd(workdir / "rspamd"))
            relays = []
            for i, spec in enumerate(args.tree):
                sink = Sink(workdir).start()
                started.append(sink)
                relay = TreeRelay(spec, workdir / f"relay{i}", sink, milter)
                started.append(relay)
                relays.append(relay.start())
            for relay in relays:
                load(relay, args.warmup, 5120, 20)
            for i in range(args.runs):
                for relay in relays if i % 2 == 0 else relays[::-1]:
                    run = measure(relay, args.messages)
                    results["runs"][relay.spec].append(run)
                    print(json.dumps(run), flush=True)
            if args.memory_size:
                results["memory"] = {}
                for relay in relays:
                    big = load(relay, 20, args.memory_size, 20)
                    results["memory"][relay.spec] = round(big.peak_mb, 1) if big.ok else big.error
                    print(f"memory {relay.spec}: {results['memory'][relay.spec]}", flush=True)
        finally:
            for thing in reversed(started):
                with contextlib.suppress(Exception):
                    thing.stop()
            shutil.rmtree(workdir, ignore_errors=True)
            results["load_average_end"] = os.getloadavg()
            out = RESULTS / f"{stamp}-cpu-ab"
            out.mkdir(parents=True, exist_ok=True)
            (out / "results.json").write_text(json.dumps(results, indent=2))
            (out / "summary.md").write_text(summary(results))
            print(summary(results))
            print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
