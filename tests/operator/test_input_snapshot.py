"""A pass's view of the input cache (inputs.Snapshot): the cache as it was when
the pass began, as a copy would be, while events change the cache meanwhile;
the statuses queued after a render go with the objects the render saw."""

from __future__ import annotations

import gc
from typing import Any

from mailrelay_operator.cluster import trim_input
from mailrelay_operator.inputs import InputCache
from mailrelay_operator.records import Cached

NS = "mail"


def rd(name: str, generation: int = 1) -> Cached:
    body: dict[str, Any] = {
        "apiVersion": "mailrelay.io/v1alpha1",
        "kind": "RelayDomain",
        "metadata": {
            "name": name,
            "namespace": NS,
            "uid": f"uid-{name}",
            "generation": generation,
            "creationTimestamp": "2026-01-01T00:00:00Z",
        },
        "spec": {"domain": f"{name}.example", "relayRef": {"name": "edge"}},
    }
    return trim_input(body)


def test_a_snapshot_reads_as_a_copy_taken_then() -> None:
    inputs = InputCache()
    for name in ("a", "b", "c"):
        inputs.store("RelayDomain", rd(name), False)
    snap = inputs.snapshot("RelayDomain")
    copy = dict(inputs.domains)
    # Meanwhile: one changed (twice), one deleted, one added then deleted, one added.
    inputs.store("RelayDomain", rd("a", 2), False)
    inputs.store("RelayDomain", rd("a", 3), False)
    inputs.store("RelayDomain", rd("b"), True)
    inputs.store("RelayDomain", rd("x"), False)
    inputs.store("RelayDomain", rd("x"), True)
    inputs.store("RelayDomain", rd("d"), False)
    later = inputs.snapshot("RelayDomain")
    assert dict(snap) == copy and len(snap) == 3 and sorted(snap) == sorted(copy)
    assert snap[(NS, "a")] is copy[(NS, "a")] and snap[(NS, "a")]["metadata"]["generation"] == 1
    assert snap.get((NS, "d")) is None and (NS, "x") not in snap
    assert list(snap.values()) == [copy[k] for k in snap]
    inputs.store("RelayDomain", rd("c", 2), False)
    # A later snapshot starts from the cache as it was then.
    assert sorted(later) == [(NS, "a"), (NS, "c"), (NS, "d")] and len(later) == 3
    assert later[(NS, "a")]["metadata"]["generation"] == 3
    assert later[(NS, "c")]["metadata"]["generation"] == 1
    assert inputs.domains[(NS, "c")]["metadata"]["generation"] == 2


def test_a_snapshot_let_go_costs_the_cache_nothing() -> None:
    inputs = InputCache()
    inputs.store("RelayDomain", rd("a"), False)
    snap = inputs.snapshot("RelayDomain")
    lists = inputs.snapshot("RecipientList")
    assert len(lists) == 0
    del snap, lists
    gc.collect()
    inputs.store("RelayDomain", rd("a", 2), False)
    assert inputs.snapshots["RelayDomain"] == []  # dropped at the store
    assert inputs.domains[(NS, "a")]["metadata"]["generation"] == 2
