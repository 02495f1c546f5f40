"""A tiny scripted milter server for tests: the milter side of protocol 6.

It answers each event from a script (`answers[event]`: the packets to send,
modifications then a verdict; "continue" when the script says nothing), and
records what it received: events, macros and the body. `hang_on` makes it
never answer one event (a slow milter); `refuse_negotiation` closes the
connection at OPTNEG (a broken one).
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from dataclasses import dataclass, field

from relay.smtpd import milter as m

Packet = tuple[bytes, bytes]


def cstr(*parts: str) -> bytes:
    return b"".join(p.encode() + b"\0" for p in parts)


def reply(text: str) -> Packet:
    return m.R_REPLYCODE, cstr(text)


def add_header(name: str, value: str) -> Packet:
    return m.R_ADDHEADER, cstr(name, value)


def insert_header(index: int, name: str, value: str) -> Packet:
    return m.R_INSHEADER, struct.pack("!I", index) + cstr(name, value)


def change_header(index: int, name: str, value: str) -> Packet:
    return m.R_CHGHEADER, struct.pack("!I", index) + cstr(name, value)


CONTINUE: Packet = (m.R_CONTINUE, b"")
ACCEPT: Packet = (m.R_ACCEPT, b"")
REJECT: Packet = (m.R_REJECT, b"")
TEMPFAIL: Packet = (m.R_TEMPFAIL, b"")
DISCARD: Packet = (m.R_DISCARD, b"")
SKIP: Packet = (m.R_SKIP, b"")


@dataclass
class ScriptedMilter:
    answers: dict[bytes, list[Packet]] = field(default_factory=dict)
    actions: int = m.OFFERED_ACTIONS
    protocol: int = 0
    symlists: dict[int, str] = field(default_factory=dict)  # SMFIM stage -> macro names
    hang_on: bytes | None = None
    refuse_negotiation: bool = False
    # What it received.
    offered: tuple[int, int, int] | None = None
    events: list[bytes] = field(default_factory=list)
    macros: dict[bytes, dict[str, str]] = field(default_factory=dict)
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    body_chunks: int = 0
    largest_chunk: int = 0
    envelope: list[str] = field(default_factory=list)
    connections: int = 0
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    _server: asyncio.Server | None = None
    _handlers: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"inet:127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)
        try:
            while True:
                (length,) = struct.unpack("!I", await reader.readexactly(4))
                packet = await reader.readexactly(length)
                command, data = packet[:1], packet[1:]
                if command == m.QUIT:
                    break
                for out in self._handle(command, data):
                    writer.write(struct.pack("!I", len(out[1]) + 1) + out[0] + out[1])
                await writer.drain()
                if command == self.hang_on:
                    await asyncio.sleep(3600)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.closed.set()
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _handle(self, command: bytes, data: bytes) -> list[Packet]:
        if command == m.OPTNEG:
            self.offered = struct.unpack("!III", data[:12])
            if self.refuse_negotiation:
                raise ConnectionError("refused")
            extra = b"".join(
                struct.pack("!I", stage) + names.encode() + b"\0"
                for stage, names in self.symlists.items()
            )
            return [(m.R_OPTNEG, struct.pack("!III", 6, self.actions, self.protocol) + extra)]
        if command == m.MACRO:
            parts = [p.decode() for p in data[1:].split(b"\0")[:-1]]
            self.macros[data[:1]] = dict(zip(parts[::2], parts[1::2], strict=True))
            return []
        if command == m.ABORT:
            self.events.append(command)
            return []
        self.events.append(command)
        if command == m.HEADER:
            name, value = data[:-1].split(b"\0", 1)
            self.headers.append((name.decode(), value.decode()))
        elif command == m.BODY:
            self.body += data
            self.body_chunks += 1
            self.largest_chunk = max(self.largest_chunk, len(data))
        elif command in (m.MAIL, m.RCPT):
            self.envelope.append(data.split(b"\0")[0].decode())
        if command == self.hang_on:
            return []
        if command in m.EVENT_FLAGS and self.protocol & m.EVENT_FLAGS[command][1]:
            return []  # SMFIP_NR_*: no reply
        return self.answers.get(command, [CONTINUE])
