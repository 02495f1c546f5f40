"""Merging a fresh listing into the RelayDomain/RecipientList cache (pure)."""

from __future__ import annotations

from typing import Any

from mailrelay_operator.inputs import merge_listing


def obj(name: str, version: int, ns: str = "mail") -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": ns, "resourceVersion": str(version)}}


def test_listing_keeps_newer_events_and_drops_missed_deletions() -> None:
    cache = {
        ("mail", "newer"): obj("newer", 120),  # changed after the listing was taken
        ("mail", "gone"): obj("gone", 90),  # deleted; the DELETED event was missed
        ("mail", "born"): obj("born", 130),  # created after the listing
        ("other", "elsewhere"): obj("elsewhere", 10, "other"),
    }
    fresh = {
        ("mail", "newer"): obj("newer", 100),
        ("mail", "stale"): obj("stale", 95),
    }
    merge_listing(cache, fresh, "110", "mail")
    assert cache[("mail", "newer")]["metadata"]["resourceVersion"] == "120"
    assert ("mail", "gone") not in cache
    assert ("mail", "born") in cache
    assert ("mail", "stale") in cache
    assert ("other", "elsewhere") in cache  # another namespace's listing decides it


def test_listing_across_all_namespaces() -> None:
    cache = {("a", "x"): obj("x", 5, "a")}
    merge_listing(cache, {}, "10", None)
    assert cache == {}
