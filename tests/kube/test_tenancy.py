"""Tenants of one shared MailRelay, against the operator on a real kube-apiserver.

Each tenant acts with its own credentials (a ServiceAccount that may manage
RelayDomains in its namespace and nothing else), the way a hostile tenant
would: it tries to take a domain another tenant holds, by editing an object
it owns, by being there while the owner's object is replaced, and through
an overlapping grant; and to send mail into the cluster.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from mrtest.kube import Kube, RunningOperator, condition, wait_for

pytestmark = pytest.mark.kube

RELAY_NS = "mail-shared"
A, B = "tenancy-a", "tenancy-b"
TENANT_ROLE = {
    "apiVersion": "rbac.authorization.k8s.io/v1",
    "kind": "Role",
    "metadata": {"name": "relaydomains"},
    "rules": [
        {
            "apiGroups": ["mailrelay.io"],
            "resources": ["relaydomains", "recipientlists"],
            "verbs": ["get", "list", "create", "update", "patch", "delete"],
        }
    ],
}


def tenant(kube: Kube, namespace: str, folder: Path) -> Kube:
    """kubectl as the namespace's own ServiceAccount (RelayDomains there, nothing else)."""
    kube.kubectl("create", "serviceaccount", "owner", "-n", namespace)
    kube.apply(
        json.dumps({**TENANT_ROLE, "metadata": {"name": "relaydomains", "namespace": namespace}})
    )
    kube.kubectl("create", "rolebinding", "owner", "-n", namespace, "--role=relaydomains",
                 f"--serviceaccount={namespace}:owner")  # fmt: skip
    token = kube.kubectl("create", "token", "owner", "-n", namespace).strip()
    admin = yaml.safe_load(kube.kubeconfig.read_text())
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": admin["clusters"],
        "users": [{"name": namespace, "user": {"token": token}}],
        "contexts": [
            {
                "name": namespace,
                "context": {"cluster": admin["clusters"][0]["name"], "user": namespace},
            }
        ],
        "current-context": namespace,
    }
    path = folder / f"{namespace}.kubeconfig"
    path.write_text(yaml.safe_dump(config))
    return Kube(path, kube.env)


def relay_domain(name: str, domain: str, **hop: Any) -> str:
    return json.dumps(
        {
            "apiVersion": "mailrelay.io/v1alpha1",
            "kind": "RelayDomain",
            "metadata": {"name": name},
            "spec": {
                "domain": domain,
                "relayRef": {"name": "shared", "namespace": RELAY_NS},
                "nextHop": {"host": "mx.customer.example", **hop},
                "recipients": "any",
            },
        }
    )


@pytest.fixture(scope="module")
def tenants(
    kube: Kube, operator: RunningOperator, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Kube, Kube]]:
    for ns in (RELAY_NS, A, B):
        kube.kubectl("create", "namespace", ns)
    kube.kubectl("label", "namespace", A, "tenant=a")
    kube.kubectl("label", "namespace", B, "tenant=b")
    grant = [
        {"namespaces": {"from": "Same"}, "domains": ["*"]},
        {
            "namespaces": {"from": "Selector", "selector": {"matchLabels": {"tenant": "a"}}},
            "domains": ["a.example", "shared.example"],
        },
        {
            "namespaces": {"from": "Selector", "selector": {"matchLabels": {"tenant": "b"}}},
            "domains": ["b.example", "*.b.example", "shared.example"],
        },
    ]
    relay = {
        "apiVersion": "mailrelay.io/v1alpha1",
        "kind": "MailRelay",
        "metadata": {"name": "shared", "namespace": RELAY_NS},
        "spec": {
            "hostname": "mx.shared.example",
            "replicas": 1,
            "allowedDomains": {"grants": grant, "releaseAfter": "1h"},
        },
    }
    kube.apply(json.dumps(relay))
    folder = tmp_path_factory.mktemp("tenants")
    yield tenant(kube, A, folder), tenant(kube, B, folder)


def verdict(kube: Kube, ns: str, name: str) -> dict[str, Any]:
    return condition(kube.get("relaydomain", name, ns), "Accepted")


def settled(kube: Kube, ns: str, name: str, reason: str) -> dict[str, Any] | None:
    obj = kube.get("relaydomain", name, ns)
    c = condition(obj, "Accepted")
    gen = (obj or {}).get("metadata", {}).get("generation")
    return c if c.get("reason") == reason and c.get("observedGeneration") == gen else None


def holders(kube: Kube) -> dict[str, dict[str, str]]:
    relay = kube.get("mailrelay", "shared", RELAY_NS) or {}
    return {c["domain"]: c for c in (relay.get("status") or {}).get("domains") or []}


def test_grants_decide_who_may_claim_what(kube: Kube, tenants: tuple[Kube, Kube]) -> None:
    a, b = tenants
    a.apply(relay_domain("a", "a.example"), "-n", A)
    b.apply(relay_domain("steal-a", "a.example"), "-n", B)
    b.apply(relay_domain("sub", "mail.b.example"), "-n", B)
    wait_for("a.example accepted", lambda: settled(kube, A, "a", "Accepted"))
    wait_for("mail.b.example accepted", lambda: settled(kube, B, "sub", "Accepted"))
    refused = wait_for("steal-a refused", lambda: settled(kube, B, "steal-a", "NotAllowed"))
    assert A not in refused["message"]
    assert holders(kube)["a.example"]["holder"] == "tenancy-a/a"


def test_an_older_object_cannot_be_edited_into_a_held_domain(
    kube: Kube, tenants: tuple[Kube, Kube]
) -> None:
    a, b = tenants
    b.apply(relay_domain("old", "shared.example"), "-n", B)  # b is first, and older
    wait_for("b holds shared.example", lambda: settled(kube, B, "old", "Accepted"))
    a.apply(relay_domain("mine", "shared.example"), "-n", A)
    refused = wait_for("a's claim refused", lambda: settled(kube, A, "mine", "Conflict"))
    assert B not in refused["message"] and "old" not in refused["message"]
    # The hijack of old: tenant a's own older object (a) edited to the held domain.
    edit = a.kubectl_run(
        "patch", "relaydomain", "a", "-n", A, "--type=merge",
        "-p", json.dumps({"spec": {"domain": "shared.example"}}),
    )  # fmt: skip
    assert edit.returncode != 0 and "spec.domain is immutable" in edit.stderr
    moved = a.kubectl_run(
        "patch", "relaydomain", "a", "-n", A, "--type=merge",
        "-p", json.dumps({"spec": {"relayRef": {"name": "other"}}}),
    )  # fmt: skip
    assert moved.returncode != 0 and "spec.relayRef is immutable" in moved.stderr
    assert holders(kube)["shared.example"]["holder"] == "tenancy-b/old"


def test_replacing_the_owners_object_hands_nothing_to_a_squatter(
    kube: Kube, tenants: tuple[Kube, Kube], operator: RunningOperator
) -> None:
    """Argo CD Replace, a restore, a migration: delete, then apply again."""
    _, b = tenants
    # tenant-b holds shared.example (test above); tenant-a's "mine" waits in Conflict.
    wait_for("b holds shared.example", lambda: settled(kube, B, "old", "Accepted"))
    b.kubectl("delete", "relaydomain", "old", "-n", B)
    gone = wait_for("the claim kept", lambda: holders(kube)["shared.example"].get("goneSince"))
    assert gone
    operator.settle()
    assert verdict(kube, A, "mine")["reason"] == "Conflict"
    assert holders(kube)["shared.example"]["holder"] == "tenancy-b/old"
    # The owner applies its object again: it gets the domain back.
    b.apply(relay_domain("old", "shared.example"), "-n", B)
    wait_for("b holds it again", lambda: settled(kube, B, "old", "Accepted"))
    assert verdict(kube, A, "mine")["reason"] == "Conflict"
    assert "goneSince" not in holders(kube)["shared.example"]
    # The relay's configuration routes the domain to its holder.
    config = kube.get("configmap", "shared-config", RELAY_NS) or {}
    domains = json.loads(config["data"]["domains.json"])["domains"]
    assert {d["domain"]: d["source"] for d in domains}["shared.example"] == "tenancy-b/old"


def test_a_claim_is_released_after_release_after(kube: Kube, tenants: tuple[Kube, Kube]) -> None:
    kube.kubectl(
        "patch", "mailrelay", "shared", "-n", RELAY_NS, "--type=merge",
        "-p", json.dumps({"spec": {"allowedDomains": {"releaseAfter": "2s"}}}),
    )  # fmt: skip
    kube.kubectl("delete", "relaydomain", "old", "-n", B)
    wait_for("a gets shared.example", lambda: settled(kube, A, "mine", "Accepted"), 60)
    assert holders(kube)["shared.example"]["holder"] == "tenancy-a/mine"


def test_tenants_cannot_send_mail_into_the_cluster(kube: Kube, tenants: tuple[Kube, Kube]) -> None:
    _, b = tenants
    b.apply(relay_domain("loop", "x.b.example", host="127.0.0.1", port=25), "-n", B)
    b.apply(relay_domain("ssh", "y.b.example", port=22), "-n", B)
    b.apply(relay_domain("svc", "z.b.example", host="kube-dns.kube-system.svc", port=25), "-n", B)
    for name in ("loop", "ssh", "svc"):
        refused = wait_for(name, lambda n=name: settled(kube, B, n, "NextHopNotAllowed"))
        assert "allowedNextHops" in refused["message"]
    # The relay's own namespace may (its owner is not a tenant).
    kube.apply(relay_domain("local", "local.example", host="127.0.0.1", port=2526), "-n", RELAY_NS)
    wait_for("own namespace accepted", lambda: settled(kube, RELAY_NS, "local", "Accepted"))
