"""Hostile peers at the handover listener (issue #11, item 6).

Anyone on the pod network can connect to it. Before AUTH a line is short,
the whole exchange has a deadline, and only so many strangers are kept at
once (the oldest make room); a peer pod with the secret still gets its
handover through, and the listener's memory stays bounded.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from mrtest.peers import AiosmtpdSink
from mrtest.relayproc import (
    RelayProcess,
    free_port,
    next_loopback,
    render_config,
    wait_until,
    write_manifests,
)

from relay.handover.transfer import (
    AUTH_LINE_LIMIT,
    LINE_LIMIT,
    HandoverClient,
    HandoverServer,
)
from relay.queue.store import Queue

SECRET = b"hostile-test-secret-0123456789"
DATA = b"Subject: handed over\r\nMessage-ID: <h1@test>\r\n\r\nbody\r\n"


@dataclass
class Listener:
    queue: Queue
    server: asyncio.Server
    receiver: HandoverServer

    @property
    def address(self) -> tuple[str, int]:
        return self.server.sockets[0].getsockname()[:2]  # type: ignore[no-any-return]


@pytest.fixture
async def listener(tmp_path: Path) -> AsyncIterator[Listener]:
    queue = Queue(tmp_path / "peer")
    receiver = HandoverServer(
        queue,
        SECRET,
        hostname=lambda: "peer.test",
        max_size=lambda: 1024 * 1024,
        draining=lambda: False,
        auth_timeout=0.5,
        max_unauthenticated=8,
    )
    # Started as the relay starts it: with the post-AUTH line limit.
    server = await asyncio.start_server(receiver.handle, "127.0.0.1", 0, limit=LINE_LIMIT)
    yield Listener(queue, server, receiver)
    server.close()
    await server.wait_closed()
    await queue.close()


async def hand_over(address: tuple[str, int], tmp_path: Path) -> str:
    """What a draining pod does: one message, authenticated; returns the peer's id."""
    mine = Queue(tmp_path / f"mine-{time.monotonic_ns()}")
    try:
        msg = mine.incoming()
        msg.write(DATA)
        qid = await msg.commit("alice@example.org", ["a@example.com"])
        claim = mine.take_fresh(qid)
        assert claim is not None
        client = HandoverClient(f"{address[0]}:{address[1]}", SECRET, timeout=10)
        await client.connect()
        try:
            return await client.send(mine, claim)
        finally:
            await client.close()
            mine.release_sync(claim)
    finally:
        await mine.close()


async def closed_by_peer(reader: asyncio.StreamReader) -> bool:
    """Reads (and drops) replies until the listener hangs up."""
    try:
        while await asyncio.wait_for(reader.read(4096), 10):
            pass
    except ConnectionError:
        pass
    return True


async def test_oversized_first_line_is_refused_early(listener: Listener) -> None:
    reader, writer = await asyncio.open_connection(*listener.address)
    assert (await reader.readline()).startswith(b"220 ")
    writer.write(b"A" * (64 * AUTH_LINE_LIMIT))  # no line end, ever
    got = b""
    try:
        while chunk := await asyncio.wait_for(reader.read(4096), 10):
            got += chunk
    except ConnectionError:
        pass  # closed with our bytes unread: a reset
    assert got == b"" or got.startswith(b"500 "), got
    writer.close()


async def test_garbage_and_slow_loris_are_shown_the_door(listener: Listener) -> None:
    reader, writer = await asyncio.open_connection(*listener.address)
    await reader.readline()
    writer.write(b"\x16\x03\x01\x02\x00\x01\xff\xfe garbage\r\n")
    assert (await reader.readline()).startswith(b"530 ")
    assert await closed_by_peer(reader)
    writer.close()

    # NOOP is harmless, but a trickle of them does not keep a stranger in.
    reader, writer = await asyncio.open_connection(*listener.address)
    await reader.readline()
    try:
        for _ in range(200):
            writer.write(b"NOOP\r\n")
            await writer.drain()
            if not await reader.readline():
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("a slow NOOP trickle kept the connection open")
    except ConnectionError:
        pass
    writer.close()


async def test_idle_strangers_make_room_for_a_peer(listener: Listener, tmp_path: Path) -> None:
    idle = [await asyncio.open_connection(*listener.address) for _ in range(200)]
    try:
        # At most max_unauthenticated strangers are kept: the rest were closed.
        assert len(listener.receiver._unauthenticated) <= 8
        assert await hand_over(listener.address, tmp_path)
        assert len(list(listener.queue.messages())) == 1
        for reader, _ in idle[:150]:  # the older ones made room (or timed out)
            assert await closed_by_peer(reader)
    finally:
        for _, writer in idle:
            writer.close()


# -- the relay process: memory ---------------------------------------------------------


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def relay_rss(relay: RelayProcess) -> int:
    assert relay.proc is not None
    pids = [relay.proc.pid]
    for pid in pids:
        for task in os.listdir(f"/proc/{pid}/task"):
            pids += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    return sum(rss_bytes(p) for p in pids)


def flood(address: tuple[str, int], n: int, payload: bytes) -> list[socket.socket]:
    """n connections that each push `payload` with no line end, as far as the
    kernel takes it (nothing buffered on this side)."""
    out = []
    for _ in range(n):
        s = socket.create_connection(address, timeout=10)
        s.setblocking(False)
        view = memoryview(payload)
        while view:
            try:
                sent = s.send(view)
            except (BlockingIOError, ConnectionError):
                break
            view = view[sent:]
        out.append(s)
    return out


def closed(s: socket.socket) -> bool:
    try:
        while True:
            if not s.recv(65536):
                return True
    except BlockingIOError:
        return False
    except ConnectionError:
        return True


@pytest.mark.slow
async def test_relay_listener_memory_stays_bounded(tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_bytes(SECRET)
    with AiosmtpdSink(next_loopback()) as sink:
        manifests = write_manifests(
            tmp_path / "m", next_hop=sink.address, domains={"example.com": "any"}
        )
        host = next_loopback()
        port = free_port(host)
        args = ["--handover-listen", f"{host}:{port}", "--handover-secret-file", str(secret_file)]
        config_dir = render_config(manifests, tmp_path / "config")
        relay = RelayProcess(
            None,
            tmp_path / "relay",
            host=host,
            command="relay",
            config_dir=config_dir,
            workers=1,
            args=args,
        )
        with relay:
            wait_until(lambda: relay.log().count("handover listener on"), what="the listener")
            before = relay_rss(relay)
            hostile = await asyncio.to_thread(flood, (host, port), 100, b"A" * (1024 * 1024))
            hostile += await asyncio.to_thread(flood, (host, port), 200, b"")
            grown = relay_rss(relay) - before
            # Without the short line limit each stranger buffers up to 2 MiB.
            assert grown < 40 * 1024 * 1024, f"RSS grew by {grown / 2**20:.0f} MiB"
            assert await hand_over((host, port), tmp_path)
            sink.wait_for(1)
            wait_until(lambda: all(closed(s) for s in hostile), timeout=60, what="strangers closed")
            for s in hostile:
                s.close()
