"""Latency under load: a probe that sends one message at a time beside the load.

The load (smtp-source) measures throughput; it cannot tell how long one message
waits. The probe sends its own messages, one after the other on one session, to
a second relay domain (probe.example) whose next hop is the ProbeSink here, and
records two intervals per message:

- accept: from writing the final "." of DATA to the relay's 250 (how long the
  relay takes to store a message durably and answer);
- forward: from that 250 to the moment the next hop has the whole message
  (ProbeSink notes the time it reads the final "."), i.e. queue and delivery.

Client and sink run in this process on one event loop in a thread, so both
times come from one clock (time.monotonic). The probe is light (a few dozen
messages a second at most), so it measures the load rather than adding to it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import math
import statistics
import threading
import time
from dataclasses import dataclass, field

PROBE_DOMAIN = "probe.example"
PROBE_HEADER = b"X-Probe-Id: "
BODY = b"".join(
    b"probe line %04d .........................................\r\n" % i for i in range(80)
)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by nearest rank; 0 when there is nothing."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[rank]


@dataclass
class Latencies:
    accept_ms: list[float] = field(default_factory=list)
    forward_ms: list[float] = field(default_factory=list)
    lost: int = 0  # probe messages accepted but not seen at the sink in time
    errors: int = 0  # probe sessions that failed (refused, reset, timed out)

    def summary(self) -> dict[str, float | int]:
        return {
            "probes": len(self.accept_ms),
            "accept_p50_ms": round(percentile(self.accept_ms, 50), 2),
            "accept_p99_ms": round(percentile(self.accept_ms, 99), 2),
            "forward_p50_ms": round(percentile(self.forward_ms, 50), 2),
            "forward_p99_ms": round(percentile(self.forward_ms, 99), 2),
            "probe_lost": self.lost,
            "probe_errors": self.errors,
        }


async def _reply(reader: asyncio.StreamReader) -> bytes:
    """One SMTP reply (all its lines); returns the last line."""
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("connection closed")
        if line[3:4] != b"-":
            return line


class ProbeSink:
    """A next hop that answers 250 to everything and notes when each probe arrived."""

    def __init__(self) -> None:
        self.arrived: dict[int, float] = {}
        self.port = 0
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._session, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            writer.write(b"220 probe.sink ESMTP\r\n")
            while line := await reader.readline():
                verb = line[:4].upper()
                if verb == b"DATA":
                    writer.write(b"354 go ahead\r\n")
                    data = await reader.readuntil(b"\r\n.\r\n")
                    at = time.monotonic()
                    start = data.find(PROBE_HEADER)
                    if start >= 0:
                        end = data.index(b"\r\n", start)
                        self.arrived[int(data[start + len(PROBE_HEADER) : end])] = at
                    writer.write(b"250 2.0.0 Ok: queued\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 2.0.0 Bye\r\n")
                    break
                else:  # EHLO, MAIL, RCPT, RSET, NOOP
                    writer.write(b"250 probe.sink\r\n")
                await writer.drain()
        writer.close()


class Probe:
    """Sends probe messages to host:port while running; see the module header."""

    def __init__(self, rate: float = 20.0) -> None:
        self.rate = rate
        self.sink = ProbeSink()
        self.latencies = Latencies()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._task: concurrent.futures.Future[None] | None = None
        self._accepted: dict[int, float] = {}
        self._next_id = 0

    def start_sink(self) -> int:
        """Starts the loop and the sink; returns the sink's port (the probe domain's next hop)."""
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.sink.start(), self._loop).result(10)
        return self.sink.port

    def begin(self, port: int, host: str = "127.0.0.1") -> None:
        """Starts probing the relay at host:port, with fresh figures."""
        self.latencies = Latencies()
        self._accepted = {}
        self._task = asyncio.run_coroutine_threadsafe(self._send_loop(host, port), self._loop)

    def accepted(self) -> int:
        """Probe messages the relay has accepted since `begin()`."""
        return len(self._accepted)

    def end(self, wait: float = 30.0) -> Latencies:
        """Stops probing, waits up to `wait` s for accepted probes to reach the sink."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(Exception):
                self._task.result(10)
            self._task = None
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and not set(self._accepted) <= set(self.sink.arrived):
            time.sleep(0.05)
        for probe_id, accepted_at in self._accepted.items():
            arrived = self.sink.arrived.get(probe_id)
            if arrived is None:
                self.latencies.lost += 1
            else:
                self.latencies.forward_ms.append(1000 * (arrived - accepted_at))
        return self.latencies

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.sink.stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _send_loop(self, host: str, port: int) -> None:
        interval = 1.0 / self.rate
        while True:
            try:
                reader, writer = await asyncio.open_connection(host, port)
            except OSError:
                self.latencies.errors += 1
                await asyncio.sleep(interval)
                continue
            try:
                await self._session(reader, writer, interval)
            except (ConnectionError, OSError, ValueError):
                self.latencies.errors += 1
            finally:
                writer.close()

    async def _command(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, line: bytes, expect: bytes
    ) -> None:
        writer.write(line)
        reply = await _reply(reader)
        if not reply.startswith(expect):
            raise ValueError(f"{line!r} answered {reply!r}")

    async def _session(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, interval: float
    ) -> None:
        greeting = await _reply(reader)
        if not greeting.startswith(b"220"):
            raise ValueError(f"greeting {greeting!r}")
        await self._command(reader, writer, b"EHLO probe.source.test\r\n", b"250")
        while True:
            started = time.monotonic()
            probe_id, self._next_id = self._next_id, self._next_id + 1
            await self._command(reader, writer, b"MAIL FROM:<probe@source.test>\r\n", b"250")
            rcpt = b"RCPT TO:<p%d@%s>\r\n" % (probe_id, PROBE_DOMAIN.encode())
            await self._command(reader, writer, rcpt, b"250")
            await self._command(reader, writer, b"DATA\r\n", b"354")
            writer.write(b"Subject: probe\r\n" + PROBE_HEADER + b"%d\r\n\r\n" % probe_id + BODY)
            await writer.drain()
            dot = time.monotonic()
            writer.write(b".\r\n")
            reply = await _reply(reader)
            accepted = time.monotonic()
            if not reply.startswith(b"250"):
                raise ValueError(f"end of DATA answered {reply!r}")
            self.latencies.accept_ms.append(1000 * (accepted - dot))
            self._accepted[probe_id] = accepted
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))


def median_of(runs: list[dict[str, float | int]], key: str) -> float:
    values = [float(r[key]) for r in runs if key in r]
    return statistics.median(values) if values else 0.0
