"""A large relay's claims: in ConfigMaps, status.domains keeps the gone holders'."""

from __future__ import annotations

import gzip
import json
from typing import Any

import pytest
from mailrelay_operator import claims_store, configmaps
from mailrelay_operator.children import desired_children
from mrtest.objects import mailrelay, relay_domain

from mailrelay_api.claims import Claim, claims_of
from mailrelay_api.load import Inventory
from mailrelay_api.render import render_relay


def relay() -> dict[str, Any]:
    return mailrelay(uid="r1")


def claims(n: int) -> list[Claim]:
    return [Claim(f"d{i}.example", f"mail/d{i}") for i in range(n)]


@pytest.fixture
def small_max(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(claims_store, "STATUS_CLAIMS_MAX", 10)


def test_few_claims_stay_in_the_status() -> None:
    few = claims(3)
    assert claims_store.status_claims(few) == [c.to_status() for c in few]
    assert claims_store.claims_config_maps(relay(), few) == []


def test_many_claims_go_to_config_maps(small_max: None) -> None:
    many = [*claims(50), Claim("gone.example", "mail/gone", "2026-01-01T00:00:00Z")]
    assert claims_store.status_claims(many) == [
        {"domain": "gone.example", "holder": "mail/gone", "goneSince": "2026-01-01T00:00:00Z"}
    ]
    cms = claims_store.claims_config_maps(relay(), many)
    assert [cm["metadata"]["name"] for cm in cms] == ["edge-claims-0"]
    assert cms[0]["metadata"]["labels"]["app.kubernetes.io/component"] == "claims"
    stored = claims_store.claims_in(cms)
    assert sorted(c["domain"] for c in stored) == sorted(c.domain for c in many)


def test_a_restart_reads_them_back(small_max: None) -> None:
    """The status's entries (gone holders) and the ConfigMaps' make every claim again."""
    many = [*claims(50), Claim("gone.example", "mail/gone", "2026-01-01T00:00:00Z")]
    status = {"domains": claims_store.status_claims(many)}
    stored = claims_store.claims_in(claims_store.claims_config_maps(relay(), many))
    back = claims_of(claims_store.with_stored_claims({**relay(), "status": status}, stored))
    assert sorted(back.values(), key=lambda c: c.domain) == sorted(many, key=lambda c: c.domain)


def test_the_relay_owns_its_claims_config_maps(small_max: None) -> None:
    r = relay()
    domains = [relay_domain(f"d{i}") for i in range(20)]
    rendered = render_relay(r, Inventory(relays=[r], domains=domains))
    children = desired_children(r, rendered, "img", cert_manager=True)
    names = [c["metadata"]["name"] for c in children if c["kind"] == "ConfigMap"]
    assert "edge-claims-0" in names
    assert configmaps.config_files(
        [c for c in children if c["metadata"]["name"] == "edge-claims-0"]
    )


def test_a_cache_packs_only_changed_shards_and_changes_nothing(
    small_max: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The claims ConfigMaps with the reconciler's cache are the ones without,
    as claims come and go (across shard counts); an unchanged shard is not packed again."""
    monkeypatch.setattr(claims_store, "DOMAIN_SHARD_RAW_BYTES", 4096)  # 50 claims: 1 shard
    cache = claims_store.ClaimsCache()
    many = claims(50)
    packed: list[int] = []
    real = claims_store._packed
    monkeypatch.setattr(claims_store, "_packed", lambda g: packed.append(len(g)) or real(g))
    for now in (many, [*many[:49], Claim("d49.example", "mail/other")], many + claims(3000)):
        assert claims_store.claims_config_maps(relay(), now, cache) == (
            claims_store.claims_config_maps(relay(), now)
        )
    packed.clear()
    again = many + claims(3000)  # equal claims, not the same objects: packed again
    claims_store.claims_config_maps(relay(), again, cache)
    shards = len(packed)
    packed.clear()
    claims_store.claims_config_maps(relay(), [*again[:-1], Claim("x.example", "mail/x")], cache)
    assert shards > 1 and len(packed) <= 2  # the shard that lost a claim, the one that got one
    assert claims_store.claims_config_maps(relay(), [], cache) == [] and cache.shards == {}


def test_a_claims_shard_is_packed_as_the_json_of_its_entries() -> None:
    """Packed ENTRY_CHUNK claims at a time: the bytes of gzip.compress of the
    whole JSON list (what earlier operators wrote and claims_in reads)."""
    group = [
        Claim(f"d{i}.example", f"ns/d{i}", "2026-01-01T00:00:00Z" if i % 7 == 0 else None)
        for i in range(2_345)
    ]
    text = json.dumps([c.to_status() for c in group], sort_keys=True, separators=(",", ":"))
    assert claims_store._packed(group) == gzip.compress(text.encode(), 6, mtime=0)
    assert claims_store._packed([]) == gzip.compress(b"[]", 6, mtime=0)
