"""Recipient verification's prober and cache (relay.delivery.verify,
relay.verify_cache): probes, TTLs, the unreachable cases, one probe per
address across sessions and across processes."""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from mrtest.delivery_helpers import FakeClock, Sink, free_port

from relay.config import Domain, NextHop, VerifyPolicy
from relay.delivery.connections import ConnectionPool
from relay.delivery.verify import Prober
from relay.dns import Resolver
from relay.verify_cache import SWEEP_INTERVAL, UNREACHABLE_TTL, Status, Verifier

POLICY = VerifyPolicy(positive_ttl=3600, negative_ttl=600, when_unreachable="defer")


def domain_at(port: int, host: str = "127.0.0.2") -> Domain:
    return Domain("example.com", NextHop(host, port, tls="none"), "verify", verify=POLICY)


@pytest.fixture
async def pool() -> AsyncIterator[ConnectionPool]:
    p = ConnectionPool(Resolver(), connect_timeout=5, command_timeout=10)
    yield p
    await p.close()


def verifier_for(pool: ConnectionPool, tmp_path: Path, clock: FakeClock, **kw: Any) -> Verifier:
    return Verifier(tmp_path / "verify", Prober(pool, lambda: "relay.test"), clock=clock, **kw)


async def test_probe_accepts_rejects_and_caches_within_ttl(
    sink_factory: Any, pool: ConnectionPool, tmp_path: Path, clock: FakeClock
) -> None:
    sink: Sink = await sink_factory(
        "127.0.0.2", rcpt_replies={"nobody@example.com": "550 5.1.1 <nobody>: User unknown"}
    )
    verifier = verifier_for(pool, tmp_path, clock)
    domain = domain_at(sink.port)
    ok = await verifier.verify("Someone@example.com", domain)
    assert ok.status == Status.OK and ok.probed
    no = await verifier.verify("nobody@example.com", domain)
    assert no.status == Status.REJECTED
    assert "said: 550 5.1.1 <nobody>: User unknown (in reply to RCPT TO command)" in no.reply
    assert sink.messages == [] and sink.transactions == 0  # never DATA
    # within the TTLs: answered from the cache (case-insensitively), no probe
    assert (await verifier.verify("someone@EXAMPLE.com", domain)).status == Status.OK
    assert (await verifier.verify("nobody@example.com", domain)).status == Status.REJECTED
    assert verifier.probes == 2 and len(sink.rcpts_asked) == 2
    clock.advance(601)  # the negative entry expires, the positive one holds
    assert (await verifier.verify("nobody@example.com", domain)).probed
    assert not (await verifier.verify("someone@example.com", domain)).probed
    clock.advance(3000)
    assert (await verifier.verify("someone@example.com", domain)).probed
    assert verifier.probes == 4
    verifier.close()


async def test_unreachable_next_hop_and_4xx_are_unreachable_briefly_cached(
    sink_factory: Any, pool: ConnectionPool, tmp_path: Path, clock: FakeClock
) -> None:
    verifier = verifier_for(pool, tmp_path, clock)
    down = domain_at(free_port("127.0.0.3"), "127.0.0.3")
    result = await verifier.verify("a@example.com", down)
    assert result.status == Status.UNREACHABLE and "Connection refused" in result.reply
    assert not (await verifier.verify("a@example.com", down)).probed
    clock.advance(UNREACHABLE_TTL + 1)
    assert (await verifier.verify("a@example.com", down)).probed
    sink = await sink_factory("127.0.0.2", rcpt_replies={"b@example.com": "451 4.3.0 try later"})
    later = await verifier.verify("b@example.com", domain_at(sink.port))
    assert later.status == Status.UNREACHABLE and "451 4.3.0 try later" in later.reply
    refused = await sink_factory("127.0.0.2")

    async def no_null_sender(*_: Any) -> str:
        return "550 5.7.1 null sender refused"

    refused.handle_MAIL = no_null_sender  # type: ignore[attr-defined]
    mail = await verifier.verify("c@example.com", domain_at(refused.port))
    assert mail.status == Status.UNREACHABLE  # says nothing about the address
    verifier.close()


async def test_ten_sessions_asking_for_one_address_make_one_probe(
    sink_factory: Any, pool: ConnectionPool, tmp_path: Path, clock: FakeClock
) -> None:
    sink = await sink_factory("127.0.0.2")
    sink.rcpt_delay = 0.3  # all ten ask while the probe is under way
    verifier = verifier_for(pool, tmp_path, clock)
    results = await asyncio.gather(
        *(verifier.verify("one@example.com", domain_at(sink.port)) for _ in range(10))
    )
    assert {r.status for r in results} == {Status.OK}
    assert sink.rcpts_asked == ["one@example.com"] and verifier.probes == 1
    verifier.close()


async def test_a_slow_probe_answers_in_progress_and_still_fills_the_cache(
    sink_factory: Any, pool: ConnectionPool, tmp_path: Path, clock: FakeClock
) -> None:
    sink = await sink_factory("127.0.0.2")
    sink.rcpt_delay = 0.5
    verifier = verifier_for(pool, tmp_path, clock, wait=0.05)
    first = await verifier.verify("slow@example.com", domain_at(sink.port))
    assert first.status == Status.UNREACHABLE
    assert first.reply == "Address verification in progress"
    while verifier.probes == 0 or "slow@example.com" in verifier._inflight:
        await asyncio.sleep(0.05)
    assert (await verifier.verify("slow@example.com", domain_at(sink.port))).status == Status.OK
    assert len(sink.rcpts_asked) == 1
    verifier.close()


async def test_probes_are_rate_limited_per_next_hop(
    sink_factory: Any, pool: ConnectionPool, tmp_path: Path, clock: FakeClock
) -> None:
    sink = await sink_factory("127.0.0.2")
    verifier = verifier_for(pool, tmp_path, clock, rate=0.001, burst=3)
    results = [await verifier.verify(f"u{i}@example.com", domain_at(sink.port)) for i in range(5)]
    assert [r.status for r in results] == [Status.OK] * 3 + [Status.UNREACHABLE] * 2
    assert "too many verification probes" in results[3].reply
    assert len(sink.rcpts_asked) == 3
    verifier.close()


_WORKER = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from relay.config import Domain, NextHop, VerifyPolicy
    from relay.delivery.connections import ConnectionPool
    from relay.process import eventloop
    from relay.delivery.verify import Prober
    from relay.dns import Resolver
    from relay.verify_cache import Verifier

    async def main() -> None:
        pool = ConnectionPool(Resolver(), connect_timeout=5, command_timeout=10)
        verifier = Verifier(Path(sys.argv[1]), Prober(pool, lambda: "relay.test"), wait=30)
        hop = NextHop("127.0.0.2", int(sys.argv[2]), tls="none")
        domain = Domain("example.com", hop, "verify", verify=VerifyPolicy())
        results = await asyncio.gather(
            *(verifier.verify("shared@example.com", domain) for _ in range(5))
        )
        print(",".join(r.status for r in results), verifier.probes)
        verifier.close()
        await pool.close()

    eventloop.run(main())  # the workers' loop
    """
)


async def test_worker_processes_share_the_cache_and_the_probe(
    sink_factory: Any, tmp_path: Path
) -> None:
    sink = await sink_factory("127.0.0.2")
    sink.rcpt_delay = 1.5  # the other processes ask while the first one probes
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _WORKER,
            str(tmp_path / "verify"),
            str(sink.port),
            stdout=asyncio.subprocess.PIPE,
        )
        for _ in range(3)
    ]
    outputs = [(await p.communicate())[0].decode().split() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0]
    assert all(out[0] == ",".join(["ok"] * 5) for out in outputs)
    assert sorted(int(out[1]) for out in outputs) == [0, 0, 1]
    assert sink.rcpts_asked == ["shared@example.com"]


async def test_expired_entries_are_swept_from_the_folder(
    sink_factory: Any, pool: ConnectionPool, tmp_path: Path, clock: FakeClock
) -> None:
    sink = await sink_factory("127.0.0.2", rcpt_replies={"gone@example.com": "550 5.1.1 no"})
    verifier = verifier_for(pool, tmp_path, clock)
    policy = VerifyPolicy(positive_ttl=2 * SWEEP_INTERVAL, negative_ttl=600)
    domain = dataclasses.replace(domain_at(sink.port), verify=policy)
    await verifier.verify("gone@example.com", domain)
    await verifier.verify("kept@example.com", domain)
    entries = [p for p in (tmp_path / "verify").iterdir() if not p.name.startswith(".")]
    assert len(entries) == 2
    clock.advance(SWEEP_INTERVAL)
    await verifier.verify("kept@example.com", domain)  # starts the sweep
    for _ in range(3000):  # the sweep runs in a thread (up to 60 s on a loaded machine)
        if len([p for p in (tmp_path / "verify").iterdir() if not p.name.startswith(".")]) == 1:
            break
        await asyncio.sleep(0.02)
    else:
        raise AssertionError("the expired entry was not swept")
    kept = await verifier.verify("kept@example.com", domain)
    assert kept.status == Status.OK and not kept.probed
    verifier.close()
