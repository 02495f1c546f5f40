"""Suite-wide pytest setup. Area fixtures live in each area's own conftest.py."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pytest

from relay.process import eventloop


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], Any]]:
    """Async tests run on the event loop the relay's workers run on
    (MAILRELAY_EVENT_LOOP, else uvloop): the in-process servers and deliveries
    are tested on the product's loop, not only on asyncio's. Those marked
    every_event_loop (what touches asyncio's internals) run on each."""
    if item.get_closest_marker("every_event_loop"):
        return {name: eventloop.loop_factory(name) for name in eventloop.EVENT_LOOPS}
    return {eventloop.requested(): eventloop.loop_factory()}
