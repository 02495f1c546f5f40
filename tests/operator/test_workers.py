"""Relays are reconciled by bounded workers: a slow relay holds up no other,
and no relay is reconciled twice at once."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from mailrelay_operator.cluster import ClusterView, Key
from mailrelay_operator.health import Health
from mailrelay_operator.reconciler import Reconciler

SLOW, FAST = ("mail", "slow"), ("mail", "fast")


def test_a_slow_relay_delays_no_other() -> None:
    async def scenario() -> None:
        r = Reconciler(
            api=cast(Any, object()),
            view=ClusterView,
            operator_key=b"k" * 32,
            health=Health(),
            workers=2,
        )
        release = asyncio.Event()
        done: list[Key] = []
        at_once: dict[Key, int] = {SLOW: 0, FAST: 0}
        most: dict[Key, int] = {SLOW: 0, FAST: 0}

        async def reconcile(key: Key, render: bool, view: ClusterView) -> bool:
            at_once[key] += 1
            most[key] = max(most[key], at_once[key])
            if key == SLOW:
                await release.wait()  # pods that never answer
            at_once[key] -= 1
            done.append(key)
            return True

        r.reconcile_relay = reconcile  # type: ignore[method-assign]
        r.queue.mark(SLOW)
        r.queue.mark(FAST)
        await r.process()
        for _ in range(100):
            if FAST in done:
                break
            await asyncio.sleep(0.01)
        assert done == [FAST] and not r.idle
        # Marked again while its reconcile runs: it waits for that one.
        r.queue.mark(SLOW)
        await r.process()
        assert most[SLOW] == 1 and SLOW in r.queue.dirty
        release.set()
        for _ in range(100):
            if r.idle:
                break
            if r.queue.dirty:
                await r.process()
            await asyncio.sleep(0.01)
        assert done == [FAST, SLOW, SLOW] and most[SLOW] == 1
        assert r.health.passes >= 2

    asyncio.run(scenario())


def test_a_scale_down_starts_from_what_we_applied_and_pods_that_exist() -> None:
    from mailrelay_operator.reconciler import pods_in_place

    def sts(spec: int, created: int | None = None) -> dict[str, Any]:
        status = (
            {"replicas": 0} if created is None else {"replicas": created, "observedGeneration": 1}
        )
        return {"metadata": {"name": "edge"}, "spec": {"replicas": spec}, "status": status}

    # Someone raised spec.replicas to 5: not a scale-down from 5.
    assert pods_in_place(sts(5), applied=2) == 2
    # After a restart (nothing applied yet): no more than the pods created.
    assert pods_in_place(sts(5, created=3), applied=None) == 3
    assert pods_in_place(sts(3, created=3), applied=None) == 3
    assert pods_in_place(None, applied=2) is None
