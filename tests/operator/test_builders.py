"""Golden-file tests of the pure builders: MailRelay in, child objects out.

The golden files show ConfigMap data as what it is: JSON files as nested
YAML, gzip recipient shards as their lines (with a digest of the exact
bytes), other multi-line text as YAML block scalars. A golden file that is
missing or differs fails the test; UPDATE_GOLDEN=1 pytest tests/operator
writes them under golden/ (review the diff before committing it).
"""

from __future__ import annotations

import base64
import copy
import gzip
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from mailrelay_operator import configmaps, naming, statefulset
from mailrelay_operator.children import desired_children
from mailrelay_operator.settings import NetworkSettings
from mrtest.objects import relay_domain

from mailrelay_api import shards
from mailrelay_api.claims import Claim
from mailrelay_api.load import Inventory, load_manifests
from mailrelay_api.render import render_relay
from mailrelay_api.validate import with_defaults
from relay.config import load_config

REPO = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).parent / "golden"
IMAGE = "registry.test/mailrelay:test"
UPDATE_ENV = "UPDATE_GOLDEN"


class _GoldenDumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True


def _text(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_GoldenDumper.add_representer(str, _text)


def _readable_json(text: str) -> Any:
    """A JSON file as data, when writing that data out again gives the same text."""
    try:
        doc = json.loads(text)
    except ValueError:
        return text
    return doc if json.dumps(doc, indent=2, sort_keys=True) + "\n" == text else text


def _readable_gzip(b64: str) -> Any:
    raw = base64.b64decode(b64)
    return {
        "gunzipped": gzip.decompress(raw).decode(),
        "sha256": hashlib.sha256(raw).hexdigest(),
    }


def readable(child: dict[str, Any]) -> dict[str, Any]:
    """A child as its golden file shows it (nothing left out, nothing escaped)."""
    if child["kind"] != "ConfigMap":
        return child
    child = copy.deepcopy(child)
    data, binary = child.get("data") or {}, child.get("binaryData") or {}
    for name, text in data.items():
        if name.endswith(".json"):
            data[name] = _readable_json(text)
    for name, b64 in binary.items():
        if name.endswith(".gz"):
            binary[name] = _readable_gzip(b64)
    return child


def check_golden(name: str, docs: list[dict[str, Any]]) -> None:
    text = yaml.dump_all(
        [readable(d) for d in docs], Dumper=_GoldenDumper, sort_keys=True, width=100
    )
    path = GOLDEN / name
    if os.environ.get(UPDATE_ENV) == "1":
        path.write_text(text)
    assert path.exists(), f"{path} is missing; write it with {UPDATE_ENV}=1 and review it"
    assert text == path.read_text(), f"{path} differs; rerun with {UPDATE_ENV}=1 and review"


def with_identity(relay: dict[str, Any]) -> dict[str, Any]:
    relay = copy.deepcopy(relay)
    relay["metadata"].update(uid="00000000-0000-0000-0000-000000000001", generation=1)
    relay["metadata"]["labels"] = {"argocd.argoproj.io/instance": "mail", "team": "ops"}
    return relay


def quickstart() -> tuple[dict[str, Any], Inventory]:
    inv = load_manifests([REPO / "examples" / "quickstart"])
    assert not inv.errors
    return with_identity(inv.relays[0]), inv


FULL_RELAY = {
    "apiVersion": "mailrelay.io/v1alpha1",
    "kind": "MailRelay",
    "metadata": {"name": "edge", "namespace": "mail"},
    "spec": {
        "hostname": "mx1.example.net",
        "replicas": 3,
        "image": "registry.test/mailrelay:pinned",
        "mx": [
            {
                "hostname": "mx1.example.net",
                "priority": 10,
                "service": {
                    "annotations": {"external-dns.alpha.kubernetes.io/hostname": "mx1.example.net"}
                },
            },
            {
                "hostname": "mx2.example.net",
                "priority": 20,
                "service": {"type": "NodePort", "externalTrafficPolicy": "Cluster"},
            },
            {"hostname": "mx3.example.net", "priority": 20, "service": {"type": "ClusterIP"}},
        ],
        "storage": {"size": "20Gi", "storageClassName": "fast"},
        "tls": {"issuerRef": {"name": "letsencrypt"}},
        "proxyProtocol": {"enabled": True, "trustedCIDRs": ["10.0.0.0/8"]},
    },
}


def full_relay() -> dict[str, Any]:
    return with_identity(with_defaults(FULL_RELAY))


def test_quickstart_children_match_golden() -> None:
    relay, inv = quickstart()
    children = desired_children(relay, render_relay(relay, inv), IMAGE, cert_manager=True)
    check_golden("quickstart.yaml", children)


def test_full_relay_children_match_golden() -> None:
    relay = full_relay()
    # With the operator's network settings: the relay pods' NetworkPolicy.
    network = NetworkSettings.from_env(
        {
            "MAILRELAY_CLUSTER_CIDRS": "10.96.0.0/12,10.244.0.0/16",
            "POD_NAMESPACE": "mailrelay-system",
            "MAILRELAY_METRICS_NAMESPACE": "monitoring",
        }
    )
    rendered = render_relay(relay, Inventory())
    children = desired_children(relay, rendered, IMAGE, cert_manager=True, network=network)
    check_golden("full.yaml", children)


def by_kind(children: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [c for c in children if c["kind"] == kind]


def test_children_are_owned_and_never_carry_parent_labels() -> None:
    relay, inv = quickstart()
    for child in desired_children(relay, render_relay(relay, inv), IMAGE, cert_manager=True):
        assert child["metadata"]["name"], "explicit names, never generateName"
        assert "generateName" not in child["metadata"]
        labels = child["metadata"]["labels"]
        assert "argocd.argoproj.io/instance" not in labels and "team" not in labels
        assert labels[naming.LABEL_MANAGED_BY] == naming.MANAGED_BY
        [ref] = child["metadata"]["ownerReferences"]
        assert ref["uid"] == relay["metadata"]["uid"] and ref["controller"] is True


def test_mx_services_one_per_entry_with_unique_names() -> None:
    relay = full_relay()
    children = desired_children(relay, render_relay(relay, Inventory()), IMAGE, cert_manager=True)
    mx = [s for s in by_kind(children, "Service") if s["spec"].get("clusterIP") != "None"]
    # Named by MX host: a new priority keeps the Service and its load-balancer IP.
    assert [s["metadata"]["name"] for s in mx] == [
        "edge-mx1-example-net",
        "edge-mx2-example-net",
        "edge-mx3-example-net",
    ]
    assert [s["metadata"]["labels"][naming.MX_PRIORITY_LABEL] for s in mx] == ["10", "20", "20"]
    lb, nodeport, cluster_ip = mx
    assert lb["spec"]["externalTrafficPolicy"] == "Local"
    assert nodeport["spec"]["externalTrafficPolicy"] == "Cluster"
    assert "externalTrafficPolicy" not in cluster_ip["spec"]
    assert all(s["spec"]["ports"][0]["targetPort"] == "smtp-proxy" for s in mx)


def test_default_mx_from_hostname() -> None:
    relay, inv = quickstart()
    children = desired_children(relay, render_relay(relay, inv), IMAGE, cert_manager=True)
    name = "quickstart-mx-quickstart-test"
    mx = [s for s in by_kind(children, "Service") if s["metadata"]["name"] == name]
    assert len(mx) == 1
    assert mx[0]["spec"]["type"] == "LoadBalancer"
    assert mx[0]["metadata"]["annotations"]["mailrelay.io/mx-hostname"] == "mx.quickstart.test"


def test_without_cert_manager_no_certificate_and_no_starttls() -> None:
    relay = full_relay()
    children = desired_children(relay, render_relay(relay, Inventory()), IMAGE, cert_manager=False)
    assert not by_kind(children, "Certificate")
    [sts] = by_kind(children, "StatefulSet")
    pod = sts["spec"]["template"]["spec"]
    assert "--tls-dir" not in pod["containers"][0]["command"]
    assert all(v["name"] != "tls" for v in pod["volumes"])


def test_certificate_names_every_mx_host() -> None:
    relay = full_relay()
    children = desired_children(relay, render_relay(relay, Inventory()), IMAGE, cert_manager=True)
    [cert] = by_kind(children, "Certificate")
    assert cert["spec"]["dnsNames"] == ["mx1.example.net", "mx2.example.net", "mx3.example.net"]
    assert cert["spec"]["secretName"] == "edge-tls"
    assert cert["spec"]["issuerRef"] == {
        "name": "letsencrypt",
        "kind": "ClusterIssuer",
        "group": "cert-manager.io",
    }


@pytest.mark.parametrize("shards,domain_shards", [(5, 0), (32, 1), (33, 2), (64, 8), (128, 16)])
def test_a_shard_count_does_not_change_the_pod_template(shards: int, domain_shards: int) -> None:
    """Crossing a shard-count boundary (recipients 32 -> 64, domains 1 -> 2 ...)
    restarts no pod: the config volume has fixed optional slots."""
    relay, _ = quickstart()
    one = statefulset.statefulset(relay, statefulset.PodOptions(image=IMAGE, shards=1))
    other = statefulset.statefulset(
        relay, statefulset.PodOptions(image=IMAGE, shards=shards, domain_shards=domain_shards)
    )
    assert one["spec"]["template"] == other["spec"]["template"]
    sources = one["spec"]["template"]["spec"]["volumes"][0]["projected"]["sources"]
    names = [s["configMap"]["name"] for s in sources]
    assert names[0] == "quickstart-config"
    assert names[1:3] == ["quickstart-recipients-0", "quickstart-recipients-1"]
    assert names[-1] == f"quickstart-domains-{statefulset.DOMAIN_SHARD_SLOTS - 1}"
    assert all(s["configMap"]["optional"] for s in sources[1:])


def test_beyond_the_fixed_slots_the_template_grows() -> None:
    relay, _ = quickstart()
    many = statefulset.statefulset(relay, statefulset.PodOptions(image=IMAGE, shards=130))
    sources = many["spec"]["template"]["spec"]["volumes"][0]["projected"]["sources"]
    assert len(sources) == 1 + 160 + statefulset.DOMAIN_SHARD_SLOTS


def test_domain_shard_count_changes_touch_no_pod_template(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Rendered for real: 1, then 2 domain shards (and none: inline)."""
    monkeypatch.setattr(shards, "DOMAINS_INLINE_MAX", 2048)
    monkeypatch.setattr(shards, "DOMAIN_SHARD_RAW_BYTES", 4096)
    relay, _ = quickstart()
    templates, counts = [], []
    for n in (3, 20, 40):
        rendered = render_relay(relay, Inventory(relays=[relay], domains=many_domains(n)))
        children = desired_children(relay, rendered, IMAGE, cert_manager=True)
        counts.append(len(configmaps.domain_config_maps(relay, rendered)))
        [sts] = by_kind(children, "StatefulSet")
        templates.append(sts["spec"]["template"])
    assert counts == [0, 1, 2]
    assert templates[0] == templates[1] == templates[2]


def test_recipient_changes_do_not_touch_the_pod_template() -> None:
    relay, inv = quickstart()
    before = desired_children(relay, render_relay(relay, inv), IMAGE, cert_manager=True)
    inv.recipient_lists[0] = copy.deepcopy(inv.recipient_lists[0])
    inv.recipient_lists[0]["spec"]["addresses"].append("new@example.com")
    after = desired_children(relay, render_relay(relay, inv), IMAGE, cert_manager=True)
    changed = [b["metadata"]["name"] for b, a in zip(before, after, strict=True) if a != b]
    assert changed == ["quickstart-recipients-0"]


def test_restart_hash_moves_only_for_restart_settings() -> None:
    relay, _ = quickstart()
    base = statefulset.restart_hash(relay)
    relay["spec"]["limits"]["messageSize"] = 1024 * 1024
    assert statefulset.restart_hash(relay) == base
    relay["spec"]["proxyProtocol"] = {"enabled": True, "trustedCIDRs": ["10.0.0.0/8"]}
    assert statefulset.restart_hash(relay) != base


@pytest.mark.parametrize("wait,timeout", [("6s", 20), ("30s", 35)])
def test_probe_timeout_outlasts_the_greet_pause(wait: str, timeout: int) -> None:
    relay, _ = quickstart()
    relay["spec"]["postscreen"]["greet"]["wait"] = wait
    assert statefulset.probe_timeout(relay) == timeout


def test_pod_security() -> None:
    relay, inv = quickstart()
    children = desired_children(relay, render_relay(relay, inv), IMAGE, cert_manager=True)
    [sts] = by_kind(children, "StatefulSet")
    pod = sts["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsUser"] == 10025
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["terminationGracePeriodSeconds"] >= 60
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    spread = pod["topologySpreadConstraints"][0]
    assert spread["topologyKey"] == "topology.kubernetes.io/zone" and spread["maxSkew"] == 1
    assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "queue"
    [pdb] = by_kind(children, "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1


def many_domains(n: int) -> list[dict[str, Any]]:
    return [relay_domain(f"d{i:05d}", relay="quickstart", namespace="default") for i in range(n)]


def test_ten_thousand_domains_go_in_domain_shards() -> None:
    """domains.json would overflow its ConfigMap: the config ConfigMap gets the
    index, each domain shard a ConfigMap of its own, and the relay loads them all."""
    relay, _ = quickstart()
    rendered = render_relay(relay, Inventory(relays=[relay], domains=many_domains(10000)))
    assert "domains.json" not in rendered.files
    children = desired_children(relay, rendered, IMAGE, cert_manager=True)
    cms = by_kind(children, "ConfigMap")
    domain_cms = configmaps.domain_config_maps(relay, rendered)
    assert [cm["metadata"]["name"] for cm in domain_cms] == ["quickstart-domains-0"]
    config_cm = next(cm for cm in cms if cm["metadata"]["name"] == "quickstart-config")
    assert set(config_cm["data"]) == {"relay.json", "domains-index.json"}
    assert all(len(yaml.safe_dump(cm)) < 512 * 1024 for cm in cms)
    with tempfile.TemporaryDirectory() as folder:
        for name, data in configmaps.config_files(cms).items():
            (Path(folder) / name).write_bytes(data)
        config = load_config(folder)
    assert len(config.domains) == 10000


def test_children_encoded_at_the_apply_are_those_built_encoded() -> None:
    """The reconciler builds its children with their binaryData encoded later
    (configmaps.Base64, encoded one child at a time as ChildApplier applies it):
    encoded, they are the children built at once, claims ConfigMaps included."""
    relay, inv = quickstart()
    rendered = render_relay(relay, inv)
    # Enough claims for the claims ConfigMaps (claims_store.STATUS_CLAIMS_MAX).
    rendered.claims = [Claim(f"d{i}.example", f"mail/d{i}") for i in range(10_001)]
    now = desired_children(relay, rendered, IMAGE, cert_manager=True)
    later = desired_children(relay, rendered, IMAGE, cert_manager=True, encode_later=True)
    deferred = [c for c in later if configmaps.encoded(c) is not c]
    assert {c["metadata"]["name"].rsplit("-", 2)[-2] for c in deferred} >= {"recipients", "claims"}
    assert [configmaps.encoded(c) for c in later] == now
