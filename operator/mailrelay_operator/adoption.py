"""Whether an object already under a child's name is ours to apply (pure).

Server-side apply would take any object of that name: it would gain our
ownerReference and be garbage-collected with the MailRelay, and its content
would become ours. So an object we did not create is refused, named in
Reconciled=False with reason ResourceExists, and left alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mailrelay_operator import naming


def controller_uid(obj: Mapping[str, Any]) -> str | None:
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller"):
            return str(ref.get("uid"))
    return None


def is_ours(existing: Mapping[str, Any], desired: Mapping[str, Any]) -> bool:
    """Controlled by the relay that wants it (the desired child's controller);
    or an orphan of a relay of that name (our labels, no controller: a
    StatefulSet orphan-deleted to be recreated, children left by a MailRelay
    deleted with --cascade=orphan, or an MX Service of an older operator)."""
    owner = controller_uid(existing)
    if owner is not None:
        return owner == controller_uid(desired)
    have = (existing.get("metadata") or {}).get("labels") or {}
    want = (desired.get("metadata") or {}).get("labels") or {}
    return have.get(naming.LABEL_MANAGED_BY) == naming.MANAGED_BY and have.get(
        naming.LABEL_INSTANCE
    ) == want.get(naming.LABEL_INSTANCE)


class ForeignObject(Exception):
    """An object under a child's name that is not the relay's (see refusal)."""


def refusal(existing: Mapping[str, Any]) -> str:
    meta = existing.get("metadata") or {}
    kind = existing.get("kind") or "object"
    where = f"{meta.get('namespace')}/{meta.get('name')}"
    return (
        f"{kind} {where} exists and is not this MailRelay's: it is left alone; "
        "delete or rename it, or name the MailRelay differently"
    )
