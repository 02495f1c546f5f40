"""Next-hop lookup: the addresses to try for a RelayDomain's next hop.

As Postfix's smtp(8): `smtp:[host]` (mx_lookup off) is the host itself,
`smtp:host` its MX records by preference, or the host itself when it has
none (RFC 5321 5.1); a null MX (RFC 7505) refuses mail for good. Names not
in DNS fall back to the system's resolver (/etc/hosts, e.g. localhost).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket

from relay.config import NextHop
from relay.dns import DnsTempError, Resolver

# Where a domain's MX hosts listen (RFC 5321): the next hop of a DSN to a
# sender's domain.
SMTP_PORT = 25


class ConnectError(Exception):
    """No conversation with the next hop (lookup, connect, greeting or TLS failed)."""

    def __init__(self, reason: str, status: str = "4.4.1", permanent: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.permanent = permanent


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        return False


async def _host_addresses(resolver: Resolver, name: str) -> list[str]:
    answers: list[str] = []
    for rdtype in ("A", "AAAA"):
        try:
            answer = await resolver.query(name, rdtype)
        except DnsTempError:
            if answers:
                break
            raise
        answers += list(answer.records)
    if answers:
        return answers
    # Not in DNS: the system's resolver still knows /etc/hosts (e.g. localhost).
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(name, None, type=socket.SOCK_STREAM)
    except OSError:
        return []
    return list(dict.fromkeys(str(i[4][0]) for i in infos))


async def _mx_names(resolver: Resolver, host: str) -> list[str]:
    mx = await resolver.query(host, "MX")
    if not mx.exists:
        return [host]  # no MX: the host itself (RFC 5321 5.1)
    pairs = []
    for rec in mx.records:
        pref, _, exchange = rec.partition(" ")
        pairs.append((int(pref), exchange.rstrip(".")))
    if any(ex == "" for _, ex in pairs):  # null MX (RFC 7505)
        raise ConnectError(f"{host}: domain does not accept mail (null MX)", "5.1.10", True)
    return [ex for _, ex in sorted(pairs)]


async def next_hop_addresses(resolver: Resolver, hop: NextHop) -> list[tuple[str, str]]:
    """(host name, ip) to try, in order. Raises ConnectError when there are none."""
    host = hop.host.strip().rstrip(".")
    if _is_ip(host):
        return [(host.strip("[]"), host.strip("[]"))]
    try:
        names = await _mx_names(resolver, host) if hop.mx_lookup else [host]
        out: list[tuple[str, str]] = []
        for name in names:
            out += [(name, ip) for ip in await _host_addresses(resolver, name)]
    except DnsTempError as e:
        raise ConnectError(f"Host or domain name lookup failed for {host}: {e}", "4.4.3") from e
    if not out:
        raise ConnectError(f"Host or domain name not found: {host}", "4.4.4")
    return out
