"""The reconciler gives the heap back to the system (malloc_trim) after a
large render only, not after each small one."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest
from mailrelay_operator import reconciler
from mailrelay_operator.cluster import ClusterView, trim
from mailrelay_operator.health import Health
from mailrelay_operator.reconciler import Reconciler, RelayMemory
from mrtest.objects import mailrelay

KEY = ("mail", "edge")


def trims_after_render(monkeypatch: pytest.MonkeyPatch) -> int:
    """malloc_trim calls while one relay without domains renders."""
    trims: list[int] = []
    monkeypatch.setattr(reconciler, "trim_heap", lambda: trims.append(1) or True)

    async def scenario() -> None:
        r = Reconciler(api=cast(Any, object()), view=ClusterView, operator_key=b"k" * 32,
                       health=Health(), workers=1)  # fmt: skip
        relay = trim(mailrelay("edge", "mail", uid="u-1", generation=1))
        mem = RelayMemory(uid="u-1", claims=[])  # claims known: no API read
        rendered = await r._render(KEY, relay, mem, True, ClusterView(relays={KEY: relay}))
        assert rendered.recipients + len(rendered.domains) == 0

    asyncio.run(scenario())
    return len(trims)


def test_a_small_render_is_not_followed_by_a_trim(monkeypatch: pytest.MonkeyPatch) -> None:
    assert trims_after_render(monkeypatch) == 0


def test_a_render_of_the_threshold_or_more_is(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reconciler, "TRIM_AFTER_RENDER_OBJECTS", 0)
    assert trims_after_render(monkeypatch) == 1
