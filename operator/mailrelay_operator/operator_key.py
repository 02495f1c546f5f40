"""The operator's own key, from which each relay's handover key is derived.

Where it comes from, first match wins:
- $MAILRELAY_OPERATOR_KEY_FILE: a file (the chart mounts operatorKey.existingSecret);
- $MAILRELAY_OPERATOR_KEY_SECRET ("namespace/name"): a Secret the operator
  creates on its first start and reads on every later one (the chart's
  default: Helm never renders a key, so `helm template` is stable for
  GitOps, and a restart keeps the key, so no relay rolls);
- neither: a random key for this process (tests, `mailrelay operator` by hand).

The one Secret the operator reads is this one (RBAC: get on its name only).
"""

from __future__ import annotations

import base64
import logging
import os
import secrets
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from mailrelay_operator import naming

KEY_FILE_ENV = "MAILRELAY_OPERATOR_KEY_FILE"
KEY_SECRET_ENV = "MAILRELAY_OPERATOR_KEY_SECRET"
SECRET_KEY = "key"
MIN_KEY_BYTES = 16
log = logging.getLogger("mailrelay.operator")

# The two calls it needs, so the logic is tested without an API server:
# read(namespace, name) -> the Secret's data (base64 values) or None if absent;
# create(secret) -> None, raising Exists when someone created it first.
ReadSecret = Callable[[str, str], Mapping[str, str] | None]
CreateSecret = Callable[[dict[str, Any]], None]


class Exists(Exception):
    """The Secret was created by someone else in the meantime (409)."""


def key_secret(namespace: str, name: str, key: bytes) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {naming.LABEL_MANAGED_BY: naming.MANAGED_BY},
        },
        "type": "Opaque",
        "data": {SECRET_KEY: base64.b64encode(key).decode()},
    }


def _decoded(data: Mapping[str, str] | None) -> bytes | None:
    if not data or SECRET_KEY not in data:
        return None
    key = base64.b64decode(data[SECRET_KEY]).strip()
    return key if len(key) >= MIN_KEY_BYTES else None


def get_or_create(namespace: str, name: str, read: ReadSecret, create: CreateSecret) -> bytes:
    """The key in Secret namespace/name, created with a random key if absent."""
    data = read(namespace, name)
    key = _decoded(data)
    if key is not None:
        return key
    if data is not None:
        raise RuntimeError(
            f"Secret {namespace}/{name} has no key `{SECRET_KEY}` of {MIN_KEY_BYTES} bytes "
            "or more: fix or delete it (deleting it rolls every relay's pods)"
        )
    fresh = base64.urlsafe_b64encode(secrets.token_bytes(36))
    try:
        create(key_secret(namespace, name, fresh))
        log.info("created the operator key in Secret %s/%s", namespace, name)
        return fresh
    except Exists:
        key = _decoded(read(namespace, name))  # another operator won the race
        if key is None:
            raise
        return key


def _api_calls() -> tuple[ReadSecret, CreateSecret]:
    from mailrelay_operator.kubeapi import KubeApi, KubeError, resource_path

    api = KubeApi()

    def read(namespace: str, name: str) -> Mapping[str, str] | None:
        secret = api.get_sync(resource_path("v1", "Secret", namespace, name))
        if secret is None:
            return None
        return {str(k): str(v) for k, v in (secret.get("data") or {}).items()}

    def create(secret: dict[str, Any]) -> None:
        try:
            api.create_sync(secret)
        except KubeError as e:
            if e.status == 409:
                raise Exists() from e
            raise

    return read, create


def load(env: Mapping[str, str] = os.environ) -> bytes:
    """The operator's key, from wherever the environment says (see above)."""
    path = env.get(KEY_FILE_ENV)
    if path:
        key = Path(path).read_bytes().strip()
        if len(key) >= MIN_KEY_BYTES:
            return key
        log.warning("%s holds fewer than %d bytes: not used", path, MIN_KEY_BYTES)
    where = env.get(KEY_SECRET_ENV)
    if where:
        namespace, _, name = where.partition("/")
        return get_or_create(namespace, name, *_api_calls())
    log.warning(
        "no operator key (%s or %s): handover keys are random for this run of the operator",
        KEY_FILE_ENV,
        KEY_SECRET_ENV,
    )
    return secrets.token_bytes(32)
