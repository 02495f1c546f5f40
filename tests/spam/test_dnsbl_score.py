"""DNSBL reply filters and scoring (Postfix postscreen_dnsbl_sites semantics)."""

from __future__ import annotations

import pytest

from relay.config import DnsblSite
from relay.smtpd import dnsbl
from relay.smtpd.dnsbl import ZoneAnswer, parse_filter, reply_counts, score, site_entries


def test_filter_numbers_lists_and_ranges() -> None:
    f = parse_filter("127.0.0.[2;4..7;10]")
    assert [a for a in range(12) if f.matches(f"127.0.0.{a}")] == [2, 4, 5, 6, 7, 10]
    assert not f.matches("127.0.1.2")
    g = parse_filter("127.0.[0..255].[2..3]")
    assert g.matches("127.0.200.3") and not g.matches("127.0.200.4")


@pytest.mark.parametrize(
    "bad", ["127.0.0", "127.0.0.256", "127.0.0.[3..2]", "127.0.0.[2", "a.b.c.d", "127.0.0.1.1"]
)
def test_bad_filters_are_refused(bad: str) -> None:
    with pytest.raises(dnsbl.FilterError):
        parse_filter(bad)


def test_error_codes_and_outside_127_never_count() -> None:
    anything = parse_filter("[0..255].[0..255].[0..255].[0..255]")
    for code in ("127.255.255.252", "127.255.255.254", "127.255.255.255"):
        assert not reply_counts(code, None)
        assert not reply_counts(code, anything)
    assert not reply_counts("192.0.2.1", None)
    assert not reply_counts("192.0.2.1", anything)  # a parked, wildcarded zone
    assert reply_counts("127.0.0.2", None)
    assert not reply_counts("127.0.5.1", None)  # no filter: only 127.0.0.0/24
    assert reply_counts("127.0.5.1", parse_filter("127.0.[0..255].1"))  # dnswl style


def entries(*sites: tuple[str, tuple[str, ...], int]) -> list[dnsbl.SiteEntry]:
    return site_entries([DnsblSite(z, codes, w) for z, codes, w in sites])


def test_a_pattern_counts_once_and_several_patterns_add_up() -> None:
    es = entries(("zen.test", (), 2), ("zen.test", ("127.0.0.10",), 3), ("b.test", (), 1))
    answers = {
        "zen.test": ZoneAnswer("zen.test", ("127.0.0.2", "127.0.0.4", "127.0.0.10"), 300),
        "b.test": ZoneAnswer("b.test", (), 900),
    }
    s = score(es, answers)
    assert s.total == 5  # 2 once (three records match), + 3 for the .10 pattern
    assert s.name == "zen.test"
    assert s.ttl == 300  # the failing answer's TTL
    assert s.complete


def test_negative_weights_allowlist_and_ttl_is_clamped() -> None:
    es = entries(("bl.test", (), 1), ("wl.test", ("127.0.[0..255].1",), -2))
    answers = {
        "bl.test": ZoneAnswer("bl.test", ("127.0.0.2",), 5),
        "wl.test": ZoneAnswer("wl.test", ("127.0.9.1",), 99999),
    }
    s = score(es, answers)
    assert s.total == -1
    assert s.ttl == dnsbl.MAX_TTL  # passing: the allowlist answer's TTL, clamped to 1 h
    answers["wl.test"] = ZoneAnswer("wl.test", (), 10)
    s = score(es, answers)
    assert s.total == 1 and s.ttl == dnsbl.MIN_TTL  # failing: 5 s, clamped to 60 s


def test_partial_refused_and_failed_answers() -> None:
    es = entries(("a.test", (), 1), ("b.test", (), 1), ("c.test", (), 1))
    answers = {
        "a.test": ZoneAnswer("a.test", ("127.0.0.2",), 300, refused="broken"),
        "b.test": ZoneAnswer("b.test", failed="timeout"),
    }
    s = score(es, answers)
    assert s.total == 0 and not s.complete


def test_several_return_codes_give_one_pattern_each_and_bad_ones_are_skipped() -> None:
    es = entries(("zen.test", ("127.0.0.10", "127.0.0.11", "not-a-code"), 1))
    assert [e.text for e in es] == ["zen.test=127.0.0.10*1", "zen.test=127.0.0.11*1"]
