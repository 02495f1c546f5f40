"""The spam checks answer from the resolver's cache without extra rounds or
queries, and give the same verdicts as with a cold cache."""

from __future__ import annotations

from mrtest.dnsserver import DnsServer

from relay.dns import Resolver
from relay.smtpd import dnsbl
from relay.smtpd.spf import evaluate


async def test_cached_is_what_query_returned(resolver: Resolver) -> None:
    assert resolver.cached("pass.test", "TXT") is None
    answer = await resolver.query("pass.test", "TXT")
    assert resolver.cached("PASS.test.", "txt") == answer
    assert resolver.cached("fail.test", "TXT") is None


async def test_spf_with_a_warm_cache_asks_no_more(
    resolver: Resolver, dns_server: DnsServer
) -> None:
    ip = "127.0.0.20"
    cold = [await evaluate(resolver, ip, f"a@{d}.test", "x") for d in ("include", "fail")]
    before = dns_server.count("include.test") + dns_server.count("pass.test")
    warm = [await evaluate(resolver, ip, f"a@{d}.test", "x") for d in ("include", "fail")]
    assert warm == cold
    assert cold[0][0] == "pass" and cold[1][0] == "fail"
    assert dns_server.count("include.test") + dns_server.count("pass.test") == before


async def test_dnsbl_zone_answer_from_the_cache(resolver: Resolver) -> None:
    cold = await dnsbl.query_zone(resolver, "bl.test", "127.0.0.10")
    warm = await dnsbl.query_zone(resolver, "bl.test", "127.0.0.10")
    assert warm == cold and cold.addresses == ("127.0.0.2",)
    for _ in range(2):  # a broken list stays refused when answered from the cache
        assert (await dnsbl.query_zone(resolver, "broken.test", "127.0.0.20")).refused
