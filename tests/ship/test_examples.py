"""Every example validates with `mailrelay validate` and is accepted by a real
kube-apiserver (server-side dry-run: schema, defaults and CEL rules)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from mrtest.kube import Kube
from ship.tools import REPO, dry_run, run

from mailrelay_api.load import load_manifests, manifest_files
from mailrelay_api.render import render_relay

EXAMPLES = sorted(p for p in (REPO / "examples").iterdir() if p.is_dir())
# Not installed on the test apiserver: checked by `mailrelay validate` only.
EXTERNAL_GROUPS = ("cert-manager.io/",)


def documents(folder: Path) -> list[dict[str, Any]]:
    docs = []
    for path in manifest_files([folder]):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def test_the_examples_are_there() -> None:
    assert {p.name for p in EXAMPLES} >= {"quickstart", "two-mx", "multi-tenant"}


@pytest.mark.parametrize("folder", EXAMPLES, ids=lambda p: p.name)
def test_mailrelay_validate(folder: Path) -> None:
    mailrelay = Path(sys.executable).parent / "mailrelay"
    result = run([str(mailrelay), "validate", "-f", str(folder.relative_to(REPO))], cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1].startswith("ok: "), result.stdout


@pytest.mark.parametrize("folder", EXAMPLES, ids=lambda p: p.name)
def test_every_domain_is_attached(folder: Path) -> None:
    inv = load_manifests([folder])
    assert not inv.errors
    verdicts = [v for relay in inv.relays for v in render_relay(relay, inv).domains]
    assert verdicts and all(v.accepted for v in verdicts), verdicts


def test_two_mx_is_the_seed_setup() -> None:
    inv = load_manifests([REPO / "examples" / "two-mx"])
    (relay,) = inv.relays
    spec = relay["spec"]
    assert [(m["hostname"], m["priority"]) for m in spec["mx"]] == [
        ("mx1.example.net", 10),
        ("mx2.example.net", 20),
    ]
    assert spec["limits"]["messageSize"] == 25600000
    assert spec["queue"]["lifetime"] == "10d"
    assert spec["tls"]["issuerRef"] == {
        "kind": "ClusterIssuer",
        "name": "letsencrypt",
        "group": "cert-manager.io",
    }
    zones = [s["zone"] for s in spec["postscreen"]["dnsbl"]["sites"]]
    assert zones == ["zen.spamhaus.org", "b.barracudacentral.org"]
    rbl = spec["restrictions"]["rblClients"]
    assert rbl[0] == {"zone": "zen.spamhaus.org", "returnCodes": ["127.0.0.10", "127.0.0.11"]}
    assert [r["zone"] for r in rbl[1:]] == ["zen.spamhaus.org", "b.barracudacentral.org"]
    restrictions = spec["restrictions"]
    assert all(
        restrictions[k]
        for k in (
            "rejectUnauthPipelining",
            "rejectNonFqdnRecipient",
            "rejectUnknownRecipientDomain",
            "rejectUnknownReverseClientHostname",
        )
    )
    assert restrictions["spf"]["enabled"]
    issuers = [d for d in documents(REPO / "examples" / "two-mx") if d["kind"] == "ClusterIssuer"]
    assert [i["metadata"]["name"] for i in issuers] == ["letsencrypt"]


def test_multi_tenant_namespaces_are_labelled_for_the_shared_relay() -> None:
    docs = documents(REPO / "examples" / "multi-tenant")
    (relay,) = [d for d in docs if d["kind"] == "MailRelay"]
    wanted = relay["spec"]["allowedDomains"]["namespaces"]["selector"]["matchLabels"]
    tenants = {d["metadata"]["namespace"] for d in docs if d["kind"] == "RelayDomain"}
    assert tenants == {"customer-a", "customer-b"}
    namespaces = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Namespace"}
    for tenant in tenants:
        assert namespaces[tenant]["metadata"]["labels"].items() >= wanted.items()


@pytest.mark.kube
@pytest.mark.parametrize("folder", EXAMPLES, ids=lambda p: p.name)
def test_server_side_dry_run(kube: Kube, folder: Path) -> None:
    docs = [
        d for d in documents(folder) if not str(d.get("apiVersion")).startswith(EXTERNAL_GROUPS)
    ]
    # A dry-run Namespace is not there for the objects in it: create those for real.
    namespaces = [d for d in docs if d["kind"] == "Namespace"]
    if namespaces:
        kube.kubectl(
            "apply", "--server-side", "--field-manager=ship-tests", "-f", "-",
            stdin=yaml.safe_dump_all(namespaces),
        )  # fmt: skip
    rest = [d for d in docs if d["kind"] != "Namespace"]
    result = dry_run(kube, rest)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("(server dry run)") == len(rest), result.stdout


@pytest.mark.kube
def test_dry_run_refuses_what_the_crd_forbids(kube: Kube) -> None:
    # The check above is only worth something if the server really validates.
    bad = {
        "apiVersion": "mailrelay.io/v1alpha1",
        "kind": "MailRelay",
        "metadata": {"name": "bad", "namespace": "default"},
        "spec": {"hostname": "mx.example.net", "proxyProtocol": {"enabled": True}},
    }
    result = dry_run(kube, [bad])
    assert result.returncode != 0
    assert "trustedCIDRs" in result.stderr, result.stderr
