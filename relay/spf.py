"""SPF at RCPT, as spf-engine (pypolicyd-spf) does it.

INTERFACE STUB (no opinion) — the spam-filtering work replaces the body.
`check()` runs once per message transaction (the caller caches the outcome
for the later recipients): a Reply to reject/defer, or a Received-SPF header
to prepend once.
"""

from __future__ import annotations

from dataclasses import dataclass

from relay.config import RelayConfig
from relay.dns import Resolver
from relay.session import Reply, Session


@dataclass(frozen=True)
class SpfOutcome:
    reply: Reply | None = None
    header: str | None = None  # "Received-SPF: ..." without CRLF


class SpfChecker:
    def __init__(self, config: RelayConfig, resolver: Resolver) -> None:
        self.config = config
        self.resolver = resolver

    def update_config(self, config: RelayConfig) -> None:
        self.config = config

    async def check(self, session: Session, sender: str, recipient: str) -> SpfOutcome:
        return SpfOutcome()
