"""RCPT restrictions that ask DNS, against the real test DNS server."""

from __future__ import annotations

from collections.abc import Callable

from mrtest.spamzones import LISTED_TXT

from relay.config import RelayConfig
from relay.dns import Resolver
from relay.smtpd.dnschecks import DnsChecks
from relay.smtpd.session import Session

MakeConfig = Callable[..., RelayConfig]

RBL = {
    "rblClients": [
        {"zone": "bl.test", "returnCodes": ["127.0.0.10", "127.0.0.11"]},
        {"zone": "bl.test"},
        {"zone": "bl2.test"},
        {"zone": "broken.test"},
    ]
}


def checks(make_config: Callable[..., RelayConfig], resolver: Resolver) -> DnsChecks:
    return DnsChecks(make_config(restrictions=RBL), resolver)


async def test_unknown_recipient_domain(make_config: MakeConfig, resolver: Resolver) -> None:
    c = checks(make_config, resolver)
    assert await c.unknown_recipient_domain("a@example.com", "example.com") is None
    assert await c.unknown_recipient_domain("a@aonly.test", "aonly.test") is None
    assert await c.unknown_recipient_domain("a@[127.0.0.1]", "[127.0.0.1]") is None
    r = await c.unknown_recipient_domain("a@nowhere.test", "nowhere.test")
    assert r is not None and not r.defer_if_permit
    assert str(r) == "450 4.1.2 <a@nowhere.test>: Recipient address rejected: Domain not found"
    r = await c.unknown_recipient_domain("a@nodata.test", "nodata.test")
    assert r is not None and r.code == 450
    r = await c.unknown_recipient_domain("a@nullmx.test", "nullmx.test")
    assert r is not None
    assert str(r) == (
        "556 5.1.10 <a@nullmx.test>: Recipient address rejected: "
        "Domain nullmx.test does not accept mail (nullMX)"
    )
    r = await c.unknown_recipient_domain("a@timeout.test", "timeout.test")
    assert r is not None and r.defer_if_permit and r.code == 450


async def test_reverse_client_hostname(make_config: MakeConfig, resolver: Resolver) -> None:
    c = checks(make_config, resolver)
    with_ptr = Session("127.0.0.20")
    assert await c.unknown_reverse_client_hostname(with_ptr) is None
    assert with_ptr.reverse_name == "mail.good.test"
    r = await c.unknown_reverse_client_hostname(Session("127.0.0.21"))
    assert r is not None
    assert (
        str(r) == "450 4.7.1 Client host rejected: cannot find your reverse hostname, [127.0.0.21]"
    )
    r = await c.unknown_reverse_client_hostname(Session("127.0.0.22"))  # PTR lookup times out
    assert r is not None and r.code == 450 and not r.defer_if_permit


async def test_rbl_return_codes_and_txt_reason(make_config: MakeConfig, resolver: Resolver) -> None:
    c = checks(make_config, resolver)
    r = await c.rbl_client(Session("127.0.0.10"))
    assert r is not None
    assert str(r) == (
        "554 5.7.1 Service unavailable; Client host [127.0.0.10] blocked using bl.test; "
        + LISTED_TXT
    )
    r = await c.rbl_client(Session("127.0.0.11"))  # matches the first entry's return codes
    assert r is not None and r.text.endswith("blocked using bl.test; PBL listed (dynamic range)")
    r = await c.rbl_client(Session("127.0.0.13"))  # the second list
    assert r is not None and "blocked using bl2.test; bl2 says no" in r.text
    # A Spamhaus-style error answer and a list that lists everything never reject.
    assert await c.rbl_client(Session("127.0.0.12")) is None
    assert await c.rbl_client(Session("127.0.0.20")) is None


async def test_rbl_return_code_filter_alone(make_config: MakeConfig, resolver: Resolver) -> None:
    config = make_config(
        restrictions={"rblClients": [{"zone": "bl.test", "returnCodes": ["127.0.0.10"]}]}
    )
    c = DnsChecks(config, resolver)
    assert await c.rbl_client(Session("127.0.0.10")) is None  # answers 127.0.0.2: not this code
    assert await c.rbl_client(Session("127.0.0.11")) is not None


async def test_checks_off_in_config(make_config: MakeConfig, resolver: Resolver) -> None:
    config = make_config(
        restrictions={
            "rejectUnknownRecipientDomain": False,
            "rejectUnknownReverseClientHostname": False,
        }
    )
    c = DnsChecks(config, resolver)
    assert await c.unknown_recipient_domain("a@nowhere.test", "nowhere.test") is None
    assert await c.unknown_reverse_client_hostname(Session("127.0.0.21")) is None
    assert await c.rbl_client(Session("127.0.0.10")) is None
