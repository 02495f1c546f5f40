"""Playing kubelet for the relay pods of the operator's StatefulSet (tests/kube).

Each pod is a `mailrelay relay` process on its own 127.0.0.x address with
the pod's folder as its volume: the projected config ConfigMaps, the
mounted handover Secret and the queue (kept across restarts, like the
pod's PVC). The operator is told where the pods are through its pluggable
pod addresses.
"""

from __future__ import annotations

import base64
import contextlib
import json
import signal
import socket
import struct
import threading
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mrtest.kube import Kube, RunningOperator, project_config_maps
from mrtest.relayproc import RelayProcess, free_port, next_loopback


@dataclass
class Pod:
    ordinal: int
    folder: Path
    host: str = field(default_factory=next_loopback)
    port: int = 0
    handover_port: int = 0
    metrics_port: int = 0
    process: RelayProcess | None = None
    runs: int = 0

    def __post_init__(self) -> None:
        self.port = self.port or free_port(self.host)
        self.handover_port = self.handover_port or free_port(self.host)
        self.metrics_port = self.metrics_port or free_port(self.host)

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    @property
    def control(self) -> str:
        return f"http://{self.host}:{self.metrics_port}"

    @property
    def handover(self) -> str:
        return f"{self.host}:{self.handover_port}"

    def queue_state(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.control}/queue", timeout=5) as resp:
            return dict(json.loads(resp.read()))

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.proc is not None

    def stop(self, signum: int = signal.SIGTERM) -> int:
        code = self.process.stop(signum) if self.process is not None else 0
        self.process = None
        return code


class Kubelet:
    """Starts and stops the pods of one relay's StatefulSet."""

    def __init__(self, kube: Kube, operator: RunningOperator, namespace: str, relay: str) -> None:
        self.kube = kube
        self.operator = operator
        self.namespace = namespace
        self.relay = relay
        self.pods: dict[int, Pod] = {}

    def statefulset(self) -> dict[str, Any]:
        sts = self.kube.get("statefulset", self.relay, self.namespace)
        assert sts is not None
        return sts

    def pod(self, ordinal: int, folder: Path) -> Pod:
        if ordinal not in self.pods:
            self.pods[ordinal] = Pod(ordinal, folder / f"{self.relay}-{ordinal}")
        return self.pods[ordinal]

    def start(self, ordinal: int, folder: Path) -> Pod:
        """Starts the pod's container on its volume, with the StatefulSet's command."""
        pod = self.pod(ordinal, folder)
        sts = self.statefulset()
        project_config_maps(self.kube, sts, pod.folder / "config")
        secret = self.kube.get("secret", f"{self.relay}-handover", self.namespace)
        assert secret is not None, "the operator made no handover Secret"
        key_file = pod.folder / "handover" / "secret"
        key_file.parent.mkdir(parents=True, exist_ok=True)
        key_file.write_bytes(base64.b64decode(secret["data"]["secret"]))
        command = sts["spec"]["template"]["spec"]["containers"][0]["command"]
        assert "--handover-listen" in command and "--handover-secret-file" in command
        pod.runs += 1
        process = RelayProcess(
            None,
            pod.folder,
            host=pod.host,
            port=pod.port,
            command="relay",
            config_dir=pod.folder / "config",
            workers=1,
            args=[
                "--metrics-listen",
                f"{pod.host}:{pod.metrics_port}",
                "--handover-listen",
                pod.handover,
                "--handover-secret-file",
                str(key_file),
            ],
        )
        # One log per run: "ready" lines of the run before must not count.
        process.log_path = pod.folder / f"relay-run{pod.runs}.log"
        pod.process = process.start()
        return pod

    def tell_operator(self) -> None:
        """Points the operator's pod addresses at these processes."""
        from mailrelay_operator.pods import PodAddress

        known = self.pods

        def address(relay: dict[str, Any], ordinal: int) -> PodAddress:
            pod = known.get(ordinal)
            if pod is None:  # a pod we never started: nothing listens there
                return PodAddress(control="http://127.0.0.1:9", handover="127.0.0.1:9")
            return PodAddress(control=pod.control, handover=pod.handover)

        def set_address() -> None:
            self.operator.reconciler.pod_address = address
            self.operator.reconciler.drain_poll_seconds = 0.5

        self.operator.call(set_address)

    def stop_all(self) -> None:
        """Stops every pod and gives the operator its real pod addresses back."""
        for pod in self.pods.values():
            pod.stop()
        from mailrelay_operator.pods import cluster_address

        def reset() -> None:
            self.operator.reconciler.pod_address = cluster_address

        self.operator.call(reset)


class SilentPod:
    """A pod that takes connections and never answers (a hung relay, or its
    control port behind a dead network path): the operator's drain request to it
    waits until the PodClient's timeout. close() resets every connection.
    """

    def __init__(self) -> None:
        self.host = next_loopback()
        self._listener = socket.create_server((self.host, 0))
        self.port = int(self._listener.getsockname()[1])
        self.connections: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def control(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.connections.append(conn)

    def close(self) -> None:
        """Gone (again: a no-op)."""
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() (Linux)
        self._listener.close()
        self._thread.join(timeout=5)
        while self.connections:
            conn = self.connections.pop()
            # RST, not FIN: the client's request fails at once.
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()
