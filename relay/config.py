"""The relay's runtime configuration, read from a rendered config folder.

The folder holds what mailrelay_api.render writes (relay.json,
domains.json, recipients-NNNN-of-NNNN.txt.gz): in a pod, the projected ConfigMaps;
with `mailrelay run`, a folder the CLI renders into. relay.json's policy is
read as a mailrelay_api.spec.MailRelaySpec (the schema owns every default);
this module only converts it to what the relay's stages use: seconds for
durations, ip_network for CIDRs, lowercased zones.
"""

from __future__ import annotations

import gzip
import ipaddress
import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mailrelay_api.render import DOMAINS_FILE, DOMAINS_INDEX_FILE, RELAY_FILE
from mailrelay_api.schema import (
    BounceDelivery,
    ClientAction,
    DmarcEnforce,
    DsnOnExpiry,
    MilterDefaultAction,
    RecipientsMode,
    ScreenAction,
    SpfMailFromReject,
    SpfReject,
    TlsMode,
    WhenUnreachable,
)
from mailrelay_api.shards import shard_set_problem
from mailrelay_api.spec import (
    AuthenticationSpec,
    BouncesSpec,
    DnsSpec,
    GreylistSpec,
    LimitsSpec,
    LoggingSpec,
    MailRelaySpec,
    MilterSpec,
    NextHopSpec,
    PostscreenSpec,
    ProxyProtocolSpec,
    QueueSpec,
    RestrictionsSpec,
    SpfSpec,
    VerifySpec,
)
from mailrelay_api.units import parse_duration
from relay.recipient_table import RecipientLookup, RecipientTable

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
log = logging.getLogger("mailrelay.config")

# What a field left out of relay.json means (the schema's defaults, as typed
# by mailrelay_api.spec); the dataclasses below default to the same scalars,
# for configs built in code (tests, benchmarks). Lists start empty there: no
# client skips SPF, no extension is refused, unless the code says so.
_SPEC = MailRelaySpec.defaults()
_NEXT_HOP = NextHopSpec.with_defaults({"host": "localhost"})
_VERIFY = VerifySpec.with_defaults({})


def networks(cidrs: Iterable[str]) -> list[IPNetwork]:
    return [ipaddress.ip_network(c, strict=False) for c in cidrs]


@dataclass(frozen=True)
class NextHop:
    host: str
    port: int = _NEXT_HOP.port
    mx_lookup: bool = _NEXT_HOP.mx_lookup
    tls: TlsMode = _NEXT_HOP.tls

    @classmethod
    def from_spec(cls, s: NextHopSpec) -> NextHop:
        return cls(host=s.host, port=s.port, mx_lookup=s.mx_lookup, tls=s.tls)


@dataclass(frozen=True)
class VerifyPolicy:
    """recipients: verify's probe cache (seconds)."""

    positive_ttl: float = parse_duration(_VERIFY.positive_ttl)
    negative_ttl: float = parse_duration(_VERIFY.negative_ttl)
    when_unreachable: WhenUnreachable = _VERIFY.when_unreachable

    @classmethod
    def from_spec(cls, s: VerifySpec) -> VerifyPolicy:
        return cls(
            positive_ttl=parse_duration(s.positive_ttl),
            negative_ttl=parse_duration(s.negative_ttl),
            when_unreachable=s.when_unreachable,
        )


@dataclass(frozen=True)
class Domain:
    name: str  # lowercased, no trailing dot
    next_hop: NextHop
    recipients: RecipientsMode
    source: str = ""  # namespace/name of the RelayDomain
    verify: VerifyPolicy = field(default_factory=VerifyPolicy)


@dataclass(frozen=True)
class ClientAccessEntry:
    network: IPNetwork
    action: ClientAction


@dataclass(frozen=True)
class DnsblSite:
    zone: str  # lowercased
    return_codes: tuple[str, ...]
    weight: int


@dataclass(frozen=True)
class RblClient:
    zone: str  # lowercased
    return_codes: tuple[str, ...]


@dataclass(frozen=True)
class SpfPolicy:
    enabled: bool = _SPEC.restrictions.spf.enabled
    helo_reject: SpfReject = _SPEC.restrictions.spf.helo_reject
    mail_from_reject: SpfMailFromReject = _SPEC.restrictions.spf.mail_from_reject
    perm_error_reject: bool = _SPEC.restrictions.spf.perm_error_reject
    temp_error_defer: bool = _SPEC.restrictions.spf.temp_error_defer
    skip_addresses: tuple[IPNetwork, ...] = ()

    @classmethod
    def from_spec(cls, s: SpfSpec) -> SpfPolicy:
        return cls(
            enabled=s.enabled,
            helo_reject=s.helo_reject,
            mail_from_reject=s.mail_from_reject,
            perm_error_reject=s.perm_error_reject,
            temp_error_defer=s.temp_error_defer,
            skip_addresses=tuple(networks(s.skip_addresses)),
        )


@dataclass(frozen=True)
class GreylistPolicy:
    """restrictions.greylist (seconds)."""

    enabled: bool = _SPEC.restrictions.greylist.enabled
    delay: float = parse_duration(_SPEC.restrictions.greylist.delay)
    retry_window: float = parse_duration(_SPEC.restrictions.greylist.retry_window)
    ttl: float = parse_duration(_SPEC.restrictions.greylist.ttl)
    skip_allowlisted: bool = _SPEC.restrictions.greylist.skip_allowlisted
    auto_allowlist_clients: int = _SPEC.restrictions.greylist.auto_allowlist_clients

    @classmethod
    def from_spec(cls, s: GreylistSpec) -> GreylistPolicy:
        return cls(
            enabled=s.enabled,
            delay=parse_duration(s.delay),
            retry_window=parse_duration(s.retry_window),
            ttl=parse_duration(s.ttl),
            skip_allowlisted=s.skip_allowlisted,
            auto_allowlist_clients=s.auto_allowlist_clients,
        )


@dataclass(frozen=True)
class Restrictions:
    reject_unauth_pipelining: bool = _SPEC.restrictions.reject_unauth_pipelining
    reject_non_fqdn_recipient: bool = _SPEC.restrictions.reject_non_fqdn_recipient
    reject_unknown_recipient_domain: bool = _SPEC.restrictions.reject_unknown_recipient_domain
    reject_unknown_reverse_client_hostname: bool = (
        _SPEC.restrictions.reject_unknown_reverse_client_hostname
    )
    rbl_clients: tuple[RblClient, ...] = ()
    spf: SpfPolicy = field(default_factory=SpfPolicy)
    greylist: GreylistPolicy = field(default_factory=GreylistPolicy)

    @classmethod
    def from_spec(cls, s: RestrictionsSpec) -> Restrictions:
        return cls(
            reject_unauth_pipelining=s.reject_unauth_pipelining,
            reject_non_fqdn_recipient=s.reject_non_fqdn_recipient,
            reject_unknown_recipient_domain=s.reject_unknown_recipient_domain,
            reject_unknown_reverse_client_hostname=s.reject_unknown_reverse_client_hostname,
            rbl_clients=tuple(RblClient(c.zone.lower(), c.return_codes) for c in s.rbl_clients),
            spf=SpfPolicy.from_spec(s.spf),
            greylist=GreylistPolicy.from_spec(s.greylist),
        )


@dataclass(frozen=True)
class Postscreen:
    greet_action: ScreenAction = _SPEC.postscreen.greet.action
    greet_wait: float = parse_duration(_SPEC.postscreen.greet.wait)
    dnsbl_action: ScreenAction = _SPEC.postscreen.dnsbl.action
    denylist_action: ScreenAction = _SPEC.postscreen.denylist.action  # for clientAccess reject
    dnsbl_threshold: int = _SPEC.postscreen.dnsbl.threshold
    dnsbl_allowlist_threshold: int = _SPEC.postscreen.dnsbl.allowlist_threshold
    dnsbl_sites: tuple[DnsblSite, ...] = ()

    @classmethod
    def from_spec(cls, s: PostscreenSpec) -> Postscreen:
        return cls(
            greet_action=s.greet.action,
            greet_wait=parse_duration(s.greet.wait),
            dnsbl_action=s.dnsbl.action,
            denylist_action=s.denylist.action,
            dnsbl_threshold=s.dnsbl.threshold,
            dnsbl_allowlist_threshold=s.dnsbl.allowlist_threshold,
            dnsbl_sites=tuple(
                DnsblSite(site.zone.lower(), site.return_codes, site.weight)
                for site in s.dnsbl.sites
            ),
        )


@dataclass(frozen=True)
class Limits:
    message_size: int = _SPEC.limits.message_size
    recipients_per_message: int = _SPEC.limits.recipients_per_message
    connections_per_client: int = _SPEC.limits.connections_per_client
    connection_rate_per_client: int = _SPEC.limits.connection_rate_per_client  # 0 = off
    message_rate_per_client: int = _SPEC.limits.message_rate_per_client
    recipient_rate_per_client: int = _SPEC.limits.recipient_rate_per_client
    rate_time_unit: float = parse_duration(_SPEC.limits.rate_time_unit)
    errors_per_session: int = _SPEC.limits.errors_per_session  # smtpd_hard_error_limit

    @classmethod
    def from_spec(cls, s: LimitsSpec) -> Limits:
        return cls(
            message_size=s.message_size,
            recipients_per_message=s.recipients_per_message,
            connections_per_client=s.connections_per_client,
            connection_rate_per_client=s.connection_rate_per_client,
            message_rate_per_client=s.message_rate_per_client,
            recipient_rate_per_client=s.recipient_rate_per_client,
            rate_time_unit=parse_duration(s.rate_time_unit),
            errors_per_session=s.errors_per_session,
        )


@dataclass(frozen=True)
class QueuePolicy:
    lifetime: float = parse_duration(_SPEC.queue.lifetime)
    min_backoff: float = parse_duration(_SPEC.queue.min_backoff)
    max_backoff: float = parse_duration(_SPEC.queue.max_backoff)
    dsn_on_expiry: DsnOnExpiry = _SPEC.queue.dsn_on_expiry

    @classmethod
    def from_spec(cls, s: QueueSpec) -> QueuePolicy:
        return cls(
            lifetime=parse_duration(s.lifetime),
            min_backoff=parse_duration(s.min_backoff),
            max_backoff=parse_duration(s.max_backoff),
            dsn_on_expiry=s.dsn_on_expiry,
        )


@dataclass(frozen=True)
class BouncePolicy:
    delivery: BounceDelivery = _SPEC.bounces.delivery
    lifetime: float = parse_duration(_SPEC.bounces.lifetime)  # bounce_queue_lifetime

    @classmethod
    def from_spec(cls, s: BouncesSpec) -> BouncePolicy:
        return cls(delivery=s.delivery, lifetime=parse_duration(s.lifetime))


@dataclass(frozen=True)
class DnsPolicy:
    nameservers: tuple[str, ...] = ()
    timeout: float = parse_duration(_SPEC.dns.timeout)

    @classmethod
    def from_spec(cls, s: DnsSpec) -> DnsPolicy:
        return cls(nameservers=s.nameservers, timeout=parse_duration(s.timeout))


@dataclass(frozen=True)
class LoggingPolicy:
    format: str = _SPEC.logging.format  # text | json
    level: str = _SPEC.logging.level  # debug | info | warning | error

    @classmethod
    def from_spec(cls, s: LoggingSpec) -> LoggingPolicy:
        return cls(format=s.format, level=s.level)


@dataclass(frozen=True)
class Milter:
    """One of contentFilters.milters (Postfix smtpd_milters), timeouts in seconds."""

    name: str
    address: str  # inet:host:port | unix:/path
    connect_timeout: float = 30.0
    command_timeout: float = 30.0
    default_action: MilterDefaultAction = "tempfail"

    @classmethod
    def from_spec(cls, s: MilterSpec) -> Milter:
        return cls(
            name=s.name,
            address=s.address,
            connect_timeout=parse_duration(s.connect_timeout),
            command_timeout=parse_duration(s.command_timeout),
            default_action=s.default_action,
        )


@dataclass(frozen=True)
class Authentication:
    """contentFilters.authentication: what the relay verifies and reports in its
    Authentication-Results header (relay.smtpd.authres)."""

    dkim: bool = _SPEC.content_filters.authentication.dkim.enabled
    arc: bool = _SPEC.content_filters.authentication.arc.enabled
    dmarc: bool = _SPEC.content_filters.authentication.dmarc.enabled
    dmarc_enforce: DmarcEnforce = _SPEC.content_filters.authentication.dmarc.enforce

    @property
    def enabled(self) -> bool:
        return self.dkim or self.arc or self.dmarc

    @classmethod
    def from_spec(cls, s: AuthenticationSpec) -> Authentication:
        return cls(
            dkim=s.dkim.enabled,
            arc=s.arc.enabled,
            dmarc=s.dmarc.enabled,
            dmarc_enforce=s.dmarc.enforce,
        )


@dataclass(frozen=True)
class ProxyProtocol:
    enabled: bool = _SPEC.proxy_protocol.enabled
    trusted: tuple[IPNetwork, ...] = ()

    @classmethod
    def from_spec(cls, s: ProxyProtocolSpec) -> ProxyProtocol:
        return cls(enabled=s.enabled, trusted=tuple(networks(s.trusted_cidrs)))


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
    bounces: BouncePolicy = field(default_factory=BouncePolicy)
    postscreen: Postscreen = field(default_factory=Postscreen)
    restrictions: Restrictions = field(default_factory=Restrictions)
    reject_attachment_extensions: frozenset[str] = frozenset()
    milters: tuple[Milter, ...] = ()
    authentication: Authentication = field(default_factory=Authentication)
    dns: DnsPolicy = field(default_factory=DnsPolicy)
    proxy_protocol: ProxyProtocol = field(default_factory=ProxyProtocol)
    logging: LoggingPolicy = field(default_factory=LoggingPolicy)
    policy: dict[str, Any] = field(default_factory=dict)  # relay.json's policy, as read

    def domain_of(self, domain: str) -> Domain | None:
        return self.domains.get(domain.lower().rstrip("."))


def config_from_spec(
    name: str,
    spec: MailRelaySpec,
    domains: dict[str, Domain],
    recipients: RecipientLookup,
    policy: dict[str, Any] | None = None,
) -> RelayConfig:
    """The runtime configuration of a MailRelay spec."""
    return RelayConfig(
        name=name,
        hostname=spec.hostname,
        domains=domains,
        recipients=recipients,
        mynetworks=tuple(networks(spec.network.mynetworks)),
        client_access=tuple(
            ClientAccessEntry(ipaddress.ip_network(e.cidr, strict=False), e.action)
            for e in spec.network.client_access
        ),
        limits=Limits.from_spec(spec.limits),
        queue=QueuePolicy.from_spec(spec.queue),
        bounces=BouncePolicy.from_spec(spec.bounces),
        postscreen=Postscreen.from_spec(spec.postscreen),
        restrictions=Restrictions.from_spec(spec.restrictions),
        reject_attachment_extensions=frozenset(
            e.lower() for e in spec.content_filters.reject_attachment_extensions
        ),
        milters=tuple(Milter.from_spec(x) for x in spec.content_filters.milters),
        authentication=Authentication.from_spec(spec.content_filters.authentication),
        dns=DnsPolicy.from_spec(spec.dns),
        proxy_protocol=ProxyProtocol.from_spec(spec.proxy_protocol),
        logging=LoggingPolicy.from_spec(spec.logging),
        policy=policy if policy is not None else {},
    )


def domain_from_document(d: dict[str, Any]) -> Domain:
    """One entry of domains.json (mailrelay_api.render)."""
    return Domain(
        name=d["domain"],
        next_hop=NextHop.from_spec(NextHopSpec.with_defaults(d["nextHop"])),
        recipients=d["recipients"],
        source=d["source"],
        verify=VerifyPolicy.from_spec(VerifySpec.with_defaults(d.get("verify", {}))),
    )


def config_from_documents(
    relay_doc: dict[str, Any], domains_doc: dict[str, Any], recipients: RecipientLookup
) -> RelayConfig:
    """relay.json and domains.json, read. The schema's defaults fill in what
    they leave out: a relay.json written by an older operator (during a
    rolling upgrade) lacks the fields added since."""
    policy = relay_doc["policy"]
    domains = {d["domain"]: domain_from_document(d) for d in domains_doc["domains"]}
    return config_from_spec(
        relay_doc["name"], MailRelaySpec.with_defaults(policy), domains, recipients, policy
    )


class IncompleteShardSet(ValueError):
    """The shards an index names are not all there yet (a shard-count change
    the kubelet has not caught up with): the relay keeps its configuration
    and loads again at the next change, without calling it an error."""


def shard_set(config_dir: Path, names: list[str]) -> list[Path]:
    """The shards an index names (recipient or domain shards), once they are
    one whole set of one shard count and every file is there; else ValueError
    saying why, and the relay keeps the configuration it has. A pod sees the
    index of one count next to shards of another while the kubelet catches up
    with ConfigMaps written one at a time (mailrelay_api.shards): a shard's
    name carries its count, so the index names files that are not there."""
    problem = shard_set_problem(names)
    if problem is not None:
        raise ValueError(problem)
    paths = [config_dir / name for name in names]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise IncompleteShardSet(
            f"{missing[0]} is missing ({len(missing)} of the {len(names)} shards named are): "
            "not yet the whole set of this shard count"
        )
    return paths


def read_recipients(config_dir: Path, files: list[str]) -> RecipientTable:
    """The recipient shards as one compact table, read shard by shard."""
    return RecipientTable.from_shards(shard_set(config_dir, files))


def read_domains_document(config_dir: Path) -> dict[str, Any]:
    """domains.json; or domains.json.gz (an older operator gzip'd a large one);
    or, for a large install, domains-index.json and the domain shards it names
    (mailrelay_api.shards), their entries joined into one document."""
    plain = config_dir / DOMAINS_FILE
    packed = config_dir / (DOMAINS_FILE + ".gz")
    index_file = config_dir / DOMAINS_INDEX_FILE
    if packed.exists() and not plain.exists():
        with gzip.open(packed, "rt") as f:
            return dict(json.load(f))
    if plain.exists() or not index_file.exists():
        return dict(json.loads(plain.read_text()))
    index = json.loads(index_file.read_text())
    domains: list[dict[str, Any]] = []
    for path in shard_set(config_dir, index["domainFiles"]):
        domains.extend(json.loads(gzip.decompress(path.read_bytes())))
    return {**index, "domains": domains}


def load_logging(config_dir: str | Path) -> LoggingPolicy:
    """spec.logging alone, from relay.json (without reading the recipients)."""
    policy = json.loads((Path(config_dir) / RELAY_FILE).read_text())["policy"]
    return LoggingPolicy.from_spec(MailRelaySpec.with_defaults(policy).logging)


def config_version(config_dir: Path) -> Path:
    """In a ConfigMap volume, the version folder `..data` points to now: one
    load reads one version even if the kubelet swaps `..data` meanwhile (the
    old folder then goes, and the load fails: the watch sees the swap and
    loads again, IncompleteShardSet). Elsewhere (`mailrelay run`), the folder
    itself."""
    data = config_dir / "..data"
    return data.resolve() if data.is_symlink() else config_dir


def load_config(config_dir: str | Path) -> RelayConfig:
    """Reads a rendered config folder; raises ValueError with the file at fault."""
    folder = Path(config_dir)
    d = config_version(folder)
    try:
        relay_doc = json.loads((d / RELAY_FILE).read_text())
        domains_doc = read_domains_document(d)
        recipients = read_recipients(d, domains_doc["recipientFiles"])
        return config_from_documents(relay_doc, domains_doc, recipients)
    except IncompleteShardSet as e:
        raise IncompleteShardSet(f"incomplete relay configuration in {folder}: {e}") from e
    except (OSError, KeyError, ValueError, TypeError) as e:
        if d != folder and not d.exists():
            raise IncompleteShardSet(f"{folder}: ..data swapped while loading") from e
        raise ValueError(f"bad relay configuration in {folder}: {e}") from e


def load_config_waiting(config_dir: str | Path, wait: float, poll: float = 1.0) -> RelayConfig:
    """load_config for a relay that starts: a shard set not all there yet (a
    pod starting while the shard count moves) is waited for, up to `wait`
    seconds, rather than failing the start."""
    deadline = time.monotonic() + wait
    while True:
        try:
            return load_config(config_dir)
        except IncompleteShardSet as e:
            if time.monotonic() >= deadline:
                raise
            log.warning("configuration incomplete, waiting for the rest: %s", e)
            time.sleep(poll)
