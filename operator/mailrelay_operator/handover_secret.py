"""The relay's handover Secret (pure builder) and its key.

One key per MailRelay, in Secret `<relay>-handover`, mounted into the pods:
it authenticates a pod handing its queue over to a peer on scale-down
(relay.handover.transfer) and the operator's drain requests (relay.handover.control).

The operator never reads Secrets (its RBAC may create and patch them, not
get, list or watch them): each relay's key is derived from the operator's
own key (a file mounted from the chart's Secret, $MAILRELAY_OPERATOR_KEY_FILE)
and the relay's uid, so the operator knows it without reading it back and
it stays the same across operator restarts.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import secrets
from pathlib import Path
from typing import Any

from mailrelay_operator import naming

KEY_FILE_ENV = "MAILRELAY_OPERATOR_KEY_FILE"
log = logging.getLogger("mailrelay.operator")


def load_operator_key() -> bytes:
    """The operator's own key; without one, a random key for this process
    (relay keys then change, and relay pods roll, when the operator restarts)."""
    path = os.environ.get(KEY_FILE_ENV)
    if path:
        key = Path(path).read_bytes().strip()
        if len(key) >= 16:
            return key
        log.warning("%s holds fewer than 16 bytes: not used", path)
    log.warning(
        "no operator key (%s): handover keys are random for this run of the operator",
        KEY_FILE_ENV,
    )
    return secrets.token_bytes(32)


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
