"""Fixtures for delivery tests (helpers in mrtest.delivery_helpers)."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from mrtest.delivery_helpers import FakeClock, Relay, Sink

from relay.config import RelayConfig
from relay.delivery.qmgr import Delivery
from relay.dns import Resolver
from relay.queue.store import Queue


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def sink_factory() -> AsyncIterator[Callable[..., Any]]:
    sinks: list[Sink] = []

    async def make(host: str = "127.0.0.2", port: int = 0, **kw: Any) -> Sink:
        s = await Sink(host=host, port=port, **kw).start()
        sinks.append(s)
        return s

    yield make
    for s in sinks:
        await s.stop()


@pytest.fixture
async def relay_factory(tmp_path: Path, clock: FakeClock) -> AsyncIterator[Callable[..., Any]]:
    made: list[Relay] = []

    async def make(
        config: RelayConfig,
        queue_dir: Path | None = None,
        resolver: Resolver | None = None,
        **kw: Any,
    ) -> Relay:
        queue = Queue(queue_dir or tmp_path / "queue", clock=clock)
        holder = {"config": config}
        delivery = Delivery(queue, lambda: holder["config"], resolver or Resolver(), clock, **kw)
        await delivery.recover()
        r = Relay(queue, delivery, config)
        made.append(r)
        return r

    yield make
    for r in made:
        await r.delivery.stop(grace=5)
        await r.queue.close()


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: Any) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("tls")
    crt, key = folder / "tls.crt", folder / "tls.key"
    key_options = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    names = "subjectAltName=DNS:mx.tls.test,IP:127.0.0.7"
    files = ["-keyout", str(key), "-out", str(crt), "-addext", names]
    subprocess.run(
        ["openssl", "req", "-x509", *key_options, "-days", "2", "-subj", "/CN=mx.tls.test", *files],
        check=True,
        capture_output=True,
    )
    return crt, key
