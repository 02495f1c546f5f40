"""Next hops: smtp:[host] vs MX lookup (against a real DNS server), TLS may/encrypt/verify."""

from __future__ import annotations

import logging
import ssl
from pathlib import Path
from typing import Any

import pytest
from mrtest.delivery_helpers import make_config, message, server_context
from mrtest.dnsserver import DnsServer

from relay.config import DnsPolicy, NextHop
from relay.delivery.transaction import DataEncoder, check_address
from relay.dns import Resolver


@pytest.fixture
def dns_server() -> Any:
    with DnsServer({}) as server:
        yield server


def resolver_for(server: DnsServer) -> Resolver:
    return Resolver(DnsPolicy(nameservers=(server.nameserver,), timeout=2.0))


async def test_mx_lookup_tries_mx_hosts_in_preference_order(
    sink_factory: Any, relay_factory: Any, dns_server: DnsServer, caplog: Any
) -> None:
    caplog.set_level(logging.INFO, logger="relay.delivery")
    sink = await sink_factory("127.0.0.6")
    dns_server.add("example.com", "MX", "20 mx2.hosts.test.")
    dns_server.add("example.com", "MX", "10 mx1.hosts.test.")
    dns_server.add("mx1.hosts.test", "A", "127.0.0.5")  # nobody listens there
    dns_server.add("mx2.hosts.test", "A", "127.0.0.6")
    relay = await relay_factory(
        make_config({"example.com": NextHop("example.com", sink.port, mx_lookup=True, tls="none")}),
        resolver=resolver_for(dns_server),
    )
    await relay.send(message(), "a@example.org", ["b@example.com"])
    await relay.delivery.idle()
    assert len(sink.messages) == 1
    assert f"relay=mx2.hosts.test[127.0.0.6]:{sink.port}" in caplog.text
    assert dns_server.count("mx1.hosts.test", "A") == 1


async def test_bracketed_host_is_not_an_mx_lookup(
    sink_factory: Any, relay_factory: Any, dns_server: DnsServer
) -> None:
    sink = await sink_factory("127.0.0.6")
    dns_server.add("relayhost.test", "MX", "10 elsewhere.test.")
    dns_server.add("relayhost.test", "A", "127.0.0.6")
    relay = await relay_factory(
        make_config({"example.com": NextHop("relayhost.test", sink.port, tls="none")}),
        resolver=resolver_for(dns_server),
    )
    await relay.send(message(), "a@example.org", ["b@example.com"])
    await relay.delivery.idle()
    assert len(sink.messages) == 1
    assert dns_server.count("relayhost.test", "MX") == 0


async def test_unknown_next_hop_name_defers(
    relay_factory: Any, dns_server: DnsServer, caplog: Any
) -> None:
    caplog.set_level(logging.INFO, logger="relay.delivery")
    relay = await relay_factory(
        make_config({"example.com": NextHop("nowhere.test", 25, tls="none")}),
        resolver=resolver_for(dns_server),
    )
    qid = await relay.send(message(), "a@example.org", ["b@example.com"])
    await relay.delivery.idle()
    assert [m.queue_id for m in relay.queue.messages()] == [qid]
    assert "Host or domain name not found: nowhere.test" in caplog.text


@pytest.mark.every_event_loop  # STARTTLS re-points the transport
async def test_tls_may_uses_starttls_when_offered(
    sink_factory: Any, relay_factory: Any, certificate: tuple[Path, Path]
) -> None:
    tls_sink = await sink_factory("127.0.0.7", tls_context=server_context(certificate))
    plain_sink = await sink_factory("127.0.0.8")
    relay = await relay_factory(
        make_config(
            {
                "example.com": NextHop("127.0.0.7", tls_sink.port, tls="may"),
                "example.net": NextHop("127.0.0.8", plain_sink.port, tls="may"),
            }
        )
    )
    await relay.send(message(), "a@example.org", ["b@example.com", "c@example.net"])
    await relay.delivery.idle()
    assert [m.tls for m in tls_sink.messages] == [True]
    assert [m.tls for m in plain_sink.messages] == [False]


async def test_tls_encrypt_defers_when_starttls_is_missing(
    sink_factory: Any, relay_factory: Any, caplog: Any
) -> None:
    caplog.set_level(logging.INFO, logger="relay.delivery")
    plain_sink = await sink_factory("127.0.0.8")
    relay = await relay_factory(
        make_config({"example.com": NextHop("127.0.0.8", plain_sink.port, tls="encrypt")})
    )
    await relay.send(message(), "a@example.org", ["b@example.com"])
    await relay.delivery.idle()
    assert plain_sink.messages == []
    assert "TLS is required, but was not offered by host 127.0.0.8[127.0.0.8]" in caplog.text


@pytest.mark.every_event_loop  # STARTTLS re-points the transport
async def test_tls_verify_checks_certificate_and_name(
    sink_factory: Any,
    relay_factory: Any,
    certificate: tuple[Path, Path],
    caplog: Any,
    tmp_path: Path,
) -> None:
    caplog.set_level(logging.INFO, logger="relay.delivery")
    sink = await sink_factory("127.0.0.7", tls_context=server_context(certificate))
    trusting = ssl.create_default_context(cafile=str(certificate[0]))
    config = make_config({"example.com": NextHop("127.0.0.7", sink.port, tls="verify")})
    good = await relay_factory(config, tmp_path / "q1", verify_context=trusting)
    await good.send(message(), "a@example.org", ["b@example.com"])
    await good.delivery.idle()
    assert [m.tls for m in sink.messages] == [True]

    untrusting = ssl.create_default_context()  # system CAs: our self-signed cert fails
    bad = await relay_factory(config, tmp_path / "q2", verify_context=untrusting)
    await bad.send(message(), "a@example.org", ["b@example.com"])
    await bad.delivery.idle()
    assert len(sink.messages) == 1
    assert "Cannot start TLS: handshake failure" in caplog.text
    assert len(list(bad.queue.messages())) == 1


def test_data_encoder_normalizes_across_chunk_boundaries() -> None:
    enc = DataEncoder()
    pieces = [b".first\r", b"\nsecond\n", b".third\r", b"", b"x\rlast"]
    out = b"".join(enc.feed(p) for p in pieces) + enc.end()
    assert out == b"..first\r\nsecond\r\n..third\r\nx\r\nlast\r\n.\r\n"
    assert DataEncoder().end() == b".\r\n"


@pytest.mark.parametrize(
    "address",
    [
        "a b@example.com",
        "a@example.com>",
        "<a@example.com",
        "a@example.com\r\nRSET",
        "a\x00@x.test",
    ],
)
def test_unsafe_envelope_addresses_are_refused(address: str) -> None:
    with pytest.raises(ValueError):
        check_address(address)


def test_quoted_local_part_may_hold_spaces() -> None:
    check_address('"john doe"@example.com')
    check_address("")
