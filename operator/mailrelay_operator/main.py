"""`mailrelay operator`: runs the Kopf operator (handlers.py) until stopped."""

from __future__ import annotations

import argparse
import threading
from collections.abc import Sequence

import kopf


def run_operator(args: argparse.Namespace) -> int:
    kopf.configure(verbose=bool(getattr(args, "verbose", False)))
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
    from mailrelay_operator import handlers  # registers the handlers

    del handlers
    kopf.run(
        standalone=True,
        clusterwide=not namespaces,
        namespaces=list(namespaces),
        liveness_endpoint=liveness,
        stop_flag=stop_flag,
        ready_flag=ready_flag,
    )
