"""Anvil's counters shared by a relay's worker processes, so limits hold per relay.

Postfix runs one anvil(8) server that every smtpd asks; our workers share a
table in anonymous shared memory instead (made by the supervisor before it
forks the workers), so a check costs a lock and a few struct reads, not a round
trip. With N workers a client gets limits.connectionsPerClient connections
from the relay, not N times that.

The table: SLOTS fixed slots, open addressing on a 64-bit hash of the client
IP, PROBES slots looked at per lookup. A slot holds the rate window (start,
connection rate, messages, recipients, shared by all workers) and one
connection count per worker, so the supervisor can forget a dead worker's
connections (`forget_worker`) without touching the others'. A slot is reused
when it has no open connection and its window is over; when every probed slot
holds connections, the client is counted in this worker alone (logged once):
a flood of distinct addresses cannot lock anyone out, it only weakens the
limit for the addresses that did not fit.

One multiprocessing lock guards the table; every Anvil event holds it for the
whole read-modify-write. time.monotonic() is one clock for all processes.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import multiprocessing
import struct
import time
from collections.abc import Callable
from typing import Any

from relay.config import Limits
from relay.smtpd.anvil import Anvil, ClientCounters
from relay.smtpd.session import Reply, Session

log = logging.getLogger("mailrelay.anvil")

MAX_WORKERS = 64
SLOTS = 16384  # ~2.6 MB; open connections are bounded far below this by sockets
PROBES = 16
# key, window start, connection rate, messages, recipients, padding, connections per worker
_HEAD = struct.Struct("<QdIIII")
_CONNS = struct.Struct(f"<{MAX_WORKERS}H")
SLOT_SIZE = _HEAD.size + _CONNS.size


def client_key(ip: str) -> int:
    """A nonzero 64-bit key for a client address (0 marks an empty slot)."""
    return int.from_bytes(hashlib.blake2b(ip.encode(), digest_size=8).digest(), "little") or 1


class SharedCounters:
    """The table in shared memory; make it before forking the workers."""

    def __init__(self, slots: int = SLOTS) -> None:
        self.slots = slots
        self.memory = mmap.mmap(-1, slots * SLOT_SIZE)  # anonymous, MAP_SHARED
        self.lock = multiprocessing.Lock()

    def forget_worker(self, worker: int) -> None:
        """Zeroes a dead worker's connection counts (its sockets are gone)."""
        offset = _HEAD.size + 2 * worker
        with self.lock:
            for slot in range(self.slots):
                struct.pack_into("<H", self.memory, slot * SLOT_SIZE + offset, 0)


class _SharedClient:
    """One slot as ClientCounters; used under the table's lock only."""

    __slots__ = ("_base", "_memory", "_worker")

    def __init__(self, memory: mmap.mmap, slot: int, worker: int) -> None:
        self._memory = memory
        self._base = slot * SLOT_SIZE
        self._worker = worker

    def _head(self) -> tuple[Any, ...]:
        return _HEAD.unpack_from(self._memory, self._base)

    def _set(self, index: int, value: float) -> None:
        head = list(self._head())
        head[index] = value
        _HEAD.pack_into(self._memory, self._base, *head)

    @property
    def window_start(self) -> float:
        return float(self._head()[1])

    @window_start.setter
    def window_start(self, value: float) -> None:
        self._set(1, value)

    @property
    def connection_rate(self) -> int:
        return int(self._head()[2])

    @connection_rate.setter
    def connection_rate(self, value: int) -> None:
        self._set(2, min(value, 0xFFFFFFFF))

    @property
    def messages(self) -> int:
        return int(self._head()[3])

    @messages.setter
    def messages(self, value: int) -> None:
        self._set(3, min(value, 0xFFFFFFFF))

    @property
    def recipients(self) -> int:
        return int(self._head()[4])

    @recipients.setter
    def recipients(self, value: int) -> None:
        self._set(4, min(value, 0xFFFFFFFF))

    @property
    def connections(self) -> int:
        """Open connections from this client, across all workers."""
        return sum(_CONNS.unpack_from(self._memory, self._base + _HEAD.size))

    @connections.setter
    def connections(self, value: int) -> None:
        # Only this worker's column changes, by the difference asked for.
        offset = self._base + _HEAD.size + 2 * self._worker
        (mine,) = struct.unpack_from("<H", self._memory, offset)
        mine = max(0, min(0xFFFF, mine + value - self.connections))
        struct.pack_into("<H", self._memory, offset, mine)


class SharedAnvil(Anvil):
    """Anvil whose counters live in SharedCounters; one per worker process."""

    def __init__(
        self,
        counters: SharedCounters,
        worker: int,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 <= worker < MAX_WORKERS:
            raise ValueError(f"worker index {worker} outside 0..{MAX_WORKERS - 1}")
        super().__init__(clock=clock)
        self.counters = counters
        self.worker = worker
        self._overflow_logged = False

    def connect(self, session: Session, limits: Limits, hostname: str) -> Reply | None:
        with self.counters.lock:
            return super().connect(session, limits, hostname)

    def message(self, session: Session, limits: Limits) -> Reply | None:
        with self.counters.lock:
            return super().message(session, limits)

    def recipient(self, session: Session, limits: Limits) -> Reply | None:
        with self.counters.lock:
            return super().recipient(session, limits)

    def disconnect(self, client_ip: str) -> None:
        with self.counters.lock:
            slot = self._find(client_key(client_ip))
            if slot is not None:
                client = _SharedClient(self.counters.memory, slot, self.worker)
                client.connections = max(0, client.connections - 1)
                return
        super().disconnect(client_ip)  # counted here alone (the table was full)

    def _find(self, key: int) -> int | None:
        memory, slots = self.counters.memory, self.counters.slots
        for i in range(PROBES):
            slot = (key + i) % slots
            if struct.unpack_from("<Q", memory, slot * SLOT_SIZE)[0] == key:
                return slot
        return None

    def _touch(self, ip: str, limits: Limits) -> ClientCounters:
        """The client's slot (taking a free or stale one), under the lock."""
        memory, slots = self.counters.memory, self.counters.slots
        key, now, unit = client_key(ip), self.clock(), limits.rate_time_unit
        reusable = None
        for i in range(PROBES):
            slot = (key + i) % slots
            client = _SharedClient(memory, slot, self.worker)
            slot_key = struct.unpack_from("<Q", memory, slot * SLOT_SIZE)[0]
            if slot_key == key:
                if now - client.window_start >= unit:
                    client.window_start = now
                    client.connection_rate = client.messages = client.recipients = 0
                return client
            stale = slot_key == 0 or (client.connections == 0 and now - client.window_start >= unit)
            if reusable is None and stale:
                reusable = slot
        if reusable is None:
            if not self._overflow_logged:
                log.warning("anvil table full near [%s]: counted per worker", ip)
                self._overflow_logged = True
            self.evicted += 1
            return super()._touch(ip, limits)
        base = reusable * SLOT_SIZE
        memory[base : base + SLOT_SIZE] = bytes(SLOT_SIZE)
        _HEAD.pack_into(memory, base, key, now, 0, 0, 0, 0)
        return _SharedClient(memory, reusable, self.worker)
