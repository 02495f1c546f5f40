"""Helpers of the operator's tests against a real kube-apiserver (tests/kube/):
kubectl with the test KUBECONFIG, polling, conditions, the running operator."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from mrtest.objects import namespace_manifest

REPO = Path(__file__).resolve().parents[2]
ASSETS = Path(os.environ.get("KUBEBUILDER_ASSETS") or REPO / ".tools" / "bin")
T = TypeVar("T")


@dataclass
class Kube:
    kubeconfig: Path
    env: dict[str, str]

    def kubectl_run(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        cmd = [str(ASSETS / "kubectl"), "--kubeconfig", str(self.kubeconfig), *args]
        return subprocess.run(
            cmd, env=self.env, input=stdin, capture_output=True, text=True, timeout=90, check=False
        )

    def kubectl(self, *args: str, stdin: str | None = None) -> str:
        result = self.kubectl_run(*args, stdin=stdin)
        if result.returncode != 0:
            pytest.fail(f"kubectl {' '.join(args)} failed:\n{result.stderr}", pytrace=False)
        return result.stdout

    def apply(self, manifest: str | Path, *extra: str) -> str:
        """kubectl apply --server-side, as users are told to."""
        args = ["apply", "--server-side", "--field-manager=mailrelay-tests", *extra]
        if isinstance(manifest, Path):
            return self.kubectl(*args, "-f", str(manifest))
        return self.kubectl(*args, "-f", "-", stdin=manifest)

    def get(self, kind: str, name: str, namespace: str = "default") -> dict[str, Any] | None:
        result = self.kubectl_run(
            "get", kind, name, "-n", namespace, "-o", "json", "--show-managed-fields"
        )
        if result.returncode != 0:
            if "NotFound" in result.stderr:
                return None
            pytest.fail(f"kubectl get {kind} {name} failed:\n{result.stderr}", pytrace=False)
        return dict(json.loads(result.stdout))

    def patch(
        self,
        kind: str,
        name: str,
        patch: dict[str, Any],
        namespace: str = "default",
        subresource: str | None = None,
    ) -> str:
        """kubectl patch --type=merge: a writer other than the tests' apply."""
        args = ["patch", kind, name, "-n", namespace, "--type=merge", "-p", json.dumps(patch)]
        return self.kubectl(*args, *([f"--subresource={subresource}"] if subresource else []))

    def list(self, kind: str, namespace: str = "default", selector: str = "") -> list[Any]:
        args = ["get", kind, "-n", namespace, "-o", "json"]
        if selector:
            args += ["-l", selector]
        return list(json.loads(self.kubectl(*args))["items"])


def wait_for(what: str, fn: Callable[[], T | None], timeout: float = 60.0) -> T:
    """Polls fn until it returns something truthy (short polls, never a long sleep)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what} (last: {last!r})", pytrace=False)


async def until(what: str, check: Callable[[], bool], timeout: float = 30.0) -> None:
    """wait_for inside an event loop: check() runs in the loop's thread, between short sleeps."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            pytest.fail(f"timed out waiting for {what}", pytrace=False)
        await asyncio.sleep(0.05)


def condition(obj: dict[str, Any] | None, ctype: str) -> dict[str, Any]:
    for c in ((obj or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") == ctype:
            return dict(c)
    return {}


def reconciled(kube: Kube, name: str, namespace: str = "default") -> dict[str, Any] | None:
    """The MailRelay once the operator reconciled its current generation."""
    relay = kube.get("mailrelay", name, namespace)
    if not relay:
        return None
    cond = condition(relay, "Reconciled")
    gen = relay["metadata"]["generation"]
    if relay.get("status", {}).get("observedGeneration") == gen and cond.get("status") == "True":
        return relay
    return None


def apply_reconciled(
    kube: Kube, operator: RunningOperator, namespace: str, docs: list[dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Applies `namespace` and `docs`, waits until each MailRelay among them is
    Reconciled and the operator has settled; returns them by name."""
    kube.apply(yaml.safe_dump_all([namespace_manifest(namespace), *docs]))
    names = [d["metadata"]["name"] for d in docs if d["kind"] == "MailRelay"]
    found = {
        n: wait_for(f"{n} Reconciled", lambda n=n: reconciled(kube, n, namespace)) for n in names
    }
    operator.settle()
    return found


@dataclass
class RunningOperator:
    reconciler: Any  # mailrelay_operator.reconciler.Reconciler
    loop: asyncio.AbstractEventLoop

    def call(self, fn: Callable[[], T]) -> T:
        """Runs fn in the operator's loop thread and returns its result."""

        async def run() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout=30)

    def settle(self, timeout: float = 60.0) -> None:
        """Waits until the reconciler has nothing left to do."""
        wait_for("the operator to settle", lambda: self.call(lambda: self.reconciler.idle), timeout)

    def full_pass(self, resync: bool = False) -> None:
        """Marks every relay dirty (optionally forgetting caches) and waits for the pass."""
        before = self.call(lambda: self.reconciler.passes)
        self.call(self.reconciler.resync_now if resync else self.reconciler.mark_all)
        wait_for("a reconcile pass", lambda: self.call(lambda: self.reconciler.passes) > before)
        self.settle()


def project_config_maps(kube: Kube, statefulset: dict[str, Any], folder: Path) -> list[str]:
    """Plays the kubelet for the StatefulSet's projected config volume.

    Reads each ConfigMap source (optional ones may be missing) and writes
    their files the way the kubelet's atomic writer does: a fresh timestamped
    folder, a `..data` symlink swapped to it, and one symlink per file through
    `..data`. Returns the file names written.
    """
    import base64

    namespace = statefulset["metadata"]["namespace"]
    [volume] = [
        v for v in statefulset["spec"]["template"]["spec"]["volumes"] if v["name"] == "config"
    ]
    files: dict[str, bytes] = {}
    for source in volume["projected"]["sources"]:
        ref = source["configMap"]
        cm = kube.get("configmap", ref["name"], namespace)
        if cm is None:
            assert ref.get("optional"), f"ConfigMap {ref['name']} is missing and not optional"
            continue
        for key, text in (cm.get("data") or {}).items():
            files[key] = str(text).encode()
        for key, b64 in (cm.get("binaryData") or {}).items():
            files[key] = base64.b64decode(b64)
    folder.mkdir(parents=True, exist_ok=True)
    stamp = folder / f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{time.monotonic_ns()}"
    stamp.mkdir()
    for name, data in files.items():
        (stamp / name).write_bytes(data)
    tmp_link = folder / "..data_tmp"
    tmp_link.unlink(missing_ok=True)
    tmp_link.symlink_to(stamp.name)
    old = (folder / "..data").resolve() if (folder / "..data").exists() else None
    tmp_link.replace(folder / "..data")
    for name in files:
        link = folder / name
        if not link.is_symlink():
            link.symlink_to(f"..data/{name}")
    for entry in folder.iterdir():
        if entry.is_symlink() and not entry.name.startswith("..") and entry.name not in files:
            entry.unlink()
    if old is not None and old != stamp.resolve():
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
    return sorted(files)
