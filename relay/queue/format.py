"""The queue's on-disk format: folder names, queue ids, the trailer of a queue file.

A queue file is named by its queue id and holds the message data as
received, then a JSON envelope trailer and a fixed-size footer that locates
it (magic, trailer length, crc32). The folder a file sits in is its state;
state/ holds each message's delivery progress as JSON. Everything here is
pure: no queue object, no event loop.

Also the records read from those files (Envelope, Progress) and the Claim a
process holds on one (its open, flocked fd), shared by relay.queue.incoming
and relay.queue.store.
"""

from __future__ import annotations

import functools
import json
import os
import threading
import time
import zlib
from dataclasses import dataclass, field
from typing import Final, Literal

from relay import procid
from relay.queue.mailparams import NO_PARAMS, MailParams

# Folder names. A committed message is in exactly one of QUEUE_STATES.
INCOMING: Final = "incoming"
ACTIVE: Final = "active"
DEFERRED: Final = "deferred"
HOLD: Final = "hold"
STATE: Final = "state"
QueueState = Literal["active", "deferred", "hold"]
QUEUE_STATES: tuple[QueueState, ...] = (ACTIVE, DEFERRED, HOLD)
CORRUPT = "corrupt"  # damaged files, set aside for a person to look at
FLUSH_MARKER = "flush"  # touched by `mailrelay queue flush`; relays watch its mtime

READ_CHUNK = 256 * 1024  # how much of a queue file's data one read returns

_FOOTER_MAGIC = b"\nMRQ1 "
_FOOTER_LEN = len(_FOOTER_MAGIC) + 10 + 1 + 8 + 1  # magic, json length, space, crc32, LF

# Queue ids: Crockford base32, 12 characters, sortable by time. 7 characters
# of seconds since 2024-01-01, then 14 bits of pid and an 11-bit counter, so
# ids are unique across the worker processes that share a queue folder.
_B32 = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_ID_EPOCH = 1704067200
_ID_LEN = 12


def _b32(value: int, width: int) -> str:
    out = []
    for _ in range(width):
        out.append(_B32[value & 31])
        value >>= 5
    return "".join(reversed(out))


class _IdGenerator:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._second = 0
        self._counter = 0
        self._pid = -1

    def next(self) -> str:
        with self._lock:
            pid = procid.current()
            if pid != self._pid:  # a forked worker starts its own sequence
                self._pid, self._second, self._counter = pid, 0, 0
            now = int(time.time()) - _ID_EPOCH
            if now > self._second:
                self._second, self._counter = now, 0
            elif self._counter >= 2048:  # more than 2048/s: borrow the next second
                self._second, self._counter = self._second + 1, 0
            tail = ((pid & 0x3FFF) << 11) | self._counter
            self._counter += 1
            return _b32_second(self._second) + _b32(tail, 5)


@functools.lru_cache(maxsize=4)  # the same second for every id made within it
def _b32_second(second: int) -> str:
    return _b32(second, 7)


_ids = _IdGenerator()


def new_queue_id() -> str:
    return _ids.next()


def is_queue_id(text: str) -> bool:
    return len(text) == _ID_LEN and all(c in _B32 for c in text)


def id_time(queue_id: str) -> float:
    """The second a queue id was made (its arrival, give or take)."""
    value = 0
    for c in queue_id[:7]:
        value = value * 32 + _B32.index(c)
    return float(value + _ID_EPOCH)


# One encoder for every trailer (json.dumps with separators builds one per call).
_COMPACT_JSON = json.JSONEncoder(separators=(",", ":"))


@dataclass
class Envelope:
    """The committed envelope, as stored in a queue file's trailer."""

    queue_id: str
    sender: str
    recipients: list[str]
    arrival: float
    client: str
    size: int  # bytes of message data (the trailer starts here)
    # SMTPUTF8, BODY and the DSN parameters (relay.queue.mailparams). An
    # optional field of the trailer: written only when some were given, and
    # files without it (all files written before it existed) read as none.
    params: MailParams = NO_PARAMS

    def to_json(self) -> bytes:
        doc = {
            "v": 1,
            "id": self.queue_id,
            "sender": self.sender,
            "recipients": self.recipients,
            "arrival": self.arrival,
            "client": self.client,
            "size": self.size,
        }
        params = self.params.to_dict()
        if params:
            doc["params"] = params
        return _COMPACT_JSON.encode(doc).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Envelope:
        d = json.loads(raw)
        return cls(
            queue_id=d["id"],
            sender=d["sender"],
            recipients=list(d["recipients"]),
            arrival=float(d["arrival"]),
            client=d.get("client", ""),
            size=int(d["size"]),
            params=MailParams.from_dict(d.get("params")),
        )


@dataclass
class Progress:
    """What delivery attempts have found out so far (the state/ sidecar)."""

    attempts: int = 0
    done: dict[str, str] = field(default_factory=dict)  # recipient -> sent|bounced|expired
    last_reason: str = ""
    reasons: dict[str, str] = field(default_factory=dict)  # recipient -> last deferral

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "attempts": self.attempts,
                "done": self.done,
                "last_reason": self.last_reason,
                "reasons": self.reasons,
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Progress:
        d = json.loads(raw)
        return cls(
            attempts=int(d.get("attempts", 0)),
            done=dict(d.get("done", {})),
            last_reason=d.get("last_reason", ""),
            reasons=dict(d.get("reasons", {})),
        )


def trailer(envelope: Envelope) -> bytes:
    raw = envelope.to_json()
    footer = _FOOTER_MAGIC + b"%010d %08x\n" % (len(raw), zlib.crc32(raw))
    return raw + footer


def read_envelope(fd: int) -> Envelope:
    """Reads the trailer of an open queue file; ValueError if it has none."""
    size = os.fstat(fd).st_size
    if size < _FOOTER_LEN:
        raise ValueError("no queue trailer")
    footer = os.pread(fd, _FOOTER_LEN, size - _FOOTER_LEN)
    if not footer.startswith(_FOOTER_MAGIC) or not footer.endswith(b"\n"):
        raise ValueError("no queue trailer")
    length_text, crc_text = footer[len(_FOOTER_MAGIC) : -1].split(b" ")
    length = int(length_text)
    raw = os.pread(fd, length, size - _FOOTER_LEN - length)
    if len(raw) != length or zlib.crc32(raw) != int(crc_text, 16):
        raise ValueError("damaged queue trailer")
    envelope = Envelope.from_json(raw)
    if envelope.size != size - _FOOTER_LEN - length:
        raise ValueError("queue trailer does not match the data size")
    return envelope


class QueueError(Exception):
    """The queue could not store a message (disk full, permissions): answer 4xx."""


@dataclass
class Claim:
    """A message this process holds the delivery lock of (an open, flocked fd)."""

    queue_id: str
    fd: int
    state: QueueState  # the folder it was claimed in
    envelope: Envelope
    progress: Progress
    data: bytes | None = None  # the whole message data, when still in memory
    # A state/ sidecar may exist (read at claim, or saved since): remove it at the end.
    progress_saved: bool = False

    @property
    def pending(self) -> list[str]:
        return [r for r in self.envelope.recipients if r not in self.progress.done]
