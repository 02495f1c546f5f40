"""The durable queue between smtpd and delivery (Postfix's incoming/active/deferred/hold folders).

relay.queue.format: the on-disk format (folders, queue ids, the trailer, Claim);
relay.queue.incoming: a message being received and the batched committer;
relay.queue.store: the Queue (claims, progress, scans, administration).
The names the other stages use are re-exported here.
"""

from relay.queue.format import (
    ACTIVE,
    DEFERRED,
    HOLD,
    QUEUE_STATES,
    READ_CHUNK,
    Claim,
    QueueError,
    new_queue_id,
)
from relay.queue.incoming import IncomingMessage
from relay.queue.store import Queue, QueuedMessage

__all__ = [
    "ACTIVE",
    "DEFERRED",
    "HOLD",
    "QUEUE_STATES",
    "READ_CHUNK",
    "Claim",
    "IncomingMessage",
    "Queue",
    "QueueError",
    "QueuedMessage",
    "new_queue_id",
]
