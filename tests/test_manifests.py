"""Schema, defaults, validation messages and rendering of the example manifests."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

from mailrelay_api.load import load_manifests
from mailrelay_api.render import render_relay
from mailrelay_api.validate import validate_object, with_defaults

ROOT = Path(__file__).resolve().parents[1]


def relay(**spec: object) -> dict:
    return {
        "apiVersion": "mailrelay.io/v1alpha1",
        "kind": "MailRelay",
        "metadata": {"name": "edge", "namespace": "mail"},
        "spec": {"hostname": "mx1.example.net", **spec},
    }


def test_bad_fields_are_named() -> None:
    errors = validate_object(relay(limits={"messageSize": "big"}, bogus=1, hostname="x"))
    text = "\n".join(map(str, errors))
    assert "spec.limits.messageSize: must be of type integer" in text
    assert "spec: unknown field" in text and "bogus" in text
    assert "spec.hostname" in text


def test_semantic_cidr_and_rule_checks() -> None:
    bad = relay(network={"mynetworks": ["300.1.2.3/8"]})
    assert any(e.field == "spec.network.mynetworks[0]" for e in validate_object(bad))
    sel = relay(allowedDomains={"namespaces": {"from": "Selector"}})
    assert any("selector is required" in e.message for e in validate_object(sel))


def test_crds_are_up_to_date() -> None:
    rc = subprocess.run([sys.executable, "-m", "mailrelay_api.crdgen", "--check"])
    assert rc.returncode == 0


def test_quickstart_renders() -> None:
    inv = load_manifests([ROOT / "examples" / "quickstart"])
    assert not inv.errors
    rendered = render_relay(inv.relays[0], inv)
    domains = json.loads(rendered.files["domains.json"])
    assert [d["domain"] for d in domains["domains"]] == ["example.com", "example.org"]
    shard = rendered.files[domains["recipientFiles"][0]]
    assert b"joe@example.com" in gzip.decompress(shard)
    policy = json.loads(rendered.files["relay.json"])["policy"]
    assert policy["queue"]["lifetime"] == "10d"  # defaults applied from the schema


def test_conflict_older_wins() -> None:
    inv = load_manifests([])
    r = with_defaults(relay())
    inv.relays.append(r)
    for name, ts in (("newer", "2026-02-01T00:00:00Z"), ("older", "2026-01-01T00:00:00Z")):
        inv.domains.append(
            with_defaults(
                {
                    "apiVersion": "mailrelay.io/v1alpha1",
                    "kind": "RelayDomain",
                    "metadata": {"name": name, "namespace": "mail", "creationTimestamp": ts},
                    "spec": {
                        "domain": "Example.COM",
                        "relayRef": {"name": "edge"},
                        "nextHop": {"host": "h"},
                        "recipients": "any",
                    },
                }
            )
        )
    verdicts = {v.name: v for v in render_relay(r, inv).domains}
    assert verdicts["older"].accepted
    assert not verdicts["newer"].accepted and verdicts["newer"].reason == "Conflict"


def test_operator_folder_never_shadows_stdlib() -> None:
    out = subprocess.run(
        [sys.executable, "-c", "import operator; print(operator.__file__)"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert str(ROOT / "operator") not in out
