"""SPF with spf-engine's semantics, DNS from the real test server."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from relay.config import RelayConfig
from relay.dns import Resolver
from relay.smtpd.session import Session
from relay.smtpd.spf import SpfChecker, evaluate

MakeConfig = Callable[..., RelayConfig]

NO_SKIP = {"spf": {"skipAddresses": []}}


def session(helo: str | None, ip: str = "127.0.0.20") -> Session:
    return Session(ip, helo=helo)


async def test_pyspf_results_over_async_dns(resolver: Resolver) -> None:
    ip = "127.0.0.20"
    assert (await evaluate(resolver, ip, "a@pass.test", "x"))[0] == "pass"
    assert (await evaluate(resolver, ip, "a@include.test", "x"))[0] == "pass"
    assert (await evaluate(resolver, "127.0.0.99", "a@include.test", "x"))[0] == "pass"  # via mx:
    assert (await evaluate(resolver, "127.0.1.1", "a@include.test", "x"))[0] == "fail"
    assert await evaluate(resolver, ip, "a@fail.test", "x") == ("fail", "SPF fail - not authorized")
    assert (await evaluate(resolver, ip, "a@softfail.test", "x"))[0] == "softfail"
    assert (await evaluate(resolver, ip, "a@neutral.test", "x"))[0] == "neutral"
    assert (await evaluate(resolver, ip, "a@nospf.test", "x"))[0] == "none"
    assert (await evaluate(resolver, ip, "a@perm.test", "x"))[0] == "permerror"
    assert (await evaluate(resolver, ip, "a@timeout.test", "x"))[0] == "temperror"


async def test_a_slow_domain_does_not_hold_up_others(resolver: Resolver) -> None:
    slow = asyncio.ensure_future(evaluate(resolver, "127.0.0.20", "a@timeout.test", "x"))
    fast = await evaluate(resolver, "127.0.0.20", "a@fail.test", "x")
    assert fast[0] == "fail"
    assert not slow.done()  # still waiting for its DNS while the other finished
    assert (await slow)[0] == "temperror"


async def test_fail_rejects_with_5_7_23(make_config: MakeConfig, resolver: Resolver) -> None:
    spf = SpfChecker(make_config(restrictions=NO_SKIP), resolver)
    out = await spf.check(session("helo-pass.test"), "joe@fail.test", "info@example.com")
    assert out.reply is not None and out.header is None
    assert (out.reply.code, out.reply.status) == (550, "5.7.23")
    # r=<UNKNOWN>, not the recipient nor its domain: spf-engine 2.9.2's default
    # Hide_Receiver=Yes replaces the recipient before the URL is made.
    assert out.reply.text == (
        "<info@example.com>: Recipient address rejected: Message rejected due to: "
        "SPF fail - not authorized. Please see "
        "http://www.openspf.net/Why?s=mfrom;id=joe@fail.test;ip=127.0.0.20;r=<UNKNOWN>"
    )


async def test_helo_is_checked_first(make_config: MakeConfig, resolver: Resolver) -> None:
    spf = SpfChecker(make_config(restrictions=NO_SKIP), resolver)
    out = await spf.check(session("helo-fail.test"), "joe@pass.test", "info@example.com")
    assert out.reply is not None and out.reply.code == 550
    assert "s=helo;id=helo-fail.test" in out.reply.text
    assert out.reply.text.endswith(";r=<UNKNOWN>")  # the recipient hidden here too


async def test_pass_and_softfail_prepend_the_header(
    make_config: MakeConfig, resolver: Resolver
) -> None:
    spf = SpfChecker(make_config(restrictions=NO_SKIP), resolver)
    out = await spf.check(session("nospf.test"), "joe@pass.test", "info@example.com")
    assert out.reply is None
    assert out.header == (
        "Received-SPF: Pass (mailfrom) identity=mailfrom; client-ip=127.0.0.20; "
        "helo=nospf.test; envelope-from=joe@pass.test; receiver=<UNKNOWN> "
    )
    out = await spf.check(session("nospf.test"), "joe@softfail.test", "info@example.com")
    assert out.reply is None and out.header is not None
    assert out.header.startswith("Received-SPF: Softfail (mailfrom) identity=mailfrom;")


async def test_null_sender_uses_the_helo_result(
    make_config: MakeConfig, resolver: Resolver
) -> None:
    spf = SpfChecker(make_config(restrictions=NO_SKIP), resolver)
    out = await spf.check(session("helo-pass.test"), "", "info@example.com")
    assert out.reply is None
    assert out.header == (
        "Received-SPF: Pass (sender SPF authorized) identity=helo; client-ip=127.0.0.20; "
        "helo=helo-pass.test; envelope-from=<>; receiver=<UNKNOWN> "
    )
    out = await spf.check(session("helo-fail.test"), "", "info@example.com")
    assert out.reply is not None and out.reply.status == "5.7.23"


async def test_none_everywhere_says_no_spf_record(
    make_config: MakeConfig, resolver: Resolver
) -> None:
    spf = SpfChecker(make_config(restrictions=NO_SKIP), resolver)
    out = await spf.check(session("nospf.test"), "joe@nospf.test", "info@example.com")
    assert out.header == (
        "Received-SPF: None (mailfrom) identity=mailfrom; client-ip=127.0.0.20; "
        "helo=nospf.test; envelope-from=joe@nospf.test; receiver=<UNKNOWN> "
    )


async def test_temperror_and_permerror_per_configuration(
    make_config: MakeConfig, resolver: Resolver
) -> None:
    lenient = SpfChecker(make_config(restrictions=NO_SKIP), resolver)
    out = await lenient.check(session("nospf.test"), "joe@timeout.test", "info@example.com")
    assert out.reply is None and out.header is not None and "Temperror" in out.header
    strict = SpfChecker(
        make_config(
            restrictions={
                "spf": {"skipAddresses": [], "tempErrorDefer": True, "permErrorReject": True}
            }
        ),
        resolver,
    )
    out = await strict.check(session("nospf.test"), "joe@timeout.test", "info@example.com")
    assert out.reply is not None and out.reply.defer_if_permit
    assert (out.reply.code, out.reply.status) == (450, "4.7.24")
    assert "Message deferred due to" in out.reply.text
    out = await strict.check(session("nospf.test"), "joe@perm.test", "info@example.com")
    assert out.reply is not None and (out.reply.code, out.reply.status) == (550, "5.7.24")


async def test_softfail_rejected_when_configured(
    make_config: MakeConfig, resolver: Resolver
) -> None:
    spf = SpfChecker(
        make_config(restrictions={"spf": {"skipAddresses": [], "mailFromReject": "Softfail"}}),
        resolver,
    )
    out = await spf.check(session("nospf.test"), "joe@softfail.test", "info@example.com")
    assert out.reply is not None and out.reply.code == 550


async def test_skip_addresses(make_config: MakeConfig, resolver: Resolver) -> None:
    spf = SpfChecker(make_config(), resolver)  # default skipAddresses: 127.0.0.0/8 ...
    out = await spf.check(session("helo-fail.test"), "joe@fail.test", "info@example.com")
    assert out.reply is None
    assert out.header == (
        "X-Comment: SPF check N/A for local connections - client-ip=127.0.0.20; "
        "helo=helo-fail.test; envelope-from=joe@fail.test; receiver=<UNKNOWN> "
    )
