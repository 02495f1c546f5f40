"""spec.mx[].pods: the relay pods that serve an MX carry its pod label
(naming.mx_pods_label), which that MX's Service selects.

The StatefulSet gives every pod the same template, so the operator labels
the pods itself: by ordinal (from the pod's name) or zone (its node's
topology.kubernetes.io/zone). The operator watches the relay pods
(EventRouter.pod_event): a pod the StatefulSet controller makes, or re-makes
without the labels, is labelled by ordinal as soon as it exists and by zone
once it is bound to a node, before it is ready; until then only the Services
of every pod reach it.
"""

from __future__ import annotations

from typing import Any, Protocol

from mailrelay_operator import naming, services
from mailrelay_operator.kubeapi import KubeObject, object_path, resource_path
from mailrelay_operator.scheduling import ZONE_KEY


class PodApi(Protocol):
    async def get(self, path: str) -> KubeObject | None: ...
    async def list_objects(self, path: str, label_selector: str = "") -> list[KubeObject]: ...
    async def patch_labels(self, path: str, labels: dict[str, str | None]) -> KubeObject: ...


def ordinal_of(relay: dict[str, Any], pod: KubeObject) -> int | None:
    prefix = naming.statefulset_name(relay) + "-"
    name = str(pod["metadata"]["name"])
    tail = name[len(prefix) :] if name.startswith(prefix) else ""
    return int(tail) if tail.isdigit() else None


async def label_mx_pods(api: PodApi, relay: dict[str, Any]) -> int:
    """Sets and removes the MX pod labels on the relay's pods; the pods patched."""
    if not any(e.pods is not None for e in naming.mx_entries(relay)):
        return 0
    selector = ",".join(f"{k}={v}" for k, v in naming.pod_selector(relay).items())
    found = await api.list_objects(
        resource_path("v1", "Pod", naming.relay_namespace(relay)), selector
    )
    zones: dict[str, str | None] = {}
    patched = 0
    for pod in found:
        ordinal = ordinal_of(relay, pod)
        if ordinal is None:
            continue
        node = (pod.get("spec") or {}).get("nodeName")
        if node and node not in zones:
            obj = await api.get(f"/api/v1/nodes/{node}")
            zones[node] = ((obj or {}).get("metadata", {}).get("labels") or {}).get(ZONE_KEY)
        want = services.pod_mx_labels(relay, ordinal, zones.get(node) if node else None)
        have = pod["metadata"].get("labels") or {}
        change = {k: v for k, v in want.items() if have.get(k) != v}
        if change:
            await api.patch_labels(object_path({"apiVersion": "v1", "kind": "Pod", **pod}), change)
            patched += 1
    return patched
