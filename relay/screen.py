"""Postscreen: connection-time tests before the SMTP session.

INTERFACE STUB (pass-through) — the spam-filtering work replaces the body.
Contract with relay.smtpd: `screen()` runs right after accept, before the
server's final "220 " greeting line. When the pregreet test runs, it has
already written the "220-" teaser; the server then writes "220 <host> ESMTP".
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from relay.config import RelayConfig
from relay.dns import Resolver
from relay.session import ScreenResult, Session


class Postscreen:
    def __init__(self, config: RelayConfig, resolver: Resolver, cache_dir: Path | None) -> None:
        self.config = config
        self.resolver = resolver
        self.cache_dir = cache_dir

    def update_config(self, config: RelayConfig) -> None:
        self.config = config

    async def screen(
        self, session: Session, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> ScreenResult:
        """The verdict on one connection: pass, enforce (550 on every RCPT) or drop."""
        return ScreenResult()
