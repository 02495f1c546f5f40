"""The operator's own list+watch of RelayDomains and RecipientLists.

Not kopf's: at 100,000 RelayDomains its per-event work (per-object memory,
cause detection, a log line per handler call) took about 25 events a second
while 50 arrived, and its queues of whole objects grew. Here a thread per
watch reads the stream, trims each object as it arrives (cluster.trim; no
full object is kept) and hands small batches to the event loop, where the
EventRouter stores them in the input cache and marks the relays, as kopf's
handlers did. The thread waits while the loop is behind (WATCH_BATCHES_AHEAD),
so the API server's stream, not our memory, holds what is not taken yet.

Contract: `seed` lists both kinds in every served namespace (or across all)
before the reconciler's first pass: the complete picture. `run` then watches
each (kind, scope) from its listing's resourceVersion with bookmarks; a 410
(the version was compacted away) lists that scope again, which also drops
what was deleted while nobody watched; other errors wait (back-off) and watch
again from the last version seen. Each failure goes to `health` (what /readyz
reads, health.py), and so does what shows the watch works again: a complete
listing, or a watch's first event or bookmark (the API server sends one about
every minute to a watch that asks for them), not its mere opening.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mailrelay_api.allocator import trim_heap
from mailrelay_api.schema import API_VERSION
from mailrelay_operator.cluster import Key
from mailrelay_operator.events import EventRouter
from mailrelay_operator.health import Health
from mailrelay_operator.inputs import INPUT_KINDS, trim_all
from mailrelay_operator.kubeapi import KubeApi, KubeError, KubeObject, WatchStream, resource_path

log = logging.getLogger("mailrelay.operator")

# Seconds the API server keeps a watch open before ending it (we watch again);
# kopf's watches too (handlers.configure).
WATCH_TIMEOUT_SECONDS = 300
# Objects a LIST page brings: a RecipientList may hold thousands of addresses.
# ConfigMaps: child_watch.py lists their metadata alone.
LIST_PAGE = {"RelayDomain": 500, "RecipientList": 20, "ConfigMap": 500}
BACKOFF_FIRST_SECONDS = 1.0
BACKOFF_MAX_SECONDS = 30.0
# A watch that ends sooner than this without delivering an event or a bookmark
# did not work (a proxy that closes streams at once): it is a failure with a
# back-off, not a normal end to watch again from straight away.
WATCH_SHORTEST_SECONDS = 5.0
# Batches a watch thread may hand over before the loop has taken them.
WATCH_BATCHES_AHEAD = 8
WATCH_BATCH_MAX = 200  # events a batch holds at most

Scope = str | None  # a namespace; None: across all of them
# One watch event, trimmed: (type, object or None for a bookmark, resourceVersion);
# the object is a Cached record here, a child's metadata in child_watch.py.
WatchEvent = tuple[str, Any, str]


class Expired(Exception):
    """410 Gone: the version watched from is compacted away; list again."""


class WatchEndedAtOnce(Exception):
    """The stream ended normally, but at once and without an event or bookmark."""

    def __str__(self) -> str:
        return "the watch ended at once without an event"


@dataclass
class InputWatch:
    api: KubeApi
    events: EventRouter
    namespaces: tuple[str, ...] = ()  # served namespaces; empty = all
    # (kind, scope) -> the resourceVersion to watch from; absent: list first
    versions: dict[tuple[str, Scope], str] = field(default_factory=dict)
    lists_done: int = 0  # listings so far (tests watch re-lists)
    health: Health = field(default_factory=Health)

    @property
    def scopes(self) -> tuple[Scope, ...]:
        return self.namespaces or (None,)

    @property
    def kinds(self) -> tuple[str, ...]:
        return INPUT_KINDS

    async def seed(self) -> None:
        """Lists every scope of both kinds (RelayDomains first: a list's relay
        is found through its domain)."""
        for kind in INPUT_KINDS:
            for scope in self.scopes:
                try:
                    await self.relist(kind, scope)
                except Exception as e:
                    self.health.watch_failed(_name(kind, scope), str(e))
                    raise

    async def run(self) -> None:
        """Watches every (kind, scope) until cancelled."""
        await asyncio.gather(
            *(self.follow(kind, scope) for kind in self.kinds for scope in self.scopes)
        )

    async def follow(self, kind: str, scope: Scope) -> None:
        delay = BACKOFF_FIRST_SECONDS
        while True:
            try:
                if (kind, scope) not in self.versions:
                    await self.relist(kind, scope)
                began = time.monotonic()
                delivered = await self.watch(kind, scope)
                if not delivered and time.monotonic() - began < WATCH_SHORTEST_SECONDS:
                    raise WatchEndedAtOnce()
                delay = BACKOFF_FIRST_SECONDS  # ended by the server's timeout
            except Expired:
                log.info("watch of %s in %s expired; listing again", kind, scope or "all")
                self.versions.pop((kind, scope), None)
            except Exception as e:
                log.warning("watching %s in %s: %s; again in %.0f s", kind, scope, e, delay)
                self.health.watch_failed(_name(kind, scope), str(e))
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX_SECONDS)

    # --- listing ---------------------------------------------------------------------
    async def relist(self, kind: str, scope: Scope) -> None:
        """Every object of this scope to the router, page by page (trimmed in a
        thread); then the cached ones the listing no longer has, as deleted."""
        path = self._path(kind, scope)
        listed: set[Key] = set()
        version, token = "", None
        while True:
            try:
                page, at, token = await asyncio.to_thread(
                    self._list_page, path, kind, LIST_PAGE[kind], token
                )
            except KubeError as e:
                if e.status == 410:  # the continue token expired
                    raise Expired() from None
                raise
            version = version or at
            for key, obj in page.items():
                listed.add(key)
                self._deliver(kind, obj, False)
            if not token:
                break
        for obj in self._gone(kind, scope, listed):
            self._deliver(kind, obj, True)
        self.versions[(kind, scope)] = version
        self.lists_done += 1
        await asyncio.to_thread(trim_heap)  # the listing's JSON pages, freed
        self.health.watch_ok(_name(kind, scope))

    # --- what the kinds watched decide (child_watch.py watches others) -----------------
    def _path(self, kind: str, scope: Scope) -> str:
        return resource_path(API_VERSION, kind, scope)

    def _list_page(
        self, path: str, kind: str, limit: int, token: str | None
    ) -> tuple[dict[Key, Any], str, str | None]:
        items, version, token = self.api.list_page_sync(path, limit, token)
        return trim_all(items, kind), version, token

    def _open(self, path: str, version: str) -> WatchStream:
        return self.api.watch_sync(path, version, WATCH_TIMEOUT_SECONDS)

    def _trim_event(self, event: KubeObject, kind: str) -> WatchEvent:
        return _trimmed(event, kind)

    def _deliver(self, kind: str, obj: Any, deleted: bool) -> None:
        self.events.input_event(kind, obj, deleted)

    def _gone(self, kind: str, scope: Scope, listed: set[Key]) -> list[Any]:
        """The cached objects of this scope a listing no longer has."""
        cache = self.events.inputs.of_kind(kind)
        return [v for k, v in cache.items() if k not in listed and scope in (None, k[0])]

    # --- watching --------------------------------------------------------------------
    async def watch(self, kind: str, scope: Scope) -> bool:
        """One watch request, its events to the router until the server ends it;
        whether it delivered anything (an event or a bookmark)."""
        path = self._path(kind, scope)
        version = self.versions[(kind, scope)]
        opening = asyncio.ensure_future(asyncio.to_thread(self._open, path, version))
        try:
            stream = await asyncio.shield(opening)
        except asyncio.CancelledError:
            # The thread still opens it: close it then, not at the server's timeout.
            opening.add_done_callback(_close_opened)
            raise
        except KubeError as e:
            if e.status == 410:
                raise Expired() from None
            raise
        loop = asyncio.get_running_loop()
        room = threading.Semaphore(WATCH_BATCHES_AHEAD)
        name = _name(kind, scope)
        delivered = False

        def take(batch: list[WatchEvent]) -> None:
            nonlocal delivered
            delivered = True
            room.release()
            # The watch delivers (an event or a bookmark): it works. Not at the
            # open: a stream the API server takes and then breaks each time
            # would clear its failure at every try and keep /readyz up.
            self.health.watch_ok(name)
            for etype, obj, at in batch:
                if obj is not None:
                    self._deliver(kind, obj, etype == "DELETED")
                if at:
                    self.versions[(kind, scope)] = at

        def hand_over(batch: list[WatchEvent]) -> bool:
            while not room.acquire(timeout=1.0):
                if stream.closed:
                    return False
            loop.call_soon_threadsafe(take, batch)
            return True

        try:
            await asyncio.to_thread(read_events, stream, kind, hand_over, self._trim_event)
        finally:
            stream.close()
        return delivered  # take() ran for every batch: scheduled before this wake-up


def _name(kind: str, scope: Scope) -> str:
    """How /readyz names a watch: "RelayDomain in mail" or "RelayDomain in all namespaces"."""
    return f"{kind} in {scope or 'all namespaces'}"


def read_events(
    stream: WatchStream,
    kind: str,
    hand_over: Callable[[list[WatchEvent]], bool],
    trim: Callable[[KubeObject, str], WatchEvent] | None = None,
) -> None:
    """Reads a watch stream (in a thread): each event trimmed as it is parsed
    (`trim`, else as an input), those of one read together to hand_over;
    raises Expired at a 410 ERROR event."""
    trim = trim or _trimmed
    for lines in stream.lines():
        for start in range(0, len(lines), WATCH_BATCH_MAX):
            some = lines[start : start + WATCH_BATCH_MAX]
            batch = [trim(json.loads(ln), kind) for ln in some]
            if not hand_over(batch):
                return


def event_parts(event: KubeObject) -> tuple[str, KubeObject | None, str]:
    """A watch event's type, its object (None: a bookmark, only the version
    moves) and resourceVersion; an ERROR event raised (Expired at a 410)."""
    etype = str(event.get("type") or "")
    obj = event.get("object") or {}
    if etype == "ERROR":
        if obj.get("code") == 410:
            raise Expired()
        raise KubeError(int(obj.get("code") or 0), str(obj.get("reason") or ""), str(obj))
    at = str((obj.get("metadata") or {}).get("resourceVersion") or "")
    return (etype, obj if etype in ("ADDED", "MODIFIED", "DELETED") else None, at)


def _trimmed(event: KubeObject, kind: str) -> WatchEvent:
    etype, obj, at = event_parts(event)
    if obj is None:
        return (etype, None, at)
    (trimmed,) = trim_all([obj], kind).values()
    return (etype, trimmed, at)


def _close_opened(opening: asyncio.Future[WatchStream]) -> None:
    if not opening.cancelled() and opening.exception() is None:
        opening.result().close()
