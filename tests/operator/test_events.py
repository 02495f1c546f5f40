"""Watch events -> the work queue (mailrelay_operator.events), without a cluster."""

from __future__ import annotations

from typing import Any

from mailrelay_operator import naming
from mailrelay_operator.apply import ChildApplier, owned_fields
from mailrelay_operator.cluster import ClusterView, trim_input
from mailrelay_operator.events import EventRouter, Replicas
from mailrelay_operator.inputs import InputCache
from mailrelay_operator.kubeapi import KubeApi, object_path
from mailrelay_operator.records import Cached
from mailrelay_operator.workqueue import WorkQueue


def router() -> EventRouter:
    applier = ChildApplier(api=KubeApi.__new__(KubeApi))  # never called here
    return EventRouter(WorkQueue(), InputCache(), applier, ClusterView)


def mailrelay_obj(kind: str, name: str, generation: int, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "mailrelay.io/v1alpha1",
        "kind": kind,
        "metadata": {
            "name": name,
            "namespace": "mail",
            "uid": f"u-{name}",
            "generation": generation,
        },
        "spec": spec,
    }


def domain(relay: str, generation: int = 1) -> Cached:
    """As the input watch hands it over: trimmed."""
    body = mailrelay_obj("RelayDomain", "d", generation, relayRef={"name": relay})
    return trim_input(body | {"spec": {"domain": "d.example", "relayRef": {"name": relay}}})


def child(kind: str, managers: list[str], **status: Any) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1" if kind == "StatefulSet" else "v1",
        "kind": kind,
        "metadata": {
            "name": "edge",
            "namespace": "mail",
            "labels": {naming.LABEL_INSTANCE: "edge"},
            "managedFields": [{"manager": m, "fieldsV1": {"f:spec": {}}} for m in managers],
        },
        "status": status,
    }


async def test_only_spec_changes_mark_the_relay() -> None:
    r = router()
    r.relay_event(mailrelay_obj("MailRelay", "edge", 1), deleted=False)
    assert r.queue.take() == ({("mail", "edge"): True}, True)
    r.relay_event(mailrelay_obj("MailRelay", "edge", 1), deleted=False)  # our status write
    assert r.queue.take() == ({}, False)


async def test_a_domain_moving_marks_both_relays() -> None:
    r = router()
    r.domain_event(domain("a"), deleted=False)
    r.queue.take()
    r.domain_event(domain("b", generation=2), deleted=False)
    assert r.queue.take() == ({("mail", "a"): True, ("mail", "b"): True}, True)
    assert ("mail", "d") in r.inputs.domains


async def test_ready_replicas_mark_without_a_render() -> None:
    r = router()
    r.statefulset_event(child("StatefulSet", [], replicas=2, readyReplicas=1), deleted=False)
    assert r.queue.take() == ({("mail", "edge"): False}, False)
    assert r.replicas[("mail", "edge")] == Replicas(2, 1)
    r.statefulset_event(child("StatefulSet", [], replicas=2, readyReplicas=1), deleted=False)
    assert r.queue.take() == ({}, False)


async def test_a_child_taken_by_another_writer_is_applied_again() -> None:
    r = router()
    ours = child("Service", [naming.FIELD_MANAGER])
    path = object_path(ours)
    r.applier.applied[path], r.applier.owned[path] = "digest", owned_fields(ours)
    r.child_event(ours, deleted=False)  # our own apply coming back
    assert r.queue.take() == ({}, False)
    r.child_event(child("Service", [naming.FIELD_MANAGER, "kubectl"]), deleted=False)
    assert r.queue.take() == ({}, False)  # same fields of ours: nothing taken
    r.child_event(child("Service", ["kubectl"]), deleted=False)
    assert r.queue.take() == ({("mail", "edge"): False}, False)
    assert path not in r.applier.applied


async def test_failed_relays_back_off() -> None:
    queue = WorkQueue(retry_seconds=2.0)
    delays: list[float] = []
    queue.mark_after = lambda delay, key, render=False: delays.append(delay)  # type: ignore[method-assign]
    for failures in (0, 1, 3, 20):
        queue.mark_later(("mail", "edge"), failures)
    assert delays == [2.0, 4.0, 16.0, 300.0]


def test_a_relay_pod_made_bound_or_relabelled_marks_its_relay_for_a_look() -> None:
    r = router()

    def pod(uid: str, node: str | None = None, **labels: str) -> dict[str, Any]:
        meta = {
            "name": "edge-1",
            "namespace": "mail",
            "uid": uid,
            "labels": {naming.LABEL_INSTANCE: "edge", **labels},
        }
        return {"metadata": meta, "spec": {"nodeName": node}}

    def marks(body: dict[str, Any], deleted: bool = False) -> dict[Any, bool]:
        r.pod_event(body, deleted)
        return r.queue.take()[0]

    mx = naming.mx_pods_label("mx2.example.net")
    assert marks(pod("1")) == {("mail", "edge"): False}  # made: no render
    assert marks(pod("1")) == {}  # a status update
    assert marks(pod("1", "node-b")) == {("mail", "edge"): False}  # bound: its zone known
    assert marks(pod("1", "node-b", **{mx: "true"})) == {("mail", "edge"): False}
    assert marks(pod("1", "node-b", **{mx: "true", "other": "x"})) == {}
    assert marks(pod("1", "node-b"), deleted=True) == {}
    assert marks(pod("2")) == {("mail", "edge"): False}  # made again
    assert marks({"metadata": {"name": "stray", "namespace": "mail"}}) == {}
