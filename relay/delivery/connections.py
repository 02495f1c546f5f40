"""Connections to next hops: opening them (EHLO, STARTTLS), a pool, `deliver()`.

What Postfix's smtp(8) does for a relay around the transaction: connect to
the next hop's addresses in turn (relay.delivery.nexthop), EHLO, STARTTLS
as the RelayDomain's `tls` says (`may`: opportunistic, falling back to
plaintext; `encrypt`: required, unverified; `verify`: required, verified),
then hand the connection to relay.delivery.transaction. Connections are
reused (a small pool per destination) and the number open per destination
is capped.

A next hop that answers EHLO with our own hostname is ourselves (another pod
of this relay, or this one): Postfix's "mail for X loops back to myself"
(5.4.6). At the best MX (or a fixed next hop) the mail bounces, as Postfix's
smtp(8) does; at a lower-preference MX the next one is tried.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiosmtplib

from relay import tlslog
from relay.config import NextHop
from relay.delivery.nexthop import ConnectError, next_hop_addresses
from relay.delivery.transaction import (
    BOUNCED,
    DEFERRED,
    AddressError,
    ChunkSource,
    Outcome,
    RecipientResult,
    check_address,
    enhanced_status,
    run_probe,
    run_transaction,
)
from relay.dns import Resolver
from relay.queue.mailparams import NO_PARAMS, MailParams

log = logging.getLogger("relay.delivery")


@dataclass
class Connection:
    smtp: aiosmtplib.SMTP
    label: str  # host[ip]:port
    last_used: float  # time.monotonic()
    uses: int = 0


@dataclass
class _Destination:
    slots: asyncio.Semaphore
    idle: list[Connection] = field(default_factory=list)


async def _quit(conn: Connection, timeout: float) -> None:
    """QUIT politely if the peer answers in time; closed either way."""
    try:
        await asyncio.wait_for(conn.smtp.quit(), timeout)
    except Exception:
        pass
    finally:
        conn.smtp.close()


class LoopError(ConnectError):
    """The next hop is ourselves (it answered EHLO with our hostname)."""


def _check_loop(smtp: aiosmtplib.SMTP, hop: NextHop, label: str, local_hostname: str) -> None:
    """Raises LoopError (closing the connection) when the EHLO reply names us."""
    reply = smtp.last_ehlo_response
    words = reply.message.split() if reply is not None else []
    if not words or words[0].lower().rstrip(".") != local_hostname.lower().rstrip("."):
        return
    log.warning("warning: host %s replied to HELO/EHLO with my own hostname %s", label, words[0])
    smtp.close()
    raise LoopError(f"mail for {hop.host} loops back to myself", "4.4.6")


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

    # -- connections ---------------------------------------------------------

    async def _open(self, hop: NextHop, local_hostname: str) -> Connection:
        errors: list[str] = []
        last: ConnectError | None = None
        addresses = await next_hop_addresses(self.resolver, hop)
        for name, ip in addresses:
            label = f"{name}[{ip}]:{hop.port}"
            try:
                return await self._open_one(hop, name, ip, label, local_hostname)
            except LoopError as e:
                if name == addresses[0][0]:  # the best MX is ourselves: give up, bounce
                    raise ConnectError(e.reason, "5.4.6", permanent=True) from e
                last = ConnectError(e.reason, "4.4.6")
                errors.append(e.reason)
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
            smtp = await self._connect(hop, ip, label, local_hostname)
            if attempt_tls and not await self._start_tls(smtp, hop, name, label):
                continue  # Postfix falls back to plaintext for `may`
            return Connection(smtp, label, time.monotonic())
        raise ConnectError(f"connect to {label}: TLS and plaintext both failed")

    async def _connect(
        self, hop: NextHop, ip: str, label: str, local_hostname: str
    ) -> aiosmtplib.SMTP:
        """Connected, greeted, EHLO answered."""
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
            _check_loop(smtp, hop, label, local_hostname)
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
        return smtp

    async def _start_tls(self, smtp: aiosmtplib.SMTP, hop: NextHop, name: str, label: str) -> bool:
        """STARTTLS and EHLO again as `hop.tls` says. False: it failed under
        `may` (the connection is closed); ConnectError where TLS is required."""
        if not smtp.supports_extension("starttls"):
            if hop.tls == "may":
                return True
            smtp.close()
            raise ConnectError(f"TLS is required, but was not offered by host {label}", "4.7.4")
        verify = hop.tls == "verify"
        try:
            await smtp.starttls(
                tls_context=self._tls_context(verify),
                server_hostname=name if verify else None,
            )
            await smtp.ehlo()
        except (aiosmtplib.SMTPException, OSError, ssl.SSLError) as e:
            smtp.close()
            if hop.tls == "may":
                return False
            raise ConnectError(
                f"Cannot start TLS: handshake failure with {label}: {e}", "4.7.5"
            ) from e
        transport = smtp.transport
        tlslog.session(
            log,
            transport.get_extra_info("ssl_object") if transport is not None else None,
            inbound=False,
            peer=label,
            verified=verify,
        )
        return True

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
        task = asyncio.ensure_future(_quit(conn, 5))
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
        await asyncio.gather(*(_quit(c, 2) for c in conns), *list(self._closing))

    # -- one transaction -------------------------------------------------------

    async def deliver(
        self,
        hop: NextHop,
        sender: str,
        recipients: list[str],
        chunks: ChunkSource,
        *,
        local_hostname: str,
        params: MailParams = NO_PARAMS,
        utf8_headers: bool = False,
    ) -> list[RecipientResult]:
        """Sends one message to one next hop; one result per recipient, never raises.
        `params`: the message's SMTPUTF8/BODY/DSN parameters (relay.queue.mailparams)."""
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

        def transaction(conn: Connection, reused: bool) -> Awaitable[Outcome]:
            return run_transaction(
                conn.smtp,
                conn.label,
                sender,
                valid,
                chunks,
                results,
                reused=reused,
                pipelining=self.pipelining,
                timeout=self.command_timeout,
                params=params,
                utf8_headers=utf8_headers,
            )

        await self._converse(hop, local_hostname, valid, results, transaction)
        return [results[r] for r in recipients]

    async def probe(self, hop: NextHop, recipient: str, *, local_hostname: str) -> RecipientResult:
        """verify(8)'s probe of one address (MAIL FROM:<>, RCPT, RSET); never raises.
        SENT: the next hop accepted the RCPT."""
        results: dict[str, RecipientResult] = {}
        try:
            check_address(recipient)
        except AddressError as e:
            return RecipientResult(recipient, BOUNCED, f"bad address syntax: {e}", "5.1.3")

        def probe(conn: Connection, reused: bool) -> Awaitable[Outcome]:
            return run_probe(
                conn.smtp,
                conn.label,
                recipient,
                results,
                reused=reused,
                timeout=self.command_timeout,
            )

        await self._converse(hop, local_hostname, [recipient], results, probe)
        return results[recipient]

    async def _converse(
        self,
        hop: NextHop,
        local_hostname: str,
        valid: list[str],
        results: dict[str, RecipientResult],
        run: Callable[[Connection, bool], Awaitable[Outcome]],
    ) -> None:
        """`run(connection, reused)` on a pooled or new connection to `hop`;
        fills `results` for every one of `valid`."""
        dest = self._destination(hop)
        async with dest.slots:
            for attempt in range(2):  # a reused connection may have been closed by the peer
                conn = self._take_idle(dest) if attempt == 0 else None
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
                        return
                try:
                    outcome = await run(conn, reused)
                except Exception as e:  # a bug or a surprise: defer, never leak the connection
                    self._discard(conn)
                    reason = f"local error while delivering to {conn.label}: {e!r}"
                    for r in valid:
                        if r not in results:
                            results[r] = RecipientResult(
                                r, DEFERRED, reason, "4.3.0", conn.label, False
                            )
                    return
                except BaseException:  # cancelled: the connection goes with the attempt
                    self._discard(conn)
                    raise
                if outcome is Outcome.RETRY:
                    continue
                if outcome is Outcome.KEEP:
                    self._put_idle(dest, conn)
                else:
                    self._discard(conn)
                return
