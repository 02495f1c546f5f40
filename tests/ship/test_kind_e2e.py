"""hack/kind-e2e.sh runs the real-cluster suite (tests/cluster/) on kind with the
same image build as CI's node; here: its shape, and the node scripts' shellcheck."""

from __future__ import annotations

import shutil

import pytest
from ship.tools import REPO, run

SCRIPT = REPO / "hack" / "kind-e2e.sh"
NODE_SCRIPTS = [
    "kind-e2e.sh", "build-images.sh", "docker-up.sh", "docker-down.sh", "docker-env.sh",
    "netfilter.sh", "stop.sh", "cluster-up.sh", "cluster-down.sh",
    "cluster-load.sh", "cluster-env.sh", "apt.sh", "install-tools.sh", "test.sh",
]  # fmt: skip


def test_shellcheck() -> None:
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.fail("shellcheck is missing: run hack/setup.sh (Debian package shellcheck)")
    result = run([shellcheck, *(str(REPO / "hack" / s) for s in NODE_SCRIPTS)])
    assert result.returncode == 0, result.stdout


def test_kind_runs_what_ci_runs() -> None:
    text = SCRIPT.read_text()
    # The same image build, and the same test module, selected the same way.
    assert 'bash hack/build-images.sh --tag "$TAG"' in text
    assert "MAILRELAY_CLUSTER=kind" in text
    assert "-m pytest -m cluster tests/cluster/" in text
    test_sh = (REPO / "hack" / "test.sh").read_text()
    assert "tests/cluster/" in test_sh
