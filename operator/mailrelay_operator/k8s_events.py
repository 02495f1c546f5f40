"""Kubernetes Events (events.k8s.io/v1) for condition transitions, posted off the hot path.

Not events.py, which routes *watch* events. What `kubectl describe` and
`kubectl get events` show: why a RelayDomain was refused, why a MailRelay is
not reconciled, a scale-down's drain starting and ending, a certificate not
ready.

Contract: the status writer calls `EventRecorder.status_written(obj, new)`
after it wrote a status (it writes only statuses that changed); `transitions`
(pure) compares the object's conditions with the new ones and yields one
event per condition whose status or reason changed and that EVENT_KINDS says
is news: a Warning when it went bad, a Normal for progress, a Normal for a
recovery from a Warning. Never per reconcile: an unchanged status is not
written, so 100,000 RelayDomains post nothing at a resync.

What an Event says is what the status already says: it regards the object
whose condition changed, lives in that object's namespace, and its note is
the condition's message. A tenant's Event names nothing of another tenant
that its own status does not (the renderer's Conflict message never names
the holder). No `related` object is set, for the same reason.

The recorder queues at most EVENT_QUEUE_MAX events (more are dropped and
counted), skips an event of the same object and reason posted within
EVENT_REPEAT_SECONDS (a flapping condition), and posts from its own task;
failures are logged at debug and counted, never raised to a reconcile.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

from mailrelay_operator import metrics
from mailrelay_operator.settings import POD_NAME_ENV
from mailrelay_operator.status import (
    ConditionType,
    ReadyReason,
    ReconciledReason,
    ScalingDownReason,
    TLSReason,
)

log = logging.getLogger("mailrelay.operator")

REPORTING_CONTROLLER = "mailrelay.io/operator"
EVENT_QUEUE_MAX = 1000  # events waiting to be posted; more are dropped
# client-go's EventCorrelator aggregates over 10 minutes: one event per
# object and reason in that time is enough for a human to see it.
EVENT_REPEAT_SECONDS = 600.0
NOTE_MAX_BYTES = 1024  # the API server refuses a longer note (events.k8s.io/v1)
NAME_MAX = 253  # a DNS subdomain


class EventKind(Enum):
    WARNING = "warning"  # the condition went bad: always news
    PROGRESS = "progress"  # something started or finished: always news
    RECOVERED = "recovered"  # healthy again: news only after a WARNING


W, P, R = EventKind.WARNING, EventKind.PROGRESS, EventKind.RECOVERED
# (condition type, reason) -> what a transition to it is. Unlisted reasons
# (RollingOut, ReplicasNotReady: every rollout has them) post nothing.
# Accepted's reasons come from the renderer: see accepted_kind.
EVENT_KINDS: dict[tuple[str, str], EventKind] = {
    (ConditionType.RECONCILED, ReconciledReason.APPLY_FAILED): W,
    (ConditionType.RECONCILED, ReconciledReason.RESOURCE_EXISTS): W,
    (ConditionType.RECONCILED, ReconciledReason.INVALID_SPEC): W,
    (ConditionType.RECONCILED, ReconciledReason.STATEFULSET_RECREATING): P,
    (ConditionType.RECONCILED, ReconciledReason.STATEFULSET_RECREATED): P,
    (ConditionType.RECONCILED, ReconciledReason.APPLIED): R,
    (ConditionType.READY, ReadyReason.PROGRESS_DEADLINE_EXCEEDED): W,
    (ConditionType.READY, ReadyReason.ALL_REPLICAS_READY): R,
    (ConditionType.READY, ReadyReason.SCALED_TO_ZERO): R,
    (ConditionType.TLS, TLSReason.CERTIFICATE_NOT_READY): W,
    (ConditionType.TLS, TLSReason.CERT_MANAGER_MISSING): W,
    (ConditionType.TLS, TLSReason.CERTIFICATE_READY): R,
    (ConditionType.TLS, TLSReason.SECRET_PROVIDED): R,
    (ConditionType.SCALING_DOWN, ScalingDownReason.DRAINING): P,
    (ConditionType.SCALING_DOWN, ScalingDownReason.DRAINED): P,
    (ConditionType.SCALING_DOWN, ScalingDownReason.CANCELLED): P,
    (ConditionType.SCALING_DOWN, ScalingDownReason.DRAIN_TIMED_OUT): W,
}


def event_kind(cond: dict[str, Any]) -> EventKind | None:
    """What a condition (metav1.Condition dict) is as an event, None: not one."""
    kind = str(cond.get("type"))
    if kind == ConditionType.ACCEPTED:
        return R if cond.get("status") == "True" else W
    return EVENT_KINDS.get((kind, str(cond.get("reason"))))


@dataclass(frozen=True)
class Transition:
    """One condition's change worth an event."""

    type: str  # "Normal" | "Warning"
    reason: str  # the condition's new reason
    note: str  # the condition's new message (what the status says)
    action: str  # the condition type it is about (events.k8s.io/v1 action)


def transitions(old_status: dict[str, Any] | None, new_status: dict[str, Any]) -> list[Transition]:
    """The events a status change is worth: per condition whose status or reason changed."""
    before = {c.get("type"): c for c in (old_status or {}).get("conditions") or []}
    out = []
    for cond in new_status.get("conditions") or []:
        prev = before.get(cond.get("type"))
        if prev and (prev.get("status"), prev.get("reason")) == (
            cond.get("status"),
            cond.get("reason"),
        ):
            continue  # only its message or times moved
        kind = event_kind(cond)
        if kind is None:
            continue
        if kind is R and (prev is None or event_kind(prev) is not W):
            continue  # healthy from the start, or after nothing worth a Warning
        out.append(
            Transition(
                type="Warning" if kind is W else "Normal",
                reason=str(cond.get("reason")),
                note=str(cond.get("message") or cond.get("reason")),
                action=str(cond.get("type")),
            )
        )
    return out


def _truncated(text: str, limit: int) -> str:
    raw = text.encode()
    if len(raw) <= limit:
        return text
    return raw[: limit - 3].decode(errors="ignore") + "..."


def event_name(obj_name: str, at_ns: int) -> str:
    """The object's name and a unique suffix, as client-go names them."""
    suffix = f".{at_ns:x}"
    return obj_name[: NAME_MAX - len(suffix)].rstrip("-.") + suffix


def event_body(obj: Mapping[str, Any], t: Transition, instance: str, at_ns: int) -> dict[str, Any]:
    """An events.k8s.io/v1 Event regarding `obj`, in its namespace (pure)."""
    meta = obj["metadata"]
    seconds, nanos = divmod(at_ns, 1_000_000_000)
    when = datetime.datetime.fromtimestamp(seconds, datetime.UTC).replace(microsecond=nanos // 1000)
    return {
        "apiVersion": "events.k8s.io/v1",
        "kind": "Event",
        "metadata": {"name": event_name(meta["name"], at_ns), "namespace": meta["namespace"]},
        "eventTime": when.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "reportingController": REPORTING_CONTROLLER,
        "reportingInstance": instance[:128],
        "action": t.action,
        "reason": t.reason[:128],
        "type": t.type,
        "note": _truncated(t.note, NOTE_MAX_BYTES),
        "regarding": {
            "apiVersion": obj["apiVersion"],
            "kind": obj["kind"],
            "namespace": meta["namespace"],
            "name": meta["name"],
            "uid": meta.get("uid", ""),
            "resourceVersion": meta.get("resourceVersion", ""),
        },
    }


def reporting_instance(env: Mapping[str, str] = os.environ) -> str:
    """The pod's name (the chart sets it); else the hostname, in a pod its name too."""
    return env.get(POD_NAME_ENV) or socket.gethostname()


class EventPoster(Protocol):
    async def create_event(self, event: Mapping[str, Any]) -> None: ...


@dataclass
class EventRecorder:
    """Queues transition events and posts them from `run` (a task of their own)."""

    api: EventPoster
    instance: str = field(default_factory=reporting_instance)
    clock: Callable[[], float] = time.monotonic
    queue: asyncio.Queue[dict[str, Any]] = field(
        default_factory=lambda: asyncio.Queue(EVENT_QUEUE_MAX)
    )
    # (object uid, reason) -> when last queued: repeats within EVENT_REPEAT_SECONDS are skipped.
    recent: dict[tuple[str, str], float] = field(default_factory=dict)
    posting: bool = False  # one taken from the queue, not posted yet

    @property
    def idle(self) -> bool:
        return self.queue.empty() and not self.posting

    def status_written(self, obj: Mapping[str, Any], new_status: dict[str, Any]) -> None:
        """Queues the events of `obj`'s status changing to `new_status`; never
        waits, never raises (the status is written: that is what counts)."""
        try:
            for t in transitions(obj.get("status"), new_status):
                self.record(obj, t)
        except Exception as e:
            log.debug("no Event for %s: %s", obj.get("metadata", {}).get("name"), e)

    def record(self, obj: Mapping[str, Any], t: Transition) -> None:
        now = self.clock()
        self._forget_before(now - EVENT_REPEAT_SECONDS)
        seen = (str(obj["metadata"].get("uid")), t.reason)
        if seen in self.recent:
            metrics.EVENTS.labels("repeated").inc()
            return
        try:
            self.queue.put_nowait(event_body(obj, t, self.instance, time.time_ns()))
        except asyncio.QueueFull:
            metrics.EVENTS.labels("dropped").inc()
            return
        self.recent[seen] = now

    def _forget_before(self, cutoff: float) -> None:
        # Insertion order is time order: the oldest are first.
        while self.recent:
            first = next(iter(self.recent))
            if self.recent[first] > cutoff:
                break
            del self.recent[first]

    async def run(self) -> None:
        """Posts the queued events one at a time (they are few: transitions only)."""
        while True:
            event = await self.queue.get()
            self.posting = True
            try:
                await self.api.create_event(event)
                metrics.EVENTS.labels("posted").inc()
            except Exception as e:  # an Event is a courtesy: never the reconcile's problem
                metrics.EVENTS.labels("failed").inc()
                log.debug("posting Event %s failed: %s", event["metadata"]["name"], e)
            finally:
                self.posting = False
