"""A real kube-apiserver for the operator's tests: one per session.

`kube` starts etcd + kube-apiserver with hack/kube-up.sh on a temporary
KUBECONFIG, installs deploy/crds/, and stops everything with kube-down.sh at
the end. `operator` runs the mailrelay operator (mailrelay_operator.main.run,
the code behind `mailrelay operator`) in a thread against it.
A bare apiserver has no controllers: no garbage collection, no StatefulSet
controller, no kubelet. Tests play those parts where they need them.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from mrtest.kube import ASSETS, REPO, Kube, RunningOperator, wait_for


@pytest.fixture(scope="session")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kube]:
    if not (ASSETS / "kube-apiserver").is_file():
        pytest.fail(
            f"{ASSETS / 'kube-apiserver'} is missing: run hack/install-tools.sh first",
            pytrace=False,
        )
    kubeconfig = tmp_path_factory.mktemp("kube") / "kubeconfig"
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "KUBEBUILDER_ASSETS": str(ASSETS)}
    try:
        up = subprocess.run(
            ["bash", str(REPO / "hack" / "kube-up.sh")],
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
        )
        if up.returncode != 0:
            pytest.fail(f"hack/kube-up.sh failed:\n{up.stderr}{up.stdout}", pytrace=False)
        k = Kube(kubeconfig, env)
        k.apply(REPO / "deploy" / "crds")
        k.kubectl(
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd",
            "-l",
            "app.kubernetes.io/part-of=mailrelay",
        )
        yield k
    finally:
        stop_recorded_processes(Path(f"{kubeconfig}.state"))
        subprocess.run(
            ["bash", str(REPO / "hack" / "kube-down.sh")],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )


def stop_recorded_processes(state_file: Path) -> None:
    """SIGTERM the apiserver and etcd this session started (pids from the state file).

    kube-down.sh does the same, but first takes the kubeconfig's lock, which
    the started processes may have inherited from kube-up.sh: stop them first.
    """
    try:
        lines = state_file.read_text().splitlines()
    except OSError:
        return
    state_dir = next((ln.split("=", 1)[1] for ln in lines if ln.startswith("STATE_DIR=")), "")
    pids = [
        int(ln.split("=", 1)[1])
        for prefix in ("APISERVER_PID=", "ETCD_PID=")
        for ln in lines
        if ln.startswith(prefix)
    ]
    for pid in pids:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if state_dir and state_dir in cmdline:
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 15
            while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            if Path(f"/proc/{pid}").exists():
                os.kill(pid, signal.SIGKILL)


def service_account_kubeconfig(
    kube: Kube, folder: Path, account: tuple[str, str] = ("mailrelay-system", "mailrelay-operator")
) -> Path:
    """A kubeconfig with a token of the operator's ServiceAccount (deploy/rbac/):
    the operator under test has exactly the rights it ships with. Or of another
    (namespace, name) account, with the rights the test gives it."""
    kube.apply(REPO / "deploy" / "rbac")
    namespace, name = account
    token = kube.kubectl("create", "token", name, "-n", namespace, "--duration=4h").strip()
    admin = yaml.safe_load(kube.kubeconfig.read_text())
    cluster = admin["clusters"][0]
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [cluster],
        "users": [{"name": name, "user": {"token": token}}],
        "contexts": [{"name": "operator", "context": {"cluster": cluster["name"], "user": name}}],
        "current-context": "operator",
    }
    path = folder / f"{name}-kubeconfig"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="session")
def operator_kubeconfig(kube: Kube, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return service_account_kubeconfig(kube, tmp_path_factory.mktemp("operator"))


@pytest.fixture(scope="session")
def operator(operator_kubeconfig: Path) -> Iterator[RunningOperator]:
    """The operator of the session: every namespace, no health endpoint."""
    with run_operator(operator_kubeconfig) as running:
        yield running


@contextlib.contextmanager
def run_operator(
    kubeconfig: Path, namespaces: tuple[str, ...] = (), liveness: str | None = None
) -> Iterator[RunningOperator]:
    """mailrelay_operator.main.run in a thread, with the operator's ServiceAccount;
    stopped (and $KUBECONFIG restored) on the way out."""
    from mailrelay_operator import handlers, main

    saved = os.environ.get("KUBECONFIG")
    os.environ["KUBECONFIG"] = str(kubeconfig)
    os.environ.setdefault("MAILRELAY_RELAY_IMAGE", "registry.test/mailrelay:test")
    stop, ready = threading.Event(), threading.Event()
    started = len(handlers.RUNNING)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(main.run, namespaces, liveness, stop, ready)
        try:
            wait_for("the operator to start", lambda: ready.is_set() or future.done(), 60)
            if future.done():
                future.result()
            wait_for("the reconciler", lambda: len(handlers.RUNNING) > started, 30)
            reconciler, loop = handlers.RUNNING[started]
            yield RunningOperator(reconciler, loop)
        finally:
            stop.set()
            future.result(timeout=60)
            if saved is None:
                os.environ.pop("KUBECONFIG", None)
            else:
                os.environ["KUBECONFIG"] = saved


@pytest.fixture(scope="session")
def start_operator(
    operator_kubeconfig: Path,
) -> Callable[..., contextlib.AbstractContextManager[RunningOperator]]:
    """Another operator beside the session's (run_operator's arguments), e.g.
    for one namespace with its health endpoint."""
    return functools.partial(run_operator, operator_kubeconfig)
