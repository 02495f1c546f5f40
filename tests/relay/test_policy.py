"""The RCPT restriction chain: order, permit, defer_if_permit, SPF once."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from mailrelay_api.schema import WhenUnreachable
from relay.config import Domain, NextHop, RelayConfig, VerifyPolicy
from relay.smtpd.addresses import parse_path
from relay.smtpd.policy import RECIPIENT_RESTRICTIONS, Check, check_recipient
from relay.smtpd.session import Reply, ScreenResult, Session, Transaction
from relay.smtpd.spf import SpfOutcome
from relay.verify_cache import ProbeResult, Status

from .conftest import make_config

DEFER = Reply(450, "4.7.1", "Client host rejected: cannot find your reverse hostname", True)
RBL = Reply(554, "5.7.1", "Service unavailable; Client host [127.0.0.9] blocked using bl.test")


class FakeDns:
    """DnsChecks with scripted answers; records what was asked."""

    def __init__(self, reverse: Reply | None = None, rbl: Reply | None = None) -> None:
        self.reverse = reverse
        self.rbl = rbl
        self.calls: list[str] = []

    async def unknown_recipient_domain(self, recipient: str, domain: str) -> Reply | None:
        self.calls.append("unknown_recipient_domain")
        return None

    async def unknown_reverse_client_hostname(self, session: Session) -> Reply | None:
        self.calls.append("reverse")
        return self.reverse

    async def rbl_client(self, session: Session) -> Reply | None:
        self.calls.append("rbl")
        return self.rbl


class FakeSpf:
    def __init__(self, outcome: SpfOutcome) -> None:
        self.outcome = outcome
        self.calls = 0

    async def check(self, session: Session, sender: str, recipient: str) -> SpfOutcome:
        self.calls += 1
        return self.outcome


@pytest.fixture
def config(tmp_path: Path) -> RelayConfig:
    return make_config(
        tmp_path,
        spec={
            "network": {
                "mynetworks": ["127.0.1.0/24"],
                "clientAccess": [
                    {"cidr": "127.0.2.1/32", "action": "permit"},
                    {"cidr": "127.0.2.0/24", "action": "reject"},
                ],
            },
            "restrictions": {
                "rejectUnknownReverseClientHostname": True,
                "rblClients": [{"zone": "bl.test"}],
                "spf": {"enabled": True},
            },
        },
    )


async def run(
    config: RelayConfig,
    rcpt: str,
    *,
    ip: str = "127.0.0.9",
    dns: Any = None,
    spf: Any = None,
    txn: Transaction | None = None,
    session: Session | None = None,
    verifier: Any = None,
) -> tuple[Reply | None, list[str]]:
    session = session or Session(client_ip=ip)
    session.trusted = ip.startswith("127.0.1.")
    address, _ = parse_path(f"<{rcpt}>")
    check = Check(
        config=config,
        session=session,
        transaction=txn or Transaction(sender="a@client.test"),
        rcpt=address,
        dns=dns or FakeDns(),
        spf=spf or FakeSpf(SpfOutcome()),
        verifier=verifier,
    )
    return await check_recipient(check), check.reasons


def test_the_order_reads_in_one_place() -> None:
    assert [r.__name__ for r in RECIPIENT_RESTRICTIONS] == [
        "screen_enforce",
        "relay_access",
        "unauth_pipelining",
        "non_fqdn_recipient",
        "unknown_recipient_domain",
        "permit_mynetworks",
        "client_access",
        "unknown_reverse_client_hostname",
        "rbl_client",
        "unlisted_recipient",
        "spf",
        "greylist",
        "unverified_recipient",
    ]


class FakeVerifier:
    def __init__(self, result: ProbeResult) -> None:
        self.result = result
        self.asked: list[str] = []

    async def verify(self, address: str, domain: Domain) -> ProbeResult:
        self.asked.append(address)
        return self.result


def with_verify_domain(
    config: RelayConfig, when_unreachable: WhenUnreachable = "defer"
) -> RelayConfig:
    hop = NextHop("127.0.0.1", 9)
    policy = VerifyPolicy(when_unreachable=when_unreachable)
    domains = {**config.domains, "v.test": Domain("v.test", hop, "verify", verify=policy)}
    return dataclasses.replace(config, domains=domains)


@pytest.mark.parametrize("ip", ["127.0.0.9", "127.0.1.5"])  # a stranger; mynetworks
async def test_verify_domain_rejects_what_the_next_hop_refused(
    config: RelayConfig, ip: str
) -> None:
    said = "host p[127.0.0.1] said: 550 5.1.1 no such user (in reply to RCPT TO command)"
    verifier = FakeVerifier(ProbeResult(Status.REJECTED, said))
    reply, reasons = await run(with_verify_domain(config), "x@v.test", ip=ip, verifier=verifier)
    assert str(reply) == (
        f"550 5.1.1 <x@v.test>: Recipient address rejected: undeliverable address: {said}"
    )
    assert reasons[-1] == "unverified_recipient" and verifier.asked == ["x@v.test"]


@pytest.mark.parametrize(("when", "code"), [("defer", "450 4.1.1"), ("accept", None)])
async def test_verify_domain_without_an_answer(
    config: RelayConfig, when: WhenUnreachable, code: str | None
) -> None:
    verifier = FakeVerifier(ProbeResult(Status.UNREACHABLE, "connect to p: Connection refused"))
    reply, _ = await run(with_verify_domain(config, when), "x@v.test", verifier=verifier)
    if code is None:
        assert reply is None
    else:
        assert str(reply) == (
            f"{code} <x@v.test>: Recipient address rejected: unverified address: "
            "connect to p: Connection refused"
        )


async def test_only_verify_domains_are_probed(config: RelayConfig) -> None:
    verifier = FakeVerifier(ProbeResult(Status.OK, "250 ok"))
    assert (await run(with_verify_domain(config), "x@v.test", verifier=verifier))[0] is None
    await run(config, "nobody@example.com", verifier=verifier)
    assert verifier.asked == ["x@v.test"]


async def test_screen_enforce_comes_first(config: RelayConfig) -> None:
    session = Session(client_ip="127.0.0.9")
    session.screen = ScreenResult("enforce", "pregreet", Reply(550, "5.5.1", "Protocol error"))
    reply, reasons = await run(config, "x@evil.test", session=session)
    assert str(reply) == "550 5.5.1 Protocol error"
    assert reasons == ["screen_enforce"]


async def test_relay_decision_before_mynetworks(config: RelayConfig) -> None:
    reply, _ = await run(config, "x@evil.test", ip="127.0.1.5")
    assert str(reply) == "554 5.7.1 <x@evil.test>: Relay access denied"


async def test_mynetworks_skip_dns_checks_but_not_the_recipient_table(config: RelayConfig) -> None:
    dns = FakeDns(reverse=DEFER, rbl=RBL)
    assert await run(config, "info@example.com", ip="127.0.1.5", dns=dns) == (
        None,
        ["permit_mynetworks"],
    )
    assert dns.calls == []  # (unknown_recipient_domain is off in test configs)
    reply, _ = await run(config, "nobody@example.com", ip="127.0.1.5", dns=dns)
    assert reply is not None and reply.code == 550 and "relay recipient table" in reply.text


async def test_client_access(config: RelayConfig) -> None:
    dns = FakeDns(rbl=RBL)
    assert (await run(config, "info@example.com", ip="127.0.2.1", dns=dns))[0] is None
    reply, _ = await run(config, "info@example.com", ip="127.0.2.7", dns=dns)
    assert str(reply) == "554 5.7.1 <127.0.2.7>: Client host rejected: Access denied"


async def test_defer_if_permit(config: RelayConfig) -> None:
    # A temporary failure defers only when nothing later rejects...
    reply, _ = await run(config, "info@example.com", dns=FakeDns(reverse=DEFER))
    assert reply == DEFER
    # ... and a later reject wins.
    reply, _ = await run(config, "info@example.com", dns=FakeDns(reverse=DEFER, rbl=RBL))
    assert reply == RBL
    reply, _ = await run(config, "nobody@example.com", dns=FakeDns(reverse=DEFER))
    assert reply is not None and reply.code == 550


async def test_spf_runs_once_per_transaction(config: RelayConfig) -> None:
    spf = FakeSpf(SpfOutcome(header="Received-SPF: Pass (mailfrom) identity=mailfrom"))
    txn = Transaction(sender="a@client.test")
    for rcpt in ("info@example.com", "joe@example.com", "x@example.org"):
        assert (await run(config, rcpt, spf=spf, txn=txn))[0] is None
    assert spf.calls == 1
    assert txn.prepend_headers == ["Received-SPF: Pass (mailfrom) identity=mailfrom"]


async def test_spf_fail_rejects(config: RelayConfig) -> None:
    fail = Reply(550, "5.7.23", "Message rejected due to: SPF fail")
    spf = FakeSpf(SpfOutcome(reply=fail))
    txn = Transaction(sender="a@client.test")
    assert (await run(config, "info@example.com", spf=spf, txn=txn))[0] == fail
    assert (await run(config, "joe@example.com", spf=spf, txn=txn))[0] == fail
    assert spf.calls == 1


async def test_non_fqdn_recipient(tmp_path: Path) -> None:
    # Only reachable for relay domains that are not FQDNs; the schema refuses
    # those, so check the restriction on its own.
    from relay.smtpd.policy import non_fqdn_recipient

    config = make_config(tmp_path)
    address, _ = parse_path("<joe@localhost>")
    check = Check(
        config,
        Session("127.0.0.9"),
        Transaction(""),
        address,
        FakeDns(),
        FakeSpf(SpfOutcome()),  # type: ignore[arg-type]
    )
    reply = await non_fqdn_recipient(check)
    assert str(reply) == (
        "504 5.5.2 <joe@localhost>: Recipient address rejected: need fully-qualified address"
    )
