"""The local control plane of hack/kube-up.sh works end to end.

Starts etcd and kube-apiserver (built by hack/install-tools.sh) with a
temporary KUBECONFIG, checks the server version, applies a tiny CRD with
server-side apply, waits for it to be Established, uses it, and stops
everything with hack/kube-down.sh. Independent of the project's Python code.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.kube

REPO = Path(__file__).resolve().parents[2]
ASSETS = Path(os.environ.get("KUBEBUILDER_ASSETS") or REPO / ".tools" / "bin")
KUBE_UP = REPO / "hack" / "kube-up.sh"
KUBE_DOWN = REPO / "hack" / "kube-down.sh"

CRD_NAME = "widgets.smoke.mailrelay.test"
CRD = """
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.smoke.mailrelay.test
spec:
  group: smoke.mailrelay.test
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget}
  versions:
    - name: v1
      served: true
      storage: true
      schema:
        openAPIV3Schema:
          type: object
          properties:
            spec:
              type: object
              properties:
                size: {type: integer, minimum: 1}
"""
WIDGET = """
apiVersion: smoke.mailrelay.test/v1
kind: Widget
metadata: {name: small, namespace: default}
spec: {size: 3}
"""


@dataclass
class ControlPlane:
    kubeconfig: Path
    state_file: Path
    env: dict[str, str]
    state: dict[str, str]


def _run(
    cmd: list[str], env: dict[str, str], timeout: float, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, env=env, input=stdin, capture_output=True, text=True, timeout=timeout, check=False
    )


def _read_state(path: Path) -> dict[str, str]:
    state: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            state.setdefault(key, value)
    return state


def _pid_runs_in(pid: str, state_dir: str) -> bool:
    """True if PID is alive and its command line names the kube-up state dir."""
    try:
        return state_dir in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


@pytest.fixture
def control_plane(tmp_path: Path) -> Iterator[ControlPlane]:
    if not (ASSETS / "kube-apiserver").is_file():
        pytest.fail(
            f"{ASSETS / 'kube-apiserver'} is missing: run hack/install-tools.sh first "
            "(it builds kube-apiserver, kubectl, etcd and helm into .tools/bin)",
            pytrace=False,
        )
    kubeconfig = tmp_path / "kubeconfig"
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "KUBEBUILDER_ASSETS": str(ASSETS)}
    try:
        up = _run(["bash", str(KUBE_UP)], env, timeout=240)
        if up.returncode != 0:
            pytest.fail(f"hack/kube-up.sh failed ({up.returncode}):\n{up.stderr}{up.stdout}")
        assert up.stdout.strip().splitlines()[-1] == str(kubeconfig), up.stdout
        state_file = Path(f"{kubeconfig}.state")
        yield ControlPlane(kubeconfig, state_file, env, _read_state(state_file))
    finally:
        # Idempotent: the test calls it too; this covers failures half-way.
        _run(["bash", str(KUBE_DOWN)], env, timeout=60)


APPLY = ("apply", "--server-side", "--field-manager=mailrelay-tests", "-f", "-")


def _kubectl_run(
    cp: ControlPlane, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    kubectl = [str(ASSETS / "kubectl"), "--kubeconfig", str(cp.kubeconfig)]
    return _run([*kubectl, *args], cp.env, timeout=90, stdin=stdin)


def _kubectl(cp: ControlPlane, *args: str, stdin: str | None = None) -> str:
    result = _kubectl_run(cp, *args, stdin=stdin)
    if result.returncode != 0:
        pytest.fail(f"kubectl {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result.stdout


def test_control_plane_lifecycle(control_plane: ControlPlane) -> None:
    cp = control_plane
    state_dir = cp.state["STATE_DIR"]
    pids = [cp.state["ETCD_PID"], cp.state["APISERVER_PID"]]
    assert all(_pid_runs_in(pid, state_dir) for pid in pids)

    # The apiserver build carries the pinned version stamp, not v0.0.0-master.
    version = json.loads(_kubectl(cp, "version", "-o", "json"))
    server = version["serverVersion"]
    assert server["gitVersion"].startswith("v1.35."), server
    assert (server["major"], server["minor"]) == ("1", "35"), server
    assert version["clientVersion"]["gitVersion"].startswith("v1.35."), version

    # A second kube-up on the same KUBECONFIG reuses the running control plane.
    again = _run(["bash", str(KUBE_UP)], cp.env, timeout=60)
    assert again.returncode == 0, again.stderr
    assert _read_state(cp.state_file)["APISERVER_PID"] == cp.state["APISERVER_PID"]

    # CRDs install with server-side apply and become Established.
    applied = _kubectl(cp, *APPLY, stdin=CRD)
    assert CRD_NAME in applied
    _kubectl(cp, "wait", "--for=condition=Established", "--timeout=60s", f"crd/{CRD_NAME}")
    crd = json.loads(_kubectl(cp, "get", "crd", CRD_NAME, "-o", "json"))
    conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
    assert conditions.get("Established") == "True", conditions

    # The new kind is served, and its schema is enforced.
    _kubectl(cp, *APPLY, stdin=WIDGET)
    widget = json.loads(_kubectl(cp, "get", "widget", "small", "-n", "default", "-o", "json"))
    assert widget["spec"] == {"size": 3}
    invalid = _kubectl_run(cp, *APPLY, stdin=WIDGET.replace("size: 3", "size: 0"))
    assert invalid.returncode != 0 and "spec.size" in invalid.stderr, invalid.stderr

    # kube-down stops both processes and removes the temporary state.
    down = _run(["bash", str(KUBE_DOWN)], cp.env, timeout=60)
    assert down.returncode == 0, down.stderr
    assert not any(_pid_runs_in(pid, state_dir) for pid in pids)
    assert not Path(state_dir).exists()
    assert not cp.state_file.exists()
    assert not cp.kubeconfig.exists()
