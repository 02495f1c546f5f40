"""The durable queue (Postfix's incoming/active/deferred/hold, on one volume).

INTERFACE STUB — to be implemented (see docs in each method). The SMTP
server writes DATA into an IncomingMessage chunk by chunk and only answers
250 after `commit()` returned (file and folder fsynced). Delivery reads
messages back with `due()` / `open_data()` and records results.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class QueuedMessage:
    queue_id: str
    sender: str
    recipients: list[str]  # still pending
    arrival: float  # unix time
    next_attempt: float
    attempts: int = 0
    held: bool = False
    last_reason: str = ""
    done: dict[str, str] = field(default_factory=dict)  # recipient -> final result
    client: str = ""  # client ip, for logs and DSNs
    size: int = 0


class IncomingMessage:
    """A message being received: chunks go straight to disk."""

    queue_id: str

    def write(self, chunk: bytes) -> None:
        raise NotImplementedError

    async def commit(self, sender: str, recipients: list[str], client: str = "") -> str:
        """Makes the message durable (data and envelope fsynced, folder fsynced); returns the id."""
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError


class Queue:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def incoming(self) -> IncomingMessage:
        raise NotImplementedError

    def messages(self) -> Iterator[QueuedMessage]:
        raise NotImplementedError
