"""Restarting the test control plane's kube-apiserver alone (etcd and its data stay).

hack/kube-down.sh wipes etcd's data, so an "API server restarted" fault
stops only the kube-apiserver process recorded in "$KUBECONFIG.state" and
starts it again with the same command line (same port, certificates and
etcd); the new pid is recorded there too, so kube-down.sh and the session
fixture stop it at the end.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

from mrtest.kube import Kube


def _state(kube: Kube) -> tuple[Path, list[str]]:
    state = Path(f"{kube.kubeconfig}.state")
    return state, state.read_text().splitlines()


def apiserver_pid(kube: Kube) -> int:
    _, lines = _state(kube)
    state_dir = next(ln.split("=", 1)[1] for ln in lines if ln.startswith("STATE_DIR="))
    for ln in reversed(lines):
        if ln.startswith("APISERVER_PID="):
            pid = int(ln.split("=", 1)[1])
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if state_dir.encode() in cmdline:
                return pid
    raise AssertionError("no running kube-apiserver recorded in the state file")


def stop_apiserver(kube: Kube) -> list[str]:
    """SIGTERM; returns its command line, for start_apiserver."""
    pid = apiserver_pid(kube)
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):  # reaps it if it is our child
            os.waitpid(pid, os.WNOHANG)
        if b"zombie" in _status(pid) or not Path(f"/proc/{pid}").exists():
            break
        time.sleep(0.1)
    return argv


def _status(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/status").read_bytes().lower()
    except OSError:
        return b""


def start_apiserver(kube: Kube, argv: list[str], timeout: float = 120) -> None:
    state, lines = _state(kube)
    log_file = next(ln.split("=", 1)[1] for ln in lines if ln.startswith("APISERVER_LOG="))
    with open(log_file, "ab") as log:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
        )
    with state.open("a") as f:
        f.write(f"APISERVER_PID={proc.pid}\n")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"kube-apiserver exited with {proc.returncode}; see {log_file}")
        if kube.kubectl_run("get", "--raw", "/readyz").stdout.strip() == "ok":
            return
        time.sleep(0.25)
    raise AssertionError(f"kube-apiserver not ready after {timeout}s; see {log_file}")
