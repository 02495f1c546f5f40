"""Recipient probes against real primaries: Postfix with a relay recipient
table (it refuses unknown users at RCPT) and Postfix's smtp-sink."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from mrtest import postfix
from mrtest.delivery_helpers import FakeClock
from mrtest.peers import PostfixSink

from relay.config import Domain, NextHop, VerifyPolicy
from relay.delivery.connections import ConnectionPool
from relay.delivery.verify import Prober
from relay.dns import Resolver
from relay.verify_cache import Status, Verifier

pytestmark = pytest.mark.skipif(not postfix.available(), reason="needs root and Postfix")


@pytest.fixture
async def pool() -> AsyncIterator[ConnectionPool]:
    p = ConnectionPool(Resolver(), connect_timeout=5, command_timeout=10)
    yield p
    await p.close()


def verifier(pool: ConnectionPool, tmp_path: Path) -> Verifier:
    return Verifier(tmp_path / "verify", Prober(pool, lambda: "relay.test"), clock=FakeClock())


def domain_at(host: str, port: int) -> Domain:
    return Domain("example.com", NextHop(host, port, tls="may"), "verify", verify=VerifyPolicy())


async def test_postfix_primary_accepts_known_and_refuses_unknown_users(
    pool: ConnectionPool, tmp_path: Path
) -> None:
    settings = {
        "relay_domains": "example.com",
        "relay_recipient_maps": "inline:{ known@example.com=OK }",
        "transport_maps": "inline:{ example.com=discard: }",
    }
    with postfix.PostfixServer("127.0.0.9", main_cf=settings) as primary:
        v = verifier(pool, tmp_path)
        domain = domain_at(*primary.address)
        known = await v.verify("known@example.com", domain)
        unknown = await v.verify("unknown@example.com", domain)
        again = await v.verify("unknown@example.com", domain)
        v.close()
        await pool.close()
        maillog = primary.wait_for_log("NOQUEUE: reject: RCPT from")
    assert known.status == Status.OK
    assert unknown.status == Status.REJECTED
    assert "550 5.1.1 <unknown@example.com>: Recipient address rejected: " in unknown.reply
    assert "User unknown in relay recipient table" in unknown.reply
    assert again.status == Status.REJECTED and not again.probed
    assert maillog.count("NOQUEUE: reject: RCPT from") == 1  # one probe, from the null sender
    assert "from=<>" in maillog and "message-id=" not in maillog  # never DATA


# smtp-sink -f refuses a command with 5xx, -r with 4xx.
@pytest.mark.parametrize(
    ("options", "status"),
    [([], Status.OK), (["-f", "RCPT"], Status.REJECTED), (["-r", "RCPT"], Status.UNREACHABLE)],
)
async def test_smtp_sink_primary(
    pool: ConnectionPool, tmp_path: Path, options: list[str], status: Status
) -> None:
    with PostfixSink("127.0.0.10", tmp_path, options=options) as sink:
        v = verifier(pool, tmp_path)
        result = await v.verify("someone@example.com", domain_at(*sink.address))
        v.close()
        await pool.close()
        assert sink.messages() == []
    assert result.status == status
