"""Children and other writers on a real kube-apiserver: an object not ours under
a child's name is refused, an MX Service of an older operator keeps its name
(and so its address) through upgrades and priority changes, and each relay's
pods get their NetworkPolicy."""

from __future__ import annotations

import json
from typing import Any

import pytest
from mrtest.kube import Kube, RunningOperator, condition, wait_for

pytestmark = pytest.mark.kube
NS = "owners"


def relay(name: str, priority: int = 10) -> str:
    return json.dumps(
        {
            "apiVersion": "mailrelay.io/v1alpha1",
            "kind": "MailRelay",
            "metadata": {"name": name, "namespace": NS},
            "spec": {
                "hostname": f"mx.{name}.example",
                "replicas": 1,
                "mx": [{"hostname": f"mx.{name}.example", "priority": priority}],
            },
        }
    )


def reconciled(kube: Kube, name: str) -> dict[str, Any] | None:
    obj = kube.get("mailrelay", name, NS)
    c = condition(obj, "Reconciled")
    gen = (obj or {}).get("metadata", {}).get("generation")
    return c if c.get("observedGeneration") == gen and c.get("status") == "True" else None


@pytest.fixture(scope="module")
def namespace(kube: Kube, operator: RunningOperator) -> str:
    kube.kubectl("create", "namespace", NS)
    return NS


def test_an_object_not_ours_is_refused_not_adopted(kube: Kube, namespace: str) -> None:
    # Someone else's Service under the name of the relay's headless Service.
    kube.kubectl("create", "service", "clusterip", "billing-pods", "--tcp=80", "-n", NS)
    kube.apply(relay("billing"))
    refused = wait_for(
        "ResourceExists",
        lambda: (
            (c := condition(kube.get("mailrelay", "billing", NS), "Reconciled")).get("reason")
            == "ResourceExists"
            and c
        ),
    )
    assert "Service owners/billing-pods exists and is not this MailRelay's" in refused["message"]
    svc = kube.get("service", "billing-pods", NS) or {}
    assert "ownerReferences" not in svc["metadata"], "left alone, not adopted"
    assert [p["port"] for p in svc["spec"]["ports"]] == [80]
    # Removed by its owner: the relay goes ahead.
    kube.kubectl("delete", "service", "billing-pods", "-n", NS)
    wait_for("Reconciled", lambda: reconciled(kube, "billing"))


def test_an_older_mx_service_keeps_its_name_and_address(
    kube: Kube, namespace: str, operator: RunningOperator
) -> None:
    # What an operator that named MX Services by priority left behind.
    old = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": "legacy-mx10",
            "namespace": NS,
            "labels": {
                "app.kubernetes.io/name": "mailrelay",
                "app.kubernetes.io/instance": "legacy",
                "app.kubernetes.io/component": "mx",
                "app.kubernetes.io/managed-by": "mailrelay-operator",
            },
            "annotations": {"mailrelay.io/mx-hostname": "mx.legacy.example"},
        },
        "spec": {"type": "ClusterIP", "ports": [{"name": "smtp", "port": 25}]},
    }
    kube.apply(json.dumps(old))
    before = kube.get("service", "legacy-mx10", NS) or {}
    operator.settle()
    kube.apply(relay("legacy"))
    wait_for("Reconciled", lambda: reconciled(kube, "legacy"))
    kube.apply(relay("legacy", priority=20))  # a new priority
    wait_for("Reconciled", lambda: reconciled(kube, "legacy"))
    operator.settle()
    mx = kube.list(
        "service", NS, "app.kubernetes.io/instance=legacy,app.kubernetes.io/component=mx"
    )
    assert [s["metadata"]["name"] for s in mx] == ["legacy-mx10"]
    after = mx[0]
    assert after["metadata"]["uid"] == before["metadata"]["uid"]
    assert after["spec"]["clusterIP"] == before["spec"]["clusterIP"]
    assert after["metadata"]["labels"]["mailrelay.io/mx-priority"] == "20"


def test_relay_pods_get_a_network_policy(kube: Kube, namespace: str) -> None:
    kube.apply(relay("fenced"))
    policy = wait_for("NetworkPolicy", lambda: kube.get("networkpolicy", "fenced", NS))
    spec = policy["spec"]
    assert spec["podSelector"]["matchLabels"]["app.kubernetes.io/instance"] == "fenced"
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    handover = spec["ingress"][1]
    assert handover["from"][0]["podSelector"] == spec["podSelector"]
    [owner] = policy["metadata"]["ownerReferences"]
    assert owner["kind"] == "MailRelay" and owner["name"] == "fenced"


def two_zones(kube: Kube) -> None:
    """Two nodes in two zones (node-a in zone-a, node-b in zone-b); no kubelet."""
    for node, zone in (("node-a", "zone-a"), ("node-b", "zone-b")):
        kube.apply(json.dumps({"apiVersion": "v1", "kind": "Node", "metadata": {
            "name": node, "labels": {"topology.kubernetes.io/zone": zone}}}))  # fmt: skip


def test_a_backup_mx_served_by_a_subset_of_pods(kube: Kube, namespace: str) -> None:
    # Play the scheduler: two nodes in two zones, and the relay's two pods.
    two_zones(kube)
    labels = {
        "app.kubernetes.io/name": "mailrelay",
        "app.kubernetes.io/instance": "split",
        "app.kubernetes.io/component": "relay",
    }
    for ordinal, node in ((0, "node-a"), (1, "node-b")):
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": f"split-{ordinal}", "namespace": NS, "labels": labels},
            "spec": {
                "nodeName": node,
                "automountServiceAccountToken": False,
                "containers": [{"name": "relay", "image": "registry.test/mailrelay:test"}],
            },
        }
        kube.apply(json.dumps(pod))
    spec = json.loads(relay("split"))
    spec["spec"]["mx"].append(
        {"hostname": "backup.split.example", "priority": 20, "pods": {"zones": ["zone-b"]}}
    )
    kube.apply(json.dumps(spec))
    label = wait_for(
        "the zone-b pod labelled",
        lambda: [
            k
            for k in (kube.get("pod", "split-1", NS) or {})["metadata"].get("labels", {})
            if k.startswith("mailrelay.io/mx-")
        ],
    )[0]
    assert label not in (kube.get("pod", "split-0", NS) or {})["metadata"]["labels"]
    backup = kube.get("service", "split-backup-split-example", NS) or {}
    assert backup["spec"]["selector"][label] == "true"
    primary = kube.get("service", "split-mx-split-example", NS) or {}
    assert label not in primary["spec"]["selector"]


def mx_labels(kube: Kube, pod: str) -> set[str]:
    obj = kube.get("pod", pod, NS) or {"metadata": {}}
    return {k for k in obj["metadata"].get("labels") or {} if k.startswith("mailrelay.io/mx-")}


def test_mx_pod_labels_follow_a_recreated_pod(kube: Kube, namespace: str) -> None:
    """The StatefulSet controller (played here) re-creates a deleted pod from the
    template, without the operator's labels; the scheduler then binds it. The
    labels come back from the watch of the pods, without a resync (nothing
    else here would mark the relay: no controller updates the StatefulSet)."""
    from mailrelay_operator.naming import mx_pods_label

    two_zones(kube)
    spec = json.loads(relay("follow"))
    spec["spec"]["replicas"] = 2
    spec["spec"]["mx"] += [
        {"hostname": "second.follow.example", "priority": 20, "pods": {"ordinals": [1]}},
        {"hostname": "zonal.follow.example", "priority": 30, "pods": {"zones": ["zone-b"]}},
    ]
    kube.apply(json.dumps(spec))
    wait_for("follow Reconciled", lambda: reconciled(kube, "follow"))
    sts = wait_for("StatefulSet follow", lambda: kube.get("statefulset", "follow", NS))
    by_ordinal = mx_pods_label("second.follow.example")
    by_zone = mx_pods_label("zonal.follow.example")

    def make_pod() -> None:
        template = sts["spec"]["template"]
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": "follow-1",
                "namespace": NS,
                "labels": {
                    **template["metadata"]["labels"],
                    "statefulset.kubernetes.io/pod-name": "follow-1",
                },
            },
            "spec": {
                "automountServiceAccountToken": False,
                "containers": [{"name": "relay", "image": "registry.test/mailrelay:test"}],
            },
        }
        kube.kubectl("create", "-f", "-", stdin=json.dumps(pod))

    def bind(node: str) -> None:
        binding = {
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": {"name": "follow-1", "namespace": NS},
            "target": {"apiVersion": "v1", "kind": "Node", "name": node},
        }
        kube.kubectl("create", "-f", "-", stdin=json.dumps(binding))

    for _ in range(2):  # made, then deleted and made again (a new uid, no labels)
        make_pod()
        wait_for("the ordinal's label", lambda: mx_labels(kube, "follow-1") == {by_ordinal})
        bind("node-b")
        wait_for(
            "the zone's label once bound",
            lambda: mx_labels(kube, "follow-1") == {by_ordinal, by_zone},
        )
        delete_now(kube, "follow-1")
    # Someone takes a label off: it is put back.
    make_pod()
    wait_for("labelled", lambda: mx_labels(kube, "follow-1") == {by_ordinal})
    kube.kubectl("label", "pod", "follow-1", "-n", NS, f"{by_ordinal}-")
    wait_for("the label back", lambda: mx_labels(kube, "follow-1") == {by_ordinal})
    backup = kube.get("service", "follow-second-follow-example", NS) or {}
    assert backup["spec"]["selector"][by_ordinal] == "true"
    delete_now(kube, "follow-1")


def delete_now(kube: Kube, pod: str) -> None:
    """No kubelet to finish a graceful delete: forced."""
    kube.kubectl("delete", "pod", pod, "-n", NS, "--force", "--grace-period=0")
    wait_for(f"{pod} gone", lambda: kube.get("pod", pod, NS) is None)
