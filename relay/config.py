"""The relay's runtime configuration, read from a rendered config folder.

The folder holds what mailrelay_api.render writes (relay.json,
domains.json, recipients-NNNN.txt.gz): in a pod, the projected ConfigMaps;
with `mailrelay run`, a folder the CLI renders into. Everything here is typed
and already defaulted by the schema; this module only converts.
"""

from __future__ import annotations

import gzip
import ipaddress
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mailrelay_api.render import DOMAINS_FILE, RELAY_FILE
from relay.recipient_table import RecipientLookup, RecipientTable

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION_PART = re.compile(r"([0-9]+)(ms|s|m|h|d|w)")


def parse_duration(text: str) -> float:
    """Postfix-style time ("10d", "4000s", "1h30m") in seconds."""
    text = str(text).strip()
    if text.isdigit():
        return float(text)  # Postfix: a bare number is seconds
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a duration: {text!r}")
    return sum(int(n) * _DURATION_UNITS[u] for n, u in parts)


def networks(cidrs: list[str]) -> list[IPNetwork]:
    return [ipaddress.ip_network(c, strict=False) for c in cidrs]


@dataclass(frozen=True)
class NextHop:
    host: str
    port: int = 25
    mx_lookup: bool = False
    tls: str = "may"  # none | may | encrypt | verify


@dataclass(frozen=True)
class Domain:
    name: str  # lowercased, no trailing dot
    next_hop: NextHop
    recipients: str  # listed | any
    source: str = ""  # namespace/name of the RelayDomain


@dataclass(frozen=True)
class ClientAccessEntry:
    network: IPNetwork
    action: str  # permit | reject


@dataclass(frozen=True)
class DnsblSite:
    zone: str
    return_codes: tuple[str, ...] = ()
    weight: int = 1


@dataclass(frozen=True)
class RblClient:
    zone: str
    return_codes: tuple[str, ...] = ()


@dataclass(frozen=True)
class SpfPolicy:
    enabled: bool = True
    helo_reject: str = "Fail"
    mail_from_reject: str = "Fail"
    perm_error_reject: bool = False
    temp_error_defer: bool = False
    skip_addresses: tuple[IPNetwork, ...] = ()


@dataclass(frozen=True)
class Restrictions:
    reject_unauth_pipelining: bool = True
    reject_non_fqdn_recipient: bool = True
    reject_unknown_recipient_domain: bool = True
    reject_unknown_reverse_client_hostname: bool = True
    rbl_clients: tuple[RblClient, ...] = ()
    spf: SpfPolicy = field(default_factory=SpfPolicy)


@dataclass(frozen=True)
class Postscreen:
    greet_action: str = "enforce"  # ignore | enforce | drop
    greet_wait: float = 6.0
    dnsbl_action: str = "enforce"
    denylist_action: str = "ignore"  # clientAccess reject: ignore | enforce | drop
    dnsbl_threshold: int = 1
    dnsbl_allowlist_threshold: int = 0
    dnsbl_sites: tuple[DnsblSite, ...] = ()


@dataclass(frozen=True)
class Limits:
    message_size: int = 25600000
    recipients_per_message: int = 1000
    connections_per_client: int = 50
    connection_rate_per_client: int = 0  # per rate_time_unit; 0 = off
    message_rate_per_client: int = 0
    recipient_rate_per_client: int = 0
    rate_time_unit: float = 60.0
    errors_per_session: int = 20  # smtpd_hard_error_limit


@dataclass(frozen=True)
class QueuePolicy:
    lifetime: float = 10 * 86400
    min_backoff: float = 300
    max_backoff: float = 4000
    dsn_on_expiry: str = "sender"  # sender | none


@dataclass(frozen=True)
class DnsPolicy:
    nameservers: tuple[str, ...] = ()
    timeout: float = 5.0


@dataclass(frozen=True)
class ProxyProtocol:
    enabled: bool = False
    trusted: tuple[IPNetwork, ...] = ()


@dataclass
class RelayConfig:
    """Everything the relay process needs, from one config folder."""

    name: str
    hostname: str
    domains: dict[str, Domain]
    # Lowercased addresses of `listed` domains: a RecipientTable when loaded
    # from a folder (compact hashes), any set-like in tests.
    recipients: RecipientLookup
    mynetworks: tuple[IPNetwork, ...] = ()
    client_access: tuple[ClientAccessEntry, ...] = ()
    limits: Limits = field(default_factory=Limits)
    queue: QueuePolicy = field(default_factory=QueuePolicy)
    postscreen: Postscreen = field(default_factory=Postscreen)
    restrictions: Restrictions = field(default_factory=Restrictions)
    reject_attachment_extensions: frozenset[str] = frozenset()
    dns: DnsPolicy = field(default_factory=DnsPolicy)
    proxy_protocol: ProxyProtocol = field(default_factory=ProxyProtocol)
    policy: dict[str, Any] = field(default_factory=dict)  # the raw MailRelay spec

    def domain_of(self, domain: str) -> Domain | None:
        return self.domains.get(domain.lower().rstrip("."))


def config_from_documents(
    relay_doc: dict[str, Any], domains_doc: dict[str, Any], recipients: RecipientLookup
) -> RelayConfig:
    p = relay_doc["policy"]
    ps = p.get("postscreen", {})
    greet = ps.get("greet", {})
    dnsbl = ps.get("dnsbl", {})
    r = p.get("restrictions", {})
    spf = r.get("spf", {})
    lim = p.get("limits", {})
    q = p.get("queue", {})
    net = p.get("network", {})
    dns = p.get("dns", {})
    proxy = p.get("proxyProtocol", {})
    domains = {
        d["domain"]: Domain(
            name=d["domain"],
            next_hop=NextHop(
                host=d["nextHop"]["host"],
                port=int(d["nextHop"].get("port", 25)),
                mx_lookup=bool(d["nextHop"].get("mxLookup", False)),
                tls=d["nextHop"].get("tls", "may"),
            ),
            recipients=d.get("recipients", "listed"),
            source=d.get("source", ""),
        )
        for d in domains_doc.get("domains", [])
    }
    return RelayConfig(
        name=relay_doc.get("name", ""),
        hostname=p["hostname"],
        domains=domains,
        recipients=recipients,
        mynetworks=tuple(networks(net.get("mynetworks", []))),
        client_access=tuple(
            ClientAccessEntry(ipaddress.ip_network(e["cidr"], strict=False), e["action"])
            for e in net.get("clientAccess", [])
        ),
        limits=Limits(
            message_size=int(lim.get("messageSize", 25600000)),
            recipients_per_message=int(lim.get("recipientsPerMessage", 1000)),
            connections_per_client=int(lim.get("connectionsPerClient", 50)),
            connection_rate_per_client=int(lim.get("connectionRatePerClient", 0)),
            message_rate_per_client=int(lim.get("messageRatePerClient", 0)),
            recipient_rate_per_client=int(lim.get("recipientRatePerClient", 0)),
            rate_time_unit=parse_duration(lim.get("rateTimeUnit", "60s")),
            errors_per_session=int(lim.get("errorsPerSession", 20)),
        ),
        queue=QueuePolicy(
            lifetime=parse_duration(q.get("lifetime", "10d")),
            min_backoff=parse_duration(q.get("minBackoff", "5m")),
            max_backoff=parse_duration(q.get("maxBackoff", "4000s")),
            dsn_on_expiry=q.get("dsnOnExpiry", "sender"),
        ),
        postscreen=Postscreen(
            greet_action=greet.get("action", "enforce"),
            greet_wait=parse_duration(greet.get("wait", "6s")),
            dnsbl_action=dnsbl.get("action", "enforce"),
            denylist_action=ps.get("denylist", {}).get("action", "ignore"),
            dnsbl_threshold=int(dnsbl.get("threshold", 1)),
            dnsbl_allowlist_threshold=int(dnsbl.get("allowlistThreshold", 0)),
            dnsbl_sites=tuple(
                DnsblSite(
                    s["zone"].lower(), tuple(s.get("returnCodes", [])), int(s.get("weight", 1))
                )
                for s in dnsbl.get("sites", [])
            ),
        ),
        restrictions=Restrictions(
            reject_unauth_pipelining=bool(r.get("rejectUnauthPipelining", True)),
            reject_non_fqdn_recipient=bool(r.get("rejectNonFqdnRecipient", True)),
            reject_unknown_recipient_domain=bool(r.get("rejectUnknownRecipientDomain", True)),
            reject_unknown_reverse_client_hostname=bool(
                r.get("rejectUnknownReverseClientHostname", True)
            ),
            rbl_clients=tuple(
                RblClient(c["zone"].lower(), tuple(c.get("returnCodes", [])))
                for c in r.get("rblClients", [])
            ),
            spf=SpfPolicy(
                enabled=bool(spf.get("enabled", True)),
                helo_reject=spf.get("heloReject", "Fail"),
                mail_from_reject=spf.get("mailFromReject", "Fail"),
                perm_error_reject=bool(spf.get("permErrorReject", False)),
                temp_error_defer=bool(spf.get("tempErrorDefer", False)),
                skip_addresses=tuple(
                    networks(
                        spf.get("skipAddresses", ["127.0.0.0/8", "::ffff:127.0.0.0/104", "::1"])
                    )
                ),
            ),
        ),
        reject_attachment_extensions=frozenset(
            e.lower() for e in p.get("contentFilters", {}).get("rejectAttachmentExtensions", [])
        ),
        dns=DnsPolicy(
            nameservers=tuple(dns.get("nameservers", [])),
            timeout=parse_duration(dns.get("timeout", "5s")),
        ),
        proxy_protocol=ProxyProtocol(
            enabled=bool(proxy.get("enabled", False)),
            trusted=tuple(networks(proxy.get("trustedCIDRs", []))),
        ),
        policy=p,
    )


def read_recipients(config_dir: Path, files: list[str]) -> RecipientTable:
    """The recipient shards as one compact table, read shard by shard."""
    return RecipientTable.from_shards(config_dir / name for name in files)


def read_domains_text(config_dir: Path) -> str:
    """domains.json, or domains.json.gz: the operator gzips a large one to fit
    its ConfigMap (1 MiB), e.g. 10,000 domains."""
    plain = config_dir / DOMAINS_FILE
    if plain.exists() or not (config_dir / (DOMAINS_FILE + ".gz")).exists():
        return plain.read_text()
    with gzip.open(config_dir / (DOMAINS_FILE + ".gz"), "rt") as f:
        return f.read()


def load_config(config_dir: str | Path) -> RelayConfig:
    """Reads a rendered config folder; raises ValueError with the file at fault."""
    d = Path(config_dir)
    try:
        relay_doc = json.loads((d / RELAY_FILE).read_text())
        domains_doc = json.loads(read_domains_text(d))
        recipients = read_recipients(d, domains_doc.get("recipientFiles", []))
        return config_from_documents(relay_doc, domains_doc, recipients)
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise ValueError(f"bad relay configuration in {d}: {e}") from e
