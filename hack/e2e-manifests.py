#!/usr/bin/env python3
"""Prints examples/quickstart/ adjusted for an end-to-end run, as one YAML stream.

The quickstart forwards to 127.0.0.1:2526, which inside a pod is the pod
itself. For a cluster (hack/kind-e2e.sh) the next hop becomes a sink Service
and the MX Service a ClusterIP; for a local run (tests/ship/test_kind_e2e.py)
the next hop is a sink on loopback. One function for both, so the two runs
cannot drift apart.

    hack/e2e-manifests.py --next-hop mail-sink.default.svc:2526 --mx-service ClusterIP \
        --sink-image mailrelay:e2e
    hack/e2e-manifests.py --next-hop 127.0.0.20:2526
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "examples" / "quickstart"
SINK_NAME = "mail-sink"
SINK_PORT = 2526


def quickstart() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(QUICKSTART.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def sink(image: str, namespace: str) -> list[dict[str, Any]]:
    """A next hop in the cluster: aiosmtpd's Debugging handler prints each message."""
    labels = {"app.kubernetes.io/name": SINK_NAME}
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": SINK_NAME, "namespace": namespace, "labels": labels},
        "spec": {
            "securityContext": {"runAsNonRoot": True, "runAsUser": 10025},
            "containers": [
                {
                    "name": "sink",
                    "image": image,
                    "imagePullPolicy": "IfNotPresent",
                    "command": ["python", "-m", "aiosmtpd", "-n", "-c",
                                "aiosmtpd.handlers.Debugging", "-l", f"0.0.0.0:{SINK_PORT}"],
                    "ports": [{"name": "smtp", "containerPort": SINK_PORT}],
                }
            ],
        },
    }  # fmt: skip
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": SINK_NAME, "namespace": namespace, "labels": labels},
        "spec": {
            "selector": labels,
            "ports": [{"name": "smtp", "port": SINK_PORT, "targetPort": "smtp"}],
        },
    }
    return [pod, service]


def adjusted(
    next_hop: tuple[str, int], mx_service: str | None = None, sink_image: str | None = None
) -> list[dict[str, Any]]:
    docs = copy.deepcopy(quickstart())
    namespace = "default"
    for doc in docs:
        spec = doc.get("spec", {})
        if doc["kind"] == "RelayDomain":
            spec["nextHop"].update({"host": next_hop[0], "port": next_hop[1]})
        if doc["kind"] == "MailRelay":
            namespace = doc["metadata"].get("namespace", namespace)
            if mx_service:
                spec["mx"] = [
                    {
                        "hostname": spec["hostname"],
                        "priority": 10,
                        "service": {"type": mx_service},
                    }
                ]
    if sink_image:
        docs += sink(sink_image, namespace)
    return docs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--next-hop", required=True, help="HOST:PORT mail is forwarded to")
    parser.add_argument("--mx-service", choices=["ClusterIP", "NodePort", "LoadBalancer"])
    parser.add_argument("--sink-image", help="also print a sink Pod and Service with this image")
    args = parser.parse_args(argv)
    host, _, port = args.next_hop.rpartition(":")
    docs = adjusted((host, int(port)), args.mx_service, args.sink_image)
    sys.stdout.write(yaml.safe_dump_all(docs, sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
