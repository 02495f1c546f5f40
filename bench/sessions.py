#!/usr/bin/env python3
"""Many sessions at once: 1,000 idle clients and 200 active ones, mailrelay and Postfix.

What a relay on port 25 sees when slow or idle clients pile up: 1,000 sessions
that greet (EHLO) and then sit idle, held open the whole time, while 200 other
sessions each send a few messages. Per system it reports:
- the legitimate (active) messages accepted, and the sessions refused, reset
  or timed out (target for mailrelay: none refused);
- how many of the idle sessions got their greeting at all;
- peak memory, PSS summed over the relay's processes (target: <= 200 MB).

Both systems are configured as in bench/relay_vs_postfix.py (same relay
domain, same next hop kind, mailrelay with its default workers, Postfix with
its default process limit of 100 smtpd processes). Clients bind to many
loopback addresses (127.0.1.x for idle, 127.0.2.x for active) so that neither
side's per-client limits (50 connections) are what is measured.

    .venv/bin/python bench/sessions.py [--idle 1000] [--active 200] [--messages 5]

Results: bench/results/<time>-sessions/results.json and summary.md. Needs root.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from relay_vs_postfix import (  # bench/ is not a package
    HOST,
    RESULTS,
    PeakMemory,
    System,
    commit_measured,
    finish,
    systems,
    wait_until,
)

PER_ADDRESS = 20  # sessions per client address, well under both sides' limit of 50
SESSION_TIMEOUT = 120.0  # an active session that takes longer counts as failed
BODY = b"Subject: sessions bench\r\n\r\n" + b"x" * 76 + b"\r\n"


def client_address(block: int, index: int) -> str:
    return f"127.0.{block}.{2 + index // PER_ADDRESS}"


async def _reply(reader: asyncio.StreamReader) -> bytes:
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("closed")
        if line[3:4] != b"-":
            return line


async def _expect(reader: asyncio.StreamReader, code: bytes) -> None:
    reply = await _reply(reader)
    if not reply.startswith(code):
        raise ConnectionError(reply.decode(errors="replace").strip())


@dataclass
class Outcome:
    system: str
    idle: int
    idle_greeted: int = 0
    active: int = 0
    messages_sent: int = 0
    messages_accepted: int = 0
    active_failed: int = 0
    failures: dict[str, int] | None = None
    peak_mb: float = 0.0
    seconds: float = 0.0


class Load:
    def __init__(self, port: int, outcome: Outcome) -> None:
        self.port = port
        self.outcome = outcome
        self.failures: dict[str, int] = {}
        self.idle_writers: list[asyncio.StreamWriter] = []

    def fail(self, why: str) -> None:
        key = why[:60]
        self.failures[key] = self.failures.get(key, 0) + 1

    async def idle_session(self, index: int) -> None:
        try:
            reader, writer = await asyncio.open_connection(
                HOST, self.port, local_addr=(client_address(1, index), 0)
            )
        except OSError as e:
            self.fail(f"idle connect: {e.__class__.__name__}")
            return
        self.idle_writers.append(writer)
        try:
            await asyncio.wait_for(_expect(reader, b"220"), SESSION_TIMEOUT)
            writer.write(b"EHLO idle.bench.test\r\n")
            await asyncio.wait_for(_expect(reader, b"250"), SESSION_TIMEOUT)
            self.outcome.idle_greeted += 1
        except (OSError, ConnectionError, TimeoutError):
            pass  # not greeted: counted by idle_greeted

    async def active_session(self, index: int, messages: int) -> None:
        try:
            await asyncio.wait_for(self._send(index, messages), SESSION_TIMEOUT)
        except TimeoutError:
            self.fail("active: timed out")
            self.outcome.active_failed += 1
        except (OSError, ConnectionError) as e:
            self.fail(f"active: {e}")
            self.outcome.active_failed += 1

    async def _send(self, index: int, messages: int) -> None:
        reader, writer = await asyncio.open_connection(
            HOST, self.port, local_addr=(client_address(2, index), 0)
        )
        try:
            await _expect(reader, b"220")
            writer.write(b"EHLO active.bench.test\r\n")
            await _expect(reader, b"250")
            for n in range(messages):
                self.outcome.messages_sent += 1
                writer.write(b"MAIL FROM:<sender@source.test>\r\n")
                await _expect(reader, b"250")
                writer.write(b"RCPT TO:<rcpt%d@example.com>\r\n" % n)
                await _expect(reader, b"250")
                writer.write(b"DATA\r\n")
                await _expect(reader, b"354")
                writer.write(BODY + b".\r\n")
                await _expect(reader, b"250")
                self.outcome.messages_accepted += 1
            writer.write(b"QUIT\r\n")
        finally:
            writer.close()


async def exercise(system: System, idle: int, active: int, messages: int) -> Outcome:
    outcome = Outcome(system.name, idle, active=active)
    load = Load(system.port, outcome)
    started = time.monotonic()
    with PeakMemory(system.root_pid) as mem:
        idlers = [asyncio.ensure_future(load.idle_session(i)) for i in range(idle)]
        await asyncio.wait(idlers, timeout=SESSION_TIMEOUT)
        await asyncio.gather(*(load.active_session(i, messages) for i in range(active)))
        outcome.seconds = time.monotonic() - started
        for task in idlers:
            task.cancel()
        for writer in load.idle_writers:
            writer.close()
    outcome.peak_mb = mem.peak
    outcome.failures = load.failures
    return outcome


def report(results: dict[str, Any]) -> str:
    lines = [
        f"Sessions benchmark {results['started']} ({results['commit']}, {results['machine']}): "
        f"{results['idle']} idle sessions held while {results['active']} active sessions send "
        f"{results['messages']} messages each.",
        "",
        "| system | idle greeted | active messages accepted | active sessions failed "
        "| peak memory (PSS) | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for o in results["outcomes"]:
        lines.append(
            f"| {o['system']} | {o['idle_greeted']}/{o['idle']} | "
            f"{o['messages_accepted']}/{o['messages_sent']} | {o['active_failed']}/{o['active']} "
            f"| {o['peak_mb']:.0f} MB | {o['seconds']:.1f} |"
        )
    for o in results["outcomes"]:
        for why, count in sorted((o["failures"] or {}).items()):
            lines.append(f"- {o['system']}: {count} x {why}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--idle", type=int, default=1000)
    p.add_argument("--active", type=int, default=200)
    p.add_argument("--messages", type=int, default=5, help="per active session")
    p.add_argument("--only", choices=["postfix", "mailrelay"], action="append")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("sessions: needs root (postfix master, smtp-sink -u)", file=sys.stderr)
        return 2
    # 1,200 client sockets here, as many in the relays (which inherit the limit).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    which = args.only or ["postfix", "mailrelay"]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = RESULTS / f"{stamp}-sessions"
    out_dir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="mailrelay-sessions-"))
    workdir.chmod(0o755)  # Postfix's daemons run as the postfix user
    results: dict[str, Any] = {
        "started": stamp,
        "commit": commit_measured(),
        "machine": f"{os.cpu_count()} cores, {os.uname().release}",
        "load_average_start": os.getloadavg(),
        **{k: getattr(args, k) for k in ("idle", "active", "messages")},
        "outcomes": [],
    }
    try:
        with systems(workdir, 0, which, content_filter=True) as running:
            for system in running:
                target = system.sink.count
                outcome = asyncio.run(exercise(system, args.idle, args.active, args.messages))
                target += outcome.messages_accepted
                with contextlib.suppress(TimeoutError):
                    wait_until(
                        lambda: system.sink.count >= target,  # noqa: B023 (called right here)
                        120,
                        "the accepted messages at the sink",
                    )
                results["outcomes"].append(asdict(outcome))
                print(f"{system.name}: {asdict(outcome)}", flush=True)
    finally:
        finish(results, report, out_dir, workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
