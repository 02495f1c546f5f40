"""recipients: verify at the SMTP door of a relay process: the primary is
probed at RCPT (reject_unverified_recipient), the answer is cached and
shared by the sessions and worker processes."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from mrtest import postfix
from mrtest.delivery_helpers import Sink, free_port
from mrtest.peers import RawClient
from mrtest.relayproc import RelayProcess, next_loopback, write_manifests


def verify_relay(
    tmp_path: Path, primary: tuple[str, int], workers: int = 1, **verify: Any
) -> RelayProcess:
    manifests = write_manifests(
        tmp_path / "manifests",
        next_hop=primary,
        domains={"example.com": "verify"},
        domain_spec={"verify": verify} if verify else None,
    )
    return RelayProcess(manifests, tmp_path / "relay", workers=workers)


async def rcpt(relay: RelayProcess, address: str) -> str:
    async with RawClient(*relay.address, local=next_loopback(), timeout=30) as c:
        await c.greet()
        assert (await c.command("MAIL FROM:<someone@client.test>")).startswith("250")
        return await c.command(f"RCPT TO:<{address}>")


@pytest.mark.skipif(not postfix.available(), reason="needs root and Postfix")
async def test_postfix_primary_decides_who_exists(tmp_path: Path) -> None:
    settings = {
        "relay_domains": "example.com",
        "relay_recipient_maps": "inline:{ known@example.com=OK }",
        "transport_maps": "inline:{ example.com=discard: }",
    }
    with (
        postfix.PostfixServer("127.0.0.9", main_cf=settings) as primary,
        verify_relay(tmp_path, primary.address).start() as relay,
    ):
        assert (await rcpt(relay, "known@example.com")).startswith("250 2.1.5")
        assert await rcpt(relay, "unknown@example.com") == (
            "550 5.1.1 <unknown@example.com>: Recipient address rejected: undeliverable "
            "address: host 127.0.0.9[127.0.0.9] said: 550 5.1.1 <unknown@example.com>: "
            "Recipient address rejected: User unknown in relay recipient table "
            "(in reply to RCPT TO command)"
        )
        assert (await rcpt(relay, "Unknown@example.com")).startswith("550 5.1.1")
        maillog = primary.wait_for_log("NOQUEUE: reject: RCPT from")
    assert maillog.count("NOQUEUE: reject: RCPT from") == 1  # the second answer was cached


@pytest.mark.parametrize("when", ["defer", "accept"])
async def test_unreachable_primary_defers_or_accepts(tmp_path: Path, when: str) -> None:
    host = next_loopback()
    with verify_relay(tmp_path, (host, free_port(host)), whenUnreachable=when).start() as relay:
        reply = await rcpt(relay, "a@example.com")
    if when == "defer":
        assert reply.startswith(
            "450 4.1.1 <a@example.com>: Recipient address rejected: unverified address: connect to"
        )
        assert "Connection refused" in reply
    else:
        assert reply.startswith("250 2.1.5")


async def test_ten_sessions_on_two_workers_make_one_probe(tmp_path: Path) -> None:
    primary = await Sink(host=next_loopback()).start()
    primary.rcpt_delay = 1.0  # every session asks while the probe is under way
    try:
        with verify_relay(tmp_path, (primary.host, primary.port), workers=2).start() as relay:
            relay.wait_for_log("ready: listening on", count=2)
            replies = await asyncio.gather(*(rcpt(relay, "one@example.com") for _ in range(10)))
            assert all(r.startswith("250 2.1.5") for r in replies), replies
            assert (await rcpt(relay, "one@example.com")).startswith("250 2.1.5")
    finally:
        await primary.stop()
    assert primary.rcpts_asked == ["one@example.com"]
    assert primary.transactions == 0  # probes never reach DATA
