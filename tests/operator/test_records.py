"""The input cache's record (records.Cached) reads as the trimmed dict it
replaces, and the render, statuses and Events made from records are those
made from the dicts."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from mailrelay_operator.children import desired_children
from mailrelay_operator.cluster import trim, trim_input
from mailrelay_operator.inputs import trim_all
from mailrelay_operator.k8s_events import Transition, event_body
from mailrelay_operator.records import Cached, DomainSpec, object_type
from mailrelay_operator.status import domain_status

from mailrelay_api.load import Inventory, load_manifests
from mailrelay_api.render import Rendered, RenderSettings, render_relay

REPO = Path(__file__).resolve().parents[2]


def domain_body(**meta: Any) -> dict[str, Any]:
    return {
        "apiVersion": "mailrelay.io/v1alpha1",
        "kind": "RelayDomain",
        "metadata": {
            "name": "d",
            "namespace": "mail",
            "uid": "u-d",
            "generation": 3,
            "creationTimestamp": "2026-12-02T12:00:00Z",
            "resourceVersion": "77",
            "managedFields": [{"manager": "kubectl"}],
            **meta,
        },
        "spec": {"domain": "d.example", "relayRef": {"name": "edge"}},
        "status": {"observedGeneration": 3},
    }


def test_a_record_reads_as_the_trimmed_dict() -> None:
    body = domain_body()
    as_dict, record = trim(body), trim_input(body)
    assert record == as_dict and as_dict == record
    assert dict(record) == as_dict
    assert dict(record["metadata"]) == as_dict["metadata"]
    assert sorted(record) == sorted(as_dict)
    assert record["metadata"]["name"] == "d" and record.get("status") == {"observedGeneration": 3}
    assert record.get("nothing", 1) == 1 and "nothing" not in record
    assert "resourceVersion" not in record["metadata"]
    assert record["metadata"].get("resourceVersion", "") == ""
    with pytest.raises(KeyError):
        record["metadata"]["labels"]
    assert (record.key, record.kind, record["apiVersion"]) == (
        ("mail", "d"),
        "RelayDomain",
        "mailrelay.io/v1alpha1",
    )


def test_absent_metadata_stays_absent() -> None:
    body = domain_body()
    for k in ("uid", "generation", "creationTimestamp", "namespace"):
        del body["metadata"][k]
    record = trim_input(body)
    assert dict(record["metadata"]) == {"name": "d", "namespace": "default"}
    assert record["metadata"].get("generation") is None and record.uid is None


def test_records_of_a_kind_share_their_type() -> None:
    a = trim_all([domain_body(name="a")], "RelayDomain")[("mail", "a")]
    b = trim_all([domain_body(name="b")], "RelayDomain")[("mail", "b")]
    assert a.type is b.type is object_type("mailrelay.io/v1alpha1", "RelayDomain")


def test_statuses_and_events_of_a_record_are_those_of_the_dict() -> None:
    body = domain_body()
    as_dict, record = trim(body), trim_input(body)
    at = "2026-12-02T12:00:05Z"
    same = domain_status(record, None, "no relay", at) == domain_status(as_dict, None, "gone", at)
    assert not same
    assert domain_status(record, None, "gone", at) == domain_status(as_dict, None, "gone", at)
    t = Transition("Warning", "RelayNotFound", "no relay", "Accepted")
    assert event_body(record, t, "op-0", 10**18) == event_body(as_dict, t, "op-0", 10**18)


def outcome(r: Rendered) -> dict[str, Any]:
    return {
        "files": r.files,
        "domains": [json.dumps(dataclasses.asdict(v)) for v in r.domains],
        "lists": [json.dumps(dataclasses.asdict(v)) for v in r.recipient_lists],
        "recipients": r.recipients,
        "claims": r.claims,
        "next_hops": r.next_hops,
    }


def as_records(inv: Inventory) -> Inventory:
    """The inventory as the operator renders it: RelayDomains and RecipientLists as records."""
    return dataclasses.replace(
        inv,
        domains=[trim_input(d) for d in inv.domains],
        recipient_lists=[trim_input(rl) for rl in inv.recipient_lists],
    )


def as_dicts(inv: Inventory) -> Inventory:
    """As the operator rendered them before: trimmed dicts."""
    return dataclasses.replace(
        inv,
        domains=[trim(d) for d in inv.domains],
        recipient_lists=[trim(rl) for rl in inv.recipient_lists],
    )


@pytest.mark.parametrize("example", ["quickstart", "multi-tenant", "two-mx"])
def test_a_render_of_records_equals_one_of_dicts(example: str) -> None:
    inv = load_manifests([REPO / "examples" / example])
    assert not inv.errors
    at = RenderSettings(now=None)
    for relay in inv.relays:
        relay = dict(relay, metadata={**relay["metadata"], "uid": "relay-uid", "generation": 1})
        records = render_relay(relay, as_records(inv), None, at)
        dicts = render_relay(relay, as_dicts(inv), None, at)
        assert outcome(records) == outcome(dicts)
        assert records.domains, example  # the example's domains are rendered
        image = "registry.test/mailrelay:pinned"
        assert desired_children(relay, records, image, cert_manager=True) == desired_children(
            relay, dicts, image, cert_manager=True
        )


def test_a_cached_record_is_not_hashable() -> None:
    """As the dict it replaces: never a key (its spec may be a new one)."""
    record = Cached(
        object_type("mailrelay.io/v1alpha1", "RecipientList"), "l", "mail", "u", 1, None, {}, {}
    )
    with pytest.raises(TypeError):
        hash(record)


def test_defaults_filled_in_place_are_those_of_a_copy() -> None:
    """trim_input fills a parsed body's defaults in place (no deep copy): the
    same record as trim's copy."""
    body = domain_body()
    body["spec"]["nextHop"] = {"host": "mx.tenant.example"}
    copied = trim(json.loads(json.dumps(body)))
    record = trim_input(body)
    assert record == copied
    assert "port" in record["spec"]["nextHop"] and "recipients" in record["spec"]


def test_a_domain_spec_reads_as_its_dict() -> None:
    body = domain_body()
    body["spec"] = {"relayRef": {"name": "edge"}, "domain": "d.example", "recipients": "any"}
    as_dict, record = trim(body), trim_input(body)
    spec = record.spec
    assert isinstance(spec, DomainSpec) and spec == as_dict["spec"] and as_dict["spec"] == spec
    assert list(spec) == list(as_dict["spec"]) and len(spec) == len(as_dict["spec"])
    assert json.dumps(dict(spec)) == json.dumps(as_dict["spec"])
    assert spec["relayRef"] is record["spec"]["relayRef"]
    assert "domain" in spec and "nothing" not in spec and spec.get("nothing", 1) == 1
    for key in ("nothing", "_keys", "get"):
        with pytest.raises(KeyError):
            spec[key]


def test_a_spec_with_other_keys_stays_a_dict() -> None:
    body = domain_body()
    body["spec"]["somethingElse"] = 1
    assert type(trim_input(body).spec) is dict


def test_a_domain_spec_has_a_slot_for_every_key_of_the_schema() -> None:
    """A key the schema gains needs its slot, or every spec falls back to a dict."""
    from mailrelay_operator.records import _DOMAIN_SPEC_KEYS

    from mailrelay_api.schema import RELAYDOMAIN_SPEC

    assert set(RELAYDOMAIN_SPEC["properties"]) == _DOMAIN_SPEC_KEYS
