"""What every connection of one relay process shares (ServerContext): the
current configuration (swapped on reload), the queue, the checking stages,
the per-client counters, and the shutdown state.

relay.process.server builds one and hands it to every RelaySMTP it accepts;
the sessions register themselves in `sessions` (as a Connection: all this
module needs of them) so that shutdown can reach them.
"""

from __future__ import annotations

import os
import ssl
import time
from collections.abc import Callable
from typing import Protocol

from relay.config import RelayConfig
from relay.queue.store import Queue
from relay.smtpd import hygiene
from relay.smtpd.anvil import Anvil
from relay.smtpd.authres import Authenticator
from relay.smtpd.dnschecks import DnsChecks
from relay.smtpd.greylist import Greylist
from relay.smtpd.policy import in_mynetworks
from relay.smtpd.screen import Postscreen
from relay.smtpd.session import Reply
from relay.smtpd.spf import SpfChecker
from relay.verify_cache import RecipientVerifier

IDLE_TIMEOUT = 300.0  # Postfix smtpd_timeout
# Postfix smtpd_min_data_rate: during DATA each byte buys this much more time
# beyond the idle timeout, so a client trickling its message cannot hold a
# session (and its per-client connection slot) for ever.
MIN_DATA_RATE = 500.0  # bytes per second
# Postfix refuses MAIL when the queue's file system has less free space than
# 1.5 x message_size_limit.
FREE_SPACE_FACTOR = 1.5


class Connection(Protocol):
    """A client session, as shutdown sees it."""

    @property
    def idle(self) -> bool:
        """Waiting for a command, outside a transaction."""
        ...

    def close_with(self, reply: Reply) -> None: ...


class ServerContext:
    """What every connection of one process shares: the current configuration
    (swapped on reload), the queue and the checking stages."""

    def __init__(
        self,
        config: RelayConfig,
        queue: Queue,
        *,
        postscreen: Postscreen,
        dns_checks: DnsChecks,
        spf: SpfChecker,
        tls_context: ssl.SSLContext | None = None,
        idle_timeout: float = IDLE_TIMEOUT,
        on_queued: Callable[[str], None] | None = None,
        anvil: Anvil | None = None,
        min_data_rate: float = MIN_DATA_RATE,
        error_sleep: float = hygiene.ERROR_SLEEP,
    ) -> None:
        self.config = config
        self.queue = queue
        self.postscreen = postscreen
        self.dns_checks = dns_checks
        self.spf = spf
        # contentFilters.authentication: DNS through the same resolver as SPF's.
        self.authenticator = Authenticator(spf.resolver)
        self.tls_context = tls_context
        self.idle_timeout = idle_timeout
        self.min_data_rate = min_data_rate
        self.error_sleep = error_sleep  # smtpd_error_sleep_time
        self.on_queued = on_queued
        # Per-client rate limits (relay.smtpd.anvil), shared by the process's sessions.
        self.anvil = anvil if anvil is not None else Anvil()
        # recipients: verify's probes and cache (relay.verify_cache); the worker sets it.
        self.verifier: RecipientVerifier | None = None
        # restrictions.greylist's triplets (relay.smtpd.greylist); the worker sets it.
        self.greylist: Greylist | None = None
        self.sessions: set[Connection] = set()
        self.shutting_down = False
        self._free_space_checked = 0.0
        self._free_space_ok = True
        self._trusted: dict[str, bool] = {}  # client ip -> in mynetworks, for this config

    def trusted(self, client_ip: str) -> bool:
        """in_mynetworks, remembered per address until the configuration changes."""
        known = self._trusted.get(client_ip)
        if known is None:
            if len(self._trusted) >= 4096:
                self._trusted.clear()
            known = self._trusted[client_ip] = in_mynetworks(self.config, client_ip)
        return known

    def update_config(self, config: RelayConfig) -> None:
        """New sessions and new commands see the new configuration at once."""
        self.config = config
        self._trusted = {}
        self.postscreen.update_config(config)
        self.dns_checks.update_config(config)
        self.spf.update_config(config)

    def storage_ok(self) -> bool:
        """Enough free space for a message of the maximum size (cached 1 s)."""
        now = time.monotonic()
        if now - self._free_space_checked > 1.0:
            self._free_space_checked = now
            try:
                st = os.statvfs(self.queue.directory)
                free = st.f_bavail * st.f_frsize
                self._free_space_ok = free >= FREE_SPACE_FACTOR * self.config.limits.message_size
            except OSError:
                self._free_space_ok = True  # cannot tell: the write will say
        return self._free_space_ok

    def begin_shutdown(self) -> None:
        """Stops new transactions; idle sessions are told so at once."""
        self.shutting_down = True
        for s in list(self.sessions):
            if s.idle:
                s.close_with(self.shutdown_reply())

    def close_all(self) -> None:
        """End of the grace period: whoever is still here is told to come back."""
        for s in list(self.sessions):
            s.close_with(self.shutdown_reply())

    def shutdown_reply(self) -> Reply:
        return Reply(
            421, "4.3.2", f"{self.config.hostname} Service shutting down, closing connection"
        )
