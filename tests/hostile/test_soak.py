"""Soak: 1,000 concurrent hostile sessions against `mailrelay run` while legitimate
mail flows. Proven afterwards: no legitimate message lost, memory bounded (the
peak is reported), and nothing left behind — the relay's open files and TCP
connections are back where they started.

The hostile mix, from 127.0.6.x (40 sessions an address, under the
per-client limit): idle sessions that never speak, slow ones that trickle a
command a byte at a time, junk floods (NOOP, garbage, unknown commands), resets
in the middle of DATA (SO_LINGER 0), and messages over the size limit. Each
hostile client starts again when the relay cuts it off, until the soak ends.

Bounded in CI (SOAK_SECONDS); MAILRELAY_LONG=1 runs it ten times longer. The
figures go to stdout and, with MAILRELAY_REPORT, to that file.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import struct
import time
from pathlib import Path

from mrtest.peers import AiosmtpdSink, RawClient
from mrtest.proc import raise_fd_limit, tree_fd_targets, tree_fds, tree_rss_mb
from mrtest.relayproc import RelayProcess, next_loopback, wait_until, write_manifests

HOSTILE = 1000
LEGITIMATE = 200
PER_ADDRESS = 40
MESSAGE_SIZE_LIMIT = 64_000  # limits.messageSize, small so "oversize" is cheap to send
SOAK_SECONDS = 40.0 * (10 if os.environ.get("MAILRELAY_LONG") else 1)
RSS_BOUND_MB = 600  # every relay process together; a leak grows past it quickly


def established_to(address: tuple[str, int]) -> int:
    """TCP connections in any state but LISTEN/TIME_WAIT/CLOSE whose local end is
    the relay's address (the relay's side of client connections)."""
    host = socket.inet_aton(address[0])
    wanted = f"{struct.unpack('<I', host)[0]:08X}:{address[1]:04X}"
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == wanted and fields[3] not in ("0A", "06", "07"):
            count += 1
    return count


class Hostile:
    def __init__(self, address: tuple[str, int], deadline: float) -> None:
        self.address = address
        self.deadline = deadline
        self.sessions = 0

    def local(self, n: int) -> str:
        return f"127.0.{6 + n // (PER_ADDRESS * 250)}.{1 + (n // PER_ADDRESS) % 250}"

    async def run(self, n: int) -> None:
        kinds = [self.idle, self.slow, self.junk, self.reset_in_data, self.oversize]
        kind = kinds[n % len(kinds)]
        rng = random.Random(n)
        while time.monotonic() < self.deadline:
            self.sessions += 1
            with contextlib.suppress(OSError, TimeoutError, EOFError, AssertionError):
                async with RawClient(*self.address, local=self.local(n), timeout=15) as c:
                    await kind(c, rng)
            await asyncio.sleep(rng.uniform(0.05, 0.5))

    def left(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    async def idle(self, c: RawClient, rng: random.Random) -> None:
        await c.read_reply()
        await asyncio.sleep(min(self.left(), rng.uniform(5, 30)))

    async def slow(self, c: RawClient, rng: random.Random) -> None:
        await c.read_reply()
        assert c.writer is not None
        for byte in b"EHLO slow.hostile.test\r\nMAIL FROM:<s@hostile.test>\r\n":
            if self.left() <= 0:
                return
            c.writer.write(bytes([byte]))
            await c.writer.drain()
            await asyncio.sleep(rng.uniform(0.2, 1.0))

    async def junk(self, c: RawClient, rng: random.Random) -> None:
        await c.read_reply()
        lines = [b"NOOP", b"RSET", b"HELP", b"\x00\xff\xfe junk", b"XYZZY", b"MAIL FROM:<>"]
        for _ in range(300):
            await c.send(rng.choice(lines) + b"\r\n")
            reply = await c.read_reply()
            if not reply or reply.startswith(("421", "221")):
                return

    async def reset_in_data(self, c: RawClient, rng: random.Random) -> None:
        await c.greet()
        await c.command("MAIL FROM:<r@hostile.test>")
        await c.command("RCPT TO:<x@example.org>")
        if (await c.command("DATA")).startswith("354"):
            await c.send(b"Subject: cut\r\n\r\n" + b"x" * rng.randint(10, 30_000) + b"\r\n")
        assert c.writer is not None
        sock = c.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.writer.transport.abort()  # RST, mid-message

    async def oversize(self, c: RawClient, rng: random.Random) -> None:
        await c.greet()
        await c.command(f"MAIL FROM:<o@hostile.test> SIZE={MESSAGE_SIZE_LIMIT * 10}")
        await c.command("MAIL FROM:<o@hostile.test>")
        await c.command("RCPT TO:<x@example.org>")
        if (await c.command("DATA")).startswith("354"):
            body = b"Subject: big\r\n\r\n" + (b"y" * 998 + b"\r\n") * (MESSAGE_SIZE_LIMIT // 500)
            await c.send(body + b".\r\n")
            await c.read_reply()  # 552 5.3.4


async def legitimate(address: tuple[str, int], n: int) -> bool:
    """One message, retried on 4xx and on a lost connection as an MTA would."""
    for attempt in range(20):
        try:
            async with RawClient(*address, local=f"127.0.5.{1 + n % 200}", timeout=60) as c:
                if not (await c.greet()).startswith("250"):
                    raise ConnectionError("no EHLO")
                await c.command("MAIL FROM:<good@client.test>")
                if (await c.command("RCPT TO:<x@example.org>")).startswith("250"):
                    await c.command("DATA")
                    reply = await c.command(f"Subject: good {n}\r\nX-Good: {n}\r\n\r\nhi\r\n.")
                    if reply.startswith("250"):
                        return True
        except (OSError, TimeoutError, AssertionError):  # refused, reset, 421 banner
            pass
        await asyncio.sleep(0.5 + attempt * 0.2)
    return False


def test_1000_hostile_sessions_while_mail_flows(tmp_path: Path) -> None:
    raise_fd_limit(2 * (HOSTILE + LEGITIMATE) + 1000)
    with AiosmtpdSink(next_loopback()) as sink:
        manifests = write_manifests(
            tmp_path / "m",
            next_hop=sink.address,
            domains={"example.org": "any"},
            spec={"limits": {"messageSize": MESSAGE_SIZE_LIMIT}},
        )
        with RelayProcess(manifests, tmp_path / "relay") as relay:
            assert relay.proc is not None
            root = relay.proc.pid
            fds_before, rss_before = tree_fds(root), tree_rss_mb(root)
            files_before = tree_fd_targets(root)
            peak = {"rss": rss_before}
            stop = asyncio.Event()

            async def sample() -> None:
                while not stop.is_set():
                    peak["rss"] = max(peak["rss"], tree_rss_mb(root))
                    await asyncio.sleep(0.5)

            async def soak() -> tuple[list[bool], int]:
                hostile = Hostile(relay.address, time.monotonic() + SOAK_SECONDS)
                sampler = asyncio.create_task(sample())
                attackers = [asyncio.create_task(hostile.run(n)) for n in range(HOSTILE)]
                await asyncio.sleep(3)  # the hostile load is on
                sent = await asyncio.gather(
                    *(legitimate(relay.address, n) for n in range(LEGITIMATE))
                )
                await asyncio.gather(*attackers)
                stop.set()
                await sampler
                return sent, hostile.sessions

            sent, hostile_sessions = asyncio.run(soak())
            assert all(sent), f"{sent.count(False)} legitimate messages never accepted"
            sink.wait_for(LEGITIMATE, timeout=120)
            # Everything the clients opened is gone on the relay's side too.
            wait_until(lambda: established_to(relay.address) == 0, 60, "client connections")
            try:
                wait_until(lambda: tree_fds(root) <= fds_before + 5, 60, "the relay's open files")
            except AssertionError:
                after = tree_fd_targets(root)
                new = sorted(set(after) - set(files_before))
                raise AssertionError(
                    f"open files left: {len(after)} vs {len(files_before)}: {new[:40]}"
                ) from None
            figures = {
                "hostile_sessions": hostile_sessions,
                "legitimate_delivered": len(sink.messages),
                "rss_before_mb": round(rss_before),
                "rss_peak_mb": round(peak["rss"]),
                "fds_before": fds_before,
                "fds_after": tree_fds(root),
            }
    print(f"\nsoak: {figures}")
    if report := os.environ.get("MAILRELAY_REPORT"):
        with open(report, "a") as f:
            f.write(f"soak {figures}\n")
    good = [m for m in sink.messages if m.header("X-Good") is not None]
    assert sorted(int(m.header("X-Good") or -1) for m in good)[:1] == [0]
    assert len({m.header("X-Good") for m in good}) == LEGITIMATE  # each one arrived
    assert figures["rss_peak_mb"] < RSS_BOUND_MB, figures
