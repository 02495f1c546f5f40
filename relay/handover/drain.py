"""Draining a pod before a scale-down removes it.

The operator asks (POST /drain on the control port, relay.handover.control); the ask
is a lease written to `<queue>/drain.json`: the peers to hand mail to and
when the lease ends. The operator renews it while it waits; when it stops
asking (the scale-down was called off, the operator went away) the lease
runs out and the pod serves again by itself. Every worker process of the
pod reads the file (it is on the queue volume, so a pod restarted while
draining goes on draining).

While draining, each worker:
- stops taking mail: sessions are told 421 (the readiness probe then fails
  and the Services stop sending clients here; MX clients try another host);
- keeps delivering to next hops as usual;
- hands every message it can claim over to a peer (relay.handover.transfer): deferred
  and held ones at once, fresh ones after HANDOVER_GRACE seconds (they get
  their first delivery attempt here). The queue locks make sure a message
  being delivered is never handed over too, and that two workers never hand
  over the same message.
The operator scales the StatefulSet down once the pod reports an empty queue
(GET /queue) after the drain has settled.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from relay import metrics
from relay.durable import replace_file_sync
from relay.handover.transfer import HandoverClient, HandoverError
from relay.queue.format import ACTIVE, HOLD, Claim
from relay.queue.store import Queue

log = logging.getLogger("mailrelay.drain")

ORDER_FILE = "drain.json"
# Fresh mail gets this long for its first delivery attempt before it is handed over.
HANDOVER_GRACE = 10.0
# After this long, no session that was open when the drain began can still
# commit a message (workers see the order within their poll interval and
# close every session).
SETTLE_SECONDS = 5.0


@dataclass
class DrainOrder:
    peers: list[str] = field(default_factory=list)  # HOST:PORT of handover listeners
    since: float = 0.0  # when the drain began (unix time)
    expires: float = 0.0  # the lease

    def to_json(self) -> bytes:
        return json.dumps(
            {"peers": self.peers, "since": self.since, "expires": self.expires}
        ).encode()


def order_path(queue_dir: Path) -> Path:
    return Path(queue_dir) / ORDER_FILE


def read_order_sync(queue_dir: Path, now: float | None = None) -> DrainOrder | None:
    """The drain order in force, or None (none, expired, or unreadable)."""
    now = time.time() if now is None else now
    try:
        doc = json.loads(order_path(queue_dir).read_bytes())
        order = DrainOrder(
            peers=[str(p) for p in doc.get("peers") or []],
            since=float(doc["since"]),
            expires=float(doc["expires"]),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return order if order.expires > now else None


def write_order_sync(
    queue_dir: Path, peers: list[str] | None, ttl: float, now: float | None = None
) -> DrainOrder | None:
    """Starts or renews a drain (peers given), or ends it (peers None)."""
    now = time.time() if now is None else now
    path = order_path(queue_dir)
    if peers is None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return None
    current = read_order_sync(queue_dir, now)
    order = DrainOrder(
        peers=list(peers), since=current.since if current else now, expires=now + ttl
    )
    # Crash-safe: a torn order file would read as "no drain" after a restart.
    replace_file_sync(path, order.to_json(), path.with_name(f".{ORDER_FILE}.{os.getpid()}.tmp"))
    return order


class Drainer:
    """The drain loop of one worker process."""

    def __init__(
        self,
        queue: Queue,
        secret: bytes | None,
        *,
        on_start: Callable[[], None],
        on_end: Callable[[], None],
        clock: Callable[[], float] = time.time,
        interval: float = 1.0,
        handover_grace: float = HANDOVER_GRACE,
    ) -> None:
        self.queue = queue
        self.secret = secret
        self.on_start = on_start
        self.on_end = on_end
        self.clock = clock
        self.interval = interval
        self.handover_grace = handover_grace
        self.order: DrainOrder | None = None
        self._clients: dict[str, HandoverClient] = {}
        self._turn = 0

    @property
    def draining(self) -> bool:
        return self.order is not None

    async def run(self) -> None:
        try:
            while True:
                try:
                    await self.step()
                except Exception:
                    log.exception("drain loop error")
                await asyncio.sleep(self.interval)
        finally:
            await self._close_clients()

    async def step(self) -> int:
        """Reads the order; while draining, one handover round. Returns messages handed over."""
        order = await self.queue.run_io(read_order_sync, self.queue.directory, self.clock())
        if order is not None and self.order is None:
            log.info(
                "draining: no new mail; handing the queue over to %s",
                ", ".join(order.peers) or "nobody (delivering only)",
            )
            self.on_start()
        elif order is None and self.order is not None:
            log.info("drain over: taking mail again")
            await self._close_clients()
            self.on_end()
        self.order = order
        if order is None or not order.peers or self.secret is None:
            return 0
        return await self.hand_over_round(order)

    async def hand_over_round(self, order: DrainOrder) -> int:
        entries = await self.queue.run_io(self.queue.scan_sync)
        fresh_too = self.clock() - order.since >= self.handover_grace
        sent = 0
        for queue_id, state, _ in sorted(entries):
            if state == ACTIVE and not fresh_too:
                continue
            claim = await self.queue.claim(queue_id, state)
            if claim is None:
                continue  # being delivered (or handed over by another worker), or gone
            try:
                if not claim.pending:  # everything done: only the removal was missing
                    await self.queue.run_io(self.queue.finish_sync, claim)
                    continue
                new_id = await self._send(order, claim, hold=state == HOLD)
                if new_id is None:
                    break  # no peer takes mail now: next round
                await self.queue.run_io(self.queue.finish_sync, claim)
                sent += 1
            finally:
                if claim.fd >= 0:
                    self.queue.release_sync(claim)
        return sent

    async def _send(self, order: DrainOrder, claim: Claim, *, hold: bool) -> str | None:
        """Tries the peers in turn, starting with the next one; None if none took it."""
        assert self.secret is not None
        peers = order.peers
        for i in range(len(peers)):
            peer = peers[(self._turn + i) % len(peers)]
            client = self._clients.get(peer)
            try:
                if client is None or not client.connected:
                    client = self._clients[peer] = HandoverClient(peer, self.secret)
                    await client.connect()
                new_id = await client.send(self.queue, claim, hold=hold)
            except HandoverError as e:
                log.warning("%s: not handed over to %s: %s", claim.queue_id, peer, e)
                metrics.HANDOVER.labels("sent", "error").inc()
                with contextlib.suppress(Exception):
                    await self._clients.pop(peer).close()
                continue
            self._turn += 1
            log.info(
                "%s: handed over to %s as %s, from=<%s>, nrcpt=%d",
                claim.queue_id,
                peer,
                new_id,
                claim.envelope.sender,
                len(claim.pending),
            )
            metrics.HANDOVER.labels("sent", "ok").inc()
            return new_id
        return None

    async def _close_clients(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for c in clients:
            await c.close()
