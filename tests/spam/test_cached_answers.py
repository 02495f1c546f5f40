"""The spam checks answer from the resolver's cache without extra rounds or
queries, and give the same verdicts as with a cold cache."""

from __future__ import annotations

from typing import Any

import pytest
from mrtest.dnsserver import DnsServer

from relay.config import DnsPolicy
from relay.dns import Resolver
from relay.smtpd import dnsbl, spf
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


def _counting_pyspf_runs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The senders pyspf evaluates from now on (one entry per pyspf run)."""
    runs: list[str] = []
    original = spf.pyspf.query.check

    def check(query: Any, *args: Any, **kwargs: Any) -> Any:
        runs.append(query.s)
        return original(query, *args, **kwargs)

    monkeypatch.setattr(spf.pyspf.query, "check", check)
    return runs


async def test_spf_outcome_remembered_while_its_records_are_cached(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    records = {"memo.test": [("TXT", '"v=spf1 ip4:127.0.0.0/24 -all"')]}
    with DnsServer(records) as server:
        warm = Resolver(DnsPolicy(nameservers=(server.nameserver,), timeout=0.5))
        first = await spf.evaluate(warm, "127.0.0.30", "a@memo.test", "x")
        runs = _counting_pyspf_runs(monkeypatch)
        assert await spf.evaluate(warm, "127.0.0.30", "a@memo.test", "x") == first
        assert runs == []  # answered without pyspf
        # Another question is evaluated: the client, the sender and HELO are the key.
        assert (await spf.evaluate(warm, "127.0.0.31", "a@memo.test", "x"))[0] == "pass"
        assert runs == ["a@memo.test"]
        # Once the resolver no longer holds those records (here: a cold resolver,
        # as after their TTL), pyspf runs again on the new ones.
        server.remove("memo.test")
        server.add("memo.test", "TXT", '"v=spf1 -all"')
        cold = Resolver(DnsPolicy(nameservers=(server.nameserver,), timeout=0.5))
        assert first[0] == "pass"
        assert (await spf.evaluate(cold, "127.0.0.30", "a@memo.test", "x"))[0] == "fail"


async def test_spf_outcome_with_a_time_macro_is_not_remembered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    records = {
        "clock.test": [("TXT", '"v=spf1 -all exp=why.clock.test"')],
        "why.clock.test": [("TXT", '"refused at %{t}"')],
    }
    with DnsServer(records) as server:
        resolver = Resolver(DnsPolicy(nameservers=(server.nameserver,), timeout=0.5))
        result, explanation = await spf.evaluate(resolver, "127.0.0.30", "a@clock.test", "x")
        assert result == "fail" and explanation.startswith("refused at ")
        runs = _counting_pyspf_runs(monkeypatch)
        await spf.evaluate(resolver, "127.0.0.30", "a@clock.test", "x")
        assert runs == ["a@clock.test"]  # %{t}: evaluated every time
