"""In-process relay servers for the edge tests (tests/edge): the real
RelaySMTP on a free 127.0.0.x port, with an optional PROXY listener beside
it, wired exactly as relay.process.server does (one ServerContext, `via_proxy=True`).

    edge = await edge_server(config=edge_config(tmp_path, spec=...), proxy=True)
    edge.address, edge.proxy_address, edge.queued()

Long versions of the edge suites are decorated with `long_test`: they run
only with MAILRELAY_LONG=1 (bench/edge.sh); CI runs the small ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from mrtest.relayproc import next_loopback, render_config, write_manifests
from relay.config import RelayConfig, load_config
from relay.dns import Resolver
from relay.queue.format import ACTIVE, read_envelope
from relay.queue.store import Queue
from relay.smtpd.anvil import Anvil
from relay.smtpd.dnschecks import DnsChecks
from relay.smtpd.screen import Postscreen
from relay.smtpd.server import RelaySMTP, ServerContext
from relay.smtpd.spf import SpfChecker

DOMAINS: dict[str, list[str] | str] = {
    "example.com": ["info@example.com", "joe@example.com"],
    "example.org": "any",
}

RUN_LONG = os.environ.get("MAILRELAY_LONG") == "1"
long_test = pytest.mark.skipif(not RUN_LONG, reason="long version: set MAILRELAY_LONG=1")


def edge_config(
    tmp_path: Path,
    *,
    spec: dict[str, Any] | None = None,
    domains: dict[str, list[str] | str] | None = None,
    next_hop: tuple[str, int] = ("127.0.0.1", 9),
    name: str = "edge",
) -> RelayConfig:
    manifests = write_manifests(
        tmp_path / f"{name}-manifests",
        next_hop=next_hop,
        domains=DOMAINS if domains is None else domains,
        spec=spec,
    )
    return load_config(render_config(manifests, tmp_path / f"{name}-config"))


@dataclass
class EdgeServer:
    host: str
    port: int
    ctx: ServerContext
    queue: Queue
    servers: list[asyncio.Server] = field(default_factory=list)
    proxy_port: int = 0

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    @property
    def proxy_address(self) -> tuple[str, int]:
        return self.host, self.proxy_port

    def queued(self) -> list[bytes]:
        """The data of every committed message (without the queue trailer)."""
        out = []
        folder = self.queue.directory / ACTIVE
        for f in sorted(folder.iterdir()) if folder.exists() else []:
            raw = f.read_bytes()
            with f.open("rb") as fh:
                size = read_envelope(fh.fileno()).size
            out.append(raw[:size])
        return out


EdgeFactory = Callable[..., Any]


async def edge_server_factory(tmp_path: Path) -> AsyncIterator[EdgeFactory]:
    """`await start(config=..., proxy=True, tls_context=..., anvil=...)`."""
    started: list[EdgeServer] = []

    async def start(
        config: RelayConfig | None = None,
        *,
        proxy: bool = False,
        tls_context: ssl.SSLContext | None = None,
        anvil: Anvil | None = None,
        queue: Queue | None = None,
        idle_timeout: float = 30.0,
        host: str | None = None,
        backlog: int = 100,
    ) -> EdgeServer:
        config = config or edge_config(tmp_path)
        resolver = Resolver(config.dns)
        queue = queue or Queue(tmp_path / f"queue{len(started)}")
        ctx = ServerContext(
            config,
            queue,
            postscreen=Postscreen(config, resolver, None),
            dns_checks=DnsChecks(config, resolver),
            spf=SpfChecker(config, resolver),
            tls_context=tls_context,
            idle_timeout=idle_timeout,
            anvil=anvil,
        )
        host = host or next_loopback()
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: RelaySMTP(ctx), host, 0, backlog=backlog)
        edge = EdgeServer(host, server.sockets[0].getsockname()[1], ctx, queue, [server])
        if proxy:
            proxy_server = await loop.create_server(
                lambda: RelaySMTP(ctx, via_proxy=True), host, 0, backlog=backlog
            )
            edge.servers.append(proxy_server)
            edge.proxy_port = proxy_server.sockets[0].getsockname()[1]
        started.append(edge)
        return edge

    yield start
    for edge in started:
        for server in edge.servers:
            server.close()
        for s in list(edge.ctx.sessions):
            s.close_with_nothing()
        await asyncio.sleep(0.05)
        with contextlib.suppress(Exception):
            await edge.queue.close()
