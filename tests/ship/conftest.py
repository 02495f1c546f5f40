"""Fixtures of the ship tests: the tools from hack/install-tools.sh, and one
local control plane (hack/kube-up.sh) per session with the CRDs installed."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from ship.tools import ASSETS, REPO, Kube, tool

KUBE_UP = REPO / "hack" / "kube-up.sh"
KUBE_DOWN = REPO / "hack" / "kube-down.sh"


@pytest.fixture(scope="session")
def helm() -> str:
    return tool("helm")


def _stop_leftovers(state_file: Path) -> None:
    """Ends the etcd/kube-apiserver this fixture's kube-up started, if kube-down could not.

    Only PIDs recorded in our own state file, and only while their command
    line still names our state folder.
    """
    if not state_file.exists():
        return
    state = dict(line.split("=", 1) for line in state_file.read_text().splitlines() if "=" in line)
    state_dir = state.get("STATE_DIR", "")
    for line in state_file.read_text().splitlines():
        key, _, pid = line.partition("=")
        if key not in ("APISERVER_PID", "ETCD_PID") or not state_dir:
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            if state_dir in cmdline:
                os.kill(int(pid), signal.SIGKILL)
        except (OSError, ValueError):
            pass


@pytest.fixture(scope="session")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kube]:
    """A kube-apiserver of our own (not the developer's cluster), CRDs established."""
    tool("kube-apiserver")
    kubeconfig = tmp_path_factory.mktemp("ship-kube") / "kubeconfig"
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "KUBEBUILDER_ASSETS": str(ASSETS)}
    try:
        up = subprocess.run(
            ["bash", str(KUBE_UP)], env=env, capture_output=True, text=True, timeout=300
        )
        if up.returncode != 0:
            pytest.fail(f"hack/kube-up.sh failed ({up.returncode}):\n{up.stderr}", pytrace=False)
        k = Kube(Path(kubeconfig), env)
        crds = sorted((REPO / "deploy" / "crds").glob("*.yaml"))
        k.kubectl("apply", "--server-side", *[a for f in crds for a in ("-f", str(f))])
        k.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd", "--all")
        yield k
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired):
            subprocess.run(["bash", str(KUBE_DOWN)], env=env, capture_output=True, timeout=60)
        _stop_leftovers(Path(f"{kubeconfig}.state"))
