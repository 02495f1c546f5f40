"""Helpers for tests/cluster/: kubectl and helm against the real cluster, the
image build and load (see tests/cluster/conftest.py for how the cluster is had)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
HACK = REPO / "hack"
TAG = os.environ.get("MAILRELAY_E2E_TAG", "e2e")
RELAY_IMAGE = f"mailrelay:{TAG}"
OPERATOR_IMAGE = f"mailrelay-operator:{TAG}"
MODE = os.environ.get("MAILRELAY_CLUSTER", "node")
OPERATOR_NS = "mailrelay-system"
MAIL_NS = "mail"
TOOLS = Path(os.environ.get("KUBEBUILDER_ASSETS", REPO / ".tools" / "bin"))


def wait_until(what: str, check: Callable[[], Any], timeout: float, every: float = 1.0) -> Any:
    """check() until truthy; its last value (or exception) is in the failure."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = check()
            if last:
                return last
        except (subprocess.CalledProcessError, AssertionError, KeyError, ValueError) as e:
            last = e
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f}s (last: {last!r})")
        time.sleep(every)


@dataclass
class Cluster:
    kubeconfig: str
    mode: str
    env: dict[str, str] = field(default_factory=dict)

    def run(
        self, args: list[str], *, input: str | None = None, check: bool = True, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            args, input=input, capture_output=True, text=True, timeout=timeout, env=self.env,
            cwd=REPO, check=False,
        )  # fmt: skip
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
            )
        return result

    def kubectl(self, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return self.run([str(self.kubectl_bin), *args], **kw)

    def get(self, *args: str) -> Any:
        return json.loads(self.kubectl("get", "-o", "json", *args).stdout)

    def helm(self, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return self.run([str(self.helm_bin), *args], **kw)

    @property
    def kubectl_bin(self) -> Path:
        return TOOLS / "kubectl" if (TOOLS / "kubectl").exists() else Path("kubectl")

    @property
    def helm_bin(self) -> Path:
        return TOOLS / "helm" if (TOOLS / "helm").exists() else Path("helm")

    def pod(self, name: str, ns: str = MAIL_NS) -> dict[str, Any]:
        return self.get("-n", ns, "pod", name)  # type: ignore[no-any-return]

    def pod_ip(self, name: str, ns: str = MAIL_NS) -> str:
        return str(self.pod(name, ns)["status"]["podIP"])

    def ready(self, pod: dict[str, Any]) -> bool:
        conds = pod.get("status", {}).get("conditions", [])
        return pod.get("status", {}).get("phase") == "Running" and any(
            c["type"] == "Ready" and c["status"] == "True" for c in conds
        )

    def exec(
        self, pod: str, *cmd: str, ns: str = MAIL_NS, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return self.kubectl("-n", ns, "exec", pod, "-c", "relay", "--", *cmd, check=check)

    def secret_data(self, ns: str, name: str, key: str) -> bytes:
        s = self.get("-n", ns, "secret", name)
        return base64.b64decode(s["data"][key])

    def build_and_load(self, tag: str, revision: str | None = None) -> None:
        """Builds both images (hack/build-images.sh) and loads them into the node."""
        args = ["bash", str(HACK / "build-images.sh"), "--tag", tag]
        if revision:
            args += ["--revision", revision]
        self.run(args, timeout=1500)
        images = [f"mailrelay:{tag}", f"mailrelay-operator:{tag}"]
        if self.mode == "kind":
            name = os.environ.get("KIND_CLUSTER", "mailrelay")
            self.run(["kind", "load", "docker-image", "--name", name, *images], timeout=600)
        else:
            self.run(["bash", str(HACK / "cluster-load.sh"), *images], timeout=600)
