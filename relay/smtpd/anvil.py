"""Per-client rate limits, like Postfix's anvil(8) server.

Counted per client IP (the real one, after PROXY), in memory, per process:
- concurrent connections   (limits.connectionsPerClient, Postfix
                            smtpd_client_connection_count_limit, default 50)
- connections per time unit  (limits.connectionRatePerClient)
- MAIL FROM per time unit    (limits.messageRatePerClient)
- RCPT TO per time unit      (limits.recipientRatePerClient)
Rates are counted over limits.rateTimeUnit (anvil_rate_time_unit, 60 s) in
a window that starts at the client's first event, as anvil does; 0 turns a
limit off. Clients in mynetworks are never counted
(smtpd_client_event_limit_exceptions = $mynetworks). The per-session error
limit (smtpd_hard_error_limit) needs no shared state: relay.smtpd.server counts it.

Memory stays bounded under an address-spraying flood (every connection from
a new IP): entries with no open connection are dropped once their window is
over, and the least recently seen ones are evicted when the table is full.
Entries with open connections are bounded by the open sockets themselves.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol, runtime_checkable

from relay import metrics
from relay.config import Limits
from relay.smtpd.session import Reply, Session

log = logging.getLogger("mailrelay.anvil")

DEFAULT_MAX_CLIENTS = 100_000
# Expired entries looked at per event: amortised cleanup, O(1) per call.
_SWEEP_PER_EVENT = 4


@runtime_checkable
class ClientCounters(Protocol):
    """One client's counters, wherever they live: a _Client in this process, or
    a slot of the table the workers share (anvil_shared._SharedClient)."""

    connections: int
    window_start: float
    connection_rate: int
    messages: int
    recipients: int


class _Client:
    __slots__ = ("connection_rate", "connections", "messages", "recipients", "window_start")

    def __init__(self, now: float) -> None:
        self.connections = 0
        self.window_start = now
        self.connection_rate = 0
        self.messages = 0
        self.recipients = 0


class Anvil:
    """The counters of one relay process; `clock` is injectable for tests."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_clients: int = DEFAULT_MAX_CLIENTS,
    ) -> None:
        self.clock = clock
        self.max_clients = max_clients
        self._clients: OrderedDict[str, _Client] = OrderedDict()
        self.evicted = 0  # entries dropped because the table was full

    def __len__(self) -> int:
        return len(self._clients)

    # -- events ----------------------------------------------------------------

    def connect(self, session: Session, limits: Limits, hostname: str) -> Reply | None:
        """A new connection. Returns the 421 to send instead of the greeting,
        or None. Unless the client is exempt (session.trusted), call
        `disconnect()` when the connection ends, whatever was returned."""
        if session.trusted:
            return None
        client = self._touch(session.client_ip, limits)
        client.connections += 1
        client.connection_rate += 1
        count_limit = limits.connections_per_client
        if count_limit > 0 and client.connections > count_limit:
            log.warning(
                "Connection concurrency limit exceeded: %d from [%s]",
                client.connections,
                session.client_ip,
            )
            metrics.child(metrics.REJECTED, "connection_count_limit").inc()
            return self._too_many_connections(session, hostname)
        rate_limit = limits.connection_rate_per_client
        if rate_limit > 0 and client.connection_rate > rate_limit:
            log.warning(
                "Connection rate limit exceeded: %d from [%s]",
                client.connection_rate,
                session.client_ip,
            )
            metrics.child(metrics.REJECTED, "connection_rate_limit").inc()
            return self._too_many_connections(session, hostname)
        return None

    def disconnect(self, client_ip: str) -> None:
        client = self._clients.get(client_ip)
        if client is not None and client.connections > 0:
            client.connections -= 1

    def message(self, session: Session, limits: Limits) -> Reply | None:
        """A MAIL FROM: 450 when over limits.messageRatePerClient."""
        limit = limits.message_rate_per_client
        if session.trusted or limit <= 0:
            return None
        client = self._touch(session.client_ip, limits)
        client.messages += 1
        if client.messages > limit:
            log.warning(
                "Message delivery request rate limit exceeded: %d from [%s]",
                client.messages,
                session.client_ip,
            )
            metrics.child(metrics.REJECTED, "message_rate_limit").inc()
            return Reply(450, "4.7.1", f"Error: too much mail from {session.client_ip}")
        return None

    def recipient(self, session: Session, limits: Limits) -> Reply | None:
        """A RCPT TO: 450 when over limits.recipientRatePerClient."""
        limit = limits.recipient_rate_per_client
        if session.trusted or limit <= 0:
            return None
        client = self._touch(session.client_ip, limits)
        client.recipients += 1
        if client.recipients > limit:
            log.warning(
                "Recipient address rate limit exceeded: %d from [%s]",
                client.recipients,
                session.client_ip,
            )
            metrics.child(metrics.REJECTED, "recipient_rate_limit").inc()
            return Reply(450, "4.7.1", f"Error: too many recipients from {session.client_ip}")
        return None

    # -- the table ---------------------------------------------------------------

    @staticmethod
    def _too_many_connections(session: Session, hostname: str) -> Reply:
        return Reply(
            421,
            "4.7.0",
            f"{hostname} Error: too many connections from {session.client_ip}",
            disconnect=True,
        )

    def _touch(self, ip: str, limits: Limits) -> ClientCounters:
        now = self.clock()
        unit = limits.rate_time_unit
        client = self._clients.get(ip)
        if client is None:
            self._make_room(now, unit)
            client = self._clients[ip] = _Client(now)
        else:
            self._clients.move_to_end(ip)
            if now - client.window_start >= unit:
                client.window_start = now
                client.connection_rate = client.messages = client.recipients = 0
        self._sweep(now, unit)
        return client

    def _sweep(self, now: float, unit: float) -> None:
        """Drops a few idle, expired entries from the least recent end."""
        for _ in range(_SWEEP_PER_EVENT):
            if not self._clients:
                return
            ip, oldest = next(iter(self._clients.items()))
            if oldest.connections > 0:
                # Still connected: kept, and out of the way of the sweep.
                self._clients.move_to_end(ip)
                continue
            if now - oldest.window_start < unit:
                return
            del self._clients[ip]

    def _make_room(self, now: float, unit: float) -> None:
        if len(self._clients) < self.max_clients:
            return
        # Evict the least recently seen entry without open connections; the
        # ones with connections are kept (their count must not be lost).
        for ip, client in self._clients.items():
            if client.connections == 0:
                del self._clients[ip]
                self.evicted += 1
                return
        # Every entry has an open connection: the table may grow with them.
