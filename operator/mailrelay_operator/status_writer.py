"""Writes statuses (merge-patch of /status), only those that differ from what is there.

Contract: StatusWriter owns `written` (object uid -> digest of the status
last written or found, lastTransitionTimes left out) and a queue of pending
writes, the newest per object winning; a queued write goes to the object as
`current` finds it then (the input cache), not as it was queued. `write` writes one status now (a
MailRelay's own); `queue` hands one to `run`, a task that drains the queue
STATUS_WRITE_CONCURRENCY writes at a time, so thousands of RelayDomain and
RecipientList statuses never keep the next reconcile waiting. `resync`
forgets `written`, so the next pass compares with the objects again.
After each write it calls `written_hook(obj, new)` (the Event recorder,
k8s_events.py: a status changed, maybe a condition), which must not wait.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from hashlib import blake2b
from typing import Any

from mailrelay_operator import status
from mailrelay_operator.cluster import Key, key_of, shared
from mailrelay_operator.kubeapi import KubeApi, KubeError, KubeObject, resource_path

log = logging.getLogger("mailrelay.operator")

STATUS_WRITE_CONCURRENCY = 16
DIGESTS_SPARE = 1000  # distinct digests held beyond one per written object


# A queued status: its object's kind, namespace and name, and the status.
# Flat (one tuple, ~72 bytes) and with the object's own strings: 100,000 of them queue up.
Queued = tuple[str, str, str, KubeObject]


# What is written to: a MailRelay (dict) or an input cache record (records.Cached).
Target = Mapping[str, Any]


def _no_object(kind: str, key: Key) -> Target | None:
    return None


def _no_hook(obj: Target, new: KubeObject) -> None:
    return None


@dataclass
class StatusWriter:
    api: KubeApi
    retry_seconds: float = 2.0
    # Where a queued status's object is now (the input cache): a queue of
    # 100,000 statuses holds no copy of an object the cache has replaced since.
    current: Callable[[str, Key], Target | None] = _no_object
    # Called with (object as it was, status written) after each write.
    written_hook: Callable[[Target, KubeObject], None] = _no_hook
    written: dict[str, bytes] = field(default_factory=dict)
    # Equal digests (most objects get the same status) held once.
    digests: dict[bytes, bytes] = field(default_factory=dict)
    pending: dict[str, Queued] = field(default_factory=dict)  # by uid
    in_flight: int = 0
    # Binds to the running loop on first use (Python 3.10+), not when made.
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def idle(self) -> bool:
        return not (self.pending or self.in_flight)

    def resync(self) -> None:
        self.written.clear()
        self.digests.clear()

    def _remember(self, uid: str, digest: bytes) -> None:
        if len(self.digests) > len(self.written) + DIGESTS_SPARE:
            self.digests.clear()  # those of statuses no object has any more
        self.written[uid] = self.digests.setdefault(digest, digest)

    def _unchanged(self, obj: Target, new: KubeObject) -> bool:
        """True when `new` is what was written or what the object has (then remembered)."""
        uid = str(obj["metadata"].get("uid"))
        want = _digest(new)
        if want == self.written.get(uid):
            return True
        if status.without_times(obj.get("status")) == status.without_times(new):
            self._remember(uid, want)
            return True
        return False

    async def write(self, obj: Target, new: KubeObject) -> None:
        if self._unchanged(obj, new):
            return
        meta = obj["metadata"]
        path = resource_path(obj["apiVersion"], obj["kind"], meta["namespace"], meta["name"])
        try:
            await self.api.patch_status(path, new)
        except KubeError as e:
            if e.status == 404:  # deleted meanwhile
                return
            raise
        self._remember(str(meta.get("uid")), _digest(new))
        self.written_hook(obj, new)

    def queue(self, obj: Target, new: KubeObject) -> None:
        """Queues a status write unless it is already there; the newest one per object wins."""
        uid = str(obj["metadata"].get("uid"))
        if self._unchanged(obj, new):
            self.pending.pop(uid, None)
            return
        # Most of 100,000 RelayDomains get the same status: held once.
        ns, name = key_of(obj)
        self.pending[uid] = (str(obj["kind"]), ns, name, shared(new))
        self.wakeup.set()

    async def _write_queued(self, uid: str, queued: Queued) -> None:
        kind, ns, name, new = queued
        obj = self.current(kind, (ns, name))
        if obj is None or str(obj["metadata"].get("uid")) != uid:
            return  # deleted (or replaced by a new object, which a later pass looks at)
        await self.write(obj, new)

    async def run(self) -> None:
        """Drains the queue, STATUS_WRITE_CONCURRENCY writes at a time."""
        while True:
            await self.wakeup.wait()
            self.wakeup.clear()
            while self.pending:
                # The uids only: each entry leaves `pending` when its write starts
                # (a newer status queued meanwhile is the one written), so the
                # statuses of a round of 100,000 are not held twice.
                uids = list(self.pending)
                self.in_flight = len(uids)
                try:
                    await _gather_limited(self._take_and_write(uid) for uid in uids)
                    log.info("statuses: %d checked; %d writes so far", len(uids), self.api.writes)
                except Exception:
                    log.exception("writing statuses failed; retrying")
                    await asyncio.sleep(self.retry_seconds)
                finally:
                    self.in_flight = 0

    async def _take_and_write(self, uid: str) -> None:
        queued = self.pending.pop(uid, None)
        if queued is None:
            return  # taken by an earlier round
        try:
            await self._write_queued(uid, queued)
        except Exception:
            self.pending.setdefault(uid, queued)  # again, unless a newer one came
            raise


def _digest(new: KubeObject) -> bytes:
    """Of a status without its times: 16 bytes (one per object written)."""
    text = json.dumps(status.without_times(new), sort_keys=True).encode()
    return blake2b(text, digest_size=16).digest()


async def _gather_limited(coros: Iterable[Coroutine[Any, Any, None]]) -> None:
    """Runs them all, STATUS_WRITE_CONCURRENCY at a time; raises the first error after.

    As many workers as may run at once, each making and awaiting the next
    coroutine: not a task per write up front (tens of thousands of tasks at once, ~3 KB each,
    for a batch of 10,000 RelayDomain statuses)."""
    pending = iter(coros)
    errors: list[BaseException] = []

    async def worker() -> None:
        for c in pending:
            try:
                await c
            except Exception as e:
                errors.append(e)

    await asyncio.gather(*(worker() for _ in range(STATUS_WRITE_CONCURRENCY)))
    if errors:
        raise errors[0]
