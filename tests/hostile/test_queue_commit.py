"""The queue file at commit time, under hostile conditions (issue #11, items 4, 5).

- A disk that fills up: the client gets 451 and the half-written file is gone,
  with its lock and file handle (a scale-down drain waits for incoming/ to empty).
- Clients that reset the connection right after the final dot: the message is
  committed and delivered, or discarded; never left locked in active/.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from mrtest.edgeserver import EdgeFactory, edge_config, edge_server_factory
from mrtest.faults import small_tmpfs
from mrtest.peers import AiosmtpdSink, RawClient
from mrtest.relayproc import RelayProcess, next_loopback, wait_until, write_manifests

from relay.queue.store import ACTIVE, DEFERRED, FLUSH_MARKER, INCOMING


@pytest.fixture
async def edge_server(tmp_path: Path) -> AsyncIterator[EdgeFactory]:
    async for start in edge_server_factory(tmp_path):
        yield start


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    with small_tmpfs(tmp_path / "small-disk", "1m") as folder:
        yield folder


def open_files(pid: int | str, under: Path) -> list[str]:
    """The files (not folders) under `under` that process `pid` has open."""
    out = []
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(fd_dir / fd)
        except OSError:
            continue  # closed meanwhile
        if target.startswith(str(under)) and not os.path.isdir(target):
            out.append(target)
    return out


async def test_disk_full_leaves_no_partial_file_nor_handle(
    edge_server: EdgeFactory, tmp_path: Path, small_disk: Path
) -> None:
    from relay.queue.store import Queue

    queue = Queue(small_disk / "queue")
    config = edge_config(tmp_path, spec={"limits": {"messageSize": 500_000}})
    edge = await edge_server(config, queue=queue)
    # Bigger than what stays in memory: written out while received, so the
    # disk fills under the background writes, found out at commit. Clients at
    # once: each passes the free-space check at MAIL, together they fill the disk.
    body = ("x" * 76 + "\r\n") * 5000  # ~390 kB

    async def client(n: int) -> str:
        async with RawClient(*edge.address, local=next_loopback(), timeout=20) as c:
            await c.greet()
            reply = await c.command("MAIL FROM:<a@client.test>")
            if reply.startswith("250"):
                assert (await c.command("RCPT TO:<x@example.org>")).startswith("250")
                assert (await c.command("DATA")).startswith("354")
                await c.send(f"Message-Id: <full{n}@client.test>\r\n\r\n{body}".encode())
                reply = await c.command(".")
            return reply[:3]

    codes = await asyncio.gather(*(client(n) for n in range(5)))
    assert "451" in codes, codes
    await queue.settle()
    # Every failed message cleaned up after itself: no file, no lock, no handle.
    assert os.listdir(queue.directory / INCOMING) == []
    assert open_files(os.getpid(), queue.directory / INCOMING) == []


# -- clients that hang up right after the final dot ----------------------------------


def send_and_reset(address: tuple[str, int], n: int) -> None:
    """One whole message, then RST (SO_LINGER 0) without waiting for the reply."""
    # Each from an address of its own: the relay's per-client limits stay out of it.
    client = (f"127.0.{1 + n // 250}.{1 + n % 250}", 0)
    with socket.create_connection(address, timeout=10, source_address=client) as s:
        f = s.makefile("rb")

        def expect(code: bytes) -> None:
            while True:
                line = f.readline()
                assert line.startswith(code), line
                if line[3:4] != b"-":
                    return

        expect(b"220")
        for command, code in (
            (b"EHLO client.test", b"250"),
            (b"MAIL FROM:<a@client.test>", b"250"),
            (b"RCPT TO:<x@example.org>", b"250"),
            (b"DATA", b"354"),
        ):
            s.sendall(command + b"\r\n")
            expect(code)
        s.sendall(b"Message-Id: <rst%d@client.test>\r\n\r\nhello\r\n.\r\n" % n)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def relay_pids(relay: RelayProcess) -> list[int]:
    assert relay.proc is not None
    pids = [relay.proc.pid]
    for pid in pids:  # the workers too, if any
        for task in os.listdir(f"/proc/{pid}/task"):
            children = Path(f"/proc/{pid}/task/{task}/children").read_text().split()
            pids += [int(c) for c in children]
    return pids


@pytest.mark.slow
def test_reset_after_final_dot_leaves_nothing_locked(tmp_path: Path) -> None:
    with AiosmtpdSink(next_loopback()) as sink:
        manifests = write_manifests(
            tmp_path / "m", next_hop=sink.address, domains={"example.org": "any"}
        )
        with RelayProcess(manifests, tmp_path / "relay", workers=1) as relay:
            clients = [
                threading.Thread(target=send_and_reset, args=(relay.address, n)) for n in range(60)
            ]
            for t in clients:
                t.start()
            for t in clients:
                t.join()
            queue = relay.queue_dir

            def settled() -> bool:
                # Committed mail whose client hung up is the queue scan's: make it run now.
                (queue / FLUSH_MARKER).touch()
                return not any(os.listdir(queue / s) for s in (INCOMING, ACTIVE, DEFERRED))

            try:
                wait_until(settled, timeout=60, what="every committed message delivered")
            except AssertionError as e:
                left = {s: os.listdir(queue / s) for s in (INCOMING, ACTIVE, DEFERRED)}
                raise AssertionError(f"{e}; left: {left}\n{relay.log()[-4000:]}") from None
            # A delivered file is unlinked a moment before its handle is closed.
            wait_until(
                lambda: not any(open_files(pid, queue) for pid in relay_pids(relay)),
                timeout=30,
                what="no queue file left open in the relay",
            )
            # What was committed went out, each once (the client may have resent it).
            ids = [m.header("Message-Id") for m in sink.messages]
            assert len(ids) == len(set(ids))
