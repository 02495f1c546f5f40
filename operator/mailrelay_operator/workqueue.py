"""The reconciler's work queue: which relays need a pass, and whether to render them.

Contract: `mark` is cheap and synchronous, called from kopf's event handlers
in the event loop's thread (it wakes an asyncio.Event, which only that thread
may touch). `take` hands the loop every mark at once; a relay marked several
times is reconciled once, rendered if any mark asked for it. The sweep flag
asks for the statuses of RelayDomains and RecipientLists no relay renders.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from mailrelay_operator.cluster import Key

MAX_RETRY_SECONDS = 300.0


@dataclass
class WorkQueue:
    retry_seconds: float = 2.0
    dirty: dict[Key, bool] = field(default_factory=dict)  # relay -> needs a fresh render
    sweep: bool = False
    sweep_timer: asyncio.TimerHandle | None = None  # a sweep asked for later
    # Binds to the running loop on first use (Python 3.10+), not when made.
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)

    def mark(self, key: Key | None, render: bool = True) -> None:
        if key is None:
            return
        self.dirty[key] = self.dirty.get(key, False) or render
        self.wakeup.set()

    def mark_sweep(self) -> None:
        self.sweep = True
        self.wakeup.set()

    def mark_after(self, delay: float, key: Key, render: bool = False) -> None:
        asyncio.get_running_loop().call_later(delay, self.mark, key, render)

    def mark_later(self, key: Key, failures: int = 0, render: bool = False) -> None:
        """Looks again after a while; longer after each failed pass (up to 5 minutes)."""
        delay = min(self.retry_seconds * 2 ** min(failures, 8), MAX_RETRY_SECONDS)
        self.mark_after(delay, key, render)

    def sweep_later(self, delay: float | None = None) -> None:
        """A sweep after `delay` (default retry_seconds), unless one is already due."""
        loop = asyncio.get_running_loop()
        if self.sweep_timer is not None and self.sweep_timer.when() > loop.time():
            return
        wait = self.retry_seconds if delay is None else delay
        self.sweep_timer = loop.call_later(wait, self.mark_sweep)

    @property
    def sweep_due(self) -> bool:
        """A sweep asked for later has not come yet."""
        timer = self.sweep_timer
        return timer is not None and timer.when() > asyncio.get_running_loop().time()

    def take(self) -> tuple[dict[Key, bool], bool]:
        """Every relay marked so far (-> render?) and the sweep flag; both cleared."""
        dirty, self.dirty = self.dirty, {}
        sweep, self.sweep = self.sweep, False
        return dirty, sweep

    @property
    def empty(self) -> bool:
        return not (self.dirty or self.sweep or self.wakeup.is_set() or self.sweep_due)
