"""The CLI's outputs: tables for people, json/yaml for scripts, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def mailrelay(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay.process.cli", *args], cwd=ROOT, capture_output=True, text=True
    )


def test_validate_table_and_json(tmp_path: Path) -> None:
    ok = mailrelay("validate", "-f", "examples/quickstart")
    assert ok.returncode == 0
    assert ok.stdout.splitlines()[0].split() == ["KIND", "NAME", "SOURCE"]
    assert "ok: 1 MailRelay, 2 RelayDomain, 1 RecipientList" in ok.stdout

    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "apiVersion: mailrelay.io/v1alpha1\nkind: RelayDomain\nmetadata: {name: d}\n"
        "spec: {domain: example.com, relayRef: {name: x}, nextHop: {host: h, tls: maybe}}\n"
    )
    out = mailrelay("validate", "-f", str(bad), "-o", "json")
    assert out.returncode == 1
    doc = json.loads(out.stdout)
    assert doc["valid"] is False
    assert any(
        "spec.nextHop.tls: must be one of none, may, encrypt, verify" in e for e in doc["errors"]
    )


def test_render_yaml_is_machine_readable() -> None:
    out = mailrelay("render", "-f", "examples/quickstart", "-o", "yaml")
    assert out.returncode == 0
    doc = yaml.safe_load(out.stdout)
    assert doc["files"]["relay.json"]["policy"]["hostname"] == "mx.quickstart.test"
    assert {d["domain"] for d in doc["domains"]} == {"example.com", "example.org"}
    assert doc["files"]["recipients-0000.txt.gz"]["recipients"] == 3
