"""RCPT restrictions that ask DNS: unknown recipient domain, reverse client
hostname, RBL clients (Postfix smtpd_check.c semantics and reply codes).

INTERFACE STUB (permits everything) — the spam-filtering work replaces the
bodies. Each returns None (no opinion) or a Reply; a temporary DNS failure
returns a Reply with defer_if_permit=True.
"""

from __future__ import annotations

from relay.config import RelayConfig
from relay.dns import Resolver
from relay.session import Reply, Session


class DnsChecks:
    def __init__(self, config: RelayConfig, resolver: Resolver) -> None:
        self.config = config
        self.resolver = resolver

    def update_config(self, config: RelayConfig) -> None:
        self.config = config

    async def unknown_recipient_domain(self, recipient: str, domain: str) -> Reply | None:
        return None

    async def unknown_reverse_client_hostname(self, session: Session) -> Reply | None:
        return None

    async def rbl_client(self, session: Session) -> Reply | None:
        return None
