"""The restriction table of each SMTP stage (relay.smtpd.policy): what each
lists, in order, and that a restriction added to a stage runs at that stage
of a real session."""

from __future__ import annotations

from pathlib import Path

import pytest
from mrtest.peers import RawClient
from mrtest.relayproc import next_loopback

from relay.smtpd import policy
from relay.smtpd.addresses import parse_path
from relay.smtpd.policy import Check, Stage, Verdict
from relay.smtpd.session import Reply, Session, Transaction

from .conftest import Harness, ServerFactory, make_config


def names(table: tuple[policy.Restriction, ...]) -> list[str]:
    return [r.__name__ for r in table]


def test_each_stage_lists_its_restrictions_in_order() -> None:
    # smtpd_delay_reject=yes: the client and HELO checks run at RCPT.
    assert names(policy.CLIENT_RESTRICTIONS) == []
    assert names(policy.HELO_RESTRICTIONS) == []
    assert names(policy.SENDER_RESTRICTIONS) == ["message_size", "storage"]
    assert names(policy.RECIPIENT_RESTRICTIONS)[:3] == [
        "screen_enforce",
        "relay_access",
        "unauth_pipelining",
    ]  # the whole RCPT table: test_policy.test_the_order_reads_in_one_place
    assert names(policy.DATA_RESTRICTIONS) == ["unauth_pipelining"]
    assert names(policy.END_OF_DATA_RESTRICTIONS) == ["hopcount", "content", "authentication"]
    assert names(policy.IMPLICIT_AFTER_PERMIT) == ["unlisted_recipient", "unverified_recipient"]


def test_reject_unauth_pipelining_is_one_restriction_in_two_tables() -> None:
    assert policy.DATA_RESTRICTIONS[0] is policy.unauth_pipelining
    assert policy.unauth_pipelining in policy.RECIPIENT_RESTRICTIONS


class Refuse:
    """A restriction that refuses, and records the stages it ran at."""

    __name__ = "refuse"

    def __init__(self) -> None:
        self.stages: list[Stage] = []

    async def __call__(self, c: Check) -> Verdict:
        self.stages.append(c.stage)
        return Reply(554, "5.7.1", f"refused at {c.stage}")


def add(monkeypatch: pytest.MonkeyPatch, table: str) -> Refuse:
    refuse = Refuse()
    monkeypatch.setattr(policy, table, (*getattr(policy, table), refuse))
    return refuse


async def banner(c: RawClient) -> str:
    """The last line of the greeting (after postscreen's "220-" teaser)."""
    return (await c.read_reply()).splitlines()[-1]


async def start(relay_server: ServerFactory) -> tuple[Harness, RawClient]:
    h = await relay_server()
    return h, RawClient(h.host, h.port, local=next_loopback(), timeout=10)


async def open_transaction(c: RawClient) -> None:
    await c.greet()
    assert await c.command("MAIL FROM:<a@client.test>") == "250 2.1.0 Ok"
    assert await c.command("RCPT TO:<info@example.com>") == "250 2.1.5 Ok"


async def test_connect_stage(relay_server: ServerFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    refuse = add(monkeypatch, "CLIENT_RESTRICTIONS")
    h, client = await start(relay_server)
    async with client as c:
        # Postfix with smtpd_delay_reject=no: the reject instead of the
        # greeting, then 503 to every command but QUIT.
        assert await banner(c) == "554 5.7.1 refused at CONNECT"
        assert (await c.command("EHLO client.test")).startswith("503 5.7.0 Error: access denied")
        assert (await c.command("MAIL FROM:<a@client.test>")).startswith("503 5.7.0")
        assert await c.command("BOGUS") == "502 5.5.2 Error: command not recognized"
        assert await c.command("QUIT") == "221 2.0.0 Bye"
    assert refuse.stages == [Stage.CONNECT]
    assert h.queued() == []


async def test_helo_stage(relay_server: ServerFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    refuse = add(monkeypatch, "HELO_RESTRICTIONS")
    _, client = await start(relay_server)
    async with client as c:
        assert (await banner(c)).startswith("220 ")
        assert await c.command("EHLO client.test") == "554 5.7.1 refused at HELO"
        assert await c.command("HELO client.test") == "554 5.7.1 refused at HELO"
        # A refused name is not kept.
        assert await c.command("MAIL FROM:<a@client.test>") == (
            "503 5.5.1 Error: send HELO/EHLO first"
        )
    assert refuse.stages == [Stage.HELO, Stage.HELO]


async def test_mail_stage(relay_server: ServerFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    refuse = add(monkeypatch, "SENDER_RESTRICTIONS")
    _, client = await start(relay_server)
    async with client as c:
        await c.greet()
        assert await c.command("MAIL FROM:<a@client.test>") == "554 5.7.1 refused at MAIL"
        # No transaction was started.
        assert await c.command("RCPT TO:<info@example.com>") == "503 5.5.1 Error: need MAIL command"
    assert refuse.stages == [Stage.MAIL]


async def test_rcpt_stage(relay_server: ServerFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    refuse = add(monkeypatch, "RECIPIENT_RESTRICTIONS")
    _, client = await start(relay_server)
    async with client as c:
        await c.greet()
        assert await c.command("MAIL FROM:<a@client.test>") == "250 2.1.0 Ok"
        assert await c.command("RCPT TO:<info@example.com>") == "554 5.7.1 refused at RCPT"
        # Earlier restrictions still decide first.
        assert (await c.command("RCPT TO:<x@evil.test>")).endswith("Relay access denied")
    assert refuse.stages == [Stage.RCPT]


async def test_data_stage(relay_server: ServerFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    refuse = add(monkeypatch, "DATA_RESTRICTIONS")
    h, client = await start(relay_server)
    async with client as c:
        await open_transaction(c)
        assert await c.command("DATA") == "554 5.7.1 refused at DATA"
        # The transaction stays: the client may still RSET or QUIT.
        assert await c.command("RSET") == "250 2.0.0 Ok"
    assert refuse.stages == [Stage.DATA]
    assert h.queued() == []


async def test_end_of_data_stage(
    relay_server: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    refuse = add(monkeypatch, "END_OF_DATA_RESTRICTIONS")
    h, client = await start(relay_server)
    async with client as c:
        await open_transaction(c)
        assert (await c.command("DATA")).startswith("354")
        await c.send(b"Subject: t\r\n\r\nhello\r\n.\r\n")
        assert await c.read_reply() == "554 5.7.1 refused at END-OF-DATA"
        # The transaction is over.
        assert await c.command("RCPT TO:<info@example.com>") == "503 5.5.1 Error: need MAIL command"
    assert refuse.stages == [Stage.END_OF_DATA]
    assert h.queued() == []


async def test_unauth_pipelining_names_the_stage(
    relay_server: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One restriction, Postfix's reply for each stage it is listed in."""
    monkeypatch.setattr(policy, "SENDER_RESTRICTIONS", (policy.unauth_pipelining,))
    _, client = await start(relay_server)
    async with client as c:
        assert (await banner(c)).startswith("220 ")
        # HELO (not EHLO): any command sent ahead of its reply is improper.
        await c.send(b"HELO client.test\r\nMAIL FROM:<a@client.test>\r\n")
        assert await c.read_reply() == "250 mx.relay.test"
        assert await c.read_reply() == (
            "503 5.5.0 <a@client.test>: Sender address rejected:"
            " Improper use of SMTP command pipelining"
        )


def test_a_rejection_names_what_its_stage_looks_at(tmp_path: Path) -> None:
    """Postfix's "<name>: <class> rejected: ..." (smtpd_check.c reply_name/reply_class)."""
    session = Session("127.0.0.9", helo="client.test")
    txn = Transaction("a@client.test")
    c = Check(make_config(tmp_path), session, txn, None, None, None)  # type: ignore[arg-type]
    c.rcpt, _ = parse_path("<Info@Example.com>")
    expected = {
        Stage.CONNECT: "<127.0.0.9>: Client host rejected: x",
        Stage.HELO: "<client.test>: Helo command rejected: x",
        Stage.MAIL: "<a@client.test>: Sender address rejected: x",
        Stage.RCPT: "<Info@Example.com>: Recipient address rejected: x",
        Stage.DATA: "<DATA>: Data command rejected: x",
        Stage.END_OF_DATA: "<END-OF-MESSAGE>: End-of-data rejected: x",
    }
    assert set(expected) == set(Stage)
    for stage, text in expected.items():
        c.stage = stage
        assert c.rejected(550, "5.7.1", "x") == Reply(550, "5.7.1", text)
