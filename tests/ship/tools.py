"""Helpers of the ship tests: the pinned tools, rendering the chart, kubectl."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from mrtest.kube import Kube

REPO = Path(__file__).resolve().parents[2]
ASSETS = Path(os.environ.get("KUBEBUILDER_ASSETS") or REPO / ".tools" / "bin")
CHART = REPO / "deploy" / "helm" / "mailrelay-operator"


def tool(name: str) -> str:
    """A binary from hack/install-tools.sh; a missing one fails the test, never skips it."""
    path = ASSETS / name
    if not path.is_file():
        pytest.fail(
            f"{path} is missing: run hack/install-tools.sh (it builds kube-apiserver, etcd, "
            "kubectl and helm from Go modules into .tools/bin)",
            pytrace=False,
        )
    return str(path)


def run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    kw.setdefault("timeout", 120)
    return subprocess.run(cmd, capture_output=True, text=True, check=False, **kw)


def helm_template(
    *args: str, release: str = "mailrelay", namespace: str = "mailrelay-system"
) -> subprocess.CompletedProcess[str]:
    return run([tool("helm"), "template", release, str(CHART), "--namespace", namespace, *args])


def render_chart(*args: str, **kw: str) -> list[dict[str, Any]]:
    """The chart's manifests as objects; a failing `helm template` fails the test."""
    result = helm_template(*args, **kw)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d.get("kind") == kind]


def ensure_namespaces(kube: Kube, *names: str) -> None:
    """Creates Namespaces for real: a dry-run one is not there for what is in it."""
    docs = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n}} for n in names]
    kube.kubectl(
        "apply", "--server-side", "--field-manager=ship-tests", "-f", "-",
        stdin=yaml.safe_dump_all(docs),
    )  # fmt: skip


def dry_run(kube: Kube, docs: list[dict[str, Any]]) -> subprocess.CompletedProcess[str]:
    """Server-side dry-run apply: schema, CEL and admission run; nothing is stored."""
    return kube.kubectl_run(
        "apply", "--server-side", "--dry-run=server", "--force-conflicts",
        "--field-manager=ship-tests", "-f", "-",
        stdin=yaml.safe_dump_all(docs),
    )  # fmt: skip
