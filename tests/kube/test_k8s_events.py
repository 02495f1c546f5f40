"""Events of condition transitions (k8s_events.py), against the operator on a real kube-apiserver.

A second tenant's RelayDomain for a domain the first holds is refused
(Conflict): the second tenant sees a Warning Event in its own namespace that
says what its status says and names nothing of the first tenant; a resync
posts nothing again.

A MailRelay stored under an older CRD (before a CEL rule existed) that the
operator refuses is one Warning InvalidSpec naming the field, and a Normal
Applied once corrected; nothing else (kopf) posts Events about it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

import pytest
from mailrelay_operator.k8s_events import REPORTING_CONTROLLER
from mrtest.kube import Kube, RunningOperator, condition, wait_for

pytestmark = pytest.mark.kube

RELAY_NS, A, B = "events-relay", "events-a", "events-b"
HOLDER = "alpha-holder"  # tenant A's object: its name must not reach tenant B


def relay_domain(name: str) -> str:
    return json.dumps(
        {
            "apiVersion": "mailrelay.io/v1alpha1",
            "kind": "RelayDomain",
            "metadata": {"name": name},
            "spec": {
                "domain": "held.example",
                "relayRef": {"name": "shared", "namespace": RELAY_NS},
                "nextHop": {"host": "mx.customer.example"},
                "recipients": "any",
            },
        }
    )


def accepted_reason(kube: Kube, ns: str, name: str, reason: str) -> dict[str, Any] | None:
    c = condition(kube.get("relaydomain", name, ns), "Accepted")
    return c if c.get("reason") == reason else None


def events_about(kube: Kube, ns: str, name: str) -> list[dict[str, Any]]:
    return [
        e
        for e in kube.list("events.events.k8s.io", ns)
        if e.get("regarding", {}).get("name") == name
        and e.get("reportingController") == REPORTING_CONTROLLER
    ]


def test_a_refused_claim_is_a_warning_in_the_claimant_s_namespace_only(
    kube: Kube, operator: RunningOperator
) -> None:
    for ns in (RELAY_NS, A, B):
        kube.kubectl("create", "namespace", ns)
        kube.kubectl("label", "namespace", ns, "events-test=yes")
    grant = {
        "namespaces": {"from": "Selector", "selector": {"matchLabels": {"events-test": "yes"}}},
        "domains": ["held.example"],
    }
    relay = {
        "apiVersion": "mailrelay.io/v1alpha1",
        "kind": "MailRelay",
        "metadata": {"name": "shared", "namespace": RELAY_NS},
        "spec": {"hostname": "mx.shared.example", "replicas": 1,
                 "allowedDomains": {"grants": [grant], "releaseAfter": "1h"}},
    }  # fmt: skip
    kube.apply(json.dumps(relay))
    kube.apply(relay_domain(HOLDER), "-n", A)
    wait_for("A holds held.example", lambda: accepted_reason(kube, A, HOLDER, "Accepted"))
    kube.apply(relay_domain("squatter"), "-n", B)
    refused = wait_for("B refused", lambda: accepted_reason(kube, B, "squatter", "Conflict"))

    [event] = wait_for("B's Event", lambda: events_about(kube, B, "squatter"))
    assert (event["type"], event["reason"]) == ("Warning", "Conflict")
    assert event["note"] == refused["message"]  # what the status says, nothing more
    assert event["regarding"]["kind"] == "RelayDomain"
    text = json.dumps(event)
    assert A not in text and HOLDER not in text and "related" not in event
    # What docs/operations.md tells users to run finds it (core/v1's view of it).
    mine = f"--field-selector=reportingComponent={REPORTING_CONTROLLER}"
    listed = kube.kubectl("get", "events", "-n", B, "-o", "json", mine)
    assert [e["reason"] for e in json.loads(listed)["items"]] == ["Conflict"]
    # Nothing of B went to A's side (which may have had RelayNotFound, then Accepted).
    for seen in kube.list("events.events.k8s.io", A):
        assert B not in json.dumps(seen) and "squatter" not in json.dumps(seen)

    # A resync (all caches forgotten, the repeat window too) writes no status: no Event.
    operator.call(operator.reconciler.recorder.recent.clear)
    operator.full_pass(resync=True)
    operator.full_pass(resync=True)
    assert len(events_about(kube, B, "squatter")) == 1


# Twice the same mx hostname (DNS names have no case): the CRD's CEL refuses it,
# and the operator refuses it should an older CRD have stored it.
MX_TWICE = [
    {"hostname": "mx2.example.net", "priority": 10},
    {"hostname": "MX2.example.net", "priority": 20},
]
MX_RULE = "/spec/versions/0/schema/openAPIV3Schema/properties/spec/properties/mx"


@contextlib.contextmanager
def crd_without_the_mx_rule(kube: Kube) -> Iterator[None]:
    """The MailRelay CRD as before its mx hostname rule, then as it is again."""
    crd = "customresourcedefinition/mailrelays.mailrelay.io"
    rules = json.loads(kube.kubectl("get", crd, "-o", "json"))
    for key in MX_RULE.split("/")[1:]:
        rules = rules[int(key) if key.isdigit() else key]
    rules = rules["x-kubernetes-validations"]

    def patch(op: dict[str, Any]) -> None:
        kube.kubectl("patch", crd, "--type=json", "-p", json.dumps([op]))

    patch({"op": "remove", "path": f"{MX_RULE}/x-kubernetes-validations"})
    try:
        yield
    finally:
        patch({"op": "add", "path": f"{MX_RULE}/x-kubernetes-validations", "value": rules})


def reconciled_reason(kube: Kube, ns: str, name: str, reason: str) -> dict[str, Any] | None:
    c = condition(kube.get("mailrelay", name, ns), "Reconciled")
    return c if c.get("reason") == reason else None


def test_an_invalid_relay_spec_is_one_warning_naming_the_field(
    kube: Kube, operator: RunningOperator
) -> None:
    ns, name = "events-invalid", "picky"
    kube.kubectl("create", "namespace", ns)

    def relay(mx: list[dict[str, Any]]) -> str:
        spec = {"hostname": "mx.picky.example", "replicas": 1, "mx": mx}
        meta = {"name": name, "namespace": ns}
        return json.dumps({"apiVersion": "mailrelay.io/v1alpha1", "kind": "MailRelay",
                           "metadata": meta, "spec": spec})  # fmt: skip

    refused_now = kube.kubectl_run("apply", "--dry-run=server", "-f", "-", stdin=relay(MX_TWICE))
    assert "each mx hostname may appear only once" in refused_now.stderr
    with crd_without_the_mx_rule(kube):  # the API server takes it once the CRD serves no rule
        wait_for("the CRD without the rule", lambda: kube.kubectl_run(
            "apply", "--server-side", "--field-manager=mailrelay-tests", "-f", "-",
            stdin=relay(MX_TWICE)).returncode == 0)  # fmt: skip
    refused = wait_for("InvalidSpec", lambda: reconciled_reason(kube, ns, name, "InvalidSpec"))
    assert refused["message"].startswith("spec.mx: ")

    [event] = wait_for("the Warning", lambda: events_about(kube, ns, name))
    assert (event["type"], event["reason"]) == ("Warning", "InvalidSpec")
    assert event["note"] == refused["message"]
    stored = kube.get("mailrelay", name, ns)
    assert stored is not None
    assert event["regarding"]["kind"] == "MailRelay"
    assert (event["regarding"]["namespace"], event["regarding"]["uid"]) == (
        ns,
        stored["metadata"]["uid"],
    )

    kube.apply(relay([MX_TWICE[0], {"hostname": "mx3.example.net", "priority": 20}]))
    wait_for("Applied", lambda: reconciled_reason(kube, ns, name, "Applied"))
    wait_for("the recovery", lambda: len(events_about(kube, ns, name)) == 2)
    seen = sorted((e["type"], e["reason"]) for e in kube.list("events.events.k8s.io", ns))
    # Ours only: the Ready condition's rollout is no news, and kopf posts none.
    assert seen == [("Normal", "Applied"), ("Warning", "InvalidSpec")]
