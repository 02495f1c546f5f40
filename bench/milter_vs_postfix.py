#!/usr/bin/env python3
"""mailrelay and Postfix side by side, each with the same rspamd as its milter.

smtp-source -> relay -> smtp-sink, as bench/relay_vs_postfix.py (whose
systems, load and measures this reuses), with one rspamd proxy worker in
milter mode (self_scan) in front of both: Postfix with `smtpd_milters` and
`milter_default_action = tempfail`, mailrelay with `contentFilters.milters`
and `defaultAction: tempfail`. rspamd runs the tests' local configuration
(tests/mrtest/realmilters.py: no DNS lists, no network, two content rules and
milter_headers), so every message is scanned and gets X-Spamd-Result.

The question (issue #15): is mailrelay the bottleneck with a spam filter in
the loop? Per system: a warm-up, then interleaved runs; medians reported:
end-to-end messages/s, the relay's CPU per message, and rspamd's CPU per
message and cores used during the runs of each system. Each run counts the
messages rspamd scanned (its log) and fails unless every message was. Then
(--no-baseline skips it) the same runs without a milter, on fresh instances:
the same run's plain ratio and each relay's CPU cost of the milter.

    .venv/bin/python bench/milter_vs_postfix.py [--messages 2000] [--runs 3] [--workers N]

Needs root (Postfix master, smtp-sink -u) and Debian's postfix and rspamd.
Results: bench/results/<time>-milter/results.json and summary.md, with the
commit measured, the machine and its load average at start and end.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))  # bench/ is not a package
sys.path.insert(0, str(BENCH.parent / "tests"))  # mrtest: the tests' rspamd
import relay_vs_postfix as base  # noqa: E402
from mrtest.realmilters import rspamd  # noqa: E402

SYSTEMS = ("postfix", "mailrelay")


class Rspamd:
    """The running rspamd: its process tree's CPU and the messages it scanned."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir

    def root_pid(self) -> int:
        """rspamd renames its processes: found as the one started in its folder
        (the tests' runner sets the cwd) whose parent was not."""
        here = {}
        for entry in filter(str.isdigit, os.listdir("/proc")):
            with contextlib.suppress(OSError):
                if Path(os.readlink(f"/proc/{entry}/cwd")) == self.workdir:
                    stat = Path(f"/proc/{entry}/stat").read_text()
                    here[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
        roots = [pid for pid, ppid in here.items() if ppid not in here]
        if len(roots) != 1:
            raise RuntimeError(f"rspamd's main process not found in {here}")
        return roots[0]

    def cpu_seconds(self) -> float:
        return base.tree_cpu_seconds(self.root_pid())

    def scanned(self) -> int:
        log = self.workdir / "rspamd.log"
        with contextlib.suppress(OSError):
            return log.read_text(errors="replace").count("rspamd_task_write_log")
        return 0


def measured_run(
    system: base.System, filter_: Rspamd | None, messages: int, size: int, sessions: int
) -> dict[str, Any]:
    """One load run; the relay's measures plus rspamd's CPU and scan count."""
    if filter_ is None:
        return base.load(system, messages, size, sessions).summary()
    cpu0, scanned0 = filter_.cpu_seconds(), filter_.scanned()
    run = base.load(system, messages, size, sessions)
    # rspamd logs a scan after it answered: give the last ones a moment.
    deadline = time.monotonic() + 10
    while filter_.scanned() - scanned0 < messages and time.monotonic() < deadline:
        time.sleep(0.1)
    scanned = filter_.scanned() - scanned0
    milter_cpu = filter_.cpu_seconds() - cpu0
    summary = run.summary()
    summary.update(
        milter_scanned=scanned,
        milter_cpu_ms_per_message=round(1000 * milter_cpu / messages, 3),
        milter_cores=round(milter_cpu / run.end_to_end_seconds, 2)
        if run.end_to_end_seconds
        else 0.0,
    )
    if run.ok and scanned < messages:
        summary.update(ok=False, error=f"rspamd scanned {scanned} of {messages} messages")
    return summary


def median(runs: list[dict[str, Any]], key: str) -> float:
    values = [r[key] for r in runs if r["ok"]]
    return statistics.median(values) if values else 0.0


def report(results: dict[str, Any]) -> str:
    runs: dict[str, list[dict[str, Any]]] = results["runs"]
    load0, load1 = results["load_average_start"], results.get("load_average_end", [0, 0, 0])
    lines = [
        f"Milter benchmark {results['started']} at {results['commit']} on {results['machine']} "
        f"(load average {load0[0]:.1f} at start, {load1[0]:.1f} at end): smtp-source -> relay "
        f"-> smtp-sink, {results['messages']} x {results['size']} B, {results['sessions']} "
        f"sessions, warm-up {results['warmup']}, {results['rounds']} interleaved runs, medians; "
        f"both relays with the same rspamd {results['rspamd_version']} proxy as milter "
        f"(self_scan, one worker, local rules only); Postfix {results['postfix_version']}; "
        f"mailrelay with {results['workers'] or 'its default number of'} workers.",
        "",
        "| system | end-to-end msgs/s | relay CPU per message | rspamd CPU per message "
        "| rspamd cores busy | relay peak memory (PSS) |",
        "|---|---|---|---|---|---|",
    ]
    for name in SYSTEMS:
        rs = runs.get(name, [])
        if not rs:
            continue
        lines.append(
            f"| {name} + rspamd | {median(rs, 'end_to_end_rate'):.0f} | "
            f"{median(rs, 'cpu_ms_per_message'):.2f} ms | "
            f"{median(rs, 'milter_cpu_ms_per_message'):.2f} ms | "
            f"{median(rs, 'milter_cores'):.2f} | "
            f"{max((r['peak_mb'] for r in rs), default=0):.0f} MB |"
        )
    baseline: dict[str, list[dict[str, Any]]] = results.get("baseline", {})
    for name in SYSTEMS:
        rs = baseline.get(name, [])
        if rs:
            lines.append(
                f"| {name}, no milter | {median(rs, 'end_to_end_rate'):.0f} | "
                f"{median(rs, 'cpu_ms_per_message'):.2f} ms | | | "
                f"{max((r['peak_mb'] for r in rs), default=0):.0f} MB |"
            )
    lines.append("")
    for label, table in (("both with rspamd", runs), ("no milter", baseline)):
        pf = median(table.get("postfix", []), "end_to_end_rate")
        mr = median(table.get("mailrelay", []), "end_to_end_rate")
        if pf and mr:
            lines.append(f"End-to-end ratio mailrelay / Postfix, {label}: **{mr / pf:.2f}x**.")
    for name in SYSTEMS:
        with_, without = runs.get(name, []), baseline.get(name, [])
        if with_ and without:
            cost = median(with_, "cpu_ms_per_message") - median(without, "cpu_ms_per_message")
            lines.append(f"The milter's cost in {name}'s CPU per message: {cost:+.2f} ms.")
    for r in (r for t in (runs, baseline) for rs in t.values() for r in rs if not r["ok"]):
        lines.append(f"FAILED run of {r['system']}: {r['error']}")
    return "\n".join(lines) + "\n"


def versions() -> dict[str, str]:
    def first_line(argv: list[str]) -> str:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout
            return out.strip().splitlines()[0] if out.strip() else "?"
        return "?"

    return {
        "rspamd_version": first_line(["rspamd", "--version"]).rsplit(" ", 1)[-1],
        "postfix_version": first_line(["postconf", "-dh", "mail_version"]),
    }


def machine() -> str:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} cores ({model}), Linux {os.uname().release}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    base.load_options(p, messages=2000, warmup=200)
    p.add_argument(
        "--baseline",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="then the same runs without a milter, for the milter's cost (default: on)",
    )
    p.add_argument("--keep", action="store_true", help="keep the scratch folder")
    return p.parse_args(argv)


def rounds(
    running: list[base.System],
    args: argparse.Namespace,
    out: dict[str, list[dict[str, Any]]],
    filter_: Rspamd | None,
) -> None:
    """The warm-up, then the interleaved runs of each system, into out[name]."""
    what = "with rspamd" if filter_ is not None else "without a milter"
    for system in running:
        print(f"warm-up {system.name} {what}: {args.warmup} messages", flush=True)
        measured_run(system, filter_, args.warmup, args.size, args.sessions)
    for i in range(args.runs):
        for system in running if i % 2 == 0 else list(reversed(running)):
            run = measured_run(system, filter_, args.messages, args.size, args.sessions)
            out[system.name].append(run)
            print(
                f"run {i + 1} {system.name} {what}: end-to-end {run['end_to_end_rate']:.0f}/s, "
                f"relay {run['cpu_ms_per_message']:.2f} ms CPU/msg"
                + (
                    f", rspamd {run['milter_cpu_ms_per_message']:.2f} ms CPU/msg, "
                    f"{run['milter_scanned']} scanned"
                    if filter_ is not None
                    else ""
                )
                + ("" if run["ok"] else f" FAILED: {run['error']}"),
                flush=True,
            )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    base.hoststate.SETTLE_SECONDS = args.settle
    if os.geteuid() != 0:
        print("milter_vs_postfix: needs root (postfix master, smtp-sink -u)", file=sys.stderr)
        return 2
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = base.RESULTS / f"{stamp}-milter"
    out_dir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="mailrelay-milter-bench-"))
    workdir.chmod(0o755)  # Postfix's daemons run as the postfix user
    results: dict[str, Any] = {
        "started": stamp,
        "machine": machine(),
        **versions(),
        "messages": args.messages,
        "size": args.size,
        "sessions": args.sessions,
        "warmup": args.warmup,
        "rounds": args.runs,
        "workers": args.workers,
        "commit": base.commit_measured(),
        "load_average_start": os.getloadavg(),
        "runs": {name: [] for name in SYSTEMS},
        "baseline": {name: [] for name in SYSTEMS},  # the same, without the milter
    }
    try:
        with (
            rspamd(workdir / "rspamd") as address,
            base.systems(workdir, args.workers, list(SYSTEMS), False, milter=address) as running,
        ):
            rounds(running, args, results["runs"], Rspamd(workdir / "rspamd"))
        if args.baseline:
            (workdir / "baseline").mkdir(mode=0o755)
            with base.systems(workdir / "baseline", args.workers, list(SYSTEMS), False) as running:
                rounds(running, args, results["baseline"], None)
    finally:
        base.finish(results, report, out_dir, workdir, keep=args.keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
