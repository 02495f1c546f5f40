"""HAProxy PROXY protocol v1 and v2 on the proxy listener (`--proxy-listen`).

A load balancer that keeps no client IP of its own (a cloud LB in TCP mode)
prepends one header to the connection saying who the real client is. The
header is believed only from peers in spec.proxyProtocol.trustedCIDRs:
Postfix has no such list and must be fenced off with a NetworkPolicy; here a
peer outside the list is refused before a single byte of it is read, so a
client that reaches the proxy port directly can never choose its own IP.

What the relay does with a header (see `accept_proxy`):
- the real client's address becomes Session.client_ip (and client_port):
  mynetworks, clientAccess, postscreen, DNSBL, SPF, anvil and the logs all
  use it; Session.peer_ip stays the load balancer;
- v1 `PROXY UNKNOWN` and v2 `LOCAL` (the LB's own health checks) keep the
  socket's addresses;
- anything malformed, too slow (5 s, Postfix smtpd_upstream_proxy_timeout)
  or from an untrusted peer: the connection is closed, with a log line.

The plain listener never looks for a header: probes and in-cluster clients
keep talking SMTP to it directly.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import struct
from dataclasses import dataclass
from typing import Protocol

from relay.config import IPNetwork, ProxyProtocol
from relay.dns import unmapped
from relay.smtpd.session import Session

log = logging.getLogger("mailrelay.proxy")

HEADER_TIMEOUT = 5.0  # Postfix smtpd_upstream_proxy_timeout
V1_MAX_LENGTH = 107  # the spec's worst case, CRLF included
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_MAX_PAYLOAD = 4096  # addresses + TLVs; real LBs send well under 600 bytes
_V2_FAMILIES = {0x11: 4, 0x21: 6}  # TCP over IPv4 / IPv6 (UDP and unix: refused)


class ProxyError(ValueError):
    """A PROXY header we will not accept."""


@dataclass(frozen=True)
class ProxyInfo:
    """What a header said. `client_ip` is None for v1 UNKNOWN and v2 LOCAL:
    the connection is the LB's own, keep the socket's addresses."""

    version: int
    client_ip: str | None = None
    client_port: int = 0
    server_ip: str | None = None
    server_port: int = 0


def _address(text: str, version: int) -> str:
    if "%" in text:  # an IPv6 scope id is free text: it would reach headers and logs
        raise ProxyError(f"bad address {text!r}")
    try:
        ip = ipaddress.ip_address(text)
    except ValueError as e:
        raise ProxyError(f"bad address {text!r}") from e
    if ip.version != version:
        raise ProxyError(f"address {text!r} is not IPv{version}")
    return canonical_ip(ip)


def canonical_ip(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """IPv4-mapped IPv6 (::ffff:a.b.c.d) as plain IPv4, as Postfix logs it."""
    return str(unmapped(ip))


def _port(text: str) -> int:
    # The spec: decimal, no leading zeros, 0..65535.
    if not text.isdigit() or not text.isascii() or (len(text) > 1 and text[0] == "0"):
        raise ProxyError(f"bad port {text!r}")
    port = int(text)
    if port > 65535:
        raise ProxyError(f"bad port {text!r}")
    return port


def parse_v1(line: bytes) -> ProxyInfo:
    """`PROXY TCP4|TCP6|UNKNOWN src dst sport dport\\r\\n` (the whole line)."""
    if len(line) > V1_MAX_LENGTH or not line.endswith(b"\r\n"):
        raise ProxyError("v1 header too long or not ended by CRLF")
    try:
        text = line[:-2].decode("ascii")
    except UnicodeDecodeError as e:
        raise ProxyError("v1 header is not ASCII") from e
    parts = text.split(" ")
    if parts[0] != "PROXY" or len(parts) < 2:
        raise ProxyError("not a v1 header")
    if parts[1] == "UNKNOWN":
        return ProxyInfo(1)  # the rest of the line is to be ignored
    if parts[1] not in ("TCP4", "TCP6") or len(parts) != 6:
        raise ProxyError(f"bad v1 header {text[:V1_MAX_LENGTH]!r}")
    version = 4 if parts[1] == "TCP4" else 6
    return ProxyInfo(
        1,
        client_ip=_address(parts[2], version),
        client_port=_port(parts[4]),
        server_ip=_address(parts[3], version),
        server_port=_port(parts[5]),
    )


def parse_v2(header: bytes, payload: bytes) -> ProxyInfo:
    """The 16-byte v2 header (signature included) and its payload."""
    if len(header) != 16 or header[:12] != V2_SIGNATURE:
        raise ProxyError("not a v2 header")
    ver_cmd, family, length = header[12], header[13], struct.unpack("!H", header[14:16])[0]
    if ver_cmd >> 4 != 2:
        raise ProxyError(f"bad v2 version {ver_cmd >> 4}")
    if length != len(payload):
        raise ProxyError("v2 payload length mismatch")
    command = ver_cmd & 0x0F
    if command == 0x0:  # LOCAL: the proxy's own connection (health check)
        return ProxyInfo(2)
    if command != 0x1:
        raise ProxyError(f"bad v2 command {command}")
    version = _V2_FAMILIES.get(family)
    if version is None:
        raise ProxyError(f"v2 address family 0x{family:02x} not supported")
    size = 4 if version == 4 else 16
    if len(payload) < 2 * size + 4:
        raise ProxyError("v2 payload too short for its addresses")
    src = ipaddress.ip_address(payload[:size])
    dst = ipaddress.ip_address(payload[size : 2 * size])
    sport, dport = struct.unpack("!HH", payload[2 * size : 2 * size + 4])
    # TLVs after the addresses (ALPN, authority, SSL, ...) carry nothing we use.
    return ProxyInfo(
        2,
        client_ip=canonical_ip(src),
        client_port=sport,
        server_ip=canonical_ip(dst),
        server_port=dport,
    )


class HeaderSource(Protocol):
    """Where the header is read from: asyncio.StreamReader's contract (the
    session's StreamProtocol keeps it)."""

    async def readexactly(self, n: int) -> bytes: ...

    async def readuntil(self, separator: bytes = b"\n") -> bytes: ...


async def read_header(reader: HeaderSource) -> ProxyInfo:
    """Reads exactly one v1 or v2 header off the stream (nothing after it)."""
    start = await reader.readexactly(12)
    if start == V2_SIGNATURE:
        rest = await reader.readexactly(4)
        length = struct.unpack("!H", rest[2:4])[0]
        if length > V2_MAX_PAYLOAD:
            raise ProxyError(f"v2 payload of {length} bytes")
        payload = await reader.readexactly(length)
        return parse_v2(start + rest, payload)
    if not start.startswith(b"PROXY "):
        raise ProxyError("no PROXY header")
    try:
        line = start + await reader.readuntil(b"\n")
    except asyncio.LimitOverrunError as e:
        raise ProxyError("v1 header too long") from e
    return parse_v1(line)


def is_trusted(peer_ip: str, trusted: tuple[IPNetwork, ...]) -> bool:
    try:
        ip = unmapped(ipaddress.ip_address(peer_ip))
    except ValueError:
        return False
    return any(ip.version == n.version and ip in n for n in trusted)


async def accept_proxy(
    session: Session,
    reader: HeaderSource,
    policy: ProxyProtocol,
    timeout: float | None = None,
) -> bool:
    """Reads the header of a proxy-listener connection and moves the real
    client's address into `session`. False: refuse (close) the connection."""
    timeout = HEADER_TIMEOUT if timeout is None else timeout
    peer = session.peer_ip
    where = f"[{peer}]:{session.client_port}"
    if not policy.enabled:
        log.warning("PROXY refused from %s: proxyProtocol is not enabled", where)
        return False
    if not is_trusted(peer, policy.trusted):
        log.warning("PROXY refused from %s: not in proxyProtocol.trustedCIDRs", where)
        return False
    try:
        info = await asyncio.wait_for(read_header(reader), timeout)
    except TimeoutError:
        log.warning("PROXY refused from %s: no header after %gs", where, timeout)
        return False
    except (asyncio.IncompleteReadError, ConnectionError):
        log.info("PROXY: %s hung up before its header", where)
        return False
    except ProxyError as e:
        log.warning("PROXY refused from %s: %s", where, e)
        return False
    if info.client_ip is not None:
        session.client_ip = info.client_ip
        session.client_port = info.client_port
        if info.server_ip is not None:
            session.local_ip = info.server_ip
            session.local_port = info.server_port
    return True
