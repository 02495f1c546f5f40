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
    assert doc["files"]["recipients-0000-of-0001.txt.gz"]["recipients"] == 3


def test_warnings_go_to_stderr_and_fail_only_with_strict(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    for f in (ROOT / "examples" / "quickstart").iterdir():
        text = f.read_text().replace("postmaster@example.com", "postmaster@example.org")
        (folder / f.name).write_text(text)
    warning = (
        f"warning: {folder / 'example-com.yaml'}#2: RecipientList default/example-com-staff: "
        "spec.addresses[2]: 'postmaster@example.org' is not in example.com: the relay ignores it"
    )
    out = mailrelay("validate", "-f", str(folder))
    assert out.returncode == 0
    assert out.stderr.splitlines() == [warning]
    assert "ok: 1 MailRelay, 2 RelayDomain, 1 RecipientList (1 warning(s))" in out.stdout
    assert warning not in out.stdout

    strict = mailrelay("validate", "-f", str(folder), "--strict", "-o", "json")
    assert strict.returncode == 1
    assert strict.stderr.splitlines() == [warning]
    doc = json.loads(strict.stdout)
    assert doc["valid"] is True and doc["errors"] == []  # valid, but --strict
    assert doc["warnings"] == [warning.removeprefix("warning: ")]

    render = mailrelay("render", "-f", str(folder), "-o", "json")
    assert render.returncode == 0 and render.stderr.splitlines() == [warning]
    assert json.loads(render.stdout)["files"]["recipients-0000-of-0001.txt.gz"]["recipients"] == 2
    strict_render = mailrelay("render", "-f", str(folder), "--strict")
    assert strict_render.returncode == 1 and strict_render.stdout == ""
    assert warning in strict_render.stderr.splitlines()

    clean = mailrelay("validate", "-f", "examples/quickstart", "--strict")
    assert clean.returncode == 0 and clean.stderr == ""
