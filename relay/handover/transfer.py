"""Handing queued mail over to a peer pod, for a safe scale-down.

A pod that is going away (relay.handover.drain) sends every message it still holds
to a surviving pod of the same relay, over a dedicated listener
(`--handover-listen`, port 10026 in the pod) that is NOT the MX port:

    S: 220 mx.example.net mailrelay handover
    C: AUTH MR-HMAC-SHA256
    S: 334 <base64 challenge>
    C: <hex HMAC-SHA256(secret, challenge)>
    S: 235 2.7.0 Authentication successful
    C: XENVELOPE <base64 JSON: id, sender, recipients, arrival, client, hold>
    S: 250 2.1.0 Ok
    C: DATA
    S: 354 End data with <CR><LF>.<CR><LF>
    C: ... the stored message, dot-stuffed ... .
    S: 250 2.0.0 Ok: queued as <new id>

Why like this:
- Nothing is trusted by address (the pod CIDR is everyone's: Mailu
  helm-charts #210). Each relay has its own secret (a Secret the operator
  makes, mounted into the pods); it never crosses the wire: the client
  answers a fresh random challenge with an HMAC. No AUTH, no command.
- The envelope travels whole (sender, the recipients still pending, the
  original arrival time and client IP): the receiving pod stores it as it
  is, runs no spam check again, and keeps the retry schedule and lifetime
  going from the original arrival. It answers 250 only once the message is
  fsynced in its queue; the sending pod removes its copy only after that 250.
- The receiver gives the message a queue id of its own (ids are unique per
  pod, not across pods); both sides log the pair, so the lineage is in the
  logs: "X: handed over to <peer> as Y" / "Y: handover of X from <ip>".
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mailrelay_api.drain_protocol import sign, verify  # one HMAC for drains and AUTH
from relay import metrics
from relay.delivery.transaction import DataEncoder
from relay.queue.format import Claim, QueueError
from relay.queue.mailparams import NO_PARAMS, MailParams
from relay.queue.store import Queue
from relay.smtpd.smtpdata import DataDecoder

log = logging.getLogger("mailrelay.handover")

MECHANISM = "MR-HMAC-SHA256"
MIN_SECRET_BYTES = 16
LINE_LIMIT = 1024 * 1024  # an XENVELOPE line carries up to 1000 recipients
IDLE_TIMEOUT = 60.0
# Before AUTH anyone may connect: short lines, little time, few at once.
# When the cap is reached the oldest unauthenticated connection makes room,
# so idle strangers cannot lock a peer pod out.
AUTH_LINE_LIMIT = 1024
AUTH_TIMEOUT = 10.0
MAX_UNAUTHENTICATED = 32
DATA_CHUNK = 256 * 1024
# Room on top of the relay's messageSize for the Received header it added.
SIZE_MARGIN = 64 * 1024


class HandoverError(Exception):
    """The peer did not take the message (it stays here, to be tried again)."""


def load_secret(path: Path) -> bytes:
    """The shared secret from a mounted Secret key; refuses a short one."""
    secret = path.read_bytes().strip()
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"{path}: the handover secret needs {MIN_SECRET_BYTES} bytes or more")
    return secret


@dataclass
class HandedEnvelope:
    """What travels in XENVELOPE."""

    queue_id: str
    sender: str
    recipients: list[str]
    arrival: float
    client: str = ""
    hold: bool = False
    params: MailParams = NO_PARAMS  # SMTPUTF8, BODY, DSN (relay.queue.mailparams)

    def encode(self) -> str:
        doc = {
            "id": self.queue_id,
            "sender": self.sender,
            "recipients": self.recipients,
            "arrival": self.arrival,
            "client": self.client,
            "hold": self.hold,
        }
        params = self.params.to_dict()
        if params:  # (a peer of an older version never sees the key)
            doc["params"] = params
        return base64.b64encode(json.dumps(doc, separators=(",", ":")).encode()).decode()

    @classmethod
    def decode(cls, text: str) -> HandedEnvelope:
        """Raises ValueError for anything but a well-formed envelope."""
        try:
            doc = json.loads(base64.b64decode(text, validate=True))
        except (ValueError, RecursionError) as e:  # binascii, UTF-8, JSON; too deep
            raise ValueError(f"not base64 JSON: {e}") from None
        if not isinstance(doc, dict):
            raise ValueError("not an object")
        sender, rcpts = doc.get("sender"), doc.get("recipients")
        if not isinstance(sender, str) or not isinstance(rcpts, list) or not rcpts:
            raise ValueError("sender and recipients are required")
        if not all(isinstance(r, str) and r for r in rcpts):
            raise ValueError("recipients must be addresses")
        for address in (sender, *rcpts):
            if any(c in address for c in "\r\n\x00"):
                raise ValueError("an address holds CR, LF or NUL")
        arrival = doc.get("arrival")
        if not isinstance(arrival, int | float) or isinstance(arrival, bool):
            raise ValueError("arrival must be a number")
        if not -1e12 < arrival < 1e12:  # also NaN; a huge int never becomes a float
            raise ValueError("arrival is not a time")
        return cls(
            queue_id=str(doc.get("id") or ""),
            sender=sender,
            recipients=list(rcpts),
            arrival=float(arrival),
            client=str(doc.get("client") or ""),
            hold=bool(doc.get("hold")),
            params=MailParams.from_dict(doc.get("params")),
        )


# -- the receiving side -------------------------------------------------------------


@dataclass
class _Conn:
    """One handover connection: its stream, and whether the peer authenticated."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    auth_deadline: float  # loop time by which AUTH must be done
    authed: bool = False

    async def reply(self, line: str) -> None:
        self.writer.write(line.encode() + b"\r\n")
        await self.writer.drain()

    async def read_line(self, idle_timeout: float) -> str:
        # Until AUTH one deadline covers everything: no slow trickle of NOOPs.
        now = asyncio.get_running_loop().time()
        timeout = idle_timeout if self.authed else max(0.0, self.auth_deadline - now)
        raw = await asyncio.wait_for(self.reader.readuntil(b"\n"), timeout)
        return raw.decode("utf-8", "surrogateescape").rstrip("\r\n")


class HandoverServer:
    """The handover listener of one worker process."""

    def __init__(
        self,
        queue: Queue,
        secret: bytes,
        *,
        hostname: Callable[[], str],
        max_size: Callable[[], int],
        draining: Callable[[], bool],
        on_queued: Callable[[str], None] | None = None,
        idle_timeout: float = IDLE_TIMEOUT,
        auth_timeout: float = AUTH_TIMEOUT,
        max_unauthenticated: int = MAX_UNAUTHENTICATED,
    ) -> None:
        self.queue = queue
        self.secret = secret
        self.hostname = hostname
        self.max_size = max_size
        self.draining = draining
        self.on_queued = on_queued
        self.idle_timeout = idle_timeout
        self.auth_timeout = auth_timeout
        self.max_unauthenticated = max_unauthenticated
        self._unauthenticated: dict[asyncio.StreamWriter, None] = {}  # oldest first

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername") or ("?", 0)
        if len(self._unauthenticated) >= self.max_unauthenticated:
            oldest = next(iter(self._unauthenticated))
            del self._unauthenticated[oldest]
            oldest.transport.abort()  # its session ends on the lost connection
        self._unauthenticated[writer] = None
        # asyncio has no per-phase limit: until AUTH a line is short, whatever
        # the server was started with (buffering pauses at twice the limit).
        reader._limit = AUTH_LINE_LIMIT  # type: ignore[attr-defined]
        try:
            await self._session(reader, writer, str(peer[0]))
        except (
            ConnectionError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            TimeoutError,
        ):
            pass
        except Exception:
            log.exception("handover session from %s failed", peer[0])
        finally:
            self._unauthenticated.pop(writer, None)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _session(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str
    ) -> None:
        conn = _Conn(reader, writer, asyncio.get_running_loop().time() + self.auth_timeout)
        host = self.hostname()
        if self.draining():
            # Never back to a pod that is itself leaving.
            await conn.reply(f"421 4.3.2 {host} draining: not taking handovers")
            return
        await conn.reply(f"220 {host} mailrelay handover")
        envelope: HandedEnvelope | None = None
        while True:
            try:
                line = await conn.read_line(self.idle_timeout)
            except asyncio.LimitOverrunError:
                await conn.reply("500 5.5.2 Error: line too long")
                return
            verb, _, arg = line.partition(" ")
            verb = verb.upper()
            if verb == "QUIT":
                await conn.reply("221 2.0.0 Bye")
                return
            if verb == "NOOP":
                await conn.reply("250 2.0.0 Ok")
            elif verb == "AUTH" and not conn.authed:
                if not await self._authenticate(conn, arg, host, peer):
                    return
            elif not conn.authed:
                log.warning("handover from %s: %s before AUTH, refused", peer, verb[:16])
                await conn.reply("530 5.7.0 Authentication required")
                return
            elif verb == "XENVELOPE":
                try:
                    envelope = HandedEnvelope.decode(arg.strip())
                except ValueError as e:
                    await conn.reply(f"501 5.5.4 bad envelope: {e}")
                    envelope = None
                    continue
                await conn.reply("250 2.1.0 Ok")
            elif verb == "RSET":
                envelope = None
                await conn.reply("250 2.0.0 Ok")
            elif verb == "DATA":
                if envelope is None:
                    await conn.reply("503 5.5.1 Error: need XENVELOPE")
                    continue
                if self.draining():
                    await conn.reply(f"421 4.3.2 {host} draining: not taking handovers")
                    return
                await conn.reply("354 End data with <CR><LF>.<CR><LF>")
                answer, keep_going = await self._receive(reader, envelope, peer)
                envelope = None
                await conn.reply(answer)
                if not keep_going:
                    return
            else:
                await conn.reply("502 5.5.2 Error: command not recognized")

    async def _authenticate(self, conn: _Conn, arg: str, host: str, peer: str) -> bool:
        """AUTH with the relay's secret (HMAC of a fresh challenge); False ends the session."""
        if arg.strip().upper() != MECHANISM:
            await conn.reply(f"504 5.5.4 only {MECHANISM}")
            return False
        challenge = base64.b64encode(os.urandom(32) + host.encode()).decode()
        await conn.reply(f"334 {challenge}")
        answer = await conn.read_line(self.idle_timeout)
        if not verify(self.secret, challenge.encode(), answer):
            log.warning("handover from %s: authentication failed", peer)
            await conn.reply("535 5.7.8 Authentication credentials invalid")
            return False
        conn.authed = True
        self._unauthenticated.pop(conn.writer, None)
        conn.reader._limit = LINE_LIMIT  # type: ignore[attr-defined]
        await conn.reply("235 2.7.0 Authentication successful")
        return True

    async def _receive(
        self, reader: asyncio.StreamReader, envelope: HandedEnvelope, peer: str
    ) -> tuple[str, bool]:
        """Stores one message; returns the reply and whether the session goes on."""
        limit = self.max_size() + SIZE_MARGIN
        incoming = self.queue.incoming()
        decoder = DataDecoder()
        too_big = False
        try:
            while not decoder.done:
                data = await asyncio.wait_for(reader.read(DATA_CHUNK), self.idle_timeout)
                if not data:
                    incoming.abort()
                    return "421 4.4.2 connection lost", False
                chunk = decoder.feed(data)
                if decoder.size > limit:
                    too_big = True
                if chunk and not too_big:
                    incoming.write(chunk)
                    await incoming.drain()
            if decoder.rest:  # the client waits for each reply: nothing may follow
                incoming.abort()
                return "503 5.5.0 Error: pipelining after DATA", False
            if too_big:
                incoming.abort()
                metrics.HANDOVER.labels("received", "too_big").inc()
                return "552 5.3.4 Error: message file too big", True
            queue_id = await incoming.commit(
                envelope.sender,
                envelope.recipients,
                client=envelope.client,
                arrival=envelope.arrival,
                params=envelope.params,
            )
        except QueueError as e:
            incoming.abort()
            log.error("handover of %s from %s not stored: %s", envelope.queue_id, peer, e)
            metrics.HANDOVER.labels("received", "error").inc()
            return "451 4.3.0 Error: queue file write error", True
        except BaseException:
            incoming.abort()
            raise
        log.info(
            "%s: handover of %s from %s, from=<%s>, nrcpt=%d%s",
            queue_id,
            envelope.queue_id or "?",
            peer,
            envelope.sender,
            len(envelope.recipients),
            " (held)" if envelope.hold else "",
        )
        metrics.HANDOVER.labels("received", "ok").inc()
        if envelope.hold:
            await self.queue.hold_fresh(queue_id)
        elif self.on_queued is not None:
            self.on_queued(queue_id)
        return f"250 2.0.0 Ok: queued as {queue_id}", True


# -- the sending side -----------------------------------------------------------------


def parse_peer(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"not HOST:PORT: {text!r}")
    return host.strip("[]"), int(port)


class HandoverClient:
    """One authenticated connection to a peer's handover listener."""

    def __init__(self, peer: str, secret: bytes, *, timeout: float = 60.0) -> None:
        self.peer = peer
        self.secret = secret
        self.timeout = timeout
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def _reply(self) -> tuple[int, str]:
        assert self._reader is not None
        lines = []
        while True:
            raw = await asyncio.wait_for(self._reader.readuntil(b"\n"), self.timeout)
            if not raw:
                raise HandoverError(f"{self.peer}: connection closed")
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            lines.append(line)
            if len(line) < 4 or line[3] != "-":
                break
        code = lines[-1][:3]
        if not code.isdigit():
            raise HandoverError(f"{self.peer}: not a reply: {lines[-1]!r}")
        return int(code), lines[-1][4:]

    async def _command(self, line: str, expect: int) -> str:
        assert self._writer is not None
        self._writer.write(line.encode() + b"\r\n")
        await self._writer.drain()
        code, text = await self._reply()
        if code != expect:
            raise HandoverError(f"{self.peer}: {line.split(' ')[0]} answered {code} {text}")
        return text

    async def connect(self) -> None:
        host, port = parse_peer(self.peer)
        try:
            self._reader, self._writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, limit=LINE_LIMIT), self.timeout
            )
            code, text = await self._reply()
            if code != 220:
                raise HandoverError(f"{self.peer}: greeting {code} {text}")
            challenge = await self._command(f"AUTH {MECHANISM}", 334)
            await self._command(sign(self.secret, challenge.strip().encode()), 235)
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as e:
            await self.close()
            raise HandoverError(f"{self.peer}: {e or type(e).__name__}") from None
        except HandoverError:
            await self.close()
            raise

    async def send(self, queue: Queue, claim: Claim, *, hold: bool = False) -> str:
        """Hands one claimed message over; returns the peer's queue id."""
        env = claim.envelope
        handed = HandedEnvelope(
            queue_id=claim.queue_id,
            sender=env.sender,
            recipients=claim.pending,
            arrival=env.arrival,
            client=env.client,
            hold=hold,
            params=env.params,
        )
        try:
            await self._command(f"XENVELOPE {handed.encode()}", 250)
            await self._command("DATA", 354)
            assert self._writer is not None
            encoder = DataEncoder()
            async for chunk in queue.read_chunks(claim):
                out = encoder.feed(chunk)
                if out:
                    self._writer.write(out)
                    await self._writer.drain()
            self._writer.write(encoder.end())
            await self._writer.drain()
            code, text = await self._reply()
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as e:
            await self.close()
            raise HandoverError(f"{self.peer}: {e or type(e).__name__}") from None
        if code != 250:
            raise HandoverError(f"{self.peer}: DATA answered {code} {text}")
        return text.rsplit(" ", 1)[-1]

    async def close(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if writer is None:
            return
        with contextlib.suppress(Exception):
            writer.write(b"QUIT\r\n")
            await asyncio.wait_for(writer.drain(), 1.0)
        writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), 1.0)

    @property
    def connected(self) -> bool:
        return self._writer is not None and not self._writer.is_closing()
