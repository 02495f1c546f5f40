"""Where relay pods run and what they may use (pure): spec.resources,
spec.affinity, spec.priorityClassName, spec.imagePullSecrets, spec.spread."""

from __future__ import annotations

from typing import Any

from mailrelay_api.pod_env import CPU_LIMIT_ENV
from mailrelay_api.spec import MailRelaySpec

ZONE_KEY = "topology.kubernetes.io/zone"
HOST_KEY = "kubernetes.io/hostname"
# Required zones: a pod waits rather than put the tier in fewer than two zones.
REQUIRED_MIN_ZONES = 2


def _constraint(key: str, how: str, selector: dict[str, str], min_domains: int) -> dict[str, Any]:
    out: dict[str, Any] = {
        "maxSkew": 1,
        "topologyKey": key,
        # Preferred: a one-zone cluster (or pods pinned by zonal volumes) still
        # runs every replica. Required: the spread is the point (a backup MX
        # that shares a zone with the primary is no backup).
        "whenUnsatisfiable": "DoNotSchedule" if how == "Required" else "ScheduleAnyway",
        "labelSelector": {"matchLabels": selector},
    }
    if how == "Required" and min_domains > 1:
        # Fewer eligible domains than this count as a global minimum of 0,
        # so pods stay Pending instead of piling into the domains there are.
        out["minDomains"] = min_domains
    return out


def spread_constraints(spec: MailRelaySpec, selector: dict[str, str]) -> list[dict[str, Any]]:
    return [
        _constraint(ZONE_KEY, spec.spread.zones, selector, min(spec.replicas, REQUIRED_MIN_ZONES)),
        _constraint(HOST_KEY, spec.spread.hosts, selector, spec.replicas),
    ]


def pod_scheduling(spec: MailRelaySpec, selector: dict[str, str]) -> dict[str, Any]:
    """The pod spec's scheduling fields (only those set)."""
    out: dict[str, Any] = {"topologySpreadConstraints": spread_constraints(spec, selector)}
    aff = spec.affinity
    if aff.node_selector:
        out["nodeSelector"] = dict(aff.node_selector)
    if aff.tolerations:
        out["tolerations"] = [dict(t) for t in aff.tolerations]
    if aff.node_affinity:
        out["affinity"] = {"nodeAffinity": dict(aff.node_affinity)}
    if spec.priority_class_name:
        out["priorityClassName"] = spec.priority_class_name
    if spec.image_pull_secrets:
        out["imagePullSecrets"] = [{"name": n} for n in spec.image_pull_secrets]
    return out


def resources(spec: MailRelaySpec) -> dict[str, Any]:
    return {k: dict(v) for k, v in spec.resources.items() if v}


def cpu_env(spec: MailRelaySpec) -> list[dict[str, Any]]:
    """MAILRELAY_CPU_LIMIT for workers: auto: the cpu limit, else the request,
    in whole CPUs (divisor 1 rounds up). Neither set: the relay counts its own."""
    if spec.workers != "auto":
        return []
    for kind in ("limits", "requests"):
        if "cpu" in spec.resources.get(kind, {}):
            ref = {"containerName": "relay", "resource": f"{kind}.cpu", "divisor": "1"}
            return [{"name": CPU_LIMIT_ENV, "valueFrom": {"resourceFieldRef": ref}}]
    return []


def workers_args(spec: MailRelaySpec) -> list[str]:
    """--workers N for a number; auto is the relay's default, so nothing."""
    return [] if spec.workers == "auto" else ["--workers", str(spec.workers)]
