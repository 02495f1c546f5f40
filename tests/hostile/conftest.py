"""Hostile input at the SMTP door (issue 11): an in-process relay on real
sockets (mrtest.edgeserver) and a Postfix 3.7 to compare with (mrtest.hostile).

    door = await relay(spec={...})            # error sleep off: no waiting
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from mrtest.edgeserver import EdgeServer, edge_config, edge_server_factory
from mrtest.hostile import DOMAINS, start_postfix


@pytest.fixture
async def relay(tmp_path: Path) -> AsyncIterator[Any]:
    """`await relay(spec=...)`: the real RelaySMTP on 127.0.0.x, without
    smtpd_error_sleep_time (tests never wait on timings)."""
    factories = edge_server_factory(tmp_path)
    start = await anext(factories)

    async def start_door(spec: dict[str, Any] | None = None) -> EdgeServer:
        door: EdgeServer = await start(edge_config(tmp_path, spec=spec, domains=DOMAINS))
        door.ctx.error_sleep = 0.0
        return door

    yield start_door
    async for _ in factories:  # its clean-up
        pass


@pytest.fixture(scope="module")
def postfix() -> Iterator[tuple[str, int]]:
    """A running Postfix smtpd; skipped where Postfix cannot run."""
    if os.geteuid() != 0 or shutil.which("postfix") is None:
        pytest.skip("needs root and Postfix (hack/setup.sh)")
    # Postfix's own user must get into its folders: pytest's tmp_path is private.
    workdir = Path(tempfile.mkdtemp(prefix="hostile-postfix-"))
    workdir.chmod(0o755)
    try:
        server, address = start_postfix(workdir / "postfix")
        try:
            yield address
        finally:
            server.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
