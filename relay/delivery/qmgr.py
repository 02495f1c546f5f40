"""Delivery: Postfix's qmgr for one relay process.

Takes messages from the queue, sends each recipient group to its domain's
next hop (relay.delivery.connections), records per-recipient results, defers with
Postfix's backoff, expires and returns mail as DSNs (relay.delivery.dsn).

- `wake(id)`: the server calls it right after `commit()`; the message is
  delivered at once, from memory when small, under the lock taken at receipt.
- `run()`: recovers the queue at start, then watches it: messages left by a
  crash, deferred ones that are due, `mailrelay queue flush`.
- Time comes from `clock` (unix seconds): tests fast-forward it to expire
  and retry mail without waiting. Only the polling pause is real time.

Retry: next attempt at now + clamp(age, minBackoff, maxBackoff)
(qmgr_active.c). Expiry is checked only after a failed attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import ssl
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from relay import logbuffer, metrics
from relay.config import NextHop, RelayConfig
from relay.delivery import dsn, notices
from relay.delivery.connections import ConnectionPool
from relay.delivery.nexthop import SMTP_PORT
from relay.delivery.transaction import (
    BOUNCED,
    SENT,
    RecipientResult,
)
from relay.delivery.transaction import DEFERRED as RESULT_DEFERRED
from relay.dns import Resolver
from relay.queue.format import (
    ACTIVE,
    DEFERRED,
    HOLD,
    Claim,
    Envelope,
    QueueState,
    id_time,
)
from relay.queue.gauges import count_queue
from relay.queue.store import Queue

log = logging.getLogger("relay.delivery")

Clock = Callable[[], float]


# A deferred _Due.at this small (but > 0) means "as its file's mtime says".
MTIME_DECIDES = 1e-9

# A message this process committed is handed to delivery at once (wake());
# one still waiting after this long lost its hand-off and is delivered by the scan.
FRESH_HANDOFF_GRACE = 60.0


def backoff(age: float, minimum: float, maximum: float) -> float:
    """Postfix's retry delay: the message's age, clamped."""
    return min(max(age, minimum), maximum)


def _format_delay(seconds: float) -> str:
    seconds = max(0.0, seconds)
    return f"{seconds:.2f}" if seconds < 100 else str(int(seconds))


@dataclass
class _Due:
    state: QueueState  # active or deferred
    at: float


class Delivery:
    def __init__(
        self,
        queue: Queue,
        config_getter: Callable[[], RelayConfig],
        resolver: Resolver,
        clock: Clock = time.time,
        *,
        poll_interval: float = 1.0,
        rescan_interval: float = 30.0,
        max_messages: int = 200,
        destination_concurrency: int = 20,
        connect_timeout: float = 30.0,
        command_timeout: float = 300.0,
        verify_context: ssl.SSLContext | None = None,
        source_address: str | None = None,
        smtp_port: int = SMTP_PORT,
    ) -> None:
        self.queue = queue
        self.config_getter = config_getter
        self.resolver = resolver
        self.clock = clock
        self.poll_interval = poll_interval
        self.rescan_interval = rescan_interval
        self.max_messages = max_messages
        self.smtp_port = smtp_port  # of sender domains' MX hosts, for DSNs (tests move it)
        self.pool = ConnectionPool(
            resolver,
            concurrency=destination_concurrency,
            connect_timeout=connect_timeout,
            command_timeout=command_timeout,
            verify_context=verify_context,
            source_address=source_address,
        )
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._due: dict[str, _Due] = {}
        self._flushed_in_attempt: set[str] = set()  # under way as a flush came
        self._stopping = False
        self._recovered = False
        self._flush_seen = 0.0
        self._flush_checked = float("-inf")
        self._last_scan = float("-inf")
        self._wakeup: asyncio.Event | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._force_next_scan = False

    # -- the server's entry points -----------------------------------------

    def wake(self, queue_id: str) -> None:
        """Delivers a just-committed message now (call after `commit()` returned)."""
        if self._stopping or queue_id in self._inflight:
            return
        claim = self.queue.take_fresh(queue_id)
        if claim is None:  # not ours (or already taken): let the scan find it
            self._due[queue_id] = _Due(ACTIVE, 0.0)
            self._poke()
            return
        self._start(queue_id, self._deliver_claim(claim))

    async def run(self) -> None:
        """Delivers until `stop()`: recovery, then due messages, flushes, rescans."""
        self._loop_task = asyncio.current_task()
        self._wakeup = asyncio.Event()
        await self.recover()
        self._flush_seen = await self.queue.run_io(self.queue.flush_marker_mtime_sync)
        while not self._stopping:
            try:
                await self._tick()
            except Exception:  # a bad file or a full disk must not stop delivery
                log.exception("delivery loop error")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), self.poll_interval)
            self._wakeup.clear()

    async def stop(self, grace: float = 10.0) -> None:
        """Stops taking messages; waits up to `grace` for deliveries under way.

        run() sees the stop at its next turn and returns; only if it has not
        within `grace` (a scan stuck on a slow disk) is it cancelled. (Cancelled
        at once, it raised CancelledError to whoever awaited it, or not, by
        where its loop was: Python 3.11's wait_for may swallow a cancel.)"""
        self._stopping = True
        self._poke()
        loop_task = self._loop_task
        if loop_task is not None and loop_task is not asyncio.current_task():
            await asyncio.wait({loop_task}, timeout=grace)
            if not loop_task.done():
                loop_task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await loop_task
        tasks = list(self._inflight.values())
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for t in pending:  # interrupted: the message stays queued as it was
                t.cancel()
            if pending:
                await asyncio.wait(pending)
        await self.pool.close()

    # -- for tests and the admin command -----------------------------------

    async def recover(self) -> None:
        removed = await self.queue.run_io(self.queue.recover_sync)
        for path in removed:
            log.info("removed unfinished queue file %s", path)
        self._recovered = True

    async def process_due(self, *, rescan: bool = True) -> None:
        """One pass now: rescan the queue, deliver everything due, wait for it."""
        if not self._recovered:
            await self.recover()
        if rescan:
            await self._rescan(force_all=False)
        self._start_due()
        await self.idle()

    async def idle(self) -> None:
        """Waits until no delivery is under way (DSNs they queue included)."""
        while self._inflight:
            await asyncio.gather(*list(self._inflight.values()), return_exceptions=True)
        await self.queue.settle()

    def flush(self) -> None:
        """Makes every deferred message due now (in-process `queue flush`)."""
        for due in self._due.values():
            due.at = 0.0
        self._last_scan = float("-inf")
        self._force_next_scan = True
        self._poke()

    # -- scheduling ----------------------------------------------------------

    def _poke(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

    async def _tick(self) -> None:
        # The flush marker is polled once per poll interval, not at every
        # wake-up (a pool job each time would cost more than the delivery).
        flush_mark = self._flush_seen
        if time.monotonic() - self._flush_checked >= self.poll_interval:
            self._flush_checked = time.monotonic()
            flush_mark = await self.queue.run_io(self.queue.flush_marker_mtime_sync)
        force = self._force_next_scan or flush_mark != self._flush_seen
        if flush_mark != self._flush_seen:
            log.info("queue flush requested")
        self._flush_seen = flush_mark
        self._force_next_scan = False
        if force or time.monotonic() - self._last_scan >= self.rescan_interval:
            await self._rescan(force_all=force)
            if not force:
                await self.recover()  # stale incoming files of crashed workers
            self.pool.prune()
        self._start_due()

    async def _rescan(self, *, force_all: bool) -> None:
        entries = await self.queue.run_io(self.queue.scan_sizes_sync)
        self._last_scan = time.monotonic()
        now = self.clock()
        seen = set()
        fresh = set(self.queue.fresh_ids())
        for queue_id, state, mtime, _size in entries:
            seen.add(queue_id)
            if queue_id in fresh and time.time() - id_time(queue_id) > FRESH_HANDOFF_GRACE:
                # Committed here but never handed to wake() (a lost hand-off):
                # our own claim keeps every scan away, so take it from here.
                claim = self.queue.take_fresh(queue_id)
                if claim is not None and queue_id not in self._inflight:
                    log.warning("%s: not handed to delivery after commit; delivering now", queue_id)
                    self._start(queue_id, self._deliver_claim(claim))
                continue
            if state == HOLD or queue_id in self._inflight or queue_id in fresh:
                self._due.pop(queue_id, None)
                if force_all and queue_id in self._inflight:
                    self._flushed_in_attempt.add(queue_id)
                continue
            at = 0.0 if state == ACTIVE or force_all else mtime
            self._due[queue_id] = _Due(state, at)
        for queue_id in list(self._due):
            if queue_id not in seen:
                del self._due[queue_id]
        try:
            volume = await self.queue.run_io(self.queue.volume_sync)
        except OSError:
            volume = None
        count_queue(entries, now, volume)

    def _start_due(self) -> None:
        if self._stopping:
            return
        now = self.clock()
        for queue_id, due in sorted(self._due.items(), key=lambda kv: kv[1].at):
            if len(self._inflight) >= self.max_messages:
                break
            if due.at > now:
                continue
            if queue_id in self._inflight:
                continue  # its attempt is ending: started when it has (done() pokes)
            del self._due[queue_id]
            self._start(queue_id, self._claim_and_deliver(queue_id, due))

    def _start(self, queue_id: str, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._inflight[queue_id] = task

        def done(t: asyncio.Task[None]) -> None:
            if self._inflight.get(queue_id) is t:
                del self._inflight[queue_id]
                self._flushed_in_attempt.discard(queue_id)
            if not t.cancelled() and t.exception() is not None:
                log.error("%s: delivery failed", queue_id, exc_info=t.exception())
            if self._due:  # a freed slot matters only to messages waiting for one
                self._poke()

        task.add_done_callback(done)

    def _due_later(self, queue_id: str, at: float) -> None:
        """A message just deferred is due at `at`. But if a flush came while its
        attempt was ending (the flush's scan skipped it, under way), its file's
        mtime decides: `mailrelay queue flush` may have found it in deferred/
        already and made it due now (_claim_and_deliver reads the mtime)."""
        flushed = queue_id in self._flushed_in_attempt
        self._due[queue_id] = _Due(DEFERRED, MTIME_DECIDES if flushed else at)

    async def _claim_and_deliver(self, queue_id: str, due: _Due) -> None:
        claim = await self.queue.claim(queue_id, due.state)
        if claim is None:
            return  # another process has it, or it is gone
        if due.state == DEFERRED and due.at > 0:
            # Our scan may be old: the file's mtime is the truth.
            at = await self.queue.run_io(self.queue.next_attempt_sync, claim)
            if at > self.clock():
                self.queue.release_sync(claim)
                self._due_later(queue_id, at)
                return
        await self._deliver_claim(claim)

    # -- one message ---------------------------------------------------------

    async def _deliver_claim(self, claim: Claim) -> None:
        try:
            await self._attempt(claim)
        except Exception as e:
            # Whatever went wrong, the message waits its backoff like any
            # deferred one (Postfix defers on an internal error) instead of
            # being retried by every scan, or lost.
            log.exception("%s: delivery attempt failed", claim.queue_id)
            if claim.fd >= 0:
                await self._defer_after_error(claim, f"4.3.0 local error in delivery: {e!r}")
        finally:
            if claim.fd >= 0:  # cancelled or failed midway: the message stays as it was
                self.queue.release_sync(claim)

    async def _defer_after_error(self, claim: Claim, reason: str) -> None:
        config = self.config_getter()
        now = self.clock()
        age = now - claim.envelope.arrival
        claim.progress.attempts += 1
        claim.progress.last_reason = reason
        at = now + backoff(age, config.queue.min_backoff, config.queue.max_backoff)
        try:
            state = await self.queue.run_io(self.queue.defer_sync, claim, at)
        except OSError:
            log.exception("%s: cannot defer", claim.queue_id)
            return
        if state == DEFERRED:
            self._due_later(claim.queue_id, at)

    async def _attempt(self, claim: Claim) -> None:
        config = self.config_getter()
        env = claim.envelope
        pending = claim.pending
        unrouted: list[RecipientResult] = []
        groups: dict[NextHop, list[str]] = {}
        for rcpt in pending:
            hop = self._next_hop(config, claim, rcpt)
            if hop is None:  # removed from the configuration since: wait for it
                unrouted.append(
                    RecipientResult(
                        rcpt,
                        RESULT_DEFERRED,
                        "4.3.5 no next hop: the recipient domain is not a relay domain here",
                        "4.3.5",
                        smtp_reply=False,
                    )
                )
            else:
                groups.setdefault(hop, []).append(rcpt)
        self._log_and_count(claim, unrouted)
        results = list(unrouted)
        chunks = functools.partial(self.queue.read_chunks, claim)
        utf8_headers = False
        if groups and env.params.smtputf8:  # does the message need SMTPUTF8 (Postfix)?
            headers = await self.queue.run_io(self.queue.read_headers_sync, claim)
            utf8_headers = not headers.isascii()
        if len(groups) == 1:  # the common case: no extra tasks
            [(hop, rcpts)] = groups.items()
            group = await self._deliver_timed(config, hop, env, rcpts, chunks, utf8_headers)
            results += group
            self._log_and_count(claim, group)
        elif groups:
            await self._deliver_groups(claim, config, groups, chunks, results, utf8_headers)
        await self._conclude(claim, config, results)

    async def _deliver_timed(
        self,
        config: RelayConfig,
        hop: NextHop,
        env: Envelope,
        rcpts: list[str],
        chunks: Callable[[], AsyncIterator[bytes]],
        utf8_headers: bool,
    ) -> list[RecipientResult]:
        """One attempt at one next hop, its time in mailrelay_delivery_seconds
        (under the first recipient's domain: domains with the same next hop
        are delivered together)."""
        started = time.monotonic()
        group = await self.pool.deliver(
            hop,
            env.sender,
            rcpts,
            chunks,
            local_hostname=config.hostname,
            params=env.params,
            utf8_headers=utf8_headers,
        )
        domain = metric_domain(config, rcpts[0])
        metrics.child(metrics.DELIVERY_SECONDS, domain).observe(time.monotonic() - started)
        return group

    def _next_hop(self, config: RelayConfig, claim: Claim, rcpt: str) -> NextHop | None:
        """The recipient domain's next hop; for our own DSN to a sender outside
        the relay domains, the sender domain's MX (bounces.delivery: mx)."""
        name = rcpt.rpartition("@")[2]
        domain = config.domain_of(name)
        if domain is not None:
            return domain.next_hop
        if claim.envelope.client == dsn.CLIENT and config.bounces.delivery == "mx" and name:
            return NextHop(name.lower().rstrip("."), self.smtp_port, mx_lookup=True, tls="may")
        return None

    async def _deliver_groups(
        self,
        claim: Claim,
        config: RelayConfig,
        groups: dict[NextHop, list[str]],
        chunks: Callable[[], AsyncIterator[bytes]],
        results: list[RecipientResult],
        utf8_headers: bool,
    ) -> None:
        """Several next hops at once; what is done is saved as each finishes."""
        env = claim.envelope
        tasks = [
            asyncio.ensure_future(
                self._deliver_timed(config, hop, env, rcpts, chunks, utf8_headers)
            )
            for hop, rcpts in groups.items()
        ]
        try:
            for finished in asyncio.as_completed(tasks):
                group = await finished
                results += group
                self._log_and_count(claim, group)
                for r in group:
                    if r.kind == SENT:
                        claim.progress.done[r.recipient] = SENT
                if any(r.kind == SENT for r in group):
                    # other groups still running: keep what is done across a crash
                    await self.queue.run_io(self.queue.save_progress_sync, claim)
        finally:
            for t in tasks:
                t.cancel()

    def _log_and_count(self, claim: Claim, results: list[RecipientResult]) -> None:
        delay = _format_delay(self.clock() - claim.envelope.arrival)
        config = self.config_getter()
        for r in results:
            logbuffer.info(
                log,
                "%s: to=<%s>, relay=%s, delay=%s, dsn=%s, status=%s (%s)",
                claim.queue_id,
                r.recipient,
                r.relay,
                delay,
                r.status,
                r.kind,
                r.reply,
            )
            domain = metric_domain(config, r.recipient)
            if r.kind == SENT:
                metrics.child(metrics.DELIVERED, domain).inc()
            elif r.kind == BOUNCED:
                metrics.child(metrics.BOUNCED, domain).inc()
            else:
                metrics.child(metrics.DEFERRED, domain).inc()

    async def _conclude(
        self, claim: Claim, config: RelayConfig, results: list[RecipientResult]
    ) -> None:
        env = claim.envelope
        now = self.clock()
        failures = [notices.failure(r, claim) for r in results if r.kind == BOUNCED]
        deferred = [r for r in results if r.kind == RESULT_DEFERRED]
        progress = claim.progress
        if deferred:
            progress.attempts += 1
            progress.last_reason = deferred[0].reply
            for r in deferred:
                progress.reasons[r.recipient] = r.reply
            # Mail from the null sender (bounces) has its own, shorter
            # lifetime: Postfix's bounce_queue_lifetime.
            lifetime = config.queue.lifetime if env.sender else config.bounces.lifetime
            if now >= env.arrival + lifetime:
                for r in deferred:
                    outcome, notify = _expiry_outcome(config, claim, r.recipient)
                    log.info(
                        "%s: to=<%s>, relay=%s, delay=%s, dsn=%s, status=expired, %s (%s)",
                        claim.queue_id,
                        r.recipient,
                        r.relay,
                        _format_delay(now - env.arrival),
                        r.status,
                        outcome,
                        r.reply,
                    )
                    if notify:
                        failures.append(notices.failure(r, claim, expired=True))
                    else:
                        progress.done[r.recipient] = "expired"
                metrics.EXPIRED.inc()
                deferred = []
        for r in results:
            if r.kind == SENT:
                progress.done[r.recipient] = SENT
                if env.client == dsn.CLIENT:
                    self._dsn_sent(claim, config, r)
        for reports in (notices.wanted(claim, failures), notices.relayed(claim, results)):
            if reports:
                dsn_id = await notices.return_to_sender(
                    self.queue, claim, config, reports, self.clock()
                )
                if dsn_id is not None:
                    self.wake(dsn_id)
        for f in failures:
            progress.done[f.recipient] = "expired" if f.expired else BOUNCED
        if deferred:
            at = now + backoff(
                now - env.arrival, config.queue.min_backoff, config.queue.max_backoff
            )
            state = await self.queue.run_io(self.queue.defer_sync, claim, at)
            if state == DEFERRED:
                self._due_later(claim.queue_id, at)
        else:
            self.queue.finish_later(claim)
            log.debug("%s: removed", claim.queue_id)

    def _dsn_sent(self, claim: Claim, config: RelayConfig, r: RecipientResult) -> None:
        route = "relay_domain" if config.domain_of(r.recipient.rpartition("@")[2]) else "mx"
        log.info(
            "%s: delivery status notification to <%s> sent (relay=%s, %s)",
            claim.queue_id,
            r.recipient,
            r.relay,
            r.reply,
        )
        metrics.child(metrics.DSN, "sent", route).inc()


def _expiry_outcome(config: RelayConfig, claim: Claim, recipient: str) -> tuple[str, bool]:
    """What the expiry line says of a recipient, and whether it goes on to
    notices (which return it, or drop it with its reason and metric)."""
    env = claim.envelope
    if not env.sender:  # its "notice" is only the log line saying it is dropped
        return "not returned (null sender)", True
    if config.queue.dsn_on_expiry == "none":  # no backscatter from expired mail
        return "not returned (dsnOnExpiry: none)", False
    rcpt = env.params.recipient(recipient)
    if not rcpt.wants("FAILURE"):  # notices.wanted counts it; Postfix's qmgr
        # says "returned to sender" here too, though its bounce daemon sends nothing
        return f"not returned (NOTIFY={','.join(rcpt.notify)})", True
    return "returned to sender", True


def metric_domain(config: RelayConfig, recipient: str) -> str:
    """The `domain` label of a recipient: its relay domain, else one value for
    all others (never a name the sender chose: the series stay bounded)."""
    domain = recipient.rpartition("@")[2].lower().rstrip(".")
    return domain if config.domain_of(domain) is not None else metrics.OTHER_DOMAIN
