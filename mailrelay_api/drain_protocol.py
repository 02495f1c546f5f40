"""The drain request: how the operator tells a relay pod to drain, and how
the pod knows the operator sent it. A contract between operator and relay,
which may run different versions during an upgrade: add fields, never rename.

POST /drain on the pod's control port (relay.handover.control) with the body

    {"drain": true, "peers": ["HOST:PORT", ...], "ttl": 60, "ts": <unix time>}

or {"drain": false, "ts": ...} to end a drain; header SIGNATURE_HEADER holds
hex HMAC-SHA256(key, body), the key being the relay's handover key (the one
the pods also use to authenticate each other, relay.handover.transfer). The
pod refuses a request more than MAX_SKEW seconds old (or ahead), so a
captured one cannot be replayed later.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from dataclasses import dataclass
from typing import Any

SIGNATURE_HEADER = "X-Mailrelay-Signature"
MAX_SKEW = 300.0
DEFAULT_TTL = 60.0  # a request without "ttl"


def sign(secret: bytes, data: bytes) -> str:
    """Hex HMAC-SHA256 of data under the shared secret."""
    return hmac.new(secret, data, hashlib.sha256).hexdigest()


def verify(secret: bytes, data: bytes, signature: str) -> bool:
    # As bytes: compare_digest refuses str with non-ASCII characters.
    answer = signature.strip().lower().encode("utf-8", "surrogateescape")
    return hmac.compare_digest(sign(secret, data).encode(), answer)


@dataclass(frozen=True)
class DrainRequest:
    """Drain towards peers for ttl seconds (a lease the operator renews);
    peers None ends the drain."""

    peers: tuple[str, ...] | None
    ttl: float
    ts: float  # when the operator sent it (unix time)

    @classmethod
    def start(cls, peers: list[str], ttl: float) -> DrainRequest:
        return cls(tuple(peers), ttl, time.time())

    @classmethod
    def end(cls) -> DrainRequest:
        return cls(None, 0, time.time())

    def encode(self) -> bytes:
        doc: dict[str, Any] = {"drain": self.peers is not None, "ts": self.ts, "ttl": self.ttl}
        if self.peers is not None:
            doc["peers"] = list(self.peers)
        return json.dumps(doc).encode()

    def signed(self, key: bytes) -> tuple[bytes, dict[str, str]]:
        """The body and the headers of the POST."""
        body = self.encode()
        return body, {SIGNATURE_HEADER: sign(key, body), "Content-Type": "application/json"}

    @classmethod
    def decode(cls, body: bytes) -> DrainRequest:
        """Raises ValueError, KeyError or TypeError for a malformed body."""
        doc = json.loads(body)
        ts, want = float(doc["ts"]), bool(doc["drain"])
        peers = tuple(str(p) for p in doc.get("peers") or []) if want else None
        return cls(peers, float(doc.get("ttl") or DEFAULT_TTL), ts)

    def fresh(self, now: float) -> bool:
        return abs(now - self.ts) <= MAX_SKEW
