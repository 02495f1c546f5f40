"""The Argo CD health checks, run by Debian's lua5.4 on sample objects.

Each kind's folder follows Argo CD's own resource_customizations layout:
health.lua, health_test.yaml (expected status and message per sample) and
testdata/. The samples must be valid objects of our CRDs, so a renamed status
field cannot leave the Lua checking something that no longer exists.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from mailrelay_api.validate import validate_object

REPO = Path(__file__).resolve().parents[2]
ARGOCD = REPO / "deploy" / "argocd"
CHECKS = ARGOCD / "resource_customizations" / "mailrelay.io"
KINDS = ["MailRelay", "RelayDomain", "RecipientList"]


def lua_literal(value: Any) -> str:
    """A Python value from YAML as a Lua table constructor (None becomes nil)."""
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        escaped = "".join(
            c if c.isalnum() or c in " .,:;-_/()=+*@[]{}<>!?#'" else f"\\{ord(c):03d}"
            for c in value
        )
        return f'"{escaped}"'
    if isinstance(value, list):
        return "{" + ", ".join(lua_literal(v) for v in value) + "}"
    if isinstance(value, dict):
        items = (f"[{lua_literal(str(k))}] = {lua_literal(v)}" for k, v in value.items())
        return "{" + ", ".join(items) + "}"
    raise TypeError(f"no Lua form for {type(value).__name__}")


def lua() -> str:
    path = shutil.which("lua5.4")
    if path is None:
        pytest.fail("lua5.4 is not installed: run hack/setup.sh (Debian package lua5.4)")
    return path


def run_health(kind: str, obj: dict[str, Any]) -> tuple[str, str]:
    """Runs the kind's health.lua the way Argo CD does: `obj` global, returns hs."""
    script = (
        f"obj = {lua_literal(obj)}\n"
        f"local hs = dofile({lua_literal(str(CHECKS / kind / 'health.lua'))})\n"
        'io.write(tostring(hs.status), "\\n", tostring(hs.message))\n'
    )
    result = subprocess.run(
        [lua(), "-"], input=script, capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
    status, _, message = result.stdout.partition("\n")
    return status, message


def cases() -> list[tuple[str, str, str, str]]:
    out = []
    for kind in KINDS:
        spec = yaml.safe_load((CHECKS / kind / "health_test.yaml").read_text())
        for t in spec["tests"]:
            want = t["healthStatus"]
            out.append((kind, t["inputPath"], want["status"], want["message"]))
    return out


@pytest.mark.parametrize(("kind", "sample", "status", "message"), cases())
def test_health_check(kind: str, sample: str, status: str, message: str) -> None:
    obj = yaml.safe_load((CHECKS / kind / sample).read_text())
    assert run_health(kind, obj) == (status, message)


def test_every_kind_has_healthy_progressing_and_degraded_samples() -> None:
    by_kind: dict[str, set[str]] = {}
    for kind, _, status, _ in cases():
        by_kind.setdefault(kind, set()).add(status)
    for kind in KINDS:
        assert by_kind.get(kind, set()) >= {"Healthy", "Progressing", "Degraded"}, kind


@pytest.mark.parametrize("kind", KINDS)
def test_samples_are_valid_objects(kind: str) -> None:
    for sample in sorted((CHECKS / kind / "testdata").glob("*.yaml")):
        obj = yaml.safe_load(sample.read_text())
        assert obj["kind"] == kind
        assert validate_object(obj, str(sample)) == []
        # Every test sample is listed in health_test.yaml.
        assert f"testdata/{sample.name}" in (CHECKS / kind / "health_test.yaml").read_text()


@pytest.mark.parametrize("kind", KINDS)
def test_lua_stays_within_lua_5_1(kind: str) -> None:
    # Argo CD runs gopher-lua (Lua 5.1): no goto, integer division,
    # bitwise operators or <const>/<close> attributes.
    code = "\n".join(
        line.split("--", 1)[0] for line in (CHECKS / kind / "health.lua").read_text().splitlines()
    )
    for construct in (r"\bgoto\b", r"//", r"<const>", r"<close>", r"[&|~]\s*\w", r"<<|>>"):
        assert not re.search(construct, code.replace("~=", "")), (kind, construct)


def test_argocd_cm_snippet_embeds_the_checks() -> None:
    gen = subprocess.run(
        [sys.executable, str(REPO / "hack" / "gen-argocd-cm.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert gen.returncode == 0, gen.stderr
    cm = yaml.safe_load((ARGOCD / "argocd-cm.yaml").read_text())
    assert cm["kind"] == "ConfigMap" and cm["metadata"]["name"] == "argocd-cm"
    for kind in KINDS:
        key = f"resource.customizations.health.mailrelay.io_{kind}"
        assert cm["data"][key] == (CHECKS / kind / "health.lua").read_text()


def test_applications() -> None:
    apps = [yaml.safe_load(p.read_text()) for p in sorted((ARGOCD / "applications").glob("*.yaml"))]
    assert {a["kind"] for a in apps} == {"Application"}
    sources = [a["spec"]["source"] for a in apps]
    chart = [s for s in sources if s.get("path") == "deploy/helm/mailrelay-operator"]
    assert chart, "an Application for the chart"
    assert (REPO / chart[0]["path"] / "Chart.yaml").is_file()
    folders = [s for s in sources if s.get("directory")]
    assert folders, "an Application for a folder of domain resources"
    for app in apps:
        sync = app["spec"].get("syncPolicy", {})
        # CRs may be applied before the chart's CRDs exist; CRDs are large.
        assert "ServerSideApply=true" in sync.get("syncOptions", []), app["metadata"]["name"]
