"""A render with the operator's RenderCache (facts of unchanged RelayDomains,
unchanged lists and shards reused) equals a render from scratch, after any
sequence of adds, changes and deletes of RelayDomains and RecipientLists,
status-only updates, namespace label changes and time passing; shard counts
are small here, so the sequences cross shard-count boundaries both ways."""

from __future__ import annotations

import dataclasses
import datetime
import json
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mrtest.objects import mailrelay, relay_domain

from mailrelay_api import shards
from mailrelay_api.claims import Claim
from mailrelay_api.load import Inventory
from mailrelay_api.render import (
    DOMAINS_FILE,
    DOMAINS_INDEX_FILE,
    RenderCache,
    Rendered,
    RenderSettings,
    render_relay,
)
from mailrelay_api.schema import API_VERSION
from mailrelay_api.validate import with_defaults

T0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
NAMESPACES = ("mail", "a", "b")
NAMES = tuple(f"d{i}" for i in range(12))
NUMBERED = tuple(f"n{i}.example" for i in range(12))
DOMAINS = ("x.example", "X.example", "x.example.", "y.example", "z.example", *NUMBERED)
HOPS = ("mx.tenant.example", "postfix", "10.96.0.10", "127.0.0.1")


def relay() -> dict[str, Any]:
    obj = mailrelay(
        spec={
            "hostname": "mx.example.net",
            "allowedDomains": {
                "releaseAfter": "60s",
                "grants": [
                    {"namespaces": {"from": "Same"}, "domains": ["*"]},
                    {
                        "namespaces": {"from": "Selector", "selector": {"matchLabels": {"t": "y"}}},
                        "domains": ["*.example"],
                    },
                ],
            },
        }
    )
    obj["metadata"]["uid"] = "relay-uid"
    return obj


@dataclasses.dataclass
class World:
    """The operator's input cache, as input_watch keeps it: a changed object is
    a new dict, a status-only update keeps the spec dict (inputs.same_spec_kept)."""

    domains: dict[tuple[str, str], dict[str, Any]] = dataclasses.field(default_factory=dict)
    lists: dict[tuple[str, str], dict[str, Any]] = dataclasses.field(default_factory=dict)
    labels: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)
    now: datetime.datetime = T0
    serial: int = 0

    def uid(self) -> str:
        self.serial += 1
        return f"uid-{self.serial}"

    def inventory(self) -> Inventory:
        return Inventory(
            relays=[],
            domains=[self.domains[k] for k in sorted(self.domains)],
            recipient_lists=[self.lists[k] for k in sorted(self.lists)],
            namespace_labels={k: dict(v) for k, v in self.labels.items()},
        )


def put_domain(w: World, ns: str, name: str, domain: str, hop: str, mode: str, age: int) -> None:
    old = w.domains.get((ns, name))
    meta = {"uid": old["metadata"]["uid"] if old else w.uid(), "generation": w.serial}
    meta["creationTimestamp"] = f"2025-01-01T00:00:{age:02d}Z"
    w.domains[(ns, name)] = relay_domain(
        name,
        domain=domain,
        namespace=ns,
        relay_namespace="mail",
        next_hop={"host": hop, "port": 25},
        recipients=mode,
        **meta,
    )


def status_only(w: World, key: tuple[str, str]) -> None:
    old = w.domains[key]
    w.serial += 1
    w.domains[key] = {
        **old,
        "metadata": {**old["metadata"], "resourceVersion": str(w.serial)},
        "status": {"recipients": w.serial},
    }


def put_list(w: World, ns: str, domain_name: str, name: str, users: list[int]) -> None:
    w.serial += 1
    key = (ns, name)
    old = w.lists.get(key)
    w.lists[key] = with_defaults(
        {
            "apiVersion": API_VERSION,
            "kind": "RecipientList",
            "metadata": {
                "name": name,
                "namespace": ns,
                "uid": old["metadata"]["uid"] if old else w.uid(),
                "generation": w.serial,
            },
            "spec": {
                "domainRef": {"name": domain_name},
                "addresses": [f"u{u}@{domain_name}.example" for u in users]
                + [f"U{u}@n{u % 12}.example" for u in users],
            },
        }
    )


ops = st.one_of(
    st.tuples(
        st.just("domain"),
        st.sampled_from(NAMESPACES),
        st.sampled_from(NAMES),
        st.sampled_from(DOMAINS),
        st.sampled_from(HOPS),
        st.sampled_from(("listed", "any", "verify")),
        st.integers(0, 5),
    ),
    st.tuples(st.just("status"), st.integers(0, 50)),
    st.tuples(st.just("delete-domain"), st.integers(0, 50)),
    st.tuples(
        st.just("list"),
        st.sampled_from(NAMESPACES),
        st.sampled_from(NAMES),
        st.integers(0, 2),
        st.lists(st.integers(0, 400), max_size=60),
    ),
    st.tuples(st.just("delete-list"), st.integers(0, 50)),
    st.tuples(st.just("labels"), st.sampled_from(NAMESPACES), st.sampled_from(("y", "n"))),
    st.tuples(st.just("time"), st.integers(1, 90)),
)


def apply(w: World, op: tuple[Any, ...]) -> None:
    kind = op[0]
    if kind == "domain":
        put_domain(w, *op[1:])
    elif kind == "status" and w.domains:
        status_only(w, sorted(w.domains)[op[1] % len(w.domains)])
    elif kind == "delete-domain" and w.domains:
        del w.domains[sorted(w.domains)[op[1] % len(w.domains)]]
    elif kind == "list":
        put_list(w, op[1], op[2], f"{op[2]}-{op[3]}", op[4])
    elif kind == "delete-list" and w.lists:
        del w.lists[sorted(w.lists)[op[1] % len(w.lists)]]
    elif kind == "labels":
        w.labels[op[1]] = {"t": op[2]}
    elif kind == "time":
        w.now += datetime.timedelta(seconds=op[1])


def outcome(r: Rendered) -> dict[str, Any]:
    return {
        "files": r.files,
        "domains": sorted(json.dumps(dataclasses.asdict(v)) for v in r.domains),
        "lists": sorted(json.dumps(dataclasses.asdict(v)) for v in r.recipient_lists),
        "recipients": r.recipients,
        "claims": r.claims,
        "next_hops": set(r.next_hops),
    }


@pytest.fixture
def small_shards() -> Iterator[None]:
    """Domains inline up to 1 KB, then shards of 1 KB; recipient shards of 512 bytes."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(shards, "DOMAINS_INLINE_MAX", 1024)
        mp.setattr(shards, "DOMAIN_SHARD_RAW_BYTES", 1024)
        mp.setattr(shards, "SHARD_RAW_BYTES", 512)
        yield


# The fixture only patches shard sizes: one for every example is what this wants.
@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(st.lists(ops, min_size=1, max_size=40))
def test_a_cached_render_equals_a_full_one(small_shards: None, steps: list[Any]) -> None:
    w = World()
    cache = RenderCache()
    claims: list[Claim] | None = None  # as the reconciler: the last render's
    base = relay()
    for op in steps:
        apply(w, op)
        at = RenderSettings(now=w.now)
        cached = render_relay(base, w.inventory(), cache, at, claims)
        full = render_relay(base, w.inventory(), None, at, claims)
        assert outcome(cached) == outcome(full), op
        claims = cached.claims


def test_claims_from_the_status_or_given_are_the_same() -> None:
    w = World()
    for i in range(5):
        put_domain(w, "mail", f"d{i}", f"n{i}.example", "postfix", "any", i)
    first = render_relay(relay(), w.inventory(), settings=RenderSettings(now=T0))
    with_status = {**relay(), "status": {"domains": [c.to_status() for c in first.claims]}}
    del w.domains[("mail", "d0")]
    a = render_relay(with_status, w.inventory(), settings=RenderSettings(now=T0))
    b = render_relay(relay(), w.inventory(), None, RenderSettings(now=T0), first.claims)
    assert outcome(a) == outcome(b)
    assert [c.gone_since for c in b.claims if c.domain == "n0.example"] == ["2026-01-01T00:00:00Z"]


def test_crossing_shard_counts_and_back(small_shards: None) -> None:
    """Inline -> 1 shard -> several and back, one domain at a time, with a cache:
    each render equals a fresh one, and one added domain changes one shard
    while the count stays."""
    w = World()
    cache = RenderCache()
    counts = []
    for i in range(40):
        put_domain(w, "mail", f"d{i:02d}", f"n{i:02d}.example", "postfix", "any", 0)
        a = render_relay(relay(), w.inventory(), cache, RenderSettings(now=T0))
        assert a.files == render_relay(relay(), w.inventory(), None, RenderSettings(now=T0)).files
        counts.append(domain_shard_count(a.files))
    for i in range(40):
        del w.domains[("mail", f"d{i:02d}")]
        a = render_relay(relay(), w.inventory(), cache, RenderSettings(now=T0))
        assert a.files == render_relay(relay(), w.inventory(), None, RenderSettings(now=T0)).files
        counts.append(domain_shard_count(a.files))
    assert counts[0] == 0 and max(counts) >= 4 and counts[-1] == 0, counts
    assert {2, 4} <= set(counts)


def domain_shard_count(files: dict[str, bytes]) -> int:
    if DOMAINS_FILE in files:
        return 0
    return len(json.loads(files[DOMAINS_INDEX_FILE])["domainFiles"])


def test_one_changed_domain_re_encodes_one_shard(
    small_shards: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = World()
    for i in range(30):
        put_domain(w, "mail", f"d{i:02d}", f"n{i:02d}.example", "postfix", "any", 0)
    cache = RenderCache()
    before = render_relay(relay(), w.inventory(), cache, RenderSettings(now=T0)).files
    encoded: list[int] = []
    real = shards.json.dumps

    def counting(obj: Any, **kw: Any) -> str:
        if kw.get("separators") == (",", ":"):  # a domain shard's JSON
            encoded.append(len(obj))
        return real(obj, **kw)

    monkeypatch.setattr(shards.json, "dumps", counting)
    put_domain(w, "mail", "d05", "n05.example", "mail.example.net", "any", 0)
    after = render_relay(relay(), w.inventory(), cache, RenderSettings(now=T0)).files
    changed = [n for n in after if before.get(n) != after[n]]
    assert len([n for n in changed if n.startswith("domains-0")]) == 1, changed
    assert len(encoded) == 1


def test_facts_are_found_again_around_added_and_removed_domains() -> None:
    """The cache walks the last render's facts alongside the (sorted) inventory:
    domains added and removed since do not make the others' facts again."""
    doms = {(ns, f"d{i:02d}"): relay_domain(f"d{i:02d}", namespace=ns)
            for ns in ("a", "mail") for i in range(0, 20, 2)}  # fmt: skip

    def facts_by_key(cache: RenderCache) -> dict[tuple[str, str], object]:
        inv = Inventory(domains=[doms[k] for k in sorted(doms)])
        render_relay(relay(), inv, cache, RenderSettings(now=T0))
        return {(f.namespace, f.name): f for f in cache.domain_facts}

    cache = RenderCache()
    first = facts_by_key(cache)
    assert set(first) == {k for k in doms if k[0] == "mail"}  # the relay's namespace only
    del doms["mail", "d00"], doms["mail", "d08"]
    for key in (("mail", "d05"), ("mail", "d09"), ("mail", "d99"), ("a", "d01")):
        doms[key] = relay_domain(key[1], namespace=key[0])
    doms["mail", "d12"] = relay_domain("d12", namespace="mail", next_hop="other.example")
    again = facts_by_key(cache)
    assert set(again) == {k for k in doms if k[0] == "mail"}
    made = {k for k in again if k not in first or again[k] is not first[k]}
    assert made == {("mail", "d05"), ("mail", "d09"), ("mail", "d99"), ("mail", "d12")}
