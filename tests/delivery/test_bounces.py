"""DSNs reach the sender: by MX to the sender's domain (spec.bounces), with
their own lifetime, never for the null sender, never a bounce of a bounce."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mrtest.delivery_helpers import FakeClock, free_port, make_config, message, server_context
from mrtest.dnsserver import DnsServer
from prometheus_client import REGISTRY

from relay.config import BouncePolicy, DnsPolicy, NextHop, RelayConfig
from relay.dns import Resolver

SENDER = "someone@elsewhere.test"
GONE = "gone@example.com"


@pytest.fixture
def dns_server() -> Iterator[DnsServer]:
    # The sender's domain: its MX points at a sink on 127.0.0.7.
    records = {
        "elsewhere.test": [("MX", "10 mx.elsewhere.test.")],
        "mx.elsewhere.test": [("A", "127.0.0.7")],
    }
    with DnsServer(records) as server:
        yield server


def dsn_count(result: str, reason: str) -> float:
    value = REGISTRY.get_sample_value("mailrelay_dsn_total", {"result": result, "reason": reason})
    return value or 0.0


def config_with(port: int, **bounces: Any) -> RelayConfig:
    config = make_config({"example.com": NextHop("127.0.0.2", port, tls="none")})
    return dataclasses.replace(config, bounces=BouncePolicy(**bounces))


async def bouncing_relay(
    sink_factory: Any, relay_factory: Any, dns_server: DnsServer, mx_port: int, **bounces: Any
) -> Any:
    """A relay whose next hop refuses GONE; senders' MX hosts listen on `mx_port`."""
    dest = await sink_factory("127.0.0.2", rcpt_replies={GONE: "550 5.1.1 <gone>: User unknown"})
    resolver = Resolver(DnsPolicy(nameservers=(dns_server.nameserver,), timeout=2.0))
    return await relay_factory(
        config_with(dest.port, **bounces), resolver=resolver, smtp_port=mx_port
    )


async def test_dsn_goes_to_the_sender_domain_by_mx_with_tls(
    sink_factory: Any,
    relay_factory: Any,
    dns_server: DnsServer,
    certificate: tuple[Path, Path],
    caplog: Any,
) -> None:
    caplog.set_level(logging.INFO, logger="relay.delivery")
    mx = await sink_factory("127.0.0.7", tls_context=server_context(certificate))
    relay = await bouncing_relay(sink_factory, relay_factory, dns_server, mx.port)
    sent = dsn_count("sent", "mx")
    qid = await relay.send(message(subject="the original"), SENDER, [GONE])
    await relay.delivery.idle()
    [got] = mx.messages
    assert got.sender in ("", "<>") and got.recipients == [SENDER]
    assert got.tls  # opportunistic TLS, as offered
    assert b"Subject: Undelivered Mail Returned to Sender" in got.data
    assert b"Subject: the original" in got.data and qid.encode() in got.data
    assert (
        f"delivery status notification to <{SENDER}> sent (relay=mx.elsewhere.test" in caplog.text
    )
    assert dsn_count("sent", "mx") == sent + 1
    assert list(relay.queue.messages()) == []


async def test_sender_mx_down_dsn_retries_then_expires_after_bounce_lifetime(
    sink_factory: Any, relay_factory: Any, dns_server: DnsServer, clock: FakeClock, caplog: Any
) -> None:
    caplog.set_level(logging.INFO, logger="relay.delivery")
    down = free_port("127.0.0.7")  # nobody listens on the sender's MX
    relay = await bouncing_relay(sink_factory, relay_factory, dns_server, down, lifetime=3600)
    dropped = dsn_count("dropped", "expired")
    await relay.send(message(), SENDER, [GONE])
    await relay.delivery.idle()
    [dsn_msg] = list(relay.queue.messages())
    assert dsn_msg.sender == "" and dsn_msg.recipients == [SENDER]
    attempts = 1
    while list(relay.queue.messages()):
        [m] = list(relay.queue.messages())
        assert m.queue_id == dsn_msg.queue_id  # no bounce of the bounce is ever queued
        clock.now = m.next_attempt
        await relay.delivery.process_due()
        attempts += 1
        assert attempts < 50
    assert attempts > 2  # retried on its own schedule: 300, 300, 600, 1200, ... < 1h
    assert f"{dsn_msg.queue_id}: to=<{SENDER}>" in caplog.text
    assert "Connection refused" in caplog.text
    assert f"delivery status notification to <{SENDER}> dropped: expired:" in caplog.text
    assert dsn_count("dropped", "expired") == dropped + 1


async def test_dsn_refused_by_the_sender_mx_is_dropped_not_bounced(
    sink_factory: Any, relay_factory: Any, dns_server: DnsServer, caplog: Any
) -> None:
    caplog.set_level(logging.INFO, logger="relay.delivery")
    mx = await sink_factory("127.0.0.7", rcpt_replies={SENDER: "550 5.1.1 no such user"})
    relay = await bouncing_relay(sink_factory, relay_factory, dns_server, mx.port)
    dropped = dsn_count("dropped", "rejected")
    await relay.send(message(), SENDER, [GONE])
    await relay.delivery.idle()
    assert mx.messages == [] and list(relay.queue.messages()) == []
    assert f"<{SENDER}> dropped: rejected: 550 5.1.1 no such user" in caplog.text
    assert dsn_count("dropped", "rejected") == dropped + 1


async def test_null_sender_gets_no_dsn(
    sink_factory: Any, relay_factory: Any, dns_server: DnsServer, caplog: Any
) -> None:
    caplog.set_level(logging.INFO, logger="relay.delivery")
    mx = await sink_factory("127.0.0.7")
    relay = await bouncing_relay(sink_factory, relay_factory, dns_server, mx.port)
    dropped = dsn_count("dropped", "null_sender")
    await relay.send(message(), "", [GONE])
    await relay.delivery.idle()
    assert mx.connections == 0 and list(relay.queue.messages()) == []
    assert "dropped: the sender is null (a bounce is never bounced)" in caplog.text
    assert dsn_count("dropped", "null_sender") == dropped + 1


@pytest.mark.parametrize(
    ("delivery", "reason"), [("relayDomainsOnly", "not_relay_domain"), ("none", "disabled")]
)
async def test_bounces_delivery_relay_domains_only_and_none(
    sink_factory: Any,
    relay_factory: Any,
    dns_server: DnsServer,
    caplog: Any,
    delivery: str,
    reason: str,
) -> None:
    caplog.set_level(logging.INFO, logger="relay.delivery")
    mx = await sink_factory("127.0.0.7")
    relay = await bouncing_relay(
        sink_factory, relay_factory, dns_server, mx.port, delivery=delivery
    )
    dropped = dsn_count("dropped", reason)
    await relay.send(message(), SENDER, [GONE])
    await relay.delivery.idle()
    assert mx.connections == 0 and list(relay.queue.messages()) == []
    assert f"non-delivery notification to <{SENDER}> dropped:" in caplog.text
    assert dsn_count("dropped", reason) == dropped + 1
