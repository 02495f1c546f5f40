"""Which existing objects the operator may apply over (adoption.py)."""

from __future__ import annotations

from typing import Any

from mailrelay_operator import adoption, naming

# What the relay wants under that name: controlled by it, with its labels.
DESIRED = {
    "kind": "Service",
    "metadata": {
        "name": "edge-mx1-example-net",
        "labels": {naming.LABEL_MANAGED_BY: naming.MANAGED_BY, naming.LABEL_INSTANCE: "edge"},
        "ownerReferences": [{"uid": "u-1", "controller": True, "kind": "MailRelay"}],
    },
}
RELAY = DESIRED


def svc(owner: str | None = None, **labels: str) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "edge-mx1-example-net", "namespace": "mail", "labels": labels}
    if owner:
        meta["ownerReferences"] = [{"uid": owner, "controller": True, "kind": "MailRelay"}]
    return {"kind": "Service", "metadata": meta}


def test_ours_when_this_relay_controls_it() -> None:
    assert adoption.is_ours(svc("u-1"), RELAY)
    assert not adoption.is_ours(svc("u-other"), RELAY)


def test_an_orphan_of_a_relay_of_this_name_is_ours() -> None:
    ours = {naming.LABEL_MANAGED_BY: naming.MANAGED_BY, naming.LABEL_INSTANCE: "edge"}
    assert adoption.is_ours(svc(None, **ours), RELAY)
    assert not adoption.is_ours(svc(None, **{**ours, naming.LABEL_INSTANCE: "other"}), RELAY)


def test_someone_elses_object_is_refused_by_name() -> None:
    theirs = svc(None, app="billing")
    assert not adoption.is_ours(theirs, RELAY)
    message = adoption.refusal(theirs)
    assert message.startswith(
        "Service mail/edge-mx1-example-net exists and is not this MailRelay's"
    )
