"""Statuses of MailRelay, RelayDomain and RecipientList, computed whole (pure).

Conditions are shaped like metav1.Condition; lastTransitionTime is kept from
the current status while a condition's status does not change, so a status
recomputed from unchanged inputs is identical and nothing gets written.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from mailrelay_api.render import DomainVerdict, RecipientListVerdict
from mailrelay_operator.rollout import PROGRESS_DEADLINE_SECONDS, Rollout, rollout

MX_RECORDS_MAX_DOMAINS = 100  # status stays small with 10,000 domains


class ConditionType(StrEnum):
    RECONCILED = "Reconciled"  # MailRelay: its children are applied
    READY = "Ready"  # MailRelay: its pods are ready
    TLS = "TLS"  # MailRelay: where its certificate comes from
    SCALING_DOWN = "ScalingDown"  # MailRelay: a scale-down's drain (scaledown.py)
    ACCEPTED = "Accepted"  # RelayDomain, RecipientList: the relay serves it


class ReconciledReason(StrEnum):
    APPLIED = "Applied"
    APPLY_FAILED = "ApplyFailed"
    RESOURCE_EXISTS = "ResourceExists"  # a child's name is taken by an object not ours
    INVALID_SPEC = "InvalidSpec"  # the spec fails mailrelay validate's checks
    STATEFULSET_RECREATING = "StatefulSetRecreating"
    STATEFULSET_RECREATED = "StatefulSetRecreated"


class ReadyReason(StrEnum):
    ALL_REPLICAS_READY = "AllReplicasReady"
    REPLICAS_NOT_READY = "ReplicasNotReady"
    ROLLING_OUT = "RollingOut"  # pods not all on the applied template yet
    PROGRESS_DEADLINE_EXCEEDED = "ProgressDeadlineExceeded"  # no progress (rollout.py)
    SCALED_TO_ZERO = "ScaledToZero"


class TLSReason(StrEnum):
    CERTIFICATE_READY = "CertificateReady"
    CERTIFICATE_NOT_READY = "CertificateNotReady"  # cert-manager has not issued it (yet)
    CERT_MANAGER_MISSING = "CertManagerMissing"
    SECRET_PROVIDED = "SecretProvided"


class ScalingDownReason(StrEnum):
    DRAINING = "Draining"  # True: the leaving pods hand their queues over
    DRAINED = "Drained"  # False: their queues were empty, the StatefulSet shrank
    DRAIN_TIMED_OUT = "DrainTimedOut"  # True: onTimeout Wait; False: Proceed, they went
    CANCELLED = "Cancelled"  # False: spec.replicas went back up


# Accepted's reasons come from the renderer (mailrelay_api.render's verdicts)
# and cluster.py's orphan lists; a RelayDomain whose relay is gone gets this one.
RELAY_NOT_FOUND = "RelayNotFound"


@dataclass(frozen=True)
class Condition:
    type: ConditionType
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
                "type": str(c.type),
                "status": word,
                "reason": str(c.reason),
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


def generation(obj: Mapping[str, Any]) -> int:
    return int(obj.get("metadata", {}).get("generation") or 0)


def domain_status(
    dom: Mapping[str, Any], verdict: DomainVerdict | None, relay_missing: str = "", at: str = ""
) -> dict[str, Any]:
    if verdict is None:
        cond = Condition(ConditionType.ACCEPTED, False, RELAY_NOT_FOUND, relay_missing)
        recipients = 0
    else:
        cond = Condition(ConditionType.ACCEPTED, verdict.accepted, verdict.reason, verdict.message)
        recipients = verdict.recipients
    gen = generation(dom)
    current = (dom.get("status") or {}).get("conditions")
    return {
        "observedGeneration": gen,
        "conditions": conditions([cond], current, gen, at or now()),
        "recipients": recipients,
    }


def list_status(
    rl: Mapping[str, Any],
    verdict: RecipientListVerdict | None,
    reason: str = "",
    message: str = "",
    at: str = "",
) -> dict[str, Any]:
    if verdict is not None:
        cond = Condition(ConditionType.ACCEPTED, verdict.accepted, verdict.reason, verdict.message)
    else:
        cond = Condition(ConditionType.ACCEPTED, False, reason, message)
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
    foreign: bool = False  # apply_error is about an object not ours (ResourceExists)
    recreating: str = ""  # message while the StatefulSet is orphan-deleted and recreated
    recreated: str = ""  # message after a recreate
    cert_manager_missing: bool = False
    replicas: int = 0
    ready_replicas: int = 0
    config_hash: str = ""
    domains: int = 0
    claims: list[dict[str, str]] = field(default_factory=list)  # status.domains
    recipients: int = 0
    mx_records: tuple[list[str], int] = ([], 0)
    scale_down: Condition | None = None  # ScalingDown (scaledown.py), once there was one
    rollout: Rollout | None = None  # the StatefulSet's (None: not seen yet)
    stuck: bool = False  # the rollout made no progress for its deadline
    certificate: tuple[bool, str] | None = None  # (Ready, message) of the Certificate
    warnings: list[str] = field(default_factory=list)  # "field: message", as validate warns


def relay_status(relay: dict[str, Any], obs: RelayObservation, at: str = "") -> dict[str, Any]:
    spec = relay["spec"]
    gen = generation(relay)
    wanted = [_reconciled(obs), _ready(int(spec["replicas"]), obs)]
    tls = _tls(spec.get("tls") or {}, obs)
    if tls is not None:
        wanted.append(tls)
    if obs.scale_down is not None:
        wanted.append(obs.scale_down)
    current = (relay.get("status") or {}).get("conditions")
    lines, omitted = obs.mx_records
    out: dict[str, Any] = {
        "observedGeneration": gen,
        "conditions": conditions(wanted, current, gen, at or now()),
        "replicas": obs.replicas,
        "readyReplicas": obs.ready_replicas,
        "acceptedDomains": obs.domains,
        "domains": obs.claims,
        "recipients": obs.recipients,
        "configHash": obs.config_hash,
        "mxRecords": lines,
    }
    if omitted:
        out["mxRecordsOmittedDomains"] = omitted
    return out


def invalid_spec_status(relay: dict[str, Any], problems: list[str], at: str = "") -> dict[str, Any]:
    """The relay's status when its spec fails validate's checks: Reconciled=False,
    InvalidSpec, naming each field; everything else as the last good pass left it."""
    old = dict(relay.get("status") or {})
    current = old.get("conditions") or []
    why = "; ".join(problems)
    refused = Condition(ConditionType.RECONCILED, False, ReconciledReason.INVALID_SPEC, why)
    fresh = conditions([refused], current, generation(relay), at or now())
    others = [c for c in current if c.get("type") != ConditionType.RECONCILED]
    return {**old, "conditions": fresh + others}


def _reconciled(obs: RelayObservation) -> Condition:
    kind, why = ConditionType.RECONCILED, ReconciledReason
    if obs.recreating:
        return Condition(kind, False, why.STATEFULSET_RECREATING, obs.recreating)
    if not obs.applied:
        reason = why.RESOURCE_EXISTS if obs.foreign else why.APPLY_FAILED
        return Condition(kind, False, reason, obs.apply_error)
    if obs.recreated:
        return Condition(kind, True, why.STATEFULSET_RECREATED, obs.recreated)
    notes = "".join(f"; warning: {w}" for w in obs.warnings)
    return Condition(kind, True, why.APPLIED, f"all children are up to date{notes}")


def _ready(want: int, obs: RelayObservation) -> Condition:
    kind, why = ConditionType.READY, ReadyReason
    if want == 0:
        return Condition(kind, True, why.SCALED_TO_ZERO, "spec.replicas is 0")
    state = obs.rollout or rollout(None, want)
    if state.done:
        return Condition(kind, True, why.ALL_REPLICAS_READY, state.message)
    if obs.stuck:
        message = f"{state.message}; no progress for {PROGRESS_DEADLINE_SECONDS / 60:.0f}m"
        return Condition(kind, False, why.PROGRESS_DEADLINE_EXCEEDED, message)
    return Condition(kind, False, ReadyReason(state.reason), state.message)


def _tls(tls: dict[str, Any], obs: RelayObservation) -> Condition | None:
    kind, why = ConditionType.TLS, TLSReason
    if tls.get("issuerRef"):
        if obs.cert_manager_missing:
            return Condition(
                kind,
                False,
                why.CERT_MANAGER_MISSING,
                "cert-manager's Certificate CRD is not installed: running without STARTTLS",
            )
        ready, message = obs.certificate or (False, "Certificate not seen yet")
        reason = why.CERTIFICATE_READY if ready else why.CERTIFICATE_NOT_READY
        return Condition(kind, ready, reason, message)
    if tls.get("secretName"):
        return Condition(kind, True, why.SECRET_PROVIDED, f"Secret {tls['secretName']}")
    return None
