"""Whether a relay's StatefulSet has rolled out, and whether it is stuck (pure).

Ready needs more than ready pods: the StatefulSet controller must have seen
the spec we applied (observedGeneration), and every pod must run the current
template (updatedReplicas, updateRevision). A rollout that makes no progress
(pods crash-looping, an image that cannot be pulled, nowhere to schedule)
for PROGRESS_DEADLINE_SECONDS is reported as stuck, not as "rolling out".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# Like a Deployment's progressDeadlineSeconds default.
PROGRESS_DEADLINE_SECONDS = 600.0


@dataclass(frozen=True)
class Rollout:
    done: bool
    reason: str  # while not done: ReplicasNotReady or RollingOut (status.ReadyReason)
    message: str
    progress: tuple[int, ...]  # what counts as progress: changes reset the deadline


NOT_READY, ROLLING_OUT = "ReplicasNotReady", "RollingOut"


def rollout(sts: Mapping[str, Any] | None, want: int) -> Rollout:
    if sts is None:
        return Rollout(False, NOT_READY, f"0/{want} pods ready", ())
    meta, st = sts.get("metadata") or {}, sts.get("status") or {}
    generation = int(meta.get("generation") or 0)
    observed = int(st.get("observedGeneration") or 0)
    ready = int(st.get("readyReplicas") or 0)
    updated = int(st.get("updatedReplicas") or 0)
    update = str(st.get("updateRevision") or "")
    progress = (observed, ready, updated, hash(update))
    if ready < want:
        return Rollout(False, NOT_READY, f"{ready}/{want} pods ready", progress)
    if observed < generation:
        message = "the StatefulSet controller has not seen the new spec"
        return Rollout(False, ROLLING_OUT, message, progress)
    if updated < want:
        message = f"{updated}/{want} pods updated to revision {update}"
        return Rollout(False, ROLLING_OUT, message, progress)
    return Rollout(True, "", f"{want}/{want} pods ready", progress)


@dataclass
class ProgressClock:
    """When the rollout last made progress (kept per relay between passes)."""

    progress: tuple[int, ...] = ()
    since: float = 0.0

    def stuck(
        self, state: Rollout, now: float, deadline: float = PROGRESS_DEADLINE_SECONDS
    ) -> bool:
        if state.done or state.progress != self.progress:
            self.progress, self.since = state.progress, now
            return False
        return now - self.since > deadline
