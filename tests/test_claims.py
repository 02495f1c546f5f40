"""Domain claims (grants, sticky holders, release) and next hops, as render sees them."""

from __future__ import annotations

import datetime
import random
from typing import Any

from mrtest.objects import mailrelay, relay_domain

from mailrelay_api.claims import Claim, ClusterNetworks, claims_of, name_matches
from mailrelay_api.load import Inventory
from mailrelay_api.render import RenderSettings, _with_claims, attach_domains

T0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
CLUSTER = ClusterNetworks.from_env(
    {
        "MAILRELAY_CLUSTER_CIDRS": "10.96.0.0/12, 10.244.0.0/16",
        "MAILRELAY_CLUSTER_DOMAIN": "k8s.local",
    }
)


def relay(claims: list[dict[str, str]] | None = None, **spec: Any) -> dict[str, Any]:
    obj = mailrelay(spec={"hostname": "mx.example.net", **spec})
    obj["status"] = {"domains": claims or []}
    return obj


def domain(ns: str, name: str, dom: str, age: int = 0, **hop: Any) -> dict[str, Any]:
    return relay_domain(
        name,
        domain=dom,
        namespace=ns,
        relay_namespace="mail",
        next_hop={"host": "mx.tenant.example", **hop},
        recipients=None,
        creationTimestamp=f"2025-01-01T00:00:{age:02d}Z",
    )


ALL = {"allowedDomains": {"namespaces": {"from": "All"}}}


def attach(r: dict[str, Any], *doms: dict[str, Any], at: datetime.datetime = T0) -> Any:
    inv = Inventory(domains=list(doms), namespace_labels={"a": {"t": "a"}, "b": {"t": "b"}})
    _, verdicts, claims = attach_domains(r, inv, RenderSettings(cluster=CLUSTER, now=at))
    return {f"{v.namespace}/{v.name}": v for v in verdicts}, [c.to_status() for c in claims]


def test_a_free_domain_goes_to_the_oldest_claim_and_is_recorded() -> None:
    verdicts, claims = attach(
        relay(**ALL), domain("b", "x", "a.example", 2), domain("a", "x", "a.example", 1)
    )
    assert verdicts["a/x"].accepted and not verdicts["b/x"].accepted
    assert claims == [{"domain": "a.example", "holder": "a/x"}]


def test_an_older_object_does_not_take_a_held_domain() -> None:
    # The squatter's object is older; the recorded holder keeps the domain.
    held = relay([{"domain": "a.example", "holder": "a/x"}], **ALL)
    verdicts, claims = attach(
        held, domain("b", "old", "a.example", 0), domain("a", "x", "a.example", 9)
    )
    assert verdicts["a/x"].accepted
    assert verdicts["b/old"].reason == "Conflict"
    assert claims == [{"domain": "a.example", "holder": "a/x"}]


def test_delete_and_reapply_keeps_the_domain_with_its_owner() -> None:
    held = relay([{"domain": "a.example", "holder": "a/x"}], **ALL)
    # The owner's object is gone (Argo CD Replace): nobody gets the domain...
    verdicts, claims = attach(held, domain("b", "squat", "a.example"))
    assert verdicts["b/squat"].reason == "Conflict"
    assert claims == [{"domain": "a.example", "holder": "a/x", "goneSince": "2026-01-01T00:00:00Z"}]
    # ...the owner re-applied within releaseAfter gets it back.
    held["status"]["domains"] = claims
    later = T0 + datetime.timedelta(minutes=30)
    verdicts, claims = attach(
        held, domain("b", "squat", "a.example"), domain("a", "x", "a.example", 9), at=later
    )
    assert verdicts["a/x"].accepted and not verdicts["b/squat"].accepted
    assert claims == [{"domain": "a.example", "holder": "a/x"}]


def test_a_claim_is_released_after_release_after() -> None:
    gone = [{"domain": "a.example", "holder": "a/x", "goneSince": "2026-01-01T00:00:00Z"}]
    r = relay(gone, allowedDomains={"namespaces": {"from": "All"}, "releaseAfter": "10m"})
    verdicts, _ = attach(r, domain("b", "new", "a.example"), at=T0 + datetime.timedelta(minutes=9))
    assert not verdicts["b/new"].accepted
    verdicts, claims = attach(
        r, domain("b", "new", "a.example"), at=T0 + datetime.timedelta(minutes=10)
    )
    assert verdicts["b/new"].accepted
    assert claims == [{"domain": "a.example", "holder": "b/new"}]
    # A released claim with no claimant is dropped.
    assert attach(r, at=T0 + datetime.timedelta(hours=1))[1] == []


def test_conflict_messages_name_no_other_tenant() -> None:
    held = relay([{"domain": "a.example", "holder": "a/secret-name"}], **ALL)
    verdicts, _ = attach(
        held, domain("b", "squat", "a.example"), domain("a", "secret-name", "a.example")
    )
    message = verdicts["b/squat"].message
    assert "secret-name" not in message and "a/" not in message and " a " not in message


GRANTS = {
    "allowedDomains": {
        "grants": [
            {"namespaces": {"from": "Same"}, "domains": ["*"]},
            {
                "namespaces": {"from": "Selector", "selector": {"matchLabels": {"t": "a"}}},
                "domains": ["a.example", "*.a.example", "shared.example"],
            },
            {
                "namespaces": {"from": "Selector", "selector": {"matchLabels": {"t": "b"}}},
                "domains": ["b.example", "shared.example"],
            },
        ]
    }
}


def test_grants_decide_who_may_claim_what() -> None:
    verdicts, _ = attach(
        relay(**GRANTS),
        domain("a", "own", "a.example"),
        domain("a", "sub", "mail.a.example"),
        domain("b", "steal", "x.a.example"),
        domain("b", "own", "b.example"),
        domain("c", "any", "c.example"),
        domain("mail", "ops", "anything.example"),
    )
    assert {k for k, v in verdicts.items() if v.accepted} == {"a/own", "a/sub", "b/own", "mail/ops"}
    assert verdicts["b/steal"].reason == "NotAllowed"
    assert verdicts["c/any"].reason == "NotAllowed"


def test_overlapping_grants_first_holder_keeps_it() -> None:
    verdicts, claims = attach(
        relay(**GRANTS),
        domain("b", "s", "shared.example", 1),
        domain("a", "s", "shared.example", 2),
    )
    assert verdicts["b/s"].accepted and verdicts["a/s"].reason == "Conflict"
    r = relay(claims, **GRANTS)
    # a's object becomes the older one (re-created under another name): b keeps it.
    verdicts, _ = attach(
        r, domain("a", "s2", "shared.example", 0), domain("b", "s", "shared.example", 1)
    )
    assert verdicts["b/s"].accepted and not verdicts["a/s2"].accepted


def test_a_revoked_grant_releases_the_holder_like_a_deletion() -> None:
    held = relay([{"domain": "b.example", "holder": "c/x"}], **GRANTS)
    verdicts, claims = attach(held, domain("c", "x", "b.example"), domain("b", "own", "b.example"))
    assert verdicts["c/x"].reason == "NotAllowed" and not verdicts["b/own"].accepted
    assert claims[0]["goneSince"] == "2026-01-01T00:00:00Z"


def test_name_patterns() -> None:
    assert name_matches("*", "x.example")
    assert name_matches("*.example.com", "a.b.example.com")
    assert not name_matches("*.example.com", "example.com")
    assert not name_matches("*.example.com", "badexample.com")
    assert name_matches("Example.COM", "example.com.")


def test_default_next_hops_keep_tenants_out_of_the_cluster() -> None:
    cases = {
        "ok": ({}, True),
        "submission": ({"port": 587}, True),
        "ssh": ({"port": 22}, False),
        "service ip": ({"host": "10.96.0.10"}, False),
        "pod ip": ({"host": "10.244.3.4"}, False),
        "loopback": ({"host": "127.0.0.1"}, False),
        "metadata": ({"host": "169.254.169.254"}, False),
        "service name": ({"host": "kube-dns.kube-system.svc"}, False),
        "cluster domain": ({"host": "db.prod.svc.k8s.local"}, False),
        "one label": ({"host": "postfix"}, False),
        "public ip": ({"host": "192.0.2.25"}, True),
    }
    doms = [
        domain("t", name, f"d{i}.example", **hop)
        for i, (name, (hop, _)) in enumerate(cases.items())
    ]
    verdicts, _ = attach(relay(**ALL), *doms)
    for name, (_, ok) in cases.items():
        assert verdicts[f"t/{name}"].accepted == ok, name
        if not ok:
            assert verdicts[f"t/{name}"].reason == "NextHopNotAllowed"
    # The relay's own namespace is not a tenant: anything goes by default.
    own, _ = attach(relay(**ALL), domain("mail", "local", "l.example", host="127.0.0.1", port=2526))
    assert own["mail/local"].accepted


def test_allowed_next_hops_replace_the_default_for_everyone() -> None:
    r = relay(
        allowedNextHops=[{"cidr": "192.0.2.0/24", "ports": [2525]}, {"host": "*.smtp.example"}],
        **ALL,
    )
    verdicts, _ = attach(
        r,
        domain("t", "cidr", "a.example", host="192.0.2.9", port=2525),
        domain("t", "cidr-port", "b.example", host="192.0.2.9", port=25),
        domain("t", "host", "c.example", host="out.smtp.example"),
        domain("t", "other", "d.example", host="mx.elsewhere.example"),
        domain("mail", "own", "e.example", host="127.0.0.1", port=2526),
    )
    assert {k for k, v in verdicts.items() if v.accepted} == {"t/cidr", "t/host"}


def test_next_release_is_when_the_first_gone_claim_lapses() -> None:
    from mailrelay_api.claims import Claim, next_release

    claims = [
        Claim("a.example", "a/x"),
        Claim("b.example", "b/x", "2026-01-01T00:10:00Z"),
        Claim("c.example", "c/x", "2026-01-01T00:05:00Z"),
    ]
    assert next_release(claims, "1h") == T0 + datetime.timedelta(hours=1, minutes=5)
    assert next_release(claims[:1], "1h") is None


def test_claims_walked_beside_the_domains_in_order() -> None:
    """attach_domains walks the sorted claimed domains beside the sorted claims:
    the union in order, each with its claim, as a dict and a set of both would."""
    rng = random.Random(7)
    for _ in range(300):
        domains = sorted(rng.sample([f"d{i}.example" for i in range(30)], rng.randint(0, 12)))
        held = rng.sample([f"d{i}.example" for i in range(30)], rng.randint(0, 12))
        claims = sorted((Claim(d, f"ns/{d}") for d in held), key=lambda c: c.domain)
        by_domain = {c.domain: c for c in claims}
        expected = [(d, by_domain.get(d)) for d in sorted(set(domains) | by_domain.keys())]
        assert list(_with_claims(domains, claims)) == expected


def test_a_render_starts_from_its_claims_as_from_the_status() -> None:
    """The last render's claims (a list) give the verdicts and claims the
    same claims in the relay's status give."""
    held = [{"domain": "a.example", "holder": "b/newer"}]
    r = relay(held, allowedDomains={"namespaces": {"from": "All"}, "releaseAfter": "10m"})
    doms = [domain("a", "old", "a.example", 1), domain("b", "newer", "a.example", 5)]
    doms.append(domain("a", "other", "c.example", 2))
    settings = RenderSettings(cluster=CLUSTER, now=T0)
    inv = Inventory(domains=doms, namespace_labels={"a": {"t": "a"}, "b": {"t": "b"}})
    _, from_status, claimed = attach_domains(r, inv, settings)
    listed = [Claim("z.example", "a/gone", "2026-01-01T00:00:00Z"), *claims_of(r).values()]
    _, from_list, claimed_list = attach_domains(r, inv, settings, None, listed)
    assert [v.name for v in from_status if v.accepted] == ["newer", "other"]
    assert from_list == from_status
    assert claimed_list == [*claimed, listed[0]]
