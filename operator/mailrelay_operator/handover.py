"""The relay's handover Secret (pure builder) and its key.

One random key per MailRelay, in Secret `<relay>-handover`, mounted into the
pods: it authenticates a pod handing its queue over to a peer on scale-down
(relay.handover) and the operator's drain requests (relay.control). The
operator creates it once and keeps it: the key is read back, never made anew
while the Secret exists.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from typing import Any

from mailrelay_operator import naming


def new_key() -> str:
    return secrets.token_urlsafe(32)


def key_of(secret: dict[str, Any] | None) -> str | None:
    """The key held by an existing Secret, if it holds a usable one."""
    raw = ((secret or {}).get("data") or {}).get(naming.HANDOVER_SECRET_KEY)
    if not raw:
        return None
    try:
        key = base64.b64decode(raw).decode()
    except (ValueError, UnicodeDecodeError):
        return None
    return key if len(key) >= 16 else None


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def handover_secret(relay: dict[str, Any], key: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": naming.handover_secret_name(relay),
            "namespace": naming.relay_namespace(relay),
            "labels": naming.labels(relay, "handover"),
        },
        "type": "Opaque",
        "data": {naming.HANDOVER_SECRET_KEY: base64.b64encode(key.encode()).decode()},
    }
