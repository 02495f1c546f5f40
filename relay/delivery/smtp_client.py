"""The SMTP client side of delivery: next hops, TLS, a connection pool, DATA.

What Postfix's smtp(8) does for a relay: find the next hop's addresses
(`smtp:[host]` = the host itself, `smtp:host` = its MX records), connect,
EHLO, STARTTLS as the RelayDomain's `tls` says, then MAIL/RCPT/DATA, and
report one result per recipient. Connections are reused (a small pool per
destination) and the number open per destination is capped.

aiosmtplib does the protocol; two things it does not do are done here:
- DATA is streamed from the queue file in chunks (aiosmtplib wants the whole
  message in memory), with its line-end normalisation applied per chunk:
  CRLF, bare LF and bare CR all go out as CRLF, then dot-stuffing. Outgoing
  mail therefore never carries a bare CR or LF, whatever was received.
- Envelope addresses are checked here and sent as is (aiosmtplib's own
  parsing goes through the `email` parser, slow and lenient).
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import aiosmtplib
from aiosmtplib import SMTPResponse

from relay.config import NextHop
from relay.delivery.pipelining import Borrowed, ReplyError, ReplyReader
from relay.dns import DnsTempError, Resolver

SENT, DEFERRED, BOUNCED = "sent", "deferred", "bounced"

_ENHANCED = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})\s")
_LINE_ENDS = re.compile(rb"\r\n|\n|\r")
# Outside a quoted local part an address may hold no space, control
# character, angle bracket or quote (what could end or extend the command).
_QUOTED_LOCAL = re.compile(r'^"(?:[^"\\\x00-\x1f\x7f]|\\[^\x00-\x1f\x7f])*"')
_UNSAFE = re.compile(r'[\s<>"\x00-\x1f\x7f]')


# The message data as an async iterator of chunks; called again for each
# next hop of one message.
ChunkSource = Callable[[], AsyncIterator[bytes]]


class AddressError(ValueError):
    """An envelope address that cannot be put on an SMTP command line."""


def check_address(address: str) -> None:
    if any(c in address for c in "\r\n\x00"):
        raise AddressError("address contains CR, LF or NUL")
    rest = _QUOTED_LOCAL.sub("", address, count=1)
    if _UNSAFE.search(rest):
        raise AddressError(f"address {address!r} contains characters not allowed in a mailbox")


@dataclass
class RecipientResult:
    recipient: str
    kind: str  # sent | deferred | bounced
    reply: str  # what the log and the DSN show, e.g. "250 2.0.0 Ok" or our own reason
    status: str  # enhanced status code
    relay: str = "none"  # host[ip]:port
    smtp_reply: bool = True  # reply came from the next hop (else our own text)
    in_reply_to: str = ""  # which command the reply answered


def _defer_unfinished(
    recipients: list[str], results: dict[str, RecipientResult], reason: str, label: str
) -> None:
    """A lost or failed conversation: every recipient not already bounced is deferred."""
    for r in recipients:
        if r not in results or results[r].kind != BOUNCED:
            results[r] = RecipientResult(r, DEFERRED, reason, "4.4.2", label, False)


def enhanced_status(code: int, message: str) -> str:
    m = _ENHANCED.match(message + " ")
    if m:
        return m.group(1)
    return f"{str(code)[0]}.0.0" if code else "4.0.0"


class DataEncoder:
    """Turns message bytes into the DATA stream, chunk by chunk.

    Line ends become CRLF (a CR at a chunk's end waits for the next chunk),
    lines starting with "." get another one, the end gets CRLF "." CRLF.
    """

    def __init__(self) -> None:
        self._carry = b""
        self._at_line_start = True

    def feed(self, chunk: bytes) -> bytes:
        data = self._carry + chunk
        if data.endswith(b"\r"):
            self._carry, data = b"\r", data[:-1]
        else:
            self._carry = b""
        if not data:
            return b""
        crlf = data.count(b"\r\n")
        if data.count(b"\n") != crlf or data.count(b"\r") != crlf:
            # Some bare CR or LF (queued mail has none, but be safe): normalise.
            data = _LINE_ENDS.sub(b"\r\n", data)
        data = data.replace(b"\r\n.", b"\r\n..")
        if self._at_line_start and data.startswith(b"."):
            data = b"." + data
        self._at_line_start = data.endswith(b"\r\n")
        return data

    def end(self) -> bytes:
        tail = b"\r\n" if self._carry else b""
        if self._carry:
            self._at_line_start = True
        if not self._at_line_start:
            tail += b"\r\n"
        return tail + b".\r\n"


@dataclass
class Connection:
    smtp: aiosmtplib.SMTP
    label: str  # host[ip]:port
    host_name: str  # the name the next hop answered for (for DSNs)
    opened: float
    last_used: float
    uses: int = 0
    tls: bool = False


@dataclass
class _Destination:
    slots: asyncio.Semaphore
    idle: list[Connection] = field(default_factory=list)


class ConnectError(Exception):
    def __init__(self, reason: str, status: str = "4.4.1", permanent: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.permanent = permanent


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        return False


def unverified_tls_context() -> ssl.SSLContext:
    """Opportunistic TLS (may/encrypt): encrypted, not authenticated, as Postfix does."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class ConnectionPool:
    """Connections to next hops: at most `concurrency` per destination, idle ones reused."""

    def __init__(
        self,
        resolver: Resolver,
        *,
        concurrency: int = 20,
        idle_seconds: float = 5.0,
        max_uses: int = 1000,
        connect_timeout: float = 30.0,
        command_timeout: float = 300.0,
        verify_context: ssl.SSLContext | None = None,
        source_address: str | None = None,
        pipelining: bool = True,
    ) -> None:
        self.resolver = resolver
        self.pipelining = pipelining  # when the next hop offers it (RFC 2920)
        self.concurrency = concurrency
        self.idle_seconds = idle_seconds
        self.max_uses = max_uses
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self._verify_context = verify_context
        self._may_context: ssl.SSLContext | None = None
        self.source_address = source_address
        self._destinations: dict[NextHop, _Destination] = {}
        self._closing: set[asyncio.Future[None]] = set()

    def _destination(self, hop: NextHop) -> _Destination:
        d = self._destinations.get(hop)
        if d is None:
            d = self._destinations[hop] = _Destination(asyncio.Semaphore(self.concurrency))
        return d

    def _tls_context(self, verify: bool) -> ssl.SSLContext:
        if verify:
            if self._verify_context is None:
                self._verify_context = ssl.create_default_context()
            return self._verify_context
        if self._may_context is None:
            self._may_context = unverified_tls_context()
        return self._may_context

    # -- next hop addresses --------------------------------------------------

    async def _host_addresses(self, name: str) -> list[str]:
        answers: list[str] = []
        for rdtype in ("A", "AAAA"):
            try:
                answer = await self.resolver.query(name, rdtype)
            except DnsTempError:
                if answers:
                    break
                raise
            answers += list(answer.records)
        if answers:
            return answers
        # Not in DNS: the system's resolver still knows /etc/hosts (e.g. localhost).
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                name, None, type=socket.SOCK_STREAM
            )
        except OSError:
            return []
        return list(dict.fromkeys(str(i[4][0]) for i in infos))

    async def addresses(self, hop: NextHop) -> list[tuple[str, str]]:
        """(host name, ip) to try, in order. Raises ConnectError when there are none."""
        host = hop.host.strip().rstrip(".")
        if _is_ip(host):
            return [(host.strip("[]"), host.strip("[]"))]
        try:
            names: list[str]
            if hop.mx_lookup:
                mx = await self.resolver.query(host, "MX")
                if mx.exists:
                    pairs = []
                    for rec in mx.records:
                        pref, _, exchange = rec.partition(" ")
                        pairs.append((int(pref), exchange.rstrip(".")))
                    if any(ex == "" for _, ex in pairs):  # null MX (RFC 7505)
                        raise ConnectError(
                            f"{host}: domain does not accept mail (null MX)", "5.1.10", True
                        )
                    names = [ex for _, ex in sorted(pairs)]
                else:
                    names = [host]  # no MX: the host itself (RFC 5321 5.1)
            else:
                names = [host]
            out: list[tuple[str, str]] = []
            for name in names:
                out += [(name, ip) for ip in await self._host_addresses(name)]
        except DnsTempError as e:
            raise ConnectError(f"Host or domain name lookup failed for {host}: {e}", "4.4.3") from e
        if not out:
            raise ConnectError(f"Host or domain name not found: {host}", "4.4.4")
        return out

    # -- connections ---------------------------------------------------------

    async def _open(self, hop: NextHop, local_hostname: str) -> Connection:
        errors: list[str] = []
        last: ConnectError | None = None
        for name, ip in await self.addresses(hop):
            label = f"{name}[{ip}]:{hop.port}"
            try:
                return await self._open_one(hop, name, ip, label, local_hostname)
            except ConnectError as e:
                last = e
                errors.append(e.reason)
        if last is not None and len(errors) == 1:
            raise last
        raise ConnectError("; ".join(errors) or f"cannot connect to {hop.host}")

    async def _open_one(
        self, hop: NextHop, name: str, ip: str, label: str, local_hostname: str
    ) -> Connection:
        use_tls = hop.tls in ("may", "encrypt", "verify")
        for attempt_tls in (use_tls, False) if hop.tls == "may" else (use_tls,):
            smtp = aiosmtplib.SMTP(
                hostname=ip,
                port=hop.port,
                local_hostname=local_hostname,
                timeout=self.command_timeout,
                start_tls=False,
                source_address=(self.source_address, 0) if self.source_address else None,
            )
            try:
                await smtp.connect(timeout=self.connect_timeout)
                if smtp.transport is not None and hasattr(smtp.transport, "max_size"):
                    # Replies are short: asyncio's 256 KB reads would allocate
                    # (mmap) and shrink a buffer that big for each one.
                    smtp.transport.max_size = 16 * 1024
                await smtp.ehlo()
            except aiosmtplib.SMTPConnectResponseError as e:
                smtp.close()
                raise ConnectError(
                    f"host {label} refused to talk to me: {e.code} {e.message}",
                    enhanced_status(e.code, e.message),
                ) from e
            except (aiosmtplib.SMTPException, OSError) as e:
                smtp.close()
                what = e.__cause__ or e
                if isinstance(what, ConnectionRefusedError):
                    reason = "Connection refused"
                elif isinstance(e, aiosmtplib.SMTPTimeoutError):
                    reason = "Connection timed out"
                else:
                    reason = str(what) or what.__class__.__name__
                raise ConnectError(f"connect to {label}: {reason}") from e
            tls = False
            if attempt_tls:
                if not smtp.supports_extension("starttls"):
                    if hop.tls == "may":
                        return self._connection(smtp, label, name, tls)
                    smtp.close()
                    raise ConnectError(
                        f"TLS is required, but was not offered by host {label}", "4.7.4"
                    )
                verify = hop.tls == "verify"
                try:
                    await smtp.starttls(
                        tls_context=self._tls_context(verify),
                        server_hostname=name if verify else None,
                    )
                    await smtp.ehlo()
                    tls = True
                except (aiosmtplib.SMTPException, OSError, ssl.SSLError) as e:
                    smtp.close()
                    if hop.tls == "may":
                        continue  # Postfix falls back to plaintext for `may`
                    raise ConnectError(
                        f"Cannot start TLS: handshake failure with {label}: {e}", "4.7.5"
                    ) from e
            return self._connection(smtp, label, name, tls)
        raise ConnectError(f"connect to {label}: TLS and plaintext both failed")

    @staticmethod
    def _connection(smtp: aiosmtplib.SMTP, label: str, name: str, tls: bool) -> Connection:
        now = time.monotonic()
        return Connection(smtp, label, name, now, now, tls=tls)

    def _take_idle(self, dest: _Destination) -> Connection | None:
        now = time.monotonic()
        while dest.idle:
            conn = dest.idle.pop()
            if conn.smtp.is_connected and now - conn.last_used < self.idle_seconds:
                return conn
            self._discard(conn)
        return None

    def _put_idle(self, dest: _Destination, conn: Connection) -> None:
        conn.last_used = time.monotonic()
        conn.uses += 1
        if conn.uses >= self.max_uses or not conn.smtp.is_connected:
            self._quit_later(conn)
        else:
            dest.idle.append(conn)

    def _discard(self, conn: Connection) -> None:
        conn.smtp.close()

    def _quit_later(self, conn: Connection) -> None:
        async def quit() -> None:
            try:
                await asyncio.wait_for(conn.smtp.quit(), 5)
            except Exception:
                pass
            finally:
                conn.smtp.close()

        task = asyncio.ensure_future(quit())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def prune(self) -> None:
        """Closes connections idle for too long."""
        now = time.monotonic()
        for dest in self._destinations.values():
            keep = []
            for conn in dest.idle:
                if conn.smtp.is_connected and now - conn.last_used < self.idle_seconds:
                    keep.append(conn)
                else:
                    self._quit_later(conn)
            dest.idle = keep

    async def close(self) -> None:
        conns = [c for d in self._destinations.values() for c in d.idle]
        for d in self._destinations.values():
            d.idle = []

        async def quit(conn: Connection) -> None:
            try:
                await asyncio.wait_for(conn.smtp.quit(), 2)
            except Exception:
                pass
            finally:
                conn.smtp.close()

        await asyncio.gather(*(quit(c) for c in conns), *list(self._closing))

    # -- one transaction -------------------------------------------------------

    async def deliver(
        self,
        hop: NextHop,
        sender: str,
        recipients: list[str],
        chunks: ChunkSource,
        *,
        local_hostname: str,
    ) -> list[RecipientResult]:
        """Sends one message to one next hop; one result per recipient, never raises."""
        results: dict[str, RecipientResult] = {}
        valid = []
        for r in recipients:
            try:
                check_address(r)
                valid.append(r)
            except AddressError as e:
                results[r] = RecipientResult(
                    r, BOUNCED, f"bad address syntax: {e}", "5.1.3", smtp_reply=False
                )
        try:
            check_address(sender)
        except AddressError as e:
            return [
                RecipientResult(
                    r, BOUNCED, f"bad sender address syntax: {e}", "5.1.7", smtp_reply=False
                )
                for r in recipients
            ]
        if not valid:
            return [results[r] for r in recipients]
        dest = self._destination(hop)
        async with dest.slots:
            for _ in range(2):  # a reused connection may have been closed by the peer
                conn = self._take_idle(dest)
                reused = conn is not None
                if conn is None:
                    try:
                        conn = await self._open(hop, local_hostname)
                    except ConnectError as e:
                        kind = BOUNCED if e.permanent else DEFERRED
                        for r in valid:
                            results[r] = RecipientResult(
                                r, kind, e.reason, e.status, smtp_reply=False
                            )
                        return [results[r] for r in recipients]
                outcome = await self._transaction(conn, sender, valid, chunks, results, reused)
                if outcome == "retry":
                    continue
                if outcome == "keep":
                    self._put_idle(dest, conn)
                else:
                    self._discard(conn)
                break
        return [results[r] for r in recipients]

    async def _transaction(
        self,
        conn: Connection,
        sender: str,
        recipients: list[str],
        chunks: ChunkSource,
        results: dict[str, RecipientResult],
        reused: bool,
    ) -> str:
        """Runs MAIL/RCPT/DATA; fills results. Returns keep | close | retry."""
        smtp = conn.smtp
        label = conn.label
        utf8 = not (sender.isascii() and all(r.isascii() for r in recipients))
        stage = "MAIL FROM"

        def fail_all(code: int, message: str, names: list[str], stage: str) -> None:
            kind = BOUNCED if code >= 500 else DEFERRED
            for r in names:
                results[r] = RecipientResult(
                    r, kind, f"{code} {message}", enhanced_status(code, message), label, True, stage
                )

        try:
            options = []
            if utf8:
                if not smtp.supports_extension("smtputf8"):
                    for r in recipients:
                        results[r] = RecipientResult(
                            r,
                            BOUNCED,
                            f"host {label} does not support SMTPUTF8, needed for this address",
                            "5.6.7",
                            label,
                            False,
                        )
                    return "keep"
                options.append(b"SMTPUTF8")
            if smtp.supports_extension("8bitmime"):
                options.append(b"BODY=8BITMIME")
            if self.pipelining and smtp.supports_extension("pipelining"):
                return await self._pipelined(
                    conn, sender, recipients, options, chunks, results, reused
                )
            resp = await smtp.execute_command(b"MAIL", b"FROM:<" + sender.encode() + b">", *options)
            if resp.code != 250:
                fail_all(resp.code, resp.message, recipients, stage)
                await self._rset(smtp)
                return "keep" if smtp.is_connected else "close"
            stage = "RCPT TO"
            accepted = []
            for r in recipients:
                resp = await smtp.execute_command(b"RCPT", b"TO:<" + r.encode() + b">")
                if resp.code in (250, 251):
                    accepted.append(r)
                else:
                    fail_all(resp.code, resp.message, [r], stage)
            if not accepted:
                await self._rset(smtp)
                return "keep" if smtp.is_connected else "close"
            stage = "end of DATA"
            resp = await self._data(smtp, chunks)
            if resp.code == 250:
                for r in accepted:
                    results[r] = RecipientResult(
                        r,
                        SENT,
                        f"{resp.code} {resp.message}",
                        enhanced_status(250, resp.message),
                        label,
                    )
            else:
                fail_all(resp.code, resp.message, accepted, stage if resp.code != 354 else "DATA")
                await self._rset(smtp)
            return "keep" if smtp.is_connected else "close"
        except (aiosmtplib.SMTPServerDisconnected, ConnectionError) as e:
            smtp.close()
            if reused and stage == "MAIL FROM":
                return "retry"
            reason = f"lost connection with {label} while sending {stage}: {e}"
            _defer_unfinished(recipients, results, reason, label)
            return "close"
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as e:
            smtp.close()
            reason = f"conversation with {label} timed out or failed while sending {stage}: {e}"
            _defer_unfinished(recipients, results, reason, label)
            return "close"

    async def _pipelined(
        self,
        conn: Connection,
        sender: str,
        recipients: list[str],
        options: list[bytes],
        chunks: ChunkSource,
        results: dict[str, RecipientResult],
        reused: bool,
    ) -> str:
        """_transaction with PIPELINING (relay.delivery.pipelining): MAIL, RCPTs and DATA
        in one write, their replies read in order, then the message. Same
        results and outcome as the one-command-at-a-time path."""
        smtp = conn.smtp
        label = conn.label
        timeout = self.command_timeout
        stage = "MAIL FROM"
        accepted: list[str] = []
        data_reply: SMTPResponse | None = None
        final: SMTPResponse | None = None

        def fail(resp: SMTPResponse, names: list[str], stage: str) -> None:
            kind = BOUNCED if resp.code >= 500 else DEFERRED
            reply = f"{resp.code} {resp.message}"
            status = enhanced_status(resp.code, resp.message)
            for r in names:
                results[r] = RecipientResult(r, kind, reply, status, label, True, stage)

        try:
            async with Borrowed(smtp) as reader:
                group = [b" ".join([b"MAIL FROM:<" + sender.encode() + b">", *options])]
                group += [b"RCPT TO:<" + r.encode() + b">" for r in recipients]
                group.append(b"DATA\r\n")
                reader.write(b"\r\n".join(group))
                async with asyncio.timeout(timeout):
                    mail = await reader.next_reply()
                stage = "RCPT TO"
                rcpt_replies = []
                for _ in recipients:
                    async with asyncio.timeout(timeout):
                        rcpt_replies.append(await reader.next_reply())
                stage = "DATA"
                async with asyncio.timeout(timeout):
                    data_reply = await reader.next_reply()
                if mail.code != 250:
                    fail(mail, recipients, "MAIL FROM")
                else:
                    for r, resp in zip(recipients, rcpt_replies, strict=True):
                        if resp.code in (250, 251):
                            accepted.append(r)
                        else:
                            fail(resp, [r], "RCPT TO")
                if data_reply.code == 354:
                    stage = "end of DATA"
                    if accepted:
                        await self._send_data(reader, chunks)
                    else:
                        # RFC 2920: DATA was accepted though no recipient was;
                        # end it at once (the server must refuse an empty one).
                        reader.write(b".\r\n")
                    async with asyncio.timeout(timeout):
                        final = await reader.next_reply()
        except (aiosmtplib.SMTPServerDisconnected, ConnectionError) as e:
            smtp.close()
            if reused and stage == "MAIL FROM":
                return "retry"
            reason = f"lost connection with {label} while sending {stage}: {e}"
            _defer_unfinished(recipients, results, reason, label)
            return "close"
        except (ReplyError, aiosmtplib.SMTPException, OSError, TimeoutError) as e:
            smtp.close()
            reason = f"conversation with {label} timed out or failed while sending {stage}: {e}"
            _defer_unfinished(recipients, results, reason, label)
            return "close"
        if accepted and data_reply is not None and data_reply.code != 354:
            fail(data_reply, accepted, "DATA")
        elif accepted and final is not None:
            if final.code == 250:
                for r in accepted:
                    results[r] = RecipientResult(
                        r, SENT, f"250 {final.message}", enhanced_status(250, final.message), label
                    )
                return "keep" if smtp.is_connected else "close"
            fail(final, accepted, "end of DATA")
        await self._rset(smtp)
        return "keep" if smtp.is_connected else "close"

    async def _send_data(self, reader: ReplyReader, chunks: ChunkSource) -> None:
        encoder = DataEncoder()
        last = b""  # held back so that the final dot goes out in the same write
        async for chunk in chunks():
            out = encoder.feed(chunk)
            if out:
                if last:
                    reader.write(last)
                    await reader.drain()  # back-pressure: the peer sets the pace
                last = out
        reader.write(last + encoder.end())

    async def _rset(self, smtp: aiosmtplib.SMTP) -> None:
        try:
            await smtp.execute_command(b"RSET", timeout=30)
        except (aiosmtplib.SMTPException, OSError):
            smtp.close()

    async def _data(self, smtp: aiosmtplib.SMTP, chunks: ChunkSource) -> SMTPResponse:
        """DATA, streamed: never more than one chunk of the message in memory."""
        resp = await smtp.execute_command(b"DATA")
        if resp.code != 354:
            return resp
        protocol = smtp.protocol
        if protocol is None:
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        encoder = DataEncoder()
        last = b""  # held back so that the final dot goes out in the same write
        async for chunk in chunks():
            out = encoder.feed(chunk)
            if out:
                if last:
                    protocol.write(last)
                    await protocol._drain_helper()  # back-pressure: the peer sets the pace
                last = out
        # aiosmtplib drops replies that arrive while it expects none; the
        # reply to the final dot may come before read_response() is awaited.
        protocol._response_pending = True
        protocol.write(last + encoder.end())
        try:
            return await protocol.read_response(timeout=self.command_timeout)
        except aiosmtplib.SMTPTimeoutError:
            smtp.close()
            raise
