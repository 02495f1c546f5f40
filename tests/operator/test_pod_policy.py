"""The relay pods' scheduling fields, workers and NetworkPolicy (pure builders)."""

from __future__ import annotations

from typing import Any

from mailrelay_operator import naming, networkpolicy, services
from mailrelay_operator.settings import NetworkSettings
from mailrelay_operator.statefulset import PodOptions, statefulset
from mrtest.objects import mailrelay

from mailrelay_api.claims import ClusterNetworks
from mailrelay_api.pod_env import CPU_LIMIT_ENV
from mailrelay_api.spec import NextHopSpec


def relay(**spec: Any) -> dict[str, Any]:
    return mailrelay(uid="u", spec={"hostname": "mx1.example.net", "replicas": 3, **spec})


def pod(r: dict[str, Any]) -> dict[str, Any]:
    return dict(statefulset(r, PodOptions(image="i"))["spec"]["template"]["spec"])


def test_defaults_make_a_burstable_pod_spread_by_preference() -> None:
    spec = pod(relay())
    (c,) = spec["containers"]
    assert c["resources"] == {
        "requests": {"cpu": "250m", "memory": "128Mi"},
        "limits": {"memory": "512Mi"},
    }
    zone, host = spec["topologySpreadConstraints"]
    assert zone["topologyKey"] == "topology.kubernetes.io/zone"
    assert host["topologyKey"] == "kubernetes.io/hostname"
    assert {zone["whenUnsatisfiable"], host["whenUnsatisfiable"]} == {"ScheduleAnyway"}
    assert "minDomains" not in zone and "minDomains" not in host
    for absent in ("priorityClassName", "imagePullSecrets", "nodeSelector", "tolerations"):
        assert absent not in spec
    # workers: auto -> no flag; the cpu request (no cpu limit) through the downward API.
    assert "--workers" not in c["command"]
    (cpu,) = [e for e in c["env"] if e["name"] == CPU_LIMIT_ENV]
    assert cpu["valueFrom"]["resourceFieldRef"] == {
        "containerName": "relay",
        "resource": "requests.cpu",
        "divisor": "1",
    }


def test_scheduling_fields_pass_through() -> None:
    affinity = {
        "nodeSelector": {"pool": "mail"},
        "tolerations": [{"key": "mail", "operator": "Exists", "effect": "NoSchedule"}],
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": []}
        },
    }
    spec = pod(
        relay(
            resources={"requests": {"cpu": 1}, "limits": {"cpu": "2", "memory": "1Gi"}},
            affinity=affinity,
            priorityClassName="mail-critical",
            imagePullSecrets=[{"name": "regcred"}],
            spread={"zones": "Required", "hosts": "Required"},
        )
    )
    assert spec["nodeSelector"] == {"pool": "mail"}
    assert spec["tolerations"] == affinity["tolerations"]
    assert spec["affinity"] == {"nodeAffinity": affinity["nodeAffinity"]}
    assert spec["priorityClassName"] == "mail-critical"
    assert spec["imagePullSecrets"] == [{"name": "regcred"}]
    zone, host = spec["topologySpreadConstraints"]
    assert (zone["whenUnsatisfiable"], zone["minDomains"]) == ("DoNotSchedule", 2)
    assert (host["whenUnsatisfiable"], host["minDomains"]) == ("DoNotSchedule", 3)
    (c,) = spec["containers"]
    (cpu,) = [e for e in c["env"] if e["name"] == CPU_LIMIT_ENV]
    assert cpu["valueFrom"]["resourceFieldRef"]["resource"] == "limits.cpu"


def test_a_number_of_workers_is_passed_as_a_flag() -> None:
    (c,) = pod(relay(workers=3))["containers"]
    assert c["command"][-2:] == ["--workers", "3"]
    assert not [e for e in c["env"] if e["name"] == CPU_LIMIT_ENV]


def test_mx_services_keep_their_name_across_priorities_and_upgrades() -> None:
    mx = [
        {"hostname": "mx1.example.net", "priority": 10},
        {"hostname": "mx2.example.net", "priority": 20},
    ]
    before = [s["metadata"]["name"] for s in services.mx_services(relay(mx=mx))]
    mx[1]["priority"] = 5
    after = [s["metadata"]["name"] for s in services.mx_services(relay(mx=mx))]
    assert before == after == ["edge-mx1-example-net", "edge-mx2-example-net"]
    # A Service from an older operator keeps its name (and load-balancer IP).
    kept = services.mx_services(relay(mx=mx), {"mx1.example.net": "edge-mx10"})
    assert [s["metadata"]["name"] for s in kept] == ["edge-mx10", "edge-mx2-example-net"]
    long = services.mx_services(relay(mx=[{"hostname": "a" * 60 + ".example.net", "priority": 1}]))
    assert len(long[0]["metadata"]["name"]) <= 63


SETTINGS = NetworkSettings(
    cluster=ClusterNetworks.from_env({"MAILRELAY_CLUSTER_CIDRS": "10.96.0.0/12,fd00::/108"}),
    operator_namespace="mailrelay-system",
    metrics_namespace="monitoring",
)


def test_network_policy_shapes_ingress_and_egress() -> None:
    hops = [NextHopSpec.with_defaults({"host": "mx.customer.example", "port": 2525})]
    np = networkpolicy.network_policy(relay(), hops, SETTINGS)["spec"]
    smtp, handover, metrics = np["ingress"]
    assert "from" not in smtp and {p["port"] for p in smtp["ports"]} == {2525, 10025}
    assert handover["from"] == [{"podSelector": {"matchLabels": naming.pod_selector(relay())}}]
    assert [p["port"] for p in handover["ports"]] == [naming.HANDOVER_PORT]
    assert [
        n["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
        for n in metrics["from"]
    ] == [
        "mailrelay-system",
        "monitoring",
    ]
    dns, peers, mail = np["egress"]
    assert [p["port"] for p in peers["ports"]] == [naming.HANDOVER_PORT]
    assert {(p["port"], p["protocol"]) for p in dns["ports"]} == {(53, "UDP"), (53, "TCP")}
    assert {p["port"] for p in mail["ports"]} == {25, 465, 587, 2525}
    v4, v6 = mail["to"]
    assert v4["ipBlock"] == {"cidr": "0.0.0.0/0", "except": ["10.96.0.0/12"]}
    assert v6["ipBlock"] == {"cidr": "::/0", "except": ["fd00::/108"]}


def test_an_internal_next_hop_opens_the_cluster_ranges() -> None:
    hops = [
        NextHopSpec.with_defaults({"host": "postfix.mail.svc"}),
        NextHopSpec.with_defaults({"host": "127.0.0.1"}),
    ]
    mail = networkpolicy.network_policy(relay(), hops, SETTINGS)["spec"]["egress"][2]
    assert all("except" not in t["ipBlock"] for t in mail["to"])
    loopback_only = [NextHopSpec.with_defaults({"host": "127.0.0.1", "port": 2526})]
    mail = networkpolicy.network_policy(relay(), loopback_only, SETTINGS)["spec"]["egress"][2]
    assert mail["to"][0]["ipBlock"]["except"] == ["10.96.0.0/12"]


def test_an_mx_may_be_served_by_a_subset_of_pods() -> None:
    mx = [
        {"hostname": "mx1.example.net", "priority": 10},
        {
            "hostname": "mx2.example.net",
            "priority": 20,
            "pods": {"ordinals": [2], "zones": ["eu-b"]},
        },
    ]
    r = relay(mx=mx)
    primary, backup = services.mx_services(r)
    assert primary["spec"]["selector"] == naming.pod_selector(r)
    label = naming.mx_pods_label("mx2.example.net")
    assert backup["spec"]["selector"] == {**naming.pod_selector(r), label: "true"}
    assert services.pod_mx_labels(r, 2, "eu-a") == {label: "true"}
    assert services.pod_mx_labels(r, 0, "eu-b") == {label: "true"}
    assert services.pod_mx_labels(r, 1, "eu-a") == {label: None}
    assert services.pod_mx_labels(relay(), 0, None) == {}
