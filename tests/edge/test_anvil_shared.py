"""Anvil's counters shared by worker processes (relay.smtpd.anvil_shared): the limits
hold per relay, across real forked processes; a dead worker's connections are
forgotten; a full table degrades to per-worker counting, never to refusing."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

from mrtest.peers import RawClient
from mrtest.relayproc import RelayProcess, next_loopback, write_manifests

from relay.config import Limits
from relay.smtpd.anvil import Anvil, ClientCounters
from relay.smtpd.anvil_shared import SharedAnvil, SharedCounters
from relay.smtpd.session import Session


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def session(ip: str) -> Session:
    return Session(client_ip=ip, trusted=False)


LIMITS = Limits(connections_per_client=3, connection_rate_per_client=0)


def _connect_in_child(counters: SharedCounters, worker: int, ip: str, times: int) -> None:
    anvil = SharedAnvil(counters, worker)
    refused = [anvil.connect(session(ip), LIMITS, "mx.test") for _ in range(times)]
    os._exit(0 if all(r is None for r in refused) else 1)


def test_connections_count_across_worker_processes() -> None:
    counters = SharedCounters()
    fork = multiprocessing.get_context("fork")
    child = fork.Process(target=_connect_in_child, args=(counters, 1, "192.0.2.7", 2))
    child.start()
    child.join(30)
    assert child.exitcode == 0  # two connections in worker 1, under the limit of 3
    here = SharedAnvil(counters, 0)
    assert here.connect(session("192.0.2.7"), LIMITS, "mx.test") is None  # the third
    reply = here.connect(session("192.0.2.7"), LIMITS, "mx.test")
    assert reply is not None and str(reply).startswith("421 4.7.0 mx.test Error: too many")
    here.disconnect("192.0.2.7")  # the refused one ends
    # Worker 1 died with its two connections open: forgetting it frees them.
    counters.forget_worker(1)
    assert here.connect(session("192.0.2.7"), LIMITS, "mx.test") is None
    assert here.connect(session("192.0.2.7"), LIMITS, "mx.test") is None
    assert here.connect(session("192.0.2.7"), LIMITS, "mx.test") is not None


def test_rates_are_shared_and_windowed() -> None:
    counters, clock = SharedCounters(), FakeClock()
    limits = Limits(message_rate_per_client=2, recipient_rate_per_client=0)
    first, second = SharedAnvil(counters, 0, clock=clock), SharedAnvil(counters, 1, clock=clock)
    s = session("198.51.100.4")
    assert first.message(s, limits) is None and second.message(s, limits) is None
    assert str(first.message(s, limits)) == "450 4.7.1 Error: too much mail from 198.51.100.4"
    clock.now += limits.rate_time_unit  # a new window for everyone
    assert second.message(s, limits) is None


def test_a_full_table_counts_per_worker_and_refuses_nobody() -> None:
    counters, clock = SharedCounters(slots=4), FakeClock()
    anvil = SharedAnvil(counters, 0, clock=clock)
    one = Limits(connections_per_client=1, connection_rate_per_client=0)
    # Four addresses with an open connection each fill every slot ...
    for i in range(4):
        assert anvil.connect(session(f"203.0.113.{i}"), one, "mx") is None
    # ... a fifth is still limited, in this worker's own table.
    assert anvil.connect(session("203.0.113.99"), one, "mx") is None
    assert anvil.connect(session("203.0.113.99"), one, "mx") is not None
    assert anvil.evicted >= 1
    anvil.disconnect("203.0.113.99")
    anvil.disconnect("203.0.113.99")
    for i in range(4):
        anvil.disconnect(f"203.0.113.{i}")
    evicted = anvil.evicted
    # Slots without connections whose window is over are taken again.
    clock.now += one.rate_time_unit
    assert anvil.connect(session("203.0.113.50"), one, "mx") is None
    assert anvil.connect(session("203.0.113.50"), one, "mx") is not None
    assert anvil.evicted == evicted  # counted in the shared table this time


async def test_a_two_worker_relay_limits_per_relay(tmp_path: Path) -> None:
    """connectionsPerClient 3 with two worker processes: the fourth connection is
    refused whichever worker the kernel hands it to (it used to be 3 per worker)."""
    manifests = write_manifests(
        tmp_path / "manifests",
        next_hop=("127.0.0.1", 9),
        domains={"example.com": "any"},
        spec={"limits": {"connectionsPerClient": 3}},
    )
    with RelayProcess(manifests, tmp_path, workers=2) as relay:
        relay.wait_for_log("ready: listening on", count=2)
        client = next_loopback()
        replies, clients = [], []
        for _ in range(8):
            c = await RawClient(*relay.address, local=client, timeout=10).__aenter__()
            clients.append(c)
            replies.append(await c.read_reply())
        for c in clients:
            await c.__aexit__(None, None, None)
    assert sum(r.startswith("220") for r in replies) == 3, replies
    assert sum(r.startswith("421 4.7.0") for r in replies) == 5, replies


def test_both_stores_hand_out_the_same_counters() -> None:
    """Anvil's logic runs unchanged on a shared slot: _touch returns ClientCounters
    from either store (mypy checks the attributes' types, this their presence and
    that a slot reads back what was written)."""
    clock = FakeClock()
    local = Anvil(clock=clock)._touch("192.0.2.1", LIMITS)
    shared = SharedAnvil(SharedCounters(slots=64), 0, clock=clock)
    with shared.counters.lock:
        slot = shared._touch("192.0.2.1", LIMITS)
        assert isinstance(local, ClientCounters) and isinstance(slot, ClientCounters)
        slot.connections, slot.messages, slot.recipients, slot.connection_rate = 2, 3, 4, 5
        again = shared._touch("192.0.2.1", LIMITS)
    got = (again.connections, again.messages, again.recipients, again.connection_rate)
    assert got == (2, 3, 4, 5)
    assert again.window_start == clock.now
