"""A MailRelay the API server stored without checking it (created before a CEL
rule existed) is refused by the operator itself: Reconciled=False, InvalidSpec,
naming the field, and nothing of the running relay is touched."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from mailrelay_operator.cluster import ClusterView, trim
from mailrelay_operator.health import Health
from mailrelay_operator.reconciler import Reconciler
from mrtest.objects import mailrelay

KEY = ("mail", "edge")


def stored(spec: dict[str, Any]) -> dict[str, Any]:
    """As the API server returns it, with a last good pass's status."""
    body = mailrelay("edge", "mail", uid="u-1", generation=2, resourceVersion="7")
    body["spec"].update(spec)
    body["status"] = {
        "observedGeneration": 1,
        "configHash": "abc",
        "acceptedDomains": 3,
        "conditions": [
            {"type": "Reconciled", "status": "True", "reason": "Applied", "message": "ok",
             "observedGeneration": 1, "lastTransitionTime": "2026-12-01T00:00:00Z"},
            {"type": "Ready", "status": "True", "reason": "AllReplicasReady", "message": "2/2",
             "observedGeneration": 1, "lastTransitionTime": "2026-12-01T00:00:00Z"},
        ],
    }  # fmt: skip
    return trim(body)


def reconcile(relay: dict[str, Any]) -> tuple[bool, list[dict[str, Any]]]:
    written: list[dict[str, Any]] = []

    class Api:
        writes = 0

        def __getattr__(self, name: str) -> Any:
            raise AssertionError(f"the API was called ({name}) for an invalid spec")

    async def scenario() -> bool:
        r = Reconciler(api=cast(Any, Api()), view=ClusterView, operator_key=b"k" * 32,
                       health=Health(), workers=1)  # fmt: skip

        async def write(obj: dict[str, Any], new: dict[str, Any]) -> None:
            written.append(new)

        r.statuses.write = write  # type: ignore[method-assign]
        view = ClusterView(relays={KEY: relay})
        return await r.reconcile_relay(KEY, True, view)

    return asyncio.run(scenario()), written


def test_an_out_of_range_cidr_is_refused_by_name_and_nothing_applied() -> None:
    applied, written = reconcile(stored({"network": {"mynetworks": ["999.1.1.1/40"]}}))
    assert not applied
    (new,) = written
    reconciled, ready = new["conditions"]
    assert reconciled["type"] == "Reconciled" and reconciled["status"] == "False"
    assert reconciled["reason"] == "InvalidSpec"
    assert "spec.network.mynetworks" in reconciled["message"], reconciled
    assert reconciled["observedGeneration"] == 2
    # What the last good pass wrote stays: the relay still runs that config.
    assert ready["reason"] == "AllReplicasReady"
    assert new["configHash"] == "abc" and new["acceptedDomains"] == 3
