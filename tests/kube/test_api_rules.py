"""The API server refuses what `mailrelay validate` refuses (one definition of
valid), and what a tenant must not change: the CRDs' CEL rules, on a real
kube-apiserver."""

from __future__ import annotations

import json
from typing import Any

import pytest
from mrtest.kube import Kube
from mrtest.objects import mailrelay_manifest, relay_domain_manifest

from mailrelay_api.validate import validate_object, with_defaults

pytestmark = pytest.mark.kube


def relay(name: str, **spec: Any) -> dict[str, Any]:
    return mailrelay_manifest(name, "default", spec={"hostname": "mx.example.net", **spec})


def domain(name: str, dom: str, relay_name: str = "r") -> dict[str, Any]:
    return relay_domain_manifest(
        name,
        domain=dom,
        relay=relay_name,
        namespace="default",
        next_hop="mx.example.org",
        recipients=None,
    )


def server_says(kube: Kube, obj: dict[str, Any]) -> str:
    """ "" when the API server takes the object (dry run), else its message."""
    run = kube.kubectl_run("apply", "--dry-run=server", "-f", "-", stdin=json.dumps(obj))
    return "" if run.returncode == 0 else run.stderr


INVALID = {
    "cidr out of range": {"network": {"mynetworks": ["999.1.1.1/40"]}},
    "prefix too long": {"proxyProtocol": {"enabled": True, "trustedCIDRs": ["10.0.0.0/33"]}},
    "client access cidr": {
        "network": {"clientAccess": [{"cidr": "300.0.0.0/8", "action": "reject"}]}
    },
    "spf skip address": {"restrictions": {"spf": {"skipAddresses": ["1.2.3.999"]}}},
    "dnsbl code over 255": {
        "postscreen": {
            "dnsbl": {"sites": [{"zone": "bl.example.org", "returnCodes": ["127.0.0.256"]}]}
        }
    },
    "dnsbl range over 255": {
        "postscreen": {
            "dnsbl": {"sites": [{"zone": "bl.example.org", "returnCodes": ["127.0.0.[2..999]"]}]}
        }
    },
    "rbl code over 255": {
        "restrictions": {"rblClients": [{"zone": "bl.example.org", "returnCodes": ["127.0.300.2"]}]}
    },
    "nameserver port": {"dns": {"nameservers": ["192.0.2.53:70000"]}},
    "nameserver port zero": {"dns": {"nameservers": ["192.0.2.53:0"]}},
    "milter port": {
        "contentFilters": {"milters": [{"name": "m", "address": "inet:127.0.0.1:99999"}]}
    },
    "milter v6 port": {"contentFilters": {"milters": [{"name": "m", "address": "inet:[::1]:0"}]}},
    "nameserver address": {"dns": {"nameservers": ["192.0.2.530"]}},
    "next hop cidr": {"allowedNextHops": [{"cidr": "10.0.0.0/99"}]},
    "next hop cidr and host": {"allowedNextHops": [{"cidr": "10.0.0.0/8", "host": "a.example"}]},
    "workers zero": {"workers": 0},
    "mx pods naming none": {"mx": [{"hostname": "mx2.example.net", "priority": 20, "pods": {}}]},
    "workers word": {"workers": "many"},
    "mx hostname twice": {
        "mx": [
            {"hostname": "mx2.example.net", "priority": 10},
            {"hostname": "MX2.Example.NET", "priority": 20},
        ]
    },
}
VALID = {
    "defaults": {},
    "v4 and v6": {"network": {"mynetworks": ["10.0.0.0/8", "2001:db8::/32", "192.0.2.1"]}},
    "nameservers": {"dns": {"nameservers": ["192.0.2.53", "192.0.2.53:5353", "::1", "[::1]:53"]}},
    "dnsbl filters": {
        "postscreen": {
            "dnsbl": {"sites": [{"zone": "bl.example.org", "returnCodes": ["127.0.0.[2..11;255]"]}]}
        }
    },
    "milters": {
        "contentFilters": {
            "milters": [
                {"name": "a", "address": "inet:127.0.0.1:65535"},
                {"name": "b", "address": "inet:[::1]:8891"},
                {"name": "c", "address": "unix:/run/milter.sock"},
            ]
        }
    },
    "grants": {
        "allowedDomains": {
            "grants": [
                {"namespaces": {"from": "Same"}, "domains": ["*"]},
                {
                    "namespaces": {"from": "Selector", "selector": {"matchLabels": {"t": "a"}}},
                    "domains": ["a.example", "*.a.example"],
                },
            ]
        }
    },
    "mx pods": {
        "mx": [
            {"hostname": "mx1.example.net", "priority": 10},
            {
                "hostname": "mx2.example.net",
                "priority": 20,
                "pods": {"ordinals": [2], "zones": ["b"]},
            },
        ]
    },
    "scheduling": {
        "workers": 4,
        "resources": {"requests": {"cpu": "500m", "memory": "256Mi"}, "limits": {"cpu": 2}},
        "spread": {"zones": "Required", "hosts": "Required"},
        "priorityClassName": "mail",
        "imagePullSecrets": [{"name": "regcred"}],
        "affinity": {
            "nodeSelector": {"pool": "mail"},
            "tolerations": [{"key": "mail", "operator": "Exists"}],
        },
    },
}


@pytest.mark.parametrize("case", list(INVALID))
def test_the_api_server_and_validate_refuse_the_same(kube: Kube, case: str) -> None:
    obj = relay("r", **INVALID[case])
    assert server_says(kube, obj), f"the API server took {case}"
    assert validate_object(with_defaults(obj)), f"mailrelay validate took {case}"


@pytest.mark.parametrize("case", list(VALID))
def test_the_api_server_and_validate_take_the_same(kube: Kube, case: str) -> None:
    obj = relay("r", **VALID[case])
    assert server_says(kube, obj) == ""
    assert validate_object(with_defaults(obj)) == []


def test_domain_and_relay_ref_are_immutable(kube: Kube) -> None:

    kube.kubectl("apply", "-f", "-", stdin=json.dumps(domain("mine", "mine.example")))
    try:
        hijack = domain("mine", "theirs.example")
        message = server_says(kube, hijack)
        assert "spec.domain is immutable" in message
        moved = domain("mine", "mine.example", relay_name="other")
        assert "spec.relayRef is immutable" in server_says(kube, moved)
        # The rest of the spec stays editable.
        edited = domain("mine", "mine.example")
        edited["spec"]["nextHop"]["port"] = 587
        assert server_says(kube, edited) == ""
    finally:
        kube.kubectl("delete", "relaydomain", "mine", "--wait=false")
