"""Recipient verification (recipients: verify): Postfix verify(8)'s cache.

The RCPT restriction (relay.smtpd) asks `Verifier.verify(address, domain)`;
an answer comes from the cache or from one probe of the domain's next hop
(`Probe`, given by the worker: relay.delivery.verify probes over the
delivery's connection pool). This module sits between the two packages, so
that relay.smtpd and relay.delivery never import each other.

- Shared across sessions: one probe in flight per address in a process;
  every other session asking for it waits for that probe.
- Shared across the pod's worker processes: the cache is a folder on the
  queue volume (one small JSON file per address, named by its hash, written
  crash-safely by relay.durable), so it also survives a restart as
  verify(8)'s address_verify_map does. A probe in flight is announced with
  a byte-range lock (fcntl) on one lock file, at an offset from the
  address's hash: the other processes wait for its entry instead of probing
  again; a crashed prober's lock goes away with it.
- A session waits at most `wait` seconds (Postfix smtpd waits ~6 s, then
  answers "Address verification in progress"); the probe goes on and fills
  the cache for the sender's retry.
- Probes are rate-limited per next hop (a token bucket per process): a
  dictionary attack on a verify domain must not become one on the primary.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import fcntl
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from relay.config import Domain, NextHop
from relay.durable import replace_file_sync

log = logging.getLogger("relay.verify")

# The cache's folder in the queue directory.
VERIFY_FOLDER = "verify"
# An unreachable next hop (or a 4xx) is remembered this long: the primary
# is not asked again by every RCPT while it is down, and is asked again soon
# once it is back.
UNREACHABLE_TTL = 60.0
# How long a session waits for a probe (Postfix: address_verify_poll_count
# x address_verify_poll_delay = 3 x 3s).
PROBE_WAIT = 6.0
# How long a process waits for another process's probe before it gives up.
PROBE_TIMEOUT = 120.0
# Probes per second to one next hop, and the burst allowed (per process).
PROBE_RATE = 10.0
PROBE_BURST = 20
# Expired entries are removed from the folder this often (per process).
SWEEP_INTERVAL = 3600.0
_LOCK_FILE = ".probes.lock"
_LOCK_RANGE = 1 << 40  # offsets of the per-address byte-range locks
_POLL = 0.05


class Status(enum.StrEnum):
    OK = "ok"  # the next hop accepted the RCPT
    REJECTED = "rejected"  # it refused the RCPT with 5xx
    UNREACHABLE = "unreachable"  # no definite answer: 4xx, no connection, rate limit


@dataclass(frozen=True)
class ProbeResult:
    status: Status
    reply: str  # the next hop's reply, or why there was none
    probed: bool = False  # this answer came from a probe made for this request


class RecipientVerifier(Protocol):
    """What the RCPT restriction needs (Verifier, or a stand-in in tests)."""

    async def verify(self, address: str, domain: Domain) -> ProbeResult: ...


class Probe(Protocol):
    """One probe of `address` at `hop` (MAIL FROM:<>, RCPT TO, RSET); never raises."""

    async def __call__(self, address: str, hop: NextHop) -> ProbeResult: ...


@dataclass
class _Bucket:
    tokens: float
    at: float  # time.monotonic() of the last refill


class Verifier:
    def __init__(
        self,
        directory: Path,
        probe: Probe,
        *,
        clock: Callable[[], float] = time.time,
        wait: float = PROBE_WAIT,
        rate: float = PROBE_RATE,
        burst: int = PROBE_BURST,
    ) -> None:
        self.directory = directory
        self.probe = probe
        self.clock = clock
        self.wait = wait
        self.rate = rate
        self.burst = burst
        self.probes = 0  # made by this process (tests, logs)
        self._inflight: dict[str, asyncio.Task[ProbeResult]] = {}
        self._buckets: dict[NextHop, _Bucket] = {}
        self._lock_fd = -1
        self._last_sweep = clock()

    def close(self) -> None:
        for task in self._inflight.values():
            task.cancel()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    async def verify(self, address: str, domain: Domain) -> ProbeResult:
        """What the next hop of `domain` says about `address`, cached."""
        key = address.lower()
        self._maybe_sweep()
        cached = await asyncio.to_thread(self._read_sync, key)
        if cached is not None:
            return cached
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.ensure_future(self._probe_once(key, address, domain))
            self._inflight[key] = task
            task.add_done_callback(lambda t: self._probe_done(key, t))
        try:
            return await asyncio.wait_for(asyncio.shield(task), self.wait)
        except TimeoutError:
            return ProbeResult(Status.UNREACHABLE, "Address verification in progress")

    def _probe_done(self, key: str, task: asyncio.Task[ProbeResult]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled() and task.exception() is not None:
            log.error("probe of <%s> failed", key, exc_info=task.exception())

    # -- one probe per address across the pod ---------------------------------

    async def _probe_once(self, key: str, address: str, domain: Domain) -> ProbeResult:
        offset = int.from_bytes(_digest(key)[:8], "big") % _LOCK_RANGE
        deadline = time.monotonic() + PROBE_TIMEOUT
        while not await asyncio.to_thread(self._try_lock_sync, offset):
            # Another process probes this address: its answer lands in the cache.
            if time.monotonic() > deadline:
                return ProbeResult(Status.UNREACHABLE, "Address verification in progress")
            await asyncio.sleep(_POLL)
            cached = await asyncio.to_thread(self._read_sync, key)
            if cached is not None:
                return cached
        try:
            cached = await asyncio.to_thread(self._read_sync, key)
            if cached is not None:  # written between our read and our lock
                return cached
            if not self._take_token(domain.next_hop):
                return ProbeResult(Status.UNREACHABLE, "too many verification probes, try later")
            self.probes += 1
            probed = await self.probe(address, domain.next_hop)
            # One line: the reply goes into our own SMTP reply at RCPT.
            result = ProbeResult(probed.status, " ".join(probed.reply.split()))
            await asyncio.to_thread(self._write_sync, key, result, self._ttl(result, domain))
            log.info("verify <%s>: %s (%s)", address, result.status, result.reply)
            return ProbeResult(result.status, result.reply, probed=True)
        finally:
            await asyncio.to_thread(self._unlock_sync, offset)

    def _ttl(self, result: ProbeResult, domain: Domain) -> float:
        if result.status == Status.OK:
            return domain.verify.positive_ttl
        if result.status == Status.REJECTED:
            return domain.verify.negative_ttl
        return UNREACHABLE_TTL

    def _take_token(self, hop: NextHop) -> bool:
        now = time.monotonic()
        bucket = self._buckets.setdefault(hop, _Bucket(float(self.burst), now))
        bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.at) * self.rate)
        bucket.at = now
        if bucket.tokens < 1:
            return False
        bucket.tokens -= 1
        return True

    # -- the folder (in threads: never on the event loop) ---------------------

    def _path(self, key: str) -> Path:
        return self.directory / _digest(key).hex()[:32]

    def _read_sync(self, key: str) -> ProbeResult | None:
        try:
            doc = json.loads(self._path(key).read_bytes())
            if doc["address"] != key or float(doc["expires"]) <= self.clock():
                return None
            return ProbeResult(Status(doc["status"]), str(doc["reply"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:  # a torn or foreign file
            log.warning("verify cache entry for <%s> unreadable: %s", key, e)
            return None

    def _write_sync(self, key: str, result: ProbeResult, ttl: float) -> None:
        doc = {
            "address": key,
            "status": str(result.status),
            "reply": result.reply,
            "expires": self.clock() + ttl,
        }
        path = self._path(key)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            replace_file_sync(path, json.dumps(doc).encode(), tmp)
        except OSError as e:  # a full disk: the answer still holds for this request
            log.warning("verify cache entry for <%s> not written: %s", key, e)

    def _lock_fd_sync(self) -> int:
        if self._lock_fd < 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(self.directory / _LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        return self._lock_fd

    def _try_lock_sync(self, offset: int) -> bool:
        try:
            fcntl.lockf(self._lock_fd_sync(), fcntl.LOCK_EX | fcntl.LOCK_NB, 1, offset)
        except BlockingIOError:
            return False
        except OSError as e:  # no lock to be had (a full or read-only volume): probe anyway
            log.warning("verify probe lock unavailable: %s", e)
        return True

    def _unlock_sync(self, offset: int) -> None:
        if self._lock_fd >= 0:
            with contextlib.suppress(OSError):
                fcntl.lockf(self._lock_fd, fcntl.LOCK_UN, 1, offset)

    def _maybe_sweep(self) -> None:
        if self.clock() - self._last_sweep < SWEEP_INTERVAL:
            return
        self._last_sweep = self.clock()
        task = asyncio.ensure_future(asyncio.to_thread(self._sweep_sync))
        task.add_done_callback(lambda t: None if t.cancelled() else t.exception())

    def _sweep_sync(self) -> None:
        """Removes expired entries (a dictionary attack leaves many)."""
        now = self.clock()
        with contextlib.suppress(FileNotFoundError), os.scandir(self.directory) as it:
            for entry in it:
                if entry.name.startswith("."):
                    continue
                try:
                    with open(entry.path, "rb") as f:
                        expires = float(json.loads(f.read())["expires"])
                    if expires <= now:
                        os.unlink(entry.path)
                except (OSError, ValueError, KeyError, TypeError):
                    continue


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
