"""Statuses of MailRelay, RelayDomain and RecipientList, computed whole (pure).

Conditions are shaped like metav1.Condition; lastTransitionTime is kept from
the current status while a condition's status does not change, so a status
recomputed from unchanged inputs is identical and nothing gets written.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

from mailrelay_api.render import DomainVerdict, RecipientListVerdict

MX_RECORDS_MAX_DOMAINS = 100  # status stays small with 10,000 domains


@dataclass(frozen=True)
class Condition:
    type: str
    status: bool | None  # None = Unknown
    reason: str
    message: str = ""


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _status_word(value: bool | None) -> str:
    return "Unknown" if value is None else ("True" if value else "False")


def conditions(
    wanted: list[Condition], current: list[dict[str, Any]] | None, generation: int, at: str
) -> list[dict[str, Any]]:
    """metav1.Condition dicts; lastTransitionTime moves only when status flips."""
    old = {c.get("type"): c for c in current or []}
    out = []
    for c in wanted:
        word = _status_word(c.status)
        prev = old.get(c.type)
        since = prev.get("lastTransitionTime") if prev and prev.get("status") == word else None
        out.append(
            {
                "type": c.type,
                "status": word,
                "reason": c.reason,
                "message": c.message,
                "observedGeneration": generation,
                "lastTransitionTime": since or at,
            }
        )
    return out


def without_times(status: dict[str, Any] | None) -> dict[str, Any]:
    """A status minus lastTransitionTime, for "did anything change"."""
    status = dict(status or {})
    if "conditions" in status:
        status["conditions"] = [
            {k: v for k, v in c.items() if k != "lastTransitionTime"} for c in status["conditions"]
        ]
    return status


def generation(obj: dict[str, Any]) -> int:
    return int(obj.get("metadata", {}).get("generation") or 0)


def domain_status(
    dom: dict[str, Any], verdict: DomainVerdict | None, relay_missing: str = "", at: str = ""
) -> dict[str, Any]:
    if verdict is None:
        cond = Condition("Accepted", False, "RelayNotFound", relay_missing)
        recipients = 0
    else:
        cond = Condition("Accepted", verdict.accepted, verdict.reason, verdict.message)
        recipients = verdict.recipients
    gen = generation(dom)
    current = (dom.get("status") or {}).get("conditions")
    return {
        "observedGeneration": gen,
        "conditions": conditions([cond], current, gen, at or now()),
        "recipients": recipients,
    }


def list_status(
    rl: dict[str, Any],
    verdict: RecipientListVerdict | None,
    reason: str = "",
    message: str = "",
    at: str = "",
) -> dict[str, Any]:
    if verdict is not None:
        cond = Condition("Accepted", verdict.accepted, verdict.reason, verdict.message)
    else:
        cond = Condition("Accepted", False, reason, message)
    gen = generation(rl)
    current = (rl.get("status") or {}).get("conditions")
    return {
        "observedGeneration": gen,
        "conditions": conditions([cond], current, gen, at or now()),
    }


def service_has_address(svc: dict[str, Any] | None) -> bool:
    """A LoadBalancer needs an ingress address; other types are reachable as set up."""
    if not svc:
        return False
    if svc.get("spec", {}).get("type", "ClusterIP") != "LoadBalancer":
        return True
    ingress = svc.get("status", {}).get("loadBalancer", {}).get("ingress") or []
    return any(i.get("ip") or i.get("hostname") for i in ingress)


def mx_records(
    domains: list[str], mx: list[tuple[int, str]], ready_hosts: set[str]
) -> tuple[list[str], int]:
    """MX lines for the accepted domains, for the hosts whose Service has an address.

    Returns the lines of the first MX_RECORDS_MAX_DOMAINS domains and how many
    domains were left out.
    """
    hosts = sorted((p, h) for p, h in mx if h in ready_hosts)
    if not hosts:
        return [], 0
    shown = sorted(domains)[:MX_RECORDS_MAX_DOMAINS]
    lines = [f"{d}. MX {p} {h.rstrip('.')}." for d in shown for p, h in hosts]
    return lines, len(domains) - len(shown)


@dataclass
class RelayObservation:
    """What reconciling a relay found out, beyond the rendered configuration."""

    applied: bool = True
    apply_error: str = ""
    recreating: str = ""  # message while the StatefulSet is orphan-deleted and recreated
    recreated: str = ""  # message after a recreate
    cert_manager_missing: bool = False
    replicas: int = 0
    ready_replicas: int = 0
    config_hash: str = ""
    domains: int = 0
    recipients: int = 0
    mx_records: tuple[list[str], int] = ([], 0)
    scale_down: Condition | None = None  # ScalingDown (scaledown.py), once there was one


def relay_status(relay: dict[str, Any], obs: RelayObservation, at: str = "") -> dict[str, Any]:
    spec = relay["spec"]
    want = int(spec["replicas"])
    gen = generation(relay)
    wanted: list[Condition] = []
    if obs.recreating:
        wanted.append(Condition("Reconciled", False, "StatefulSetRecreating", obs.recreating))
    elif not obs.applied:
        wanted.append(Condition("Reconciled", False, "ApplyFailed", obs.apply_error))
    elif obs.recreated:
        wanted.append(Condition("Reconciled", True, "StatefulSetRecreated", obs.recreated))
    else:
        wanted.append(Condition("Reconciled", True, "Applied", "all children are up to date"))
    if want == 0:
        wanted.append(Condition("Ready", True, "ScaledToZero", "spec.replicas is 0"))
    elif obs.ready_replicas >= want:
        wanted.append(Condition("Ready", True, "AllReplicasReady", f"{want}/{want} pods ready"))
    else:
        wanted.append(
            Condition("Ready", False, "ReplicasNotReady", f"{obs.ready_replicas}/{want} pods ready")
        )
    tls = spec.get("tls") or {}
    if tls.get("issuerRef"):
        if obs.cert_manager_missing:
            wanted.append(
                Condition(
                    "TLS",
                    False,
                    "CertManagerMissing",
                    "cert-manager's Certificate CRD is not installed: running without STARTTLS",
                )
            )
        else:
            wanted.append(Condition("TLS", True, "CertificateRequested", "Certificate applied"))
    elif tls.get("secretName"):
        wanted.append(Condition("TLS", True, "SecretProvided", f"Secret {tls['secretName']}"))
    if obs.scale_down is not None:
        wanted.append(obs.scale_down)
    current = (relay.get("status") or {}).get("conditions")
    lines, omitted = obs.mx_records
    out: dict[str, Any] = {
        "observedGeneration": gen,
        "conditions": conditions(wanted, current, gen, at or now()),
        "replicas": obs.replicas,
        "readyReplicas": obs.ready_replicas,
        "domains": obs.domains,
        "recipients": obs.recipients,
        "configHash": obs.config_hash,
        "mxRecords": lines,
    }
    if omitted:
        out["mxRecordsOmittedDomains"] = omitted
    return out
