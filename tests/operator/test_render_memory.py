"""The reconciler lets the last render go before it builds the next one (not
two sets of 100,000 verdicts at once), and the next render still starts from
the last render's claims: a domain held stays with its holder."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest
from mailrelay_operator import reconciler
from mailrelay_operator.cluster import ClusterView, trim
from mailrelay_operator.health import Health
from mailrelay_operator.reconciler import Reconciler, RelayMemory
from mrtest.objects import mailrelay, relay_domain

from mailrelay_api.render import Rendered

KEY = ("mail", "edge")


def view_of(*domains: dict[str, Any]) -> ClusterView:
    relay = trim(mailrelay("edge", "mail", uid="u-1", generation=1))
    found = {(d["metadata"]["namespace"], d["metadata"]["name"]): trim(d) for d in domains}
    return ClusterView(relays={KEY: relay}, domains=found)


def new_reconciler() -> Reconciler:
    return Reconciler(api=cast(Any, object()), view=ClusterView, operator_key=b"k" * 32,
                      health=Health(), workers=1)  # fmt: skip


async def render(r: Reconciler, mem: RelayMemory, view: ClusterView) -> Rendered:
    return await r._render(KEY, view.relays[KEY], mem, True, view)


def test_the_last_render_is_let_go_before_the_next_and_its_claims_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[tuple[Rendered | None, list[str]]] = []
    render_relay = reconciler.render_relay

    def spying(*args: Any) -> Rendered:
        claims = args[4]
        seen.append((mem.rendered, sorted(c.holder for c in claims)))
        return render_relay(*args)

    mem = RelayMemory(uid="u-1", claims=[])  # claims known: no API read

    async def scenario() -> None:
        r = new_reconciler()
        first = await render(r, mem, view_of(relay_domain("first", domain="shop.example")))
        assert [(v.name, v.accepted) for v in first.domains] == [("first", True)]
        monkeypatch.setattr(reconciler, "render_relay", spying)
        # A second claimant, older by its timestamp, in another namespace:
        # the claim recorded by the first render still decides.
        rival = relay_domain(
            "rival", namespace="other", domain="shop.example", relay_namespace="mail",
            creationTimestamp="2000-01-01T00:00:00Z",
        )  # fmt: skip
        view = view_of(relay_domain("first", domain="shop.example"), rival)
        second = await render(r, mem, view)
        assert seen == [(None, ["mail/first"])]
        winners = {v.namespace for v in second.domains if v.accepted}
        assert winners == {"mail"}
        assert mem.rendered is second

    asyncio.run(scenario())


def test_a_failed_render_leaves_no_render_and_the_claims(monkeypatch: pytest.MonkeyPatch) -> None:
    mem = RelayMemory(uid="u-1", claims=[])

    def failing(*args: Any) -> Rendered:
        raise RuntimeError("render failed")

    async def scenario() -> None:
        r = new_reconciler()
        view = view_of(relay_domain("first", domain="shop.example"))
        await render(r, mem, view)
        claims = mem.claims
        monkeypatch.setattr(reconciler, "render_relay", failing)
        with pytest.raises(RuntimeError):
            await render(r, mem, view)
        # The next pass renders again (nothing to reuse), from the same claims.
        assert mem.rendered is None and mem.claims is claims and claims
        monkeypatch.undo()
        again = await r._render(KEY, view.relays[KEY], mem, False, view)
        assert [(v.name, v.accepted) for v in again.domains] == [("first", True)]

    asyncio.run(scenario())
