"""Kubernetes Events of condition transitions (k8s_events.py): bodies, when, how often."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import kopf
from mailrelay_operator import handlers, status
from mailrelay_operator.k8s_events import (
    EVENT_QUEUE_MAX,
    EVENT_REPEAT_SECONDS,
    NOTE_MAX_BYTES,
    REPORTING_CONTROLLER,
    EventRecorder,
    Transition,
    event_body,
    event_name,
    transitions,
)
from mrtest.objects import mailrelay

from mailrelay_api.render import DomainVerdict

CONFLICT = "shared.example is held by another RelayDomain on this relay"


def domain(ns: str = "tenant-b", name: str = "mine", uid: str = "u1") -> dict[str, Any]:
    meta = {"name": name, "namespace": ns, "uid": uid, "resourceVersion": "7", "generation": 1}
    return {"apiVersion": "mailrelay.io/v1alpha1", "kind": "RelayDomain", "metadata": meta}


def verdict(accepted: bool, reason: str, message: str = "") -> DomainVerdict:
    return DomainVerdict("tenant-b", "mine", "shared.example", accepted, reason, message)


def test_a_refused_domain_is_a_warning_saying_what_its_status_says() -> None:
    dom = domain()
    new = status.domain_status(dom, verdict(False, "Conflict", CONFLICT))
    [t] = transitions(dom.get("status"), new)
    assert t == Transition("Warning", "Conflict", CONFLICT, "Accepted")
    body = event_body(dom, t, "operator-0", 1_700_000_000_123_456_789)
    # In the object's own namespace, about it alone: no `related`, nothing but the status's text.
    assert body["metadata"]["namespace"] == "tenant-b"
    assert body["regarding"] == {
        "apiVersion": "mailrelay.io/v1alpha1",
        "kind": "RelayDomain",
        "namespace": "tenant-b",
        "name": "mine",
        "uid": "u1",
        "resourceVersion": "7",
    }
    assert "related" not in body and body["note"] == CONFLICT
    assert body["reportingController"] == REPORTING_CONTROLLER
    assert body["reportingInstance"] == "operator-0"
    assert body["type"] == "Warning" and body["reason"] == "Conflict"
    assert body["eventTime"] == "2023-11-14T22:13:20.123456Z"


def test_an_unchanged_condition_posts_nothing() -> None:
    dom = domain()
    refused = status.domain_status(dom, verdict(False, "Conflict", CONFLICT))
    again = status.domain_status({**dom, "status": refused}, verdict(False, "Conflict", "other"))
    assert transitions(refused, again) == []  # only the message moved


def test_healthy_is_news_only_after_a_warning() -> None:
    dom = domain()
    accepted = status.domain_status(dom, verdict(True, "Accepted"))
    assert transitions(None, accepted) == []  # 100,000 new domains: no 100,000 events
    refused = status.domain_status(dom, verdict(False, "Conflict", CONFLICT))
    [back] = transitions(refused, accepted)
    assert (back.type, back.reason) == ("Normal", "Accepted")


def relay(conditions: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    meta = {"name": "shared", "namespace": "mail", "uid": "r1", "generation": 2}
    spec = {"replicas": 2, "tls": {"issuerRef": {"name": "ca"}}}
    return {"apiVersion": "mailrelay.io/v1alpha1", "kind": "MailRelay", "metadata": meta,
            "spec": spec, "status": {"conditions": conditions or []}}  # fmt: skip


def test_a_relay_s_transitions() -> None:
    rel = relay()
    obs = status.RelayObservation(applied=False, apply_error="403 Forbidden: quota exceeded")
    obs.rollout = None
    bad = status.relay_status(rel, obs)
    found = {(t.type, t.reason) for t in transitions(rel["status"], bad)}
    # Rolling out is not news; a failed apply and a missing certificate are.
    assert found == {("Warning", "ApplyFailed"), ("Warning", "CertificateNotReady")}
    good = status.relay_status(
        {**rel, "status": bad},
        status.RelayObservation(certificate=(True, "issued"), replicas=2, ready_replicas=2),
    )
    found = {(t.type, t.reason) for t in transitions(bad, good)}
    assert {("Normal", "Applied"), ("Normal", "CertificateReady")} <= found


def test_invalid_spec_and_a_scale_down() -> None:
    rel = relay()
    invalid = status.invalid_spec_status(rel, ["spec.replicas: must be >= 0"])
    [t] = transitions(rel["status"], invalid)
    assert (t.type, t.reason, t.note) == ("Warning", "InvalidSpec", "spec.replicas: must be >= 0")
    draining = status.Condition(
        status.ConditionType.SCALING_DOWN, True, status.ScalingDownReason.DRAINING, "2 -> 1"
    )
    drained = status.Condition(
        status.ConditionType.SCALING_DOWN, False, status.ScalingDownReason.DRAINED, "1"
    )
    started = {"conditions": status.conditions([draining], [], 2, "t")}
    finished = {"conditions": status.conditions([drained], started["conditions"], 2, "t")}
    assert [(t.type, t.reason) for t in transitions(None, started)] == [("Normal", "Draining")]
    assert [(t.type, t.reason) for t in transitions(started, finished)] == [("Normal", "Drained")]


def test_a_body_fits_the_api_server_s_limits() -> None:
    t = Transition("Warning", "ApplyFailed", "é" * 2000, "Reconciled")
    body = event_body(domain(name="a" * 253), t, "p", 1)
    assert len(body["note"].encode()) <= NOTE_MAX_BYTES
    assert len(body["metadata"]["name"]) <= 253
    assert event_name("x-" * 126 + "y", 255).endswith("x.ff")  # no "-." inside the name


class Poster:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.posted: list[Mapping[str, Any]] = []

    async def create_event(self, event: Mapping[str, Any]) -> None:
        if self.fail:
            raise RuntimeError("403 Forbidden")
        self.posted.append(event)


def test_repeats_within_the_window_are_skipped_and_a_full_queue_drops() -> None:
    async def scenario() -> None:
        now = [0.0]
        recorder = EventRecorder(Poster(), instance="p", clock=lambda: now[0])
        t = Transition("Warning", "Conflict", CONFLICT, "Accepted")
        recorder.record(domain(), t)
        recorder.record(domain(), t)  # a flapping condition
        assert recorder.queue.qsize() == 1
        now[0] = EVENT_REPEAT_SECONDS + 1
        recorder.record(domain(), t)
        assert recorder.queue.qsize() == 2
        for i in range(EVENT_QUEUE_MAX + 10):  # never waits, never raises
            recorder.record(domain(uid=f"x{i}"), t)
        assert recorder.queue.qsize() == EVENT_QUEUE_MAX

    asyncio.run(scenario())


def test_a_failed_post_is_not_the_reconcile_s_problem() -> None:
    async def scenario() -> None:
        for poster in (Poster(fail=True), Poster()):
            recorder = EventRecorder(poster, instance="p")
            dom = domain()
            recorder.status_written(dom, status.domain_status(dom, verdict(False, "Conflict", "")))
            task = asyncio.create_task(recorder.run())
            for _ in range(100):
                if recorder.idle:
                    break
                await asyncio.sleep(0.01)
            assert not task.done()  # still draining after a failure
            task.cancel()
        assert [e["reason"] for e in poster.posted] == ["Conflict"]

    asyncio.run(scenario())


def kopf_queued(settings: kopf.OperatorSettings) -> list[Any]:
    """The Events kopf itself queues for a handler's failure (its log lines and
    kopf.exception) under these settings."""
    # kopf's poster reads its queue from these context variables: no public seam.
    from kopf._core.engines import posting

    async def fail() -> list[Any]:
        queue: asyncio.Queue[Any] = asyncio.Queue()
        posting.event_queue_loop_var.set(asyncio.get_running_loop())
        posting.event_queue_var.set(queue)
        posting.settings_var.set(settings)
        body = kopf.Body(mailrelay("edge", "mail", uid="u-1"))
        logger = kopf.ObjectLogger(body=body, settings=settings)
        try:
            raise RuntimeError("boom")
        except RuntimeError as e:
            logger.exception("Handler 'relay_event' failed with an exception. Will retry.")
            logger.error("Handler 'relay_event' failed temporarily: boom")
            kopf.exception(body, exc=e)
        await asyncio.sleep(0)
        return [queue.get_nowait() for _ in range(queue.qsize())]

    return asyncio.run(fail())


def test_kopf_posts_no_events_of_its_own() -> None:
    # Log lines as Events (settings.posting.loggers): off by kopf's default
    # today, on here, as a kopf that posted them by default would be.
    stock = kopf.OperatorSettings()
    stock.posting.loggers = True
    assert len(kopf_queued(stock)) == 3  # what users would see besides ours
    ours = kopf.OperatorSettings()
    ours.posting.loggers = True
    handlers.configure(ours)
    assert kopf_queued(ours) == []
