"""Ready means rolled out; a rollout without progress is stuck; TLS follows the Certificate."""

from __future__ import annotations

from typing import Any

from mailrelay_operator.certificate import certificate_ready
from mailrelay_operator.rollout import PROGRESS_DEADLINE_SECONDS, ProgressClock, rollout


def sts(generation: int = 2, **status: Any) -> dict[str, Any]:
    return {"metadata": {"name": "edge", "generation": generation}, "status": status}


DONE = {"observedGeneration": 2, "replicas": 2, "readyReplicas": 2, "updatedReplicas": 2,
        "currentRevision": "edge-b", "updateRevision": "edge-b"}  # fmt: skip


def test_ready_pods_are_not_enough() -> None:
    assert rollout(sts(**DONE), 2).done
    stale = rollout(sts(**{**DONE, "observedGeneration": 1}), 2)
    assert (stale.reason, stale.message) == (
        "RollingOut",
        "the StatefulSet controller has not seen the new spec",
    )
    # Two ready pods, one still on the old template.
    half = rollout(sts(**{**DONE, "updatedReplicas": 1, "currentRevision": "edge-a"}), 2)
    assert (half.reason, half.message) == ("RollingOut", "1/2 pods updated to revision edge-b")
    short = rollout(sts(**{**DONE, "readyReplicas": 1}), 2)
    assert (short.reason, short.message) == ("ReplicasNotReady", "1/2 pods ready")
    assert not rollout(None, 2).done


def test_no_progress_for_the_deadline_is_stuck() -> None:
    clock = ProgressClock()
    crashing = rollout(sts(**{**DONE, "readyReplicas": 1}), 2)
    assert not clock.stuck(crashing, now=0.0)
    assert not clock.stuck(crashing, now=PROGRESS_DEADLINE_SECONDS - 1)
    assert clock.stuck(crashing, now=PROGRESS_DEADLINE_SECONDS + 1)
    # Progress (one more pod updated) restarts the clock; done is never stuck.
    moving = rollout(sts(**{**DONE, "readyReplicas": 1, "updatedReplicas": 1}), 2)
    assert not clock.stuck(moving, now=PROGRESS_DEADLINE_SECONDS + 2)
    assert not clock.stuck(rollout(sts(**DONE), 2), now=10 * PROGRESS_DEADLINE_SECONDS)


def test_tls_is_true_only_when_the_certificate_is_ready() -> None:
    assert certificate_ready(None) == (False, "Certificate not created yet")
    cert: dict[str, Any] = {"metadata": {"name": "edge-tls"}, "status": {}}
    assert certificate_ready(cert) == (False, "Certificate edge-tls: Issuing")
    cert["status"]["conditions"] = [
        {"type": "Ready", "status": "False", "reason": "DoesNotExist", "message": "no secret"}
    ]
    assert certificate_ready(cert) == (False, "Certificate edge-tls: DoesNotExist: no secret")
    cert["status"]["conditions"] = [{"type": "Ready", "status": "True", "reason": "Ready"}]
    assert certificate_ready(cert) == (True, "Certificate edge-tls: Ready")
