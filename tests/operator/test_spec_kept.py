"""Status-only events keep the cached spec (the render cache shares its strings)."""

from __future__ import annotations

from typing import Any

from mailrelay_operator.inputs import Cache, store, trim_all
from mailrelay_operator.records import Cached, object_type


def rl(generation: int | None, addresses: list[str], uid: str | None = "u1") -> Cached:
    """A RecipientList as the input watch hands it over (trimmed)."""
    kind = object_type("mailrelay.io/v1alpha1", "RecipientList")
    return Cached(kind, "staff", "mail", uid, generation, None, {"addresses": addresses}, {})


def test_a_status_event_keeps_the_spec_objects() -> None:
    cache: Cache = {}
    first = rl(1, ["a@x.example"])
    store(cache, first, deleted=False)
    again = rl(1, ["a@x.example"])
    again.status = {"conditions": [{"type": "Accepted"}]}
    store(cache, again, deleted=False)
    held = cache[("mail", "staff")]
    assert held["status"] == again["status"]
    assert held["spec"] is first["spec"]


def test_a_new_generation_or_object_replaces_the_spec() -> None:
    cache: Cache = {}
    store(cache, rl(1, ["a@x.example"]), deleted=False)
    store(cache, rl(2, ["b@x.example"]), deleted=False)
    assert cache[("mail", "staff")]["spec"]["addresses"] == ["b@x.example"]
    store(cache, rl(2, ["c@x.example"], uid="u2"), deleted=False)
    assert cache[("mail", "staff")]["spec"]["addresses"] == ["c@x.example"]


def test_objects_without_identity_always_replace() -> None:
    cache: Cache = {}
    store(cache, rl(None, ["a@x.example"], uid=None), deleted=False)
    store(cache, rl(None, ["b@x.example"], uid=None), deleted=False)
    assert cache[("mail", "staff")]["spec"]["addresses"] == ["b@x.example"]


def test_equal_statuses_are_held_once() -> None:
    """100,000 RelayDomains with the same verdict: one status dict in the cache."""
    status = {"observedGeneration": 1, "conditions": [{"type": "Accepted", "status": "True"}]}
    docs = [
        {
            "apiVersion": "mailrelay.io/v1alpha1",
            "kind": "RelayDomain",
            "metadata": {"name": f"d{i}", "namespace": "mail", "uid": f"u{i}"},
            "spec": {"domain": f"d{i}.example", "relayRef": {"name": "edge"}},
            "status": {**status, "conditions": [dict(c) for c in status["conditions"]]},
        }
        for i in range(3)
    ]
    held = list(trim_all(docs, "RelayDomain").values())
    assert held[0]["status"] == status
    assert held[0]["status"] is held[1]["status"] is held[2]["status"]
    assert held[0]["spec"] is not held[1]["spec"]


def test_trimmed_objects_share_their_spec_keys() -> None:
    """Each watch event is parsed on its own: its keys are new strings, which
    the cache must not keep one set of per object."""
    import json

    def parsed(name: str) -> dict[str, Any]:
        text = json.dumps(
            {
                "apiVersion": "mailrelay.io/v1alpha1",
                "kind": "RelayDomain",
                "metadata": {"name": name, "namespace": "mail", "uid": name},
                "spec": {"domain": f"{name}.example", "relayRef": {"name": "edge"}},
            }
        )
        return dict(json.loads(text))

    one, two = trim_all([parsed("a")], "RelayDomain"), trim_all([parsed("b")], "RelayDomain")
    keys_one = list(one[("mail", "a")]["spec"])
    keys_two = list(two[("mail", "b")]["spec"])
    assert keys_one == keys_two
    assert all(a is b for a, b in zip(keys_one, keys_two, strict=True))


def test_a_later_event_of_the_same_object_takes_its_strings() -> None:
    """Name and uid are held once however often the object comes back."""
    cache: Cache = {}
    first = rl(1, ["a@x.example"], uid="".join(["u", "1"]))
    store(cache, first, deleted=False)
    again = rl(2, ["b@x.example"], uid="".join(["u", "1"]))
    again.key = ("mail", "".join(["st", "aff"]))
    assert again["metadata"]["uid"] is not first["metadata"]["uid"]
    store(cache, again, deleted=False)
    held = cache[("mail", "staff")]["metadata"]
    assert held["uid"] is first["metadata"]["uid"]
    assert held["name"] is first["metadata"]["name"]
    assert cache[("mail", "staff")]["spec"]["addresses"] == ["b@x.example"]
    # The cache's key is the record's own (namespace, name): one tuple, not two.
    (key,) = cache
    assert key is cache[key].key


def test_the_many_kinds_are_cached_without_their_resource_version() -> None:
    from mailrelay_operator.cluster import trim

    meta = {"name": "a", "namespace": "mail", "uid": "u", "generation": 1, "resourceVersion": "9"}
    body = {"apiVersion": "mailrelay.io/v1alpha1", "metadata": meta, "spec": {}}
    assert "resourceVersion" not in trim({**body, "kind": "RelayDomain"})["metadata"]
    assert trim({**body, "kind": "MailRelay"})["metadata"]["resourceVersion"] == "9"
