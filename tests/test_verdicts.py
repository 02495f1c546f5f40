"""A render's DomainVerdicts (an accepted domain held as its facts) reads as
the list of DomainVerdict it replaces."""

from __future__ import annotations

from typing import Any

import pytest

from mailrelay_api.domain_facts import DomainFacts
from mailrelay_api.verdicts import DomainVerdict, DomainVerdicts


def facts(name: str, domain: str) -> DomainFacts:
    dom: dict[str, Any] = {
        "metadata": {"name": name, "namespace": "mail"},
        "spec": {"domain": domain, "recipients": "listed"},
    }
    return DomainFacts(dom)


def test_verdicts_read_as_the_list() -> None:
    a, b, c = facts("a", "A.example."), facts("b", "b.example"), facts("c", "c.example")
    refused = DomainVerdict("mail", "x", "x.example", False, "NotAllowed", "no", source="mail/x")
    verdicts = DomainVerdicts()
    verdicts.accept(a)
    verdicts.append(refused)
    verdicts.accept(b)
    verdicts.accept(c)
    assert [(i, f.name) for i, f in verdicts.accepted_facts()] == [(0, "a"), (2, "b"), (3, "c")]
    verdicts.set_recipients(0, 1000)
    verdicts.set_recipients(2, 0)
    expected = [
        DomainVerdict("mail", "a", "a.example", True, "Accepted", "", 1000, source="mail/a"),
        refused,
        DomainVerdict(
            "mail",
            "b",
            "b.example",
            True,
            "NoRecipients",
            "recipients: listed and no RecipientList: every address is refused",
            source="mail/b",
        ),
        DomainVerdict("mail", "c", "c.example", True, "Accepted", "", source="mail/c"),
    ]
    assert list(verdicts) == expected and verdicts == expected and expected == verdicts
    assert len(verdicts) == 4 and verdicts[-1] == expected[-1] and verdicts[1:3] == expected[1:3]
    with pytest.raises(IndexError):
        verdicts[-5]
    assert [v.key for v in verdicts.held()] == ["mail/x"]
    assert verdicts[0].source is a.source  # the facts' own string
    verdicts[0].recipients = 5  # a verdict read is made on the spot
    assert verdicts[0].recipients == 1000
    assert DomainVerdicts(expected) == expected
    assert verdicts != expected[:3] and verdicts != "abcd"
