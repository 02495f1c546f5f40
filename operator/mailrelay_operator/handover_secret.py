"""The relay's handover Secret (pure builder) and its key.

One key per MailRelay, in Secret `<relay>-handover`, mounted into the pods:
it authenticates a pod handing its queue over to a peer on scale-down
(relay.handover.transfer) and the operator's drain requests (relay.handover.control).

The operator never reads these Secrets (its RBAC may create and patch
Secrets, and get only its own key): each relay's key is derived from the
operator's own key (operator_key.py) and the relay's uid, so the operator
knows it without reading it back and it stays the same across operator
restarts.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Any

from mailrelay_operator import naming


def relay_key(operator_key: bytes, relay: dict[str, Any]) -> str:
    """The relay's handover key: a new relay (a new uid) gets a new one."""
    meta = relay["metadata"]
    label = f"mailrelay-handover/{naming.relay_namespace(relay)}/{meta['name']}/{meta.get('uid')}"
    digest = hmac.new(operator_key, label.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


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
