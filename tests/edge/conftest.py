"""The production-edge tests (issue 5): PROXY, anvil, certificate rotation,
backscatter, faults, load and fuzz. Helpers: mrtest.edgeserver."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from mrtest.edgeserver import EdgeFactory, edge_server_factory


@pytest.fixture
async def edge_server(tmp_path: Path) -> AsyncIterator[EdgeFactory]:
    """`await edge_server(config=..., proxy=True, tls_context=..., anvil=...)`."""
    async for start in edge_server_factory(tmp_path):
        yield start
