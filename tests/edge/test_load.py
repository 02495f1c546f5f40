"""Load: 1,000 concurrent sessions held by one relay process with bounded
memory; slowloris clients time out without starving others; a flood from
one address is limited while other addresses keep being served."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from mrtest.edgeserver import edge_config, long_test
from mrtest.peers import RawClient
from mrtest.proc import raise_fd_limit, rss_kib
from mrtest.relayproc import RelayProcess, write_manifests

from relay.process.listeners import LISTEN_BACKLOG

PER_ADDRESS = 40  # under connectionsPerClient (50)


async def hold_sessions(address: tuple[str, int], count: int) -> dict[str, Any]:
    """Opens `count` sessions (EHLO, MAIL, RCPT) from 127.0.1.x addresses and
    holds them all; then sends one message on each."""
    addresses = [f"127.0.1.{1 + i // PER_ADDRESS}" for i in range(count)]
    sessions: list[RawClient] = []
    sem = asyncio.Semaphore(200)  # the connection burst, not the sessions held

    async def open_one(local: str) -> RawClient:
        async with sem:
            c = RawClient(*address, local=local, timeout=120)
            await c.__aenter__()
            assert (await c.greet()).startswith("250")
            assert (await c.command("MAIL FROM:<load@client.test>")).startswith("250")
            assert (await c.command("RCPT TO:<x@example.org>")).startswith("250")
            return c

    sessions = list(await asyncio.gather(*(open_one(a) for a in addresses)))
    held = len(sessions)

    async def finish(c: RawClient, n: int) -> str:
        assert (await c.command("DATA")).startswith("354")
        reply = await c.command(f"Subject: load {n}\r\n\r\nhello {n}\r\n.")
        await c.command("QUIT")
        await c.__aexit__(None, None, None)
        return reply

    return {"held": held, "sessions": sessions, "finish": finish}


async def run_held_sessions(tmp_path: Path, count: int) -> dict[str, int]:
    raise_fd_limit(2 * count + 500)
    manifests = write_manifests(
        tmp_path / "m", next_hop=("127.0.0.1", 9), domains={"example.org": "any"}
    )
    relay = RelayProcess(manifests, tmp_path / "relay", workers=1)
    with relay:
        assert relay.proc is not None
        pid = relay.proc.pid
        before = rss_kib(pid)
        state = await hold_sessions(relay.address, count)
        during = rss_kib(pid)
        replies = await asyncio.gather(
            *(state["finish"](c, n) for n, c in enumerate(state["sessions"]))
        )
        after = rss_kib(pid)
    accepted = sum(r.startswith("250") for r in replies)
    figures = {
        "sessions": count,
        "held": state["held"],
        "accepted": accepted,
        "rss_before_kib": before,
        "rss_held_kib": during,
        "rss_after_kib": after,
        "kib_per_session": (during - before) // max(count, 1),
    }
    print(f"\nheld sessions: {figures}")
    report = os.environ.get("MAILRELAY_REPORT")
    if report:
        with open(report, "a") as f:
            f.write(f"load {figures}\n")
    return figures


async def test_1000_concurrent_sessions_with_bounded_memory(tmp_path: Path) -> None:
    figures = await run_held_sessions(tmp_path, 1000)
    assert figures["held"] == 1000
    assert figures["accepted"] == 1000
    # A held session costs a socket, a protocol and a small transaction:
    # well under 100 KiB each (the whole message never sits in memory).
    assert figures["kib_per_session"] < 100, figures


@long_test
async def test_5000_concurrent_sessions(tmp_path: Path) -> None:
    figures = await run_held_sessions(tmp_path, 5000)
    assert figures["accepted"] == 5000
    assert figures["kib_per_session"] < 100, figures


async def test_slowloris_times_out_without_starving_others(
    edge_server: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mailrelay.smtpd")
    edge = await edge_server(edge_config(tmp_path), idle_timeout=1.0)
    stop = asyncio.Event()

    async def slowloris(n: int) -> str:
        """Sends a command one byte at a time, never ending the line."""
        c = RawClient(*edge.address, local=f"127.0.2.{1 + n // 20}", timeout=30)
        await c.__aenter__()
        assert (await c.read_reply()).startswith("220")
        assert c.reader is not None and c.writer is not None
        for byte in b"EHLO slow.client.test" * 10:
            if stop.is_set() or c.reader._buffer or c.reader.at_eof():  # type: ignore[attr-defined]
                break  # the relay has answered (and closed)
            c.writer.write(bytes([byte]))
            await asyncio.sleep(0.1)
        try:
            reply = await c.read_reply()
        except ConnectionError:
            reply = "closed"  # our last byte crossed the relay's 421 and close
        c.writer.transport.abort()
        return reply

    async def polite(n: int) -> list[str]:
        await asyncio.sleep(0.05 * n)  # spread over the slowloris' lifetime
        async with RawClient(*edge.address, local=f"127.0.3.{1 + n}", timeout=30) as c:
            await c.greet()
            out = [await c.command("MAIL FROM:<a@client.test>")]
            out.append(await c.command("RCPT TO:<x@example.org>"))
            out.append(await c.command("DATA"))
            out.append(await c.command(f"Subject: polite {n}\r\n\r\nhi\r\n."))
            return out

    slow = [asyncio.create_task(slowloris(n)) for n in range(100)]
    polite_results = await asyncio.gather(*(polite(n) for n in range(30)))
    slow_results = await asyncio.wait_for(asyncio.gather(*slow), 30)
    stop.set()
    for r in polite_results:
        assert r[3].startswith("250"), r
    # Each slowloris was cut off by the idle timeout (its client may read the
    # 421 or, when its next byte crossed the close, just the reset).
    assert set(slow_results) <= {"421 4.4.2 mx.relay.test Error: timeout exceeded", "closed"}
    assert caplog.text.count("timeout after CONNECT") == 100
    await asyncio.sleep(0.1)
    assert len(edge.ctx.sessions) == 0
    assert len(edge.queued()) == 30


async def test_flood_from_one_address_is_limited_others_served(
    edge_server: Any, tmp_path: Path
) -> None:
    spec = {"limits": {"connectionsPerClient": 10, "messageRatePerClient": 30}}
    edge = await edge_server(edge_config(tmp_path, spec=spec), backlog=512)
    flooder = "127.0.4.1"

    async def flood_connection() -> str:
        try:
            async with RawClient(*edge.address, local=flooder, timeout=30) as c:
                banner = await c.read_reply()
                if banner.startswith("220"):
                    await c.command("EHLO flood.test")
                    for _ in range(10):
                        reply = await c.command("MAIL FROM:<f@flood.test>")
                        await c.command("RSET")
                    await asyncio.sleep(0.5)  # hold the slot a while
                    return reply
                return banner
        except (ConnectionError, TimeoutError):
            return "reset"

    async def other(n: int) -> list[str]:
        out = []
        async with RawClient(*edge.address, local=f"127.0.5.{1 + n}", timeout=30) as c:
            await c.greet()
            for k in range(3):
                await c.command("MAIL FROM:<a@client.test>")
                await c.command("RCPT TO:<x@example.org>")
                await c.command("DATA")
                out.append(await c.command(f"Subject: other {n}.{k}\r\n\r\nhi\r\n."))
        return out

    flood = [asyncio.create_task(flood_connection()) for _ in range(200)]
    others = await asyncio.gather(*(other(n) for n in range(20)))
    flood_results = await asyncio.gather(*flood)
    for r in others:
        assert all(x.startswith("250") for x in r), r
    refused = [r for r in flood_results if r.startswith("421 4.7.0")]
    rate_limited = [r for r in flood_results if r.startswith("450 4.7.1")]
    assert len(refused) >= 150, flood_results[:5]
    assert f"too many connections from {flooder}" in refused[0]
    assert rate_limited, "the message rate limit never hit"
    assert len(edge.queued()) == 60


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2)")
def test_the_listen_queue_holds_a_burst_of_connections(tmp_path: Path) -> None:
    """The port's accept queue is LISTEN_BACKLOG deep in the running relay, not
    asyncio's 100 (create_server listens again on the socket it is given): a
    burst of connections past the queue gets SYN cookies, and a client whose
    last ACK is then dropped waits for a greeting that never comes."""
    manifests = write_manifests(
        tmp_path / "m", next_hop=("127.0.0.1", 9), domains={"example.org": "any"}
    )
    with RelayProcess(manifests, tmp_path / "relay", workers=2) as relay:
        host, port = relay.address
        listing = subprocess.run(
            ["ss", "-ltnH", f"src {host}:{port}"], capture_output=True, text=True, check=True
        ).stdout.split("\n")
    queues = sorted(int(line.split()[2]) for line in listing if line.strip())
    assert queues == [LISTEN_BACKLOG, LISTEN_BACKLOG]  # one listener per worker (SO_REUSEPORT)
