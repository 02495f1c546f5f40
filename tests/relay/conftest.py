"""In-process relay servers for the SMTP tests: the real RelaySMTP, the real
queue on tmp_path, on a free 127.0.0.x port; stages replaceable by fakes."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from mrtest.relayproc import next_loopback, render_config, write_manifests

from relay.config import RelayConfig, load_config
from relay.dns import Resolver
from relay.queue.format import ACTIVE
from relay.queue.store import Queue
from relay.smtpd.dnschecks import DnsChecks
from relay.smtpd.screen import Postscreen
from relay.smtpd.server import RelaySMTP, ServerContext
from relay.smtpd.spf import SpfChecker

DEFAULT_DOMAINS: dict[str, list[str] | str] = {
    "example.com": ["info@example.com", "joe@example.com"],
    "example.org": "any",
}


def make_config(
    tmp_path: Path,
    *,
    domains: dict[str, list[str] | str] | None = None,
    spec: dict[str, Any] | None = None,
    name: str = "cfg",
) -> RelayConfig:
    """A RelayConfig rendered from test manifests, as `mailrelay run` does it."""
    manifests = write_manifests(
        tmp_path / f"{name}-manifests",
        next_hop=("127.0.0.1", 9),
        domains=DEFAULT_DOMAINS if domains is None else domains,
        spec=spec,
    )
    return load_config(render_config(manifests, tmp_path / f"{name}-config"))


@dataclass
class Harness:
    host: str
    port: int
    ctx: ServerContext
    queue: Queue
    server: asyncio.Server

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def queued(self) -> list[bytes]:
        """The data of every committed message (without the queue trailer)."""
        from relay.queue.format import read_envelope

        out = []
        for f in sorted((self.queue.directory / ACTIVE).iterdir()):
            raw = f.read_bytes()
            with f.open("rb") as fh:
                size = read_envelope(fh.fileno()).size
            out.append(raw[:size])
        return out


ServerFactory = Callable[..., Any]


@pytest.fixture
async def relay_server(tmp_path: Path) -> AsyncIterator[ServerFactory]:
    """`await relay_server(config=..., postscreen=..., tls=...)` -> Harness."""
    started: list[Harness] = []

    async def start(
        config: RelayConfig | None = None,
        *,
        postscreen: Any = None,
        dns_checks: Any = None,
        spf: Any = None,
        queue: Queue | None = None,
        tls_context: ssl.SSLContext | None = None,
        idle_timeout: float = 30.0,
    ) -> Harness:
        config = config or make_config(tmp_path)
        resolver = Resolver(config.dns)
        queue = queue or Queue(tmp_path / f"queue{len(started)}")
        ctx = ServerContext(
            config,
            queue,
            postscreen=postscreen or Postscreen(config, resolver, None),
            dns_checks=dns_checks or DnsChecks(config, resolver),
            spf=spf or SpfChecker(config, resolver),
            tls_context=tls_context,
            idle_timeout=idle_timeout,
        )
        host = next_loopback()
        server = await asyncio.get_running_loop().create_server(lambda: RelaySMTP(ctx), host, 0)
        port = server.sockets[0].getsockname()[1]
        h = Harness(host, port, ctx, queue, server)
        started.append(h)
        return h

    yield start
    for h in started:
        h.server.close()
        for s in list(h.ctx.sessions):
            s.close_with_nothing()
        await asyncio.sleep(0.05)
        with contextlib.suppress(Exception):
            await h.queue.close()
