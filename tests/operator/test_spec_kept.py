"""Status-only events keep the cached spec (the render cache shares its strings)."""

from __future__ import annotations

from typing import Any

from mailrelay_operator.inputs import store


def rl(generation: int | None, addresses: list[str], uid: str | None = "u1") -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "staff", "namespace": "mail", "resourceVersion": "7"}
    if uid is not None:
        meta["uid"] = uid
    if generation is not None:
        meta["generation"] = generation
    return {"metadata": meta, "spec": {"addresses": addresses}, "status": {}}


def test_a_status_event_keeps_the_spec_objects() -> None:
    cache: dict[Any, dict[str, Any]] = {}
    first = rl(1, ["a@x.example"])
    store(cache, first, deleted=False)
    again = rl(1, ["a@x.example"])
    again["status"] = {"conditions": [{"type": "Accepted"}]}
    store(cache, again, deleted=False)
    held = cache[("mail", "staff")]
    assert held["status"] == again["status"]
    assert held["spec"] is first["spec"]


def test_a_new_generation_or_object_replaces_the_spec() -> None:
    cache: dict[Any, dict[str, Any]] = {}
    store(cache, rl(1, ["a@x.example"]), deleted=False)
    store(cache, rl(2, ["b@x.example"]), deleted=False)
    assert cache[("mail", "staff")]["spec"]["addresses"] == ["b@x.example"]
    store(cache, rl(2, ["c@x.example"], uid="u2"), deleted=False)
    assert cache[("mail", "staff")]["spec"]["addresses"] == ["c@x.example"]


def test_objects_without_identity_always_replace() -> None:
    cache: dict[Any, dict[str, Any]] = {}
    store(cache, rl(None, ["a@x.example"], uid=None), deleted=False)
    store(cache, rl(None, ["b@x.example"], uid=None), deleted=False)
    assert cache[("mail", "staff")]["spec"]["addresses"] == ["b@x.example"]
