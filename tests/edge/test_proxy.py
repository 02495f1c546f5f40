"""PROXY protocol v1/v2: parsing, the trusted-CIDR rule, and the client IP
every check uses (mynetworks, clientAccess, anvil, Received)."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mrtest.edgeserver import edge_config
from mrtest.peers import RawClient, swaks
from mrtest.relayproc import RelayProcess, free_port, next_loopback, render_config, write_manifests

from relay.smtpd import proxy
from relay.smtpd.proxy import V2_SIGNATURE, ProxyError, ProxyInfo, parse_v1, read_header


def v1(src: str, dst: str, sport: int, dport: int) -> bytes:
    family = "TCP6" if ":" in src else "TCP4"
    return f"PROXY {family} {src} {dst} {sport} {dport}\r\n".encode()


def v2(src: str, dst: str, sport: int, dport: int, *, tlvs: bytes = b"") -> bytes:
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    family = 0x11 if s.version == 4 else 0x21
    payload = s.packed + d.packed + struct.pack("!HH", sport, dport) + tlvs
    return V2_SIGNATURE + bytes([0x21, family]) + struct.pack("!H", len(payload)) + payload


def v2_local() -> bytes:
    return V2_SIGNATURE + bytes([0x20, 0x00]) + struct.pack("!H", 0)


async def parse_stream(data: bytes) -> tuple[ProxyInfo, bytes]:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    info = await read_header(reader)
    return info, await reader.read()


# -- parsing --------------------------------------------------------------------


def test_v1_tcp4_tcp6_unknown() -> None:
    assert parse_v1(b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 25\r\n") == ProxyInfo(
        1, "192.0.2.7", 40000, "198.51.100.1", 25
    )
    assert parse_v1(b"PROXY TCP6 2001:db8::7 2001:db8::1 1 25\r\n").client_ip == "2001:db8::7"
    # IPv4-mapped: logged and matched as IPv4, as Postfix does.
    assert parse_v1(b"PROXY TCP6 ::ffff:192.0.2.9 ::1 1 25\r\n").client_ip == "192.0.2.9"
    assert parse_v1(b"PROXY UNKNOWN whatever follows\r\n") == ProxyInfo(1)


@pytest.mark.parametrize(
    "line",
    [
        b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 25\n",  # bare LF
        b"PROXY TCP4 192.0.2.7 198.51.100.1 040000 25\r\n",  # leading zero
        b"PROXY TCP4 192.0.2.7 198.51.100.1 70000 25\r\n",  # port range
        b"PROXY TCP4 2001:db8::1 198.51.100.1 1 25\r\n",  # family mismatch
        b"PROXY TCP4 192.0.2.7  198.51.100.1 1 25\r\n",  # double space
        b"PROXY UDP4 192.0.2.7 198.51.100.1 1 25\r\n",
        b"PROXY TCP4 192.0.2.7 198.51.100.1 1\r\n",
        b"PROXY TCP4 192.0.2.256 198.51.100.1 1 25\r\n",
        b"PROXY TCP4 192.0.2.7 198.51.100.1 1 25 extra\r\n",
        b"PROXY TCP4 " + b"1" * 100 + b"\r\n",  # longer than 107
        b"proxy TCP4 192.0.2.7 198.51.100.1 1 25\r\n",
    ],
)
def test_v1_refused(line: bytes) -> None:
    with pytest.raises(ProxyError):
        parse_v1(line)


async def test_v2_addresses_tlvs_and_local() -> None:
    tlv = b"\x02\x00\x0bmx.test.net"  # PP2_TYPE_AUTHORITY: ignored
    info, rest = await parse_stream(v2("192.0.2.7", "198.51.100.1", 40000, 25, tlvs=tlv) + b"EHLO")
    assert info == ProxyInfo(2, "192.0.2.7", 40000, "198.51.100.1", 25)
    assert rest == b"EHLO"  # nothing after the header is eaten
    info, _ = await parse_stream(v2("2001:db8::7", "2001:db8::1", 1, 25))
    assert info.client_ip == "2001:db8::7"
    info, _ = await parse_stream(v2_local())
    assert info == ProxyInfo(2)


@pytest.mark.parametrize(
    "header",
    [
        V2_SIGNATURE + bytes([0x11, 0x11]) + b"\x00\x0c" + bytes(12),  # version 1
        V2_SIGNATURE + bytes([0x22, 0x11]) + b"\x00\x0c" + bytes(12),  # command 2
        V2_SIGNATURE + bytes([0x21, 0x12]) + b"\x00\x0c" + bytes(12),  # UDP
        V2_SIGNATURE + bytes([0x21, 0x31]) + b"\x00\x0c" + bytes(12),  # unix
        V2_SIGNATURE + bytes([0x21, 0x11]) + b"\x00\x08" + bytes(8),  # too short
        V2_SIGNATURE + bytes([0x21, 0x21]) + b"\x00\x0c" + bytes(12),  # v6 too short
        V2_SIGNATURE + bytes([0x21, 0x11]) + b"\xff\xff",  # huge payload
    ],
)
async def test_v2_refused(header: bytes) -> None:
    with pytest.raises((ProxyError, asyncio.IncompleteReadError)):
        await parse_stream(header + bytes(64))


async def test_not_a_header() -> None:
    for data in (b"EHLO client.test\r\n", b"GET / HTTP/1.1\r\n\r\n", b"PROXY"):
        with pytest.raises((ProxyError, asyncio.IncompleteReadError)):
            await parse_stream(data)


ips4 = st.ip_addresses(v=4).map(str)
ips6 = st.ip_addresses(v=6).map(str)
ports = st.integers(0, 65535)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.tuples(ips4, ips4), st.tuples(ips6, ips6)), ports, ports, st.booleans())
def test_round_trip_property(pair: tuple[str, str], sport: int, dport: int, use_v2: bool) -> None:
    src, dst = pair
    header = v2(src, dst, sport, dport) if use_v2 else v1(src, dst, sport, dport)
    info, rest = asyncio.run(parse_stream(header + b"QUIT\r\n"))
    expected_src = proxy.canonical_ip(ipaddress.ip_address(src))
    assert (info.client_ip, info.client_port, info.server_port) == (expected_src, sport, dport)
    assert rest == b"QUIT\r\n"


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        st.binary(max_size=300),
        st.binary(max_size=200).map(lambda b: b"PROXY " + b),
        st.binary(max_size=200).map(lambda b: V2_SIGNATURE + b),
    )
)
def test_fuzz_read_header(data: bytes) -> None:
    """Any bytes: a clean refusal or a header whose addresses are real IPs."""
    try:
        info, _ = asyncio.run(parse_stream(data))
    except (ProxyError, asyncio.IncompleteReadError):
        return
    if info.client_ip is not None:
        ipaddress.ip_address(info.client_ip)
        assert 0 <= info.client_port <= 65535


# -- the proxy listener ---------------------------------------------------------------


def proxy_spec(lb: str, **extra: object) -> dict[str, object]:
    spec: dict[str, object] = {"proxyProtocol": {"enabled": True, "trustedCIDRs": [f"{lb}/32"]}}
    spec.update(extra)
    return spec


async def session_via(
    edge_address: tuple[str, int], lb: str, header: bytes, rcpt: str = "info@example.com"
) -> list[str]:
    async with RawClient(*edge_address, local=lb, timeout=10) as c:
        await c.send(header)
        replies = [await c.greet(), await c.command("MAIL FROM:<a@client.test>")]
        replies.append(await c.command(f"RCPT TO:<{rcpt}>"))
        await c.command("QUIT")
        return replies


async def test_client_ip_from_trusted_lb_is_used_by_every_check(
    edge_server, tmp_path: Path
) -> None:
    lb = next_loopback()
    config = edge_config(
        tmp_path,
        spec=proxy_spec(
            lb,
            network={
                "mynetworks": ["10.9.0.0/16"],
                "clientAccess": [{"cidr": "192.0.2.0/24", "action": "reject"}],
            },
        ),
    )
    edge = await edge_server(config, proxy=True)
    # clientAccess sees the client, not the LB.
    replies = await session_via(edge.proxy_address, lb, v1("192.0.2.7", edge.host, 4000, 25))
    assert replies[2].startswith("554 5.7.1 <192.0.2.7>: Client host rejected"), replies
    replies = await session_via(edge.proxy_address, lb, v2("192.0.2.8", edge.host, 4000, 25))
    assert replies[2].startswith("554 5.7.1 <192.0.2.8>"), replies
    # A mynetworks client behind the LB is trusted; the same LB with an
    # outside client is not (an outside client never looks internal).
    sessions = list(edge.ctx.sessions)
    async with RawClient(*edge.proxy_address, local=lb, timeout=10) as c:
        await c.send(v1("10.9.1.1", edge.host, 4000, 25))
        await c.greet()
        sessions = [s for s in edge.ctx.sessions if s not in sessions]
        assert [(s.state.client_ip, s.state.peer_ip, s.state.trusted) for s in sessions] == [
            ("10.9.1.1", lb, True)
        ]
    # The Received header names the real client.
    async with RawClient(*edge.proxy_address, local=lb, timeout=10) as c:
        await c.send(v1("203.0.113.9", edge.host, 4000, 25))
        await c.greet()
        assert (await c.command("MAIL FROM:<a@client.test>")).startswith("250")
        assert (await c.command("RCPT TO:<x@example.org>")).startswith("250")
        assert (await c.command("DATA")).startswith("354")
        assert (await c.command("Subject: t\r\n\r\nhi\r\n.")).startswith("250")
    (data,) = edge.queued()
    assert b"[203.0.113.9]" in data.split(b"\r\n\r\n")[0]


async def test_untrusted_peer_is_refused_and_never_sets_the_ip(
    edge_server, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    lb, intruder = next_loopback(), next_loopback()
    # The intruder's header would claim a mynetworks address.
    config = edge_config(tmp_path, spec=proxy_spec(lb, network={"mynetworks": ["10.0.0.0/8"]}))
    edge = await edge_server(config, proxy=True)
    caplog.set_level(logging.INFO, "mailrelay.proxy")
    async with RawClient(*edge.proxy_address, local=intruder, timeout=10) as c:
        await c.send(v1("10.1.1.1", edge.host, 4000, 25) + b"EHLO x\r\n")
        assert await c.read_reply() == ""  # closed, no banner
    assert f"PROXY refused from [{intruder}]" in caplog.text
    assert "not in proxyProtocol.trustedCIDRs" in caplog.text


async def test_bad_or_missing_header_from_trusted_lb_is_refused(
    edge_server, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    lb = next_loopback()
    edge = await edge_server(edge_config(tmp_path, spec=proxy_spec(lb)), proxy=True)
    caplog.set_level(logging.INFO, "mailrelay.proxy")
    # A client speaking SMTP straight away (no header).
    async with RawClient(*edge.proxy_address, local=lb, timeout=10) as c:
        await c.send(b"EHLO client.test\r\n")
        assert await c.read_reply() == ""
    assert "no PROXY header" in caplog.text
    # Silence: the header timeout (5 s in production; short here).
    monkeypatch.setattr(proxy, "HEADER_TIMEOUT", 0.2)
    async with RawClient(*edge.proxy_address, local=lb, timeout=10) as c:
        assert await c.read_reply() == ""
    assert "no header after 0.2s" in caplog.text


async def test_lb_health_check_and_plain_listener(edge_server, tmp_path: Path) -> None:
    lb = next_loopback()
    edge = await edge_server(edge_config(tmp_path, spec=proxy_spec(lb)), proxy=True)
    # v2 LOCAL (the LB's own check): the socket's address stays.
    async with RawClient(*edge.proxy_address, local=lb, timeout=10) as c:
        await c.send(v2_local())
        assert (await c.greet()).startswith("250")
        assert [s.state.client_ip for s in edge.ctx.sessions] == [lb]
    # The plain listener never parses a header: it is just a bad command.
    async with RawClient(*edge.address, local=lb, timeout=10) as c:
        assert (await c.read_reply()).startswith("220")
        reply = await c.command("PROXY TCP4 10.1.1.1 127.0.0.1 1 25")
        assert reply.startswith("502"), reply
        assert {s.state.client_ip for s in edge.ctx.sessions} == {lb}


async def test_disabled_proxy_protocol_refuses_everyone(edge_server, tmp_path: Path) -> None:
    lb = next_loopback()
    spec = {"proxyProtocol": {"enabled": False, "trustedCIDRs": [f"{lb}/32"]}}
    edge = await edge_server(edge_config(tmp_path, spec=spec), proxy=True)
    async with RawClient(*edge.proxy_address, local=lb, timeout=10) as c:
        await c.send(v1("192.0.2.1", edge.host, 1, 25))
        assert await c.read_reply() == ""


async def test_anvil_counts_the_real_client_behind_the_lb(edge_server, tmp_path: Path) -> None:
    lb = next_loopback()
    edge = await edge_server(
        edge_config(tmp_path, spec=proxy_spec(lb, limits={"connectionsPerClient": 1})), proxy=True
    )
    async with RawClient(*edge.proxy_address, local=lb, timeout=10) as first:
        await first.send(v1("198.51.100.1", edge.host, 1, 25))
        assert (await first.read_reply()).startswith("220")
        # Another client through the same LB: served.
        async with RawClient(*edge.proxy_address, local=lb, timeout=10) as other:
            await other.send(v1("198.51.100.2", edge.host, 1, 25))
            assert (await other.read_reply()).startswith("220")
        # The same client again: over its limit.
        async with RawClient(*edge.proxy_address, local=lb, timeout=10) as again:
            await again.send(v1("198.51.100.1", edge.host, 2, 25))
            assert await again.read_reply() == (
                "421 4.7.0 mx.relay.test Error: too many connections from 198.51.100.1"
            )


# -- the real process, with swaks as the load balancer ---------------------------------


@pytest.mark.parametrize("version", ["1", "2"])
def test_relay_process_proxy_listen_with_swaks(tmp_path: Path, version: str) -> None:
    lb = next_loopback()
    manifests = write_manifests(
        tmp_path / "m",
        next_hop=("127.0.0.1", 9),
        domains={"example.org": "any"},
        spec={
            **proxy_spec(lb),
            "network": {"clientAccess": [{"cidr": "192.0.2.0/24", "action": "reject"}]},
        },
    )
    config_dir = render_config(manifests, tmp_path / "config")
    host = next_loopback()
    proxy_port = free_port(host)
    relay = RelayProcess(
        None,
        tmp_path,
        host=host,
        command="relay",
        config_dir=config_dir,
        workers=1,
        args=["--proxy-listen", f"{host}:{proxy_port}"],
    )
    with relay:
        relay.wait_for_log("PROXY protocol listener")
        common = [
            "--proxy-version",
            version,
            "--proxy-family",
            "TCP4" if version == "1" else "AF_INET",
            "--proxy-dest",
            host,
            "--proxy-source-port",
            "40000",
            "--proxy-dest-port",
            "25",
        ]
        refused = swaks(
            (host, proxy_port),
            to="x@example.org",
            local=lb,
            extra=[*common, "--proxy-source", "192.0.2.55"],
        )
        assert "554 5.7.1 <192.0.2.55>: Client host rejected" in refused.output
        accepted = swaks(
            (host, proxy_port),
            to="x@example.org",
            local=lb,
            extra=[*common, "--proxy-source", "203.0.113.77"],
        )
        assert accepted.returncode == 0, accepted.output
        relay.wait_for_log(r"client=unknown\[203\.0\.113\.77\]")
        # The plain port still serves in-cluster clients without a header.
        plain = swaks(relay.address, to="x@example.org", local=next_loopback())
        assert plain.returncode == 0, plain.output
