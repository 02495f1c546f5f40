"""The operator against a real kube-apiserver: children, statuses, conflicts, no-op passes."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from mrtest.kube import REPO, Kube, RunningOperator, condition, reconciled, wait_for

pytestmark = pytest.mark.kube

QUICKSTART = REPO / "examples" / "quickstart"
CHILDREN = [
    ("configmap", "quickstart-config"),
    ("configmap", "quickstart-recipients-0"),
    ("statefulset", "quickstart"),
    ("service", "quickstart-pods"),
    ("service", "quickstart-mx-quickstart-test"),
    ("poddisruptionbudget", "quickstart"),
]


def accepted(kube: Kube, kind: str, name: str, namespace: str = "default") -> dict[str, Any]:
    return condition(kube.get(kind, name, namespace), "Accepted")


def versions(kube: Kube, names: list[tuple[str, str]]) -> dict[tuple[str, str], str]:
    out = {}
    for kind, name in names:
        obj = kube.get(kind, name)
        assert obj is not None, f"{kind}/{name} missing"
        out[(kind, name)] = obj["metadata"]["resourceVersion"]
    return out


@pytest.fixture(scope="module")
def quickstart(kube: Kube, operator: RunningOperator) -> dict[str, Any]:
    kube.apply(QUICKSTART)
    relay = wait_for("quickstart Reconciled", lambda: reconciled(kube, "quickstart"))
    operator.settle()
    return relay


def test_quickstart_children_owned_and_labelled(kube: Kube, quickstart: dict[str, Any]) -> None:
    uid = quickstart["metadata"]["uid"]
    for kind, name in CHILDREN:
        obj = kube.get(kind, name)
        assert obj is not None, f"{kind}/{name} was not created"
        [ref] = obj["metadata"]["ownerReferences"]
        assert (ref["kind"], ref["name"], ref["uid"], ref["controller"]) == (
            "MailRelay",
            "quickstart",
            uid,
            True,
        )
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/managed-by"] == "mailrelay-operator"
        assert labels["app.kubernetes.io/instance"] == "quickstart"
        managers = {m["manager"] for m in obj["metadata"]["managedFields"]}
        assert managers == {"mailrelay-operator"}, managers
    sts = kube.get("statefulset", "quickstart")
    assert sts is not None
    pod = sts["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"] == "registry.test/mailrelay:test"
    mx = kube.get("service", "quickstart-mx-quickstart-test")
    assert mx is not None and mx["metadata"]["labels"]["mailrelay.io/mx-priority"] == "10"
    assert mx["spec"]["ports"][0]["port"] == 25


def test_quickstart_statuses(kube: Kube, quickstart: dict[str, Any]) -> None:
    st = quickstart["status"]
    assert st["acceptedDomains"] == 2 and st["recipients"] == 3
    assert {c["domain"]: c["holder"] for c in st["domains"]} == {
        "example.com": "default/example-com",
        "example.org": "default/example-org",
    }
    ready = condition(quickstart, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "ReplicasNotReady")
    assert all(
        c["observedGeneration"] == quickstart["metadata"]["generation"] for c in st["conditions"]
    )
    com = accepted(kube, "relaydomain", "example-com")
    assert (com["status"], com["reason"]) == ("True", "Accepted")
    assert kube.get("relaydomain", "example-com")["status"]["recipients"] == 3  # type: ignore[index]
    assert accepted(kube, "relaydomain", "example-org")["status"] == "True"
    assert accepted(kube, "recipientlist", "example-com-staff")["reason"] == "Accepted"
    relay = kube.get("mailrelay", "quickstart")
    assert relay is not None
    annotations = relay["metadata"].get("annotations") or {}
    assert not [a for a in annotations if "kopf" in a or "last-handled" in a]
    assert not relay["metadata"].get("finalizers")


def test_second_pass_writes_nothing(
    kube: Kube, operator: RunningOperator, quickstart: dict[str, Any]
) -> None:
    watched = [
        *CHILDREN,
        ("mailrelay", "quickstart"),
        ("relaydomain", "example-com"),
        ("recipientlist", "example-com-staff"),
    ]
    before = versions(kube, watched)
    writes = operator.call(lambda: operator.reconciler.api.writes)
    operator.full_pass()
    assert operator.call(lambda: operator.reconciler.api.writes) == writes
    # Forgetting every cache re-applies everything: server-side apply of an
    # unchanged object is a no-op on the server too.
    operator.full_pass(resync=True)
    assert versions(kube, watched) == before


def test_recipient_list_change_touches_only_the_recipients(
    kube: Kube, operator: RunningOperator, quickstart: dict[str, Any]
) -> None:
    others = [c for c in CHILDREN if c[1] != "quickstart-recipients-0"]
    before = versions(kube, others)
    shard = kube.get("configmap", "quickstart-recipients-0")
    assert shard is not None
    kube.apply(
        """
apiVersion: mailrelay.io/v1alpha1
kind: RecipientList
metadata: {name: example-com-new, namespace: default}
spec:
  domainRef: {name: example-com}
  addresses: [new@example.com]
"""
    )
    wait_for(
        "the recipients ConfigMap to change",
        lambda: (
            kube.get("configmap", "quickstart-recipients-0")["binaryData"]  # type: ignore[index]
            != shard["binaryData"]
        ),
    )
    operator.settle()
    assert versions(kube, others) == before
    relay = wait_for(
        "4 recipients",
        lambda: (r := kube.get("mailrelay", "quickstart")) and r["status"]["recipients"] == 4 and r,
    )
    assert relay
    assert accepted(kube, "recipientlist", "example-com-new")["status"] == "True"


def test_conflicts_and_refusals(
    kube: Kube, operator: RunningOperator, quickstart: dict[str, Any]
) -> None:
    kube.apply(
        """
apiVersion: v1
kind: Namespace
metadata: {name: tenant-a, labels: {mail: allowed}}
---
apiVersion: mailrelay.io/v1alpha1
kind: RelayDomain
metadata: {name: example-com-again, namespace: default}
spec:
  domain: EXAMPLE.com
  relayRef: {name: quickstart}
  nextHop: {host: 127.0.0.1, port: 2526}
---
apiVersion: mailrelay.io/v1alpha1
kind: RelayDomain
metadata: {name: tenant-domain, namespace: tenant-a}
spec:
  domain: tenant.example
  relayRef: {name: quickstart, namespace: default}
  # Outside the cluster: a tenant may not use loopback (docs/security.md).
  nextHop: {host: mx.tenant.example}
  recipients: any
---
apiVersion: mailrelay.io/v1alpha1
kind: RelayDomain
metadata: {name: nowhere, namespace: default}
spec:
  domain: nowhere.example
  relayRef: {name: no-such-relay}
  nextHop: {host: 127.0.0.1}
---
apiVersion: mailrelay.io/v1alpha1
kind: RecipientList
metadata: {name: dangling, namespace: default}
spec:
  domainRef: {name: no-such-domain}
  addresses: [a@b.example]
"""
    )
    conflict = wait_for(
        "Conflict", lambda: (c := accepted(kube, "relaydomain", "example-com-again")) and c
    )
    assert (conflict["status"], conflict["reason"]) == ("False", "Conflict")
    # Who holds it is not said (it may be another tenant's); status.domains says it.
    assert "default/example-com" not in conflict["message"]
    # The recorded holder keeps the domain.
    assert accepted(kube, "relaydomain", "example-com")["status"] == "True"
    refused = wait_for(
        "NotAllowed",
        lambda: (c := accepted(kube, "relaydomain", "tenant-domain", "tenant-a")) and c,
    )
    assert refused["reason"] == "NotAllowed"
    missing = wait_for("RelayNotFound", lambda: accepted(kube, "relaydomain", "nowhere"))
    assert (missing["status"], missing["reason"]) == ("False", "RelayNotFound")
    dangling = wait_for("DomainNotFound", lambda: accepted(kube, "recipientlist", "dangling"))
    assert dangling["reason"] == "DomainNotFound"

    # Allowing namespaces by label attaches the tenant's domain.
    relay = kube.get("mailrelay", "quickstart")
    assert relay is not None
    allowed = {"from": "Selector", "selector": {"matchLabels": {"mail": "allowed"}}}
    kube.patch("mailrelay", "quickstart", {"spec": {"allowedDomains": {"namespaces": allowed}}})
    now = wait_for(
        "tenant domain Accepted",
        lambda: accepted(kube, "relaydomain", "tenant-domain", "tenant-a").get("status") == "True",
    )
    assert now
    wait_for("domains counted", lambda: reconciled(kube, "quickstart"))
    # Same-namespace domains now need the label too: default has none.
    assert accepted(kube, "relaydomain", "example-com")["reason"] == "NotAllowed"
    kube.kubectl(
        "patch",
        "mailrelay",
        "quickstart",
        "--type=json",
        "-p",
        '[{"op":"remove","path":"/spec/allowedDomains/namespaces/selector"},'
        '{"op":"replace","path":"/spec/allowedDomains/namespaces/from","value":"Same"}]',
    )
    wait_for(
        "example-com back",
        lambda: accepted(kube, "relaydomain", "example-com").get("status") == "True",
    )
    operator.settle()


def test_schema_rejections_name_the_field(kube: Kube) -> None:
    bad = {
        "spec.limits.messageSize": "spec: {hostname: mx.example.net, limits: {messageSize: 10}}",
        "spec.hostname": "spec: {hostname: not_a_host}",
        "spec.proxyProtocol": ("spec: {hostname: mx.example.net, proxyProtocol: {enabled: true}}"),
    }
    for field, spec in bad.items():
        result = kube.kubectl_run(
            "apply",
            "--server-side",
            "--dry-run=server",
            "-f",
            "-",
            stdin=f"apiVersion: mailrelay.io/v1alpha1\nkind: MailRelay\n"
            f"metadata: {{name: bad, namespace: default}}\n{spec}\n",
        )
        assert result.returncode != 0, spec
        assert field in result.stderr, result.stderr
    result = kube.kubectl_run(
        "apply",
        "--server-side",
        "--dry-run=server",
        "-f",
        "-",
        stdin="apiVersion: mailrelay.io/v1alpha1\nkind: RecipientList\n"
        "metadata: {name: bad, namespace: default}\n"
        "spec: {domainRef: {name: x}, addresses: ['not an address']}\n",
    )
    assert result.returncode != 0 and "spec.addresses[0]" in result.stderr, result.stderr


def test_cert_manager_missing_runs_without_starttls(kube: Kube, operator: RunningOperator) -> None:
    kube.apply(
        """
apiVersion: mailrelay.io/v1alpha1
kind: MailRelay
metadata: {name: tls-relay, namespace: default}
spec:
  hostname: mx.tls.example
  replicas: 1
  tls: {issuerRef: {name: letsencrypt}}
"""
    )
    relay = wait_for("tls-relay Reconciled", lambda: reconciled(kube, "tls-relay"))
    tls = condition(relay, "TLS")
    assert (tls["status"], tls["reason"]) == ("False", "CertManagerMissing")
    sts = kube.get("statefulset", "tls-relay")
    assert sts is not None
    assert "--tls-dir" not in sts["spec"]["template"]["spec"]["containers"][0]["command"]


def test_ready_and_mx_records_follow_the_children(
    kube: Kube, operator: RunningOperator, quickstart: dict[str, Any]
) -> None:
    # Play the StatefulSet controller and the cloud load balancer. A ready pod
    # on the old template is not a finished rollout: Ready waits for it.
    sts = kube.get("statefulset", "quickstart") or {}
    rolling = {
        "observedGeneration": sts["metadata"]["generation"],
        "replicas": 1,
        "readyReplicas": 1,
        "availableReplicas": 1,
        "updatedReplicas": 0,
        "currentRevision": "quickstart-old",
        "updateRevision": "quickstart-new",
    }
    kube.patch("statefulset", "quickstart", {"status": rolling}, subresource="status")
    wait_for(
        "RollingOut",
        lambda: (
            condition(kube.get("mailrelay", "quickstart"), "Ready").get("reason") == "RollingOut"
        ),
    )
    done = {**rolling, "updatedReplicas": 1, "currentRevision": "quickstart-new"}
    kube.patch("statefulset", "quickstart", {"status": done}, subresource="status")
    balanced = {"status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.25"}]}}}
    kube.patch("service", "quickstart-mx-quickstart-test", balanced, subresource="status")
    relay = wait_for(
        "Ready",
        lambda: (
            (r := kube.get("mailrelay", "quickstart"))
            and condition(r, "Ready").get("status") == "True"
            and r
        ),
    )
    assert relay["status"]["readyReplicas"] == 1
    records = wait_for(
        "mxRecords", lambda: (kube.get("mailrelay", "quickstart") or {})["status"].get("mxRecords")
    )
    assert "example.com. MX 10 mx.quickstart.test." in records
    assert "example.org. MX 10 mx.quickstart.test." in records


def test_large_recipient_list_skips_kopf_annotations(
    kube: Kube, operator: RunningOperator, quickstart: dict[str, Any]
) -> None:
    addresses = [f"user{i:06d}@example.com" for i in range(15000)]  # ~400 KB of spec
    body = "\n".join(f"  - {a}" for a in addresses)
    kube.apply(
        "apiVersion: mailrelay.io/v1alpha1\nkind: RecipientList\n"
        "metadata: {name: example-com-big, namespace: default}\n"
        f"spec:\n  domainRef: {{name: example-com}}\n  addresses:\n{body}\n"
    )
    wait_for(
        "big list Accepted",
        lambda: accepted(kube, "recipientlist", "example-com-big").get("status") == "True",
    )
    big = kube.get("recipientlist", "example-com-big")
    assert big is not None
    assert not [a for a in (big["metadata"].get("annotations") or {}) if "kopf" in a]
    relay = wait_for(
        "15k recipients",
        lambda: (
            (r := kube.get("mailrelay", "quickstart")) and r["status"]["recipients"] >= 15000 and r
        ),
    )
    assert relay
    kube.kubectl("delete", "recipientlist", "example-com-big")
    operator.settle()


def recipient_shard_files(kube: Kube) -> dict[str, list[str]]:
    """Each recipient shard ConfigMap of quickstart -> the file names it holds."""
    selector = "app.kubernetes.io/instance=quickstart,app.kubernetes.io/component=recipients"
    return {
        cm["metadata"]["name"]: sorted(cm.get("binaryData") or {})
        for cm in kube.list("configmap", selector=selector)
    }


def test_a_shard_count_change_renames_every_shard_file(
    kube: Kube,
    operator: RunningOperator,
    quickstart: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Server-side apply drops the old file name from a shard's ConfigMap: a pod
    never finds recipients-0000-of-0001.txt.gz next to recipients-0000-of-0004.txt.gz."""
    from mailrelay_api import shards

    monkeypatch.setattr(shards, "SHARD_RAW_BYTES", 2048)
    body = "\n".join(f"  - user{i:04d}@example.com" for i in range(300))
    kube.apply(
        "apiVersion: mailrelay.io/v1alpha1\nkind: RecipientList\n"
        "metadata: {name: example-com-many, namespace: default}\n"
        f"spec:\n  domainRef: {{name: example-com}}\n  addresses:\n{body}\n"
    )
    files = wait_for(
        "several shards", lambda: (f := recipient_shard_files(kube)) and len(f) > 1 and f
    )
    operator.settle()
    files = recipient_shard_files(kube)
    count = len(files)
    assert files == {
        f"quickstart-recipients-{i}": [f"recipients-{i:04d}-of-{count:04d}.txt.gz"]
        for i in range(count)
    }
    config = kube.get("configmap", "quickstart-config")
    assert config is not None
    listed = json.loads(config["data"]["domains.json"])["recipientFiles"]
    assert listed == [name for names in files.values() for name in names]
    kube.kubectl("delete", "recipientlist", "example-com-many")
    operator.settle()
    assert recipient_shard_files(kube) == {
        "quickstart-recipients-0": ["recipients-0000-of-0001.txt.gz"]
    }


def test_immutable_statefulset_change_recreates_it(
    kube: Kube, operator: RunningOperator, quickstart: dict[str, Any]
) -> None:
    old = kube.get("statefulset", "quickstart")
    assert old is not None
    kube.patch("mailrelay", "quickstart", {"spec": {"storage": {"size": "20Gi"}}})
    recreating = wait_for(
        "StatefulSetRecreating",
        lambda: (
            condition(kube.get("mailrelay", "quickstart"), "Reconciled").get("reason")
            == "StatefulSetRecreating"
        ),
    )
    assert recreating
    held = kube.get("statefulset", "quickstart")
    assert held is not None and held["metadata"].get("deletionTimestamp")
    assert "orphan" in held["metadata"].get("finalizers", [])
    # Play the garbage collector: it releases the pods and drops the finalizer.
    kube.kubectl(
        "patch",
        "statefulset",
        "quickstart",
        "--type=json",
        "-p",
        '[{"op":"remove","path":"/metadata/finalizers"}]',
    )
    new = wait_for(
        "a new StatefulSet",
        lambda: (
            (s := kube.get("statefulset", "quickstart"))
            and s["metadata"]["uid"] != old["metadata"]["uid"]
            and s
        ),
    )
    claim = new["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]
    assert claim == "20Gi"
    relay = wait_for("Reconciled after recreate", lambda: reconciled(kube, "quickstart"))
    assert condition(relay, "Reconciled")["reason"] == "StatefulSetRecreated"
    assert copy.deepcopy(relay)
