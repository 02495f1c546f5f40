"""A next hop that is ourselves: Postfix's "mail for X loops back to myself"
(5.4.6). The mail bounces instead of going round; our own DSN caught in the
same loop is dropped with a log line, never relayed to ourselves for ever."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from mrtest.delivery_helpers import make_config, message
from mrtest.dnsserver import DnsServer
from mrtest.peers import swaks
from mrtest.relayproc import RelayProcess, free_port, next_loopback, write_manifests
from prometheus_client import REGISTRY

from relay.config import DnsPolicy, NextHop
from relay.dns import Resolver


def dropped_loops() -> float:
    labels = {"result": "dropped", "reason": "rejected"}
    return REGISTRY.get_sample_value("mailrelay_dsn_total", labels) or 0.0


async def test_a_next_hop_greeting_with_our_hostname_bounces_and_its_dsn_is_dropped(
    sink_factory: Any, relay_factory: Any, caplog: Any
) -> None:
    caplog.set_level(logging.INFO, logger="relay.delivery")
    # "Another pod of this relay": it answers EHLO with our hostname, relay.test.
    us = await sink_factory("127.0.0.2", hostname="relay.test")
    hop = NextHop("127.0.0.2", us.port, tls="none")
    relay = await relay_factory(make_config({"example.com": hop, "loop.test": hop}))
    before = dropped_loops()
    qid = await relay.send(message(), "someone@loop.test", ["info@example.com"])
    await relay.delivery.idle()
    assert us.transactions == 0 and list(relay.queue.messages()) == []
    loop = "mail for 127.0.0.2 loops back to myself"
    assert f"{qid}: to=<info@example.com>" in caplog.text
    assert f"dsn=5.4.6, status=bounced ({loop})" in caplog.text
    assert "replied to HELO/EHLO with my own hostname relay.test" in caplog.text
    # The DSN to someone@loop.test goes to the same next hop: dropped, not relayed.
    assert f"delivery status notification to <someone@loop.test> dropped: rejected: {loop}" in (
        caplog.text
    )
    assert dropped_loops() == before + 1


def test_a_relay_domain_whose_next_hop_is_the_relay_itself(tmp_path: Path) -> None:
    """The real thing: every domain's next hop is this very relay (a mistake a
    RelayDomain can make). One mail, one bounce, one dropped DSN, then quiet."""
    host = next_loopback()
    port = free_port(host)
    manifests = write_manifests(
        tmp_path / "m", next_hop=(host, port), domains={"example.com": "any"}
    )
    with RelayProcess(manifests, tmp_path / "relay", host=host, port=port, workers=1) as relay:
        sent = swaks(relay.address, to="info@example.com", sender="alice@example.com")
        assert sent.returncode == 0, sent.output
        relay.wait_for_log(r"to=<info@example\.com>.*dsn=5\.4\.6, status=bounced")
        relay.wait_for_log(
            r"delivery status notification to <alice@example\.com> dropped: rejected: "
            rf"mail for {host} loops back to myself"
        )
        assert relay.stop() == 0
        log = relay.log()
    # Two connections to ourselves (the mail, then the DSN), each ended at EHLO:
    # the relay never accepted anything from itself.
    assert log.count("replied to HELO/EHLO with my own hostname mx.relay.test") == 2
    assert len([ln for ln in log.splitlines() if "status=sent" in ln]) == 0


async def test_ourselves_at_a_lower_mx_preference_is_skipped_not_bounced(
    sink_factory: Any, relay_factory: Any, caplog: Any
) -> None:
    """As Postfix: only the best MX being ourselves bounces; a backup MX that is
    ourselves is one more address that did not work (the mail waits)."""
    caplog.set_level(logging.INFO, logger="relay.delivery")
    records = {
        "elsewhere.test": [("MX", "10 mx1.elsewhere.test."), ("MX", "20 mx2.elsewhere.test.")],
        "mx1.elsewhere.test": [("A", "127.0.0.7")],
        "mx2.elsewhere.test": [("A", "127.0.0.2")],
    }
    # mx2 is "us"; nobody listens on mx1 (127.0.0.7) at that port.
    us = await sink_factory("127.0.0.2", hostname="relay.test")
    with DnsServer(records) as dns_server:
        resolver = Resolver(DnsPolicy(nameservers=(dns_server.nameserver,), timeout=2.0))
        hop = NextHop("elsewhere.test", us.port, mx_lookup=True, tls="none")
        relay = await relay_factory(make_config({"elsewhere.test": hop}), resolver=resolver)
        await relay.send(message(), "", ["info@elsewhere.test"])
        await relay.delivery.idle()
    [waiting] = list(relay.queue.messages())  # deferred, not bounced
    assert waiting.recipients == ["info@elsewhere.test"] and us.transactions == 0
    assert "Connection refused; mail for elsewhere.test loops back to myself" in caplog.text
