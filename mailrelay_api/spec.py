"""The mailrelay.io specs as typed, frozen dataclasses: what their users read.

`from_dict` takes a spec with the schema's defaults applied (validate.
with_defaults, as load_manifests and the operator's indexes do) and reads
every defaulted key without a default of its own: the schema
(mailrelay_api.schema) is the one owner of defaults, and a key it defaults
that is missing here is a bug (KeyError), not a reason to guess. Keys the
schema leaves optional without a default read as None (or empty).

Field names are the manifest's, in snake_case (`from` is `from_`);
durations and quantities stay as written ("15m", "10Gi": users convert them
with mailrelay_api.units), lists become tuples, string enums are the
schema's Literals.

Long because it mirrors the schema field by field, a small dataclass per part:
the parts are read together, and splitting them would split the one mapping.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, cast

from mailrelay_api import schema as S
from mailrelay_api.validate import apply_defaults

Doc = Mapping[str, Any]

# "Empty: one entry with spec.hostname at priority 10" (MailRelay spec.mx).
IMPLICIT_MX_PRIORITY = 10

# Postfix's hopcount_limit: a message with this many Received: headers (the
# relay's own included) is refused at end of DATA, "554 5.4.0 Error: too many
# hops": a mail loop between relays that do not know each other.
HOPCOUNT_LIMIT = 50


def _defaulted(node: S.Schema, value: dict[str, Any]) -> dict[str, Any]:
    """value with the defaults of the schema node filled in (a copy)."""
    return cast(dict[str, Any], apply_defaults(node, copy.deepcopy(value)))


def _strings(values: Any) -> tuple[str, ...]:
    return tuple(str(v) for v in values)


def _map(values: Any) -> dict[str, str]:
    return {str(k): str(v) for k, v in (values or {}).items()}


# --- MailRelay ------------------------------------------------------------------
@dataclass(frozen=True)
class MxServiceSpec:
    type: S.ServiceType
    external_traffic_policy: S.TrafficPolicy
    annotations: Mapping[str, str]
    load_balancer_class: str | None
    load_balancer_source_ranges: tuple[str, ...]

    @classmethod
    def from_dict(cls, d: Doc) -> MxServiceSpec:
        return cls(
            type=d["type"],
            external_traffic_policy=d["externalTrafficPolicy"],
            annotations=_map(d.get("annotations")),
            load_balancer_class=d.get("loadBalancerClass") or None,
            load_balancer_source_ranges=_strings(d.get("loadBalancerSourceRanges") or ()),
        )

    @classmethod
    def defaults(cls) -> MxServiceSpec:
        return cls.from_dict(_defaulted(S.MX_ENTRY["properties"]["service"], {}))


@dataclass(frozen=True)
class MxPods:
    """The pods serving one MX: any with one of the ordinals or in one of the zones."""

    ordinals: tuple[int, ...]
    zones: tuple[str, ...]

    def serves(self, ordinal: int, zone: str | None) -> bool:
        return ordinal in self.ordinals or (zone is not None and zone in self.zones)


@dataclass(frozen=True)
class MxEntrySpec:
    hostname: str
    priority: int
    service: MxServiceSpec
    pods: MxPods | None = None  # None: every pod

    @classmethod
    def from_dict(cls, d: Doc) -> MxEntrySpec:
        pods = d.get("pods")
        return cls(
            hostname=str(d["hostname"]),
            priority=int(d["priority"]),
            service=MxServiceSpec.from_dict(d["service"]),
            pods=MxPods(
                tuple(int(o) for o in pods.get("ordinals") or ()), _strings(pods.get("zones") or ())
            )
            if pods is not None
            else None,
        )


@dataclass(frozen=True)
class LabelRequirement:
    key: str
    operator: str  # In | NotIn | Exists | DoesNotExist
    values: tuple[str, ...]


@dataclass(frozen=True)
class LabelSelector:
    match_labels: Mapping[str, str]
    match_expressions: tuple[LabelRequirement, ...]

    @classmethod
    def from_dict(cls, d: Doc) -> LabelSelector:
        return cls(
            match_labels=_map(d.get("matchLabels")),
            match_expressions=tuple(
                LabelRequirement(str(e["key"]), str(e["operator"]), _strings(e.get("values") or ()))
                for e in d.get("matchExpressions") or ()
            ),
        )

    def matches(self, labels: Mapping[str, str]) -> bool:
        """A Kubernetes LabelSelector against a label set."""
        for key, value in self.match_labels.items():
            if labels.get(key) != value:
                return False
        for expr in self.match_expressions:
            key, op = expr.key, expr.operator
            if op == "In" and labels.get(key) not in expr.values:
                return False
            if op == "NotIn" and key in labels and labels[key] in expr.values:
                return False
            if op == "Exists" and key not in labels:
                return False
            if op == "DoesNotExist" and key in labels:
                return False
        return True


@dataclass(frozen=True)
class AllowedNamespaces:
    from_: S.NamespacesFrom
    selector: LabelSelector | None

    @classmethod
    def from_dict(cls, d: Doc) -> AllowedNamespaces:
        selector = d.get("selector")
        return cls(
            from_=d["from"],
            selector=LabelSelector.from_dict(selector) if selector is not None else None,
        )


@dataclass(frozen=True)
class DomainGrant:
    namespaces: AllowedNamespaces
    domains: tuple[str, ...]  # names, "*.suffix" or "*"

    @classmethod
    def from_dict(cls, d: Doc) -> DomainGrant:
        return cls(
            namespaces=AllowedNamespaces.from_dict(
                _defaulted(S.ALLOWED_NAMESPACES, dict(d.get("namespaces") or {}))
            ),
            domains=_strings(d["domains"]),
        )


@dataclass(frozen=True)
class AllowedDomainsSpec:
    namespaces: AllowedNamespaces
    grants: tuple[DomainGrant, ...]  # empty: any domain from `namespaces`
    release_after: str  # a duration

    @classmethod
    def from_dict(cls, d: Doc) -> AllowedDomainsSpec:
        return cls(
            namespaces=AllowedNamespaces.from_dict(d["namespaces"]),
            grants=tuple(DomainGrant.from_dict(g) for g in d["grants"]),
            release_after=str(d["releaseAfter"]),
        )


@dataclass(frozen=True)
class NextHopRule:
    """One spec.allowedNextHops entry: exactly one of cidr and host."""

    cidr: str | None
    host: str | None  # a name or "*.suffix"
    ports: tuple[int, ...]

    @classmethod
    def from_dict(cls, d: Doc) -> NextHopRule:
        item = S.MAILRELAY_SPEC["properties"]["allowedNextHops"]["items"]
        d = _defaulted(item, dict(d))
        return cls(cidr=d.get("cidr"), host=d.get("host"), ports=tuple(int(p) for p in d["ports"]))


@dataclass(frozen=True)
class AffinitySpec:
    node_selector: Mapping[str, str]
    tolerations: tuple[Mapping[str, Any], ...]  # core/v1 Tolerations, as written
    node_affinity: Mapping[str, Any] | None  # a core/v1 NodeAffinity, as written

    @classmethod
    def from_dict(cls, d: Doc) -> AffinitySpec:
        return cls(
            node_selector=_map(d.get("nodeSelector")),
            tolerations=tuple(dict(t) for t in d.get("tolerations") or ()),
            node_affinity=d.get("nodeAffinity"),
        )


@dataclass(frozen=True)
class SpreadSpec:
    zones: S.Spread
    hosts: S.Spread

    @classmethod
    def from_dict(cls, d: Doc) -> SpreadSpec:
        return cls(zones=d["zones"], hosts=d["hosts"])


@dataclass(frozen=True)
class StorageSpec:
    size: str  # a Kubernetes quantity, e.g. 10Gi
    storage_class_name: str | None  # None: the cluster's default

    @classmethod
    def from_dict(cls, d: Doc) -> StorageSpec:
        return cls(size=str(d["size"]), storage_class_name=d.get("storageClassName"))


@dataclass(frozen=True)
class IssuerRef:
    kind: S.IssuerKind
    name: str
    group: str

    @classmethod
    def from_dict(cls, d: Doc) -> IssuerRef:
        return cls(kind=d["kind"], name=str(d["name"]), group=str(d["group"]))


@dataclass(frozen=True)
class TlsSpec:
    issuer_ref: IssuerRef | None  # None: no Certificate
    secret_name: str  # "": the operator's name for it

    @classmethod
    def from_dict(cls, d: Doc) -> TlsSpec:
        issuer = d.get("issuerRef")
        return cls(
            issuer_ref=IssuerRef.from_dict(issuer) if issuer is not None else None,
            secret_name=str(d["secretName"]),
        )


@dataclass(frozen=True)
class ProxyProtocolSpec:
    enabled: bool
    trusted_cidrs: tuple[str, ...]

    @classmethod
    def from_dict(cls, d: Doc) -> ProxyProtocolSpec:
        return cls(enabled=bool(d["enabled"]), trusted_cidrs=_strings(d["trustedCIDRs"]))


@dataclass(frozen=True)
class ClientAccessRule:
    cidr: str
    action: S.ClientAction


@dataclass(frozen=True)
class NetworkSpec:
    mynetworks: tuple[str, ...]
    client_access: tuple[ClientAccessRule, ...]

    @classmethod
    def from_dict(cls, d: Doc) -> NetworkSpec:
        return cls(
            mynetworks=_strings(d["mynetworks"]),
            client_access=tuple(
                ClientAccessRule(str(e["cidr"]), e["action"]) for e in d["clientAccess"]
            ),
        )


@dataclass(frozen=True)
class LimitsSpec:
    message_size: int
    recipients_per_message: int
    connections_per_client: int
    connection_rate_per_client: int
    message_rate_per_client: int
    recipient_rate_per_client: int
    rate_time_unit: str  # a duration
    errors_per_session: int

    @classmethod
    def from_dict(cls, d: Doc) -> LimitsSpec:
        return cls(
            message_size=int(d["messageSize"]),
            recipients_per_message=int(d["recipientsPerMessage"]),
            connections_per_client=int(d["connectionsPerClient"]),
            connection_rate_per_client=int(d["connectionRatePerClient"]),
            message_rate_per_client=int(d["messageRatePerClient"]),
            recipient_rate_per_client=int(d["recipientRatePerClient"]),
            rate_time_unit=str(d["rateTimeUnit"]),
            errors_per_session=int(d["errorsPerSession"]),
        )


@dataclass(frozen=True)
class QueueSpec:
    lifetime: str  # durations
    min_backoff: str
    max_backoff: str
    dsn_on_expiry: S.DsnOnExpiry

    @classmethod
    def from_dict(cls, d: Doc) -> QueueSpec:
        return cls(
            lifetime=str(d["lifetime"]),
            min_backoff=str(d["minBackoff"]),
            max_backoff=str(d["maxBackoff"]),
            dsn_on_expiry=d["dsnOnExpiry"],
        )


@dataclass(frozen=True)
class BouncesSpec:
    delivery: S.BounceDelivery
    lifetime: str  # a duration

    @classmethod
    def from_dict(cls, d: Doc) -> BouncesSpec:
        return cls(delivery=d["delivery"], lifetime=str(d["lifetime"]))


@dataclass(frozen=True)
class ScaleDownSpec:
    drain_timeout: str  # a duration
    on_timeout: S.OnTimeout

    @classmethod
    def from_dict(cls, d: Doc) -> ScaleDownSpec:
        return cls(drain_timeout=str(d["drainTimeout"]), on_timeout=d["onTimeout"])


@dataclass(frozen=True)
class GreetSpec:
    action: S.ScreenAction
    wait: str  # a duration

    @classmethod
    def from_dict(cls, d: Doc) -> GreetSpec:
        return cls(action=d["action"], wait=str(d["wait"]))


@dataclass(frozen=True)
class DenylistSpec:
    action: S.ScreenAction

    @classmethod
    def from_dict(cls, d: Doc) -> DenylistSpec:
        return cls(action=d["action"])


@dataclass(frozen=True)
class DnsblSiteSpec:
    zone: str
    return_codes: tuple[str, ...]
    weight: int

    @classmethod
    def from_dict(cls, d: Doc) -> DnsblSiteSpec:
        return cls(
            zone=str(d["zone"]), return_codes=_strings(d["returnCodes"]), weight=int(d["weight"])
        )


@dataclass(frozen=True)
class DnsblSpec:
    action: S.ScreenAction
    threshold: int
    allowlist_threshold: int
    sites: tuple[DnsblSiteSpec, ...]

    @classmethod
    def from_dict(cls, d: Doc) -> DnsblSpec:
        return cls(
            action=d["action"],
            threshold=int(d["threshold"]),
            allowlist_threshold=int(d["allowlistThreshold"]),
            sites=tuple(DnsblSiteSpec.from_dict(s) for s in d["sites"]),
        )


@dataclass(frozen=True)
class PostscreenSpec:
    greet: GreetSpec
    denylist: DenylistSpec
    dnsbl: DnsblSpec

    @classmethod
    def from_dict(cls, d: Doc) -> PostscreenSpec:
        return cls(
            greet=GreetSpec.from_dict(d["greet"]),
            denylist=DenylistSpec.from_dict(d["denylist"]),
            dnsbl=DnsblSpec.from_dict(d["dnsbl"]),
        )


@dataclass(frozen=True)
class RblClientSpec:
    zone: str
    return_codes: tuple[str, ...]

    @classmethod
    def from_dict(cls, d: Doc) -> RblClientSpec:
        return cls(zone=str(d["zone"]), return_codes=_strings(d["returnCodes"]))


@dataclass(frozen=True)
class SpfSpec:
    enabled: bool
    helo_reject: S.SpfReject
    mail_from_reject: S.SpfMailFromReject
    perm_error_reject: bool
    temp_error_defer: bool
    skip_addresses: tuple[str, ...]  # CIDRs

    @classmethod
    def from_dict(cls, d: Doc) -> SpfSpec:
        return cls(
            enabled=bool(d["enabled"]),
            helo_reject=d["heloReject"],
            mail_from_reject=d["mailFromReject"],
            perm_error_reject=bool(d["permErrorReject"]),
            temp_error_defer=bool(d["tempErrorDefer"]),
            skip_addresses=_strings(d["skipAddresses"]),
        )


@dataclass(frozen=True)
class GreylistSpec:
    enabled: bool
    delay: str  # durations
    retry_window: str
    ttl: str
    skip_allowlisted: bool
    auto_allowlist_clients: int  # passes; 0: off

    @classmethod
    def from_dict(cls, d: Doc) -> GreylistSpec:
        return cls(
            enabled=bool(d["enabled"]),
            delay=str(d["delay"]),
            retry_window=str(d["retryWindow"]),
            ttl=str(d["ttl"]),
            skip_allowlisted=bool(d["skipAllowlisted"]),
            auto_allowlist_clients=int(d["autoAllowlistClients"]),
        )


@dataclass(frozen=True)
class RestrictionsSpec:
    reject_unauth_pipelining: bool
    reject_non_fqdn_recipient: bool
    reject_unknown_recipient_domain: bool
    reject_unknown_reverse_client_hostname: bool
    rbl_clients: tuple[RblClientSpec, ...]
    spf: SpfSpec
    greylist: GreylistSpec

    @classmethod
    def from_dict(cls, d: Doc) -> RestrictionsSpec:
        return cls(
            reject_unauth_pipelining=bool(d["rejectUnauthPipelining"]),
            reject_non_fqdn_recipient=bool(d["rejectNonFqdnRecipient"]),
            reject_unknown_recipient_domain=bool(d["rejectUnknownRecipientDomain"]),
            reject_unknown_reverse_client_hostname=bool(d["rejectUnknownReverseClientHostname"]),
            rbl_clients=tuple(RblClientSpec.from_dict(c) for c in d["rblClients"]),
            spf=SpfSpec.from_dict(d["spf"]),
            greylist=GreylistSpec.from_dict(d["greylist"]),
        )


@dataclass(frozen=True)
class MilterSpec:
    name: str
    address: str  # inet:host:port | unix:/path
    connect_timeout: str  # a duration
    command_timeout: str  # a duration
    default_action: S.MilterDefaultAction

    @classmethod
    def from_dict(cls, d: Doc) -> MilterSpec:
        return cls(
            name=str(d["name"]),
            address=str(d["address"]),
            connect_timeout=str(d["connectTimeout"]),
            command_timeout=str(d["commandTimeout"]),
            default_action=d["defaultAction"],
        )


@dataclass(frozen=True)
class ToggleSpec:
    enabled: bool

    @classmethod
    def from_dict(cls, d: Doc) -> ToggleSpec:
        return cls(enabled=bool(d["enabled"]))


@dataclass(frozen=True)
class DmarcSpec:
    enabled: bool
    enforce: S.DmarcEnforce

    @classmethod
    def from_dict(cls, d: Doc) -> DmarcSpec:
        return cls(enabled=bool(d["enabled"]), enforce=d["enforce"])


@dataclass(frozen=True)
class AuthenticationSpec:
    dkim: ToggleSpec
    arc: ToggleSpec
    dmarc: DmarcSpec

    @classmethod
    def from_dict(cls, d: Doc) -> AuthenticationSpec:
        return cls(
            dkim=ToggleSpec.from_dict(d["dkim"]),
            arc=ToggleSpec.from_dict(d["arc"]),
            dmarc=DmarcSpec.from_dict(d["dmarc"]),
        )


@dataclass(frozen=True)
class ContentFiltersSpec:
    reject_attachment_extensions: tuple[str, ...]
    milters: tuple[MilterSpec, ...]
    authentication: AuthenticationSpec

    @classmethod
    def from_dict(cls, d: Doc) -> ContentFiltersSpec:
        return cls(
            reject_attachment_extensions=_strings(d["rejectAttachmentExtensions"]),
            milters=tuple(MilterSpec.from_dict(x) for x in d["milters"]),
            authentication=AuthenticationSpec.from_dict(d["authentication"]),
        )


@dataclass(frozen=True)
class DnsSpec:
    nameservers: tuple[str, ...]
    timeout: str  # a duration

    @classmethod
    def from_dict(cls, d: Doc) -> DnsSpec:
        return cls(nameservers=_strings(d["nameservers"]), timeout=str(d["timeout"]))


@dataclass(frozen=True)
class LoggingSpec:
    format: S.LogFormat
    level: S.LogLevel

    @classmethod
    def from_dict(cls, d: Doc) -> LoggingSpec:
        return cls(format=d["format"], level=d["level"])


@dataclass(frozen=True)
class MailRelaySpec:
    hostname: str
    replicas: int
    image: str | None  # None: the operator's default
    mx: tuple[MxEntrySpec, ...]  # as written; see mx_entries()
    allowed_domains: AllowedDomainsSpec
    allowed_next_hops: tuple[NextHopRule, ...]  # empty: the default policy (render.py)
    resources: Mapping[str, Mapping[str, str | int]]  # core/v1 ResourceRequirements
    workers: int | Literal["auto"]  # auto: the CPUs the container may use
    affinity: AffinitySpec
    priority_class_name: str | None
    image_pull_secrets: tuple[str, ...]  # Secret names
    spread: SpreadSpec
    storage: StorageSpec
    tls: TlsSpec
    proxy_protocol: ProxyProtocolSpec
    network: NetworkSpec
    limits: LimitsSpec
    queue: QueueSpec
    bounces: BouncesSpec
    scale_down: ScaleDownSpec
    postscreen: PostscreenSpec
    restrictions: RestrictionsSpec
    content_filters: ContentFiltersSpec
    dns: DnsSpec
    logging: LoggingSpec

    @classmethod
    def from_dict(cls, d: Doc) -> MailRelaySpec:
        return cls(
            hostname=str(d["hostname"]),
            replicas=int(d["replicas"]),
            image=d.get("image") or None,
            mx=tuple(MxEntrySpec.from_dict(e) for e in d["mx"]),
            allowed_domains=AllowedDomainsSpec.from_dict(d["allowedDomains"]),
            allowed_next_hops=tuple(NextHopRule.from_dict(e) for e in d["allowedNextHops"]),
            resources={k: dict(v) for k, v in d["resources"].items()},
            workers="auto" if d["workers"] == "auto" else int(d["workers"]),
            affinity=AffinitySpec.from_dict(d["affinity"]),
            priority_class_name=d.get("priorityClassName") or None,
            image_pull_secrets=tuple(str(s["name"]) for s in d.get("imagePullSecrets") or ()),
            spread=SpreadSpec.from_dict(d["spread"]),
            storage=StorageSpec.from_dict(d["storage"]),
            tls=TlsSpec.from_dict(d["tls"]),
            proxy_protocol=ProxyProtocolSpec.from_dict(d["proxyProtocol"]),
            network=NetworkSpec.from_dict(d["network"]),
            limits=LimitsSpec.from_dict(d["limits"]),
            queue=QueueSpec.from_dict(d["queue"]),
            bounces=BouncesSpec.from_dict(d["bounces"]),
            scale_down=ScaleDownSpec.from_dict(d["scaleDown"]),
            postscreen=PostscreenSpec.from_dict(d["postscreen"]),
            restrictions=RestrictionsSpec.from_dict(d["restrictions"]),
            content_filters=ContentFiltersSpec.from_dict(d["contentFilters"]),
            dns=DnsSpec.from_dict(d["dns"]),
            logging=LoggingSpec.from_dict(d["logging"]),
        )

    @classmethod
    def with_defaults(cls, d: Doc) -> MailRelaySpec:
        """A spec as written, or rendered by an older operator: defaults filled in first."""
        return cls.from_dict(_defaulted(S.MAILRELAY_SPEC, dict(d)))

    @classmethod
    def defaults(cls) -> MailRelaySpec:
        """The spec of a MailRelay that sets only its (required) hostname."""
        return cls.with_defaults({"hostname": "localhost"})

    def mx_entries(self) -> tuple[MxEntrySpec, ...]:
        """spec.mx, or one entry from spec.hostname at priority 10 when it is empty."""
        if self.mx:
            return self.mx
        return (MxEntrySpec(self.hostname, IMPLICIT_MX_PRIORITY, MxServiceSpec.defaults()),)


# --- RelayDomain ------------------------------------------------------------------
@dataclass(frozen=True)
class RelayRef:
    name: str
    namespace: str | None  # None: the RelayDomain's own

    @classmethod
    def from_dict(cls, d: Doc) -> RelayRef:
        return cls(name=str(d["name"]), namespace=d.get("namespace") or None)


@dataclass(frozen=True)
class NextHopSpec:
    host: str
    port: int
    mx_lookup: bool
    tls: S.TlsMode

    @classmethod
    def from_dict(cls, d: Doc) -> NextHopSpec:
        return cls(
            host=str(d["host"]), port=int(d["port"]), mx_lookup=bool(d["mxLookup"]), tls=d["tls"]
        )

    @classmethod
    def with_defaults(cls, d: Doc) -> NextHopSpec:
        return cls.from_dict(_defaulted(S.RELAYDOMAIN_SPEC["properties"]["nextHop"], dict(d)))


@dataclass(frozen=True)
class VerifySpec:
    positive_ttl: str  # durations
    negative_ttl: str
    when_unreachable: S.WhenUnreachable

    @classmethod
    def from_dict(cls, d: Doc) -> VerifySpec:
        return cls(
            positive_ttl=str(d["positiveTTL"]),
            negative_ttl=str(d["negativeTTL"]),
            when_unreachable=d["whenUnreachable"],
        )

    @classmethod
    def with_defaults(cls, d: Doc) -> VerifySpec:
        return cls.from_dict(_defaulted(S.RELAYDOMAIN_SPEC["properties"]["verify"], dict(d)))


@dataclass(frozen=True)
class RelayDomainSpec:
    domain: str
    relay_ref: RelayRef
    next_hop: NextHopSpec
    recipients: S.RecipientsMode
    verify: VerifySpec

    @classmethod
    def from_dict(cls, d: Doc) -> RelayDomainSpec:
        return cls(
            domain=str(d["domain"]),
            relay_ref=RelayRef.from_dict(d["relayRef"]),
            next_hop=NextHopSpec.from_dict(d["nextHop"]),
            recipients=d["recipients"],
            verify=VerifySpec.from_dict(d["verify"]),
        )

    @classmethod
    def with_defaults(cls, d: Doc) -> RelayDomainSpec:
        return cls.from_dict(_defaulted(S.RELAYDOMAIN_SPEC, dict(d)))


# --- RecipientList ------------------------------------------------------------------
@dataclass(frozen=True)
class DomainRef:
    name: str


@dataclass(frozen=True)
class RecipientListSpec:
    domain_ref: DomainRef
    addresses: tuple[str, ...]

    @classmethod
    def from_dict(cls, d: Doc) -> RecipientListSpec:
        return cls(
            domain_ref=DomainRef(str(d["domainRef"]["name"])), addresses=_strings(d["addresses"])
        )

    @classmethod
    def with_defaults(cls, d: Doc) -> RecipientListSpec:
        return cls.from_dict(_defaulted(S.RECIPIENTLIST_SPEC, dict(d)))


def relay_spec(relay: Doc) -> MailRelaySpec:
    """The typed spec of a MailRelay object whose defaults are applied (as
    load_manifests and the operator's indexes hold them)."""
    return MailRelaySpec.from_dict(relay["spec"])
