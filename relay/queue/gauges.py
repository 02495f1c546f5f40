"""The queue's gauges, from one scan of the queue folder (any process may set
them: every worker scans the same folder, and the newest scan wins)."""

from __future__ import annotations

from relay import metrics
from relay.queue.format import ACTIVE, DEFERRED, HOLD, QueueState, id_time


def count_queue(
    entries: list[tuple[str, QueueState, float, int]],
    now: float,
    volume: tuple[int, int] | None,
) -> None:
    """Messages and bytes per state; the age of the oldest message waiting for
    a next hop (held mail waits for a person: not counted); the volume's
    (available, size) bytes when known."""
    counts: dict[QueueState, int] = {ACTIVE: 0, DEFERRED: 0, HOLD: 0}
    sizes: dict[QueueState, int] = {ACTIVE: 0, DEFERRED: 0, HOLD: 0}
    oldest = now
    for queue_id, state, _mtime, size in entries:
        counts[state] += 1
        sizes[state] += size
        if state != HOLD:
            oldest = min(oldest, id_time(queue_id))
    for state, n in counts.items():
        metrics.QUEUE_SIZE.labels(state).set(n)
        metrics.QUEUE_BYTES.labels(state).set(sizes[state])
    metrics.QUEUE_OLDEST_AGE.set(max(0.0, now - oldest))
    if volume is not None:
        metrics.QUEUE_VOLUME_AVAILABLE.set(volume[0])
        metrics.QUEUE_VOLUME_SIZE.set(volume[1])
