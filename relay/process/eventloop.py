"""Which event loop the relay's workers run on: uvloop unless told otherwise.

uvloop (libuv, in C) takes less CPU per SMTP session than asyncio's pure
Python selector loop (docs/benchmarks.md, "The plain relay's CPU"). Everything
else is the same asyncio API, so `MAILRELAY_EVENT_LOOP=asyncio` turns it off
(for a comparison, or a platform without the wheel); when uvloop cannot be
imported the workers fall back to asyncio and say so once.

The one owner of that choice: relay.process.server runs the workers through
run(), and tests/conftest.py gives pytest-asyncio the same loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TypeVar

log = logging.getLogger("mailrelay.server")

EventLoopName = Literal["uvloop", "asyncio"]
EVENT_LOOPS: tuple[EventLoopName, ...] = ("uvloop", "asyncio")
DEFAULT_EVENT_LOOP: EventLoopName = "uvloop"
ENV_EVENT_LOOP = "MAILRELAY_EVENT_LOOP"

T = TypeVar("T")


def requested() -> EventLoopName:
    """MAILRELAY_EVENT_LOOP, else the default (an unknown name is logged and ignored)."""
    name = os.environ.get(ENV_EVENT_LOOP, "").strip().lower() or DEFAULT_EVENT_LOOP
    for known in EVENT_LOOPS:
        if name == known:
            return known
    log.warning(
        "%s=%s: not one of %s, using %s",
        ENV_EVENT_LOOP,
        name,
        ", ".join(EVENT_LOOPS),
        DEFAULT_EVENT_LOOP,
    )
    return DEFAULT_EVENT_LOOP


def loop_factory(name: EventLoopName | None = None) -> Callable[[], asyncio.AbstractEventLoop]:
    """Makes a new loop of the kind asked for (default: requested()); asyncio's
    when uvloop is asked for but not installed."""
    if (name or requested()) == "uvloop":
        try:
            import uvloop
        except ImportError as e:
            log.warning("uvloop unavailable (%s): running on asyncio's event loop", e)
        else:
            return uvloop.new_event_loop
    return asyncio.new_event_loop


def run(main: Coroutine[Any, Any, T]) -> T:
    """asyncio.run(main) on the event loop MAILRELAY_EVENT_LOOP asks for."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)


def name_of(loop: asyncio.AbstractEventLoop) -> str:
    """'uvloop' or 'asyncio' (for the worker's start-up line and the tests)."""
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"
