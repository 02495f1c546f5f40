"""Statuses computed whole, and the cluster view the reconciler reads (pure)."""

from __future__ import annotations

from typing import Any

from mailrelay_operator import status
from mailrelay_operator.cluster import ClusterView, trim

from mailrelay_api.render import DomainVerdict
from mailrelay_api.validate import relay_warnings


def obj(
    kind: str, name: str, spec: dict[str, Any], ns: str = "mail", **meta: Any
) -> dict[str, Any]:
    return trim(
        {
            "apiVersion": "mailrelay.io/v1alpha1",
            "kind": kind,
            "metadata": {"name": name, "namespace": ns, "uid": f"uid-{name}", **meta},
            "spec": spec,
        }
    )


RELAY = obj("MailRelay", "edge", {"hostname": "mx1.example.net"}, generation=4)


def domain(name: str, relay: str = "edge") -> dict[str, Any]:
    return obj(
        "RelayDomain",
        name,
        {"domain": f"{name}.test", "relayRef": {"name": relay}, "nextHop": {"host": "h"}},
    )


def test_conditions_keep_transition_time_while_status_holds() -> None:
    first = status.conditions(
        [status.Condition(status.ConditionType.READY, False, "X")], None, 1, "T1"
    )
    again = status.conditions(
        [status.Condition(status.ConditionType.READY, False, "Y", "m")], first, 2, "T2"
    )
    assert again[0]["lastTransitionTime"] == "T1"
    assert again[0]["observedGeneration"] == 2
    flipped = status.conditions(
        [status.Condition(status.ConditionType.READY, True, "Z")], again, 2, "T3"
    )
    assert flipped[0]["lastTransitionTime"] == "T3"


def test_relay_status_is_stable_for_the_same_inputs() -> None:
    obs = status.RelayObservation(replicas=2, ready_replicas=1, domains=3)
    one = status.relay_status(RELAY, obs, at="T1")
    relay = {**RELAY, "status": one}
    two = status.relay_status(relay, obs, at="T2")
    assert one == two
    ready = {c["type"]: c for c in one["conditions"]}["Ready"]
    assert (ready["status"], ready["reason"]) == ("False", "ReplicasNotReady")
    assert one["observedGeneration"] == 4


def test_relay_status_reports_missing_cert_manager_and_recreate() -> None:
    relay = {**RELAY, "spec": {**RELAY["spec"], "tls": {"issuerRef": {"name": "le"}}}}
    obs = status.RelayObservation(cert_manager_missing=True, recreating="recreating now")
    conds = {c["type"]: c for c in status.relay_status(relay, obs)["conditions"]}
    assert conds["TLS"]["reason"] == "CertManagerMissing" and conds["TLS"]["status"] == "False"
    assert conds["Reconciled"]["reason"] == "StatefulSetRecreating"


def test_domain_status_from_verdicts() -> None:
    dom = domain("a")
    v = DomainVerdict("mail", "a", "a.test", False, "Conflict", "claimed by mail/b")
    st = status.domain_status(dom, v, at="T")
    assert st["conditions"][0] | {"lastTransitionTime": "T"} == {
        "type": "Accepted",
        "status": "False",
        "reason": "Conflict",
        "message": "claimed by mail/b",
        "observedGeneration": 0,
        "lastTransitionTime": "T",
    }
    missing = status.domain_status(dom, None, "no MailRelay mail/edge")
    assert missing["conditions"][0]["reason"] == "RelayNotFound"


def test_mx_records_only_for_hosts_with_addresses_and_capped() -> None:
    mx = [(10, "mx1.example.net"), (20, "mx2.example.net")]
    lines, omitted = status.mx_records(["b.test", "a.test"], mx, {"mx1.example.net"})
    assert lines == ["a.test. MX 10 mx1.example.net.", "b.test. MX 10 mx1.example.net."]
    assert omitted == 0
    many = [f"d{i:04d}.test" for i in range(250)]
    lines, omitted = status.mx_records(many, mx, {"mx1.example.net", "mx2.example.net"})
    assert len(lines) == 2 * status.MX_RECORDS_MAX_DOMAINS and omitted == 150
    assert status.mx_records(many, mx, set()) == ([], 0)


def test_service_address() -> None:
    lb = {"spec": {"type": "LoadBalancer"}, "status": {"loadBalancer": {}}}
    assert not status.service_has_address(lb)
    lb["status"]["loadBalancer"]["ingress"] = [{"ip": "192.0.2.1"}]
    assert status.service_has_address(lb)
    assert status.service_has_address({"spec": {"type": "ClusterIP"}})


def test_cluster_view_orphans_and_defaults() -> None:
    rl = obj("RecipientList", "staff", {"domainRef": {"name": "a"}, "addresses": ["x@a.test"]})
    stray = obj("RecipientList", "stray", {"domainRef": {"name": "nope"}})
    view = ClusterView(
        relays={("mail", "edge"): RELAY},
        domains={("mail", "a"): domain("a"), ("mail", "lost"): domain("lost", relay="gone")},
        lists={("mail", "staff"): rl, ("mail", "stray"): stray},
    )
    assert [d["metadata"]["name"] for d in view.orphan_domains()] == ["lost"]
    assert [(r["metadata"]["name"], reason) for r, reason, _ in view.orphan_lists()] == [
        ("stray", "DomainNotFound")
    ]
    assert view.relay_of_list(rl) == ("mail", "edge")
    inv = view.inventory()
    assert inv.domains[0]["spec"]["recipients"] == "listed"  # defaults applied
    assert RELAY["spec"]["replicas"] == 2


def test_reconciled_carries_the_relays_warnings() -> None:
    """What `mailrelay validate` warns about a MailRelay, the operator says in
    its Reconciled condition (the RecipientLists' warnings are in theirs)."""
    site = {"zone": "bl.example.org", "returnCodes": ["127.0.0.[9..2]"]}
    spec = {**RELAY["spec"], "postscreen": {"dnsbl": {"sites": [site]}}}
    relay = {**RELAY, "spec": spec}
    obs = status.RelayObservation(
        warnings=[f"{w.field}: {w.message}" for w in relay_warnings(relay)]
    )
    [cond] = [c for c in status.relay_status(relay, obs)["conditions"] if c["type"] == "Reconciled"]
    assert (cond["status"], cond["reason"]) == ("True", "Applied")
    assert cond["message"] == (
        "all children are up to date; warning: spec.postscreen.dnsbl.sites[0].returnCodes[0]: "
        "'127.0.0.[9..2]' has a range a..b with a > b: it matches nothing and the relay "
        "ignores this filter"
    )
    plain = status.relay_status(RELAY, status.RelayObservation())["conditions"]
    assert {c["type"]: c["message"] for c in plain}["Reconciled"] == "all children are up to date"
