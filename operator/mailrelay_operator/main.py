"""`mailrelay operator`: runs the Kopf operator (handlers.py) until stopped."""

from __future__ import annotations

import argparse
import os
import sys
import threading
from collections.abc import Sequence
from typing import Any

from mailrelay_api.allocator import settle_operator_allocator

# HOST:PORT for Prometheus metrics (the Helm chart sets it; unset = none).
METRICS_LISTEN_ENV = "MAILRELAY_OPERATOR_METRICS_LISTEN"


def serve_metrics(listen: str) -> Any:
    """The process's metrics (memory grows with the recipient tables) on /metrics;
    the HTTP server (a daemon thread; tests shut it down)."""
    from prometheus_client import start_http_server

    host, _, port = listen.rpartition(":")
    server, _thread = start_http_server(int(port), addr=host or "0.0.0.0")
    return server


def without_kubernetes_client() -> None:
    """kopf imports the official Kubernetes client when it is installed, to
    recognise its model objects (in kopf.adopt() and the like, which the
    operator never calls with them): ~20 MiB resident for nothing, since
    kubeapi.py talks to the API server itself. Made unimportable before kopf
    is imported, kopf does without it. A client imported already stays."""
    for name in ("kubernetes", "kubernetes_asyncio"):
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]


def run_operator(args: argparse.Namespace) -> int:
    settle_operator_allocator()  # before any thread starts: arenas, once made, stay
    without_kubernetes_client()  # before kopf is imported
    import kopf

    kopf.configure(verbose=bool(getattr(args, "verbose", False)))
    if os.environ.get(METRICS_LISTEN_ENV):
        serve_metrics(os.environ[METRICS_LISTEN_ENV])
    run(
        namespaces=list(getattr(args, "namespace", None) or []),
        liveness=getattr(args, "liveness", None) or None,
    )
    return 0


def run(
    namespaces: Sequence[str] = (),
    liveness: str | None = None,
    stop_flag: threading.Event | None = None,
    ready_flag: threading.Event | None = None,
) -> None:
    """Runs the operator in this thread; tests pass stop_flag to end it.

    Always standalone: one operator replica (Deployment strategy Recreate);
    kopf's peering would freeze two equal-priority operators anyway.
    """
    import kopf

    from mailrelay_operator import handlers  # registers the handlers

    handlers.NAMESPACES[:] = list(namespaces)
    # Our own /healthz (the reconcile loop, not only kopf's) and /readyz.
    handlers.HEALTH_ENDPOINT[:] = [liveness] if liveness else []
    kopf.run(
        standalone=True,
        clusterwide=not namespaces,
        namespaces=list(namespaces),
        stop_flag=stop_flag,
        ready_flag=ready_flag,
    )
