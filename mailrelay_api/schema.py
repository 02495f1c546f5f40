"""The one definition of the mailrelay.io/v1alpha1 resources.

Everything that knows the shape of a MailRelay, RelayDomain or RecipientList
reads it from here: the CRDs in deploy/crds/ are generated from these schemas
(`python -m mailrelay_api.crdgen`), `mailrelay validate` and `mailrelay run`
check manifests against them offline, and defaults are applied from them, the
way the API server's structural defaulting does.

Cross-field rules are written once as `Rule`s: a CEL expression for the API
server and a Python predicate for offline validation, side by side.

Long because it is one declarative literal per kind, field by field with its
description and default: splitting it would only scatter the one definition.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

GROUP = "mailrelay.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
# Where an object came from (file and document), for messages and `mailrelay render`.
SOURCE_ANNOTATION = f"{GROUP}/source"

Schema = dict[str, Any]

# --- the spec's string enums -------------------------------------------------------
# Typed here once: the schema's enums are these, and mailrelay_api.spec's
# dataclasses carry them, so a value mypy accepts is one the API server accepts.
ServiceType = Literal["LoadBalancer", "NodePort", "ClusterIP"]
TrafficPolicy = Literal["Local", "Cluster"]
NamespacesFrom = Literal["Same", "All", "Selector"]
IssuerKind = Literal["Issuer", "ClusterIssuer"]
ClientAction = Literal["permit", "reject"]
DsnOnExpiry = Literal["sender", "none"]
OnTimeout = Literal["Wait", "Proceed"]
ScreenAction = Literal["ignore", "enforce", "drop"]  # postscreen's *_action
SpfReject = Literal["Fail", "SPF_Not_Pass", "Softfail", "Null", "False", "No_Check"]
SpfMailFromReject = Literal["Fail", "SPF_Not_Pass", "Softfail", "False", "No_Check"]  # no Null
TlsMode = Literal["none", "may", "encrypt", "verify"]  # Postfix smtp_tls_security_level
RecipientsMode = Literal["listed", "any", "verify"]
MilterDefaultAction = Literal["tempfail", "accept", "reject"]  # Postfix milter_default_action
Spread = Literal["Preferred", "Required"]
BounceDelivery = Literal["mx", "relayDomainsOnly", "none"]
WhenUnreachable = Literal["defer", "accept"]
DmarcEnforce = Literal["none", "quarantine", "reject"]  # what a failing p=quarantine/reject does
LogFormat = Literal["text", "json"]  # text: Postfix-like lines; json: one object a line
LogLevel = Literal["debug", "info", "warning", "error"]


def values(enum: Any) -> list[str]:
    """The values of a Literal, in order, for a schema's enum."""
    return list(get_args(enum))


# --- patterns -----------------------------------------------------------------
# The API server compiles patterns with Go's RE2: no lookaheads or
# backreferences. Name length (253) is a maxLength instead (see string()).
# A DNS name of at least two labels (an FQDN without the trailing dot).
FQDN_PATTERN = (
    r"^([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+"
    r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$"
)
# A host name: one label or more (next hops may be "localhost" or a Service name).
HOSTNAME_PATTERN = (
    r"^([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?\.)*"
    r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?$|^\[[0-9A-Fa-f:.]+\]$|^[0-9.]+$"
)
# A plain mailbox: dot-atom local part @ FQDN (no quoted or routed forms).
ADDRESS_PATTERN = (
    r"^[A-Za-z0-9!#$&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$&'*+/=?^_`{|}~-]+)*@"
    r"([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$"
)
IPV4_CIDR = r"([0-9]{1,3}\.){3}[0-9]{1,3}(/[0-9]{1,2})?"
IPV6_CIDR = r"[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*(/[0-9]{1,3})?"
CIDR_PATTERN = f"^({IPV4_CIDR}|{IPV6_CIDR})$"
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_LABEL_ = r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?"
# A grant's domain: a name of two labels or more, "*.suffix" or "*".
DOMAIN_GRANT_PATTERN = rf"^(\*|(\*\.)?({_LABEL}\.)+{_LABEL})$"
# An allowed next-hop host: a name (one label or more) or "*.suffix".
HOST_GRANT_PATTERN = rf"^(\*\.)?({_LABEL_}\.)*{_LABEL_}$"
IPV4_PATTERN = r"^([0-9]{1,3}\.){3}[0-9]{1,3}$"
# "ip" or "ip:port" (IPv6 with a port: "[::1]:53").
NAMESERVER_PATTERN = (
    r"^(([0-9]{1,3}\.){3}[0-9]{1,3}(:[0-9]{1,5})?|[0-9A-Fa-f:]+|\[[0-9A-Fa-f:]+\]:[0-9]{1,5})$"
)
# A milter's socket, as Postfix writes it: inet:host:port, inet:[ipv6]:port or unix:/path.
MILTER_ADDRESS_PATTERN = r"^(inet:([A-Za-z0-9_.-]+|\[[0-9A-Fa-f:.]+\]):[0-9]{1,5}|unix:/[^\x00]+)$"
# Postfix-style time: 10d, 4000s, 5m, 1h30m.
DURATION_PATTERN = r"^([0-9]+(ms|s|m|h|d|w))+$"
# A DNSBL reply filter: d.d.d.d where each d is a number or [a;b;c..d].
RETURN_CODE_PATTERN = (
    r"^(([0-9]{1,3}|\[[0-9]{1,3}(\.\.[0-9]{1,3})?(;[0-9]{1,3}(\.\.[0-9]{1,3})?)*\])\.){3}"
    r"([0-9]{1,3}|\[[0-9]{1,3}(\.\.[0-9]{1,3})?(;[0-9]{1,3}(\.\.[0-9]{1,3})?)*\])$"
)
QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$"
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
K8S_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"


# --- small schema builders ----------------------------------------------------
def string(
    description: str,
    *,
    pattern: str | None = None,
    enum: list[str] | None = None,
    default: str | None = None,
    max_length: int | None = None,
    nullable: bool = False,
) -> Schema:
    s: Schema = {"type": "string", "description": description}
    if pattern:
        s["pattern"] = pattern
        if pattern in (FQDN_PATTERN, HOSTNAME_PATTERN) and max_length is None:
            max_length = 253  # a DNS name's limit
    if enum:
        s["enum"] = enum
    if default is not None:
        s["default"] = default
    if max_length is not None:
        s["maxLength"] = max_length
    if nullable:
        s["nullable"] = True
    return s


def integer(
    description: str,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
    default: int | None = None,
) -> Schema:
    s: Schema = {"type": "integer", "description": description}
    if minimum is not None:
        s["minimum"] = minimum
    if maximum is not None:
        s["maximum"] = maximum
    if default is not None:
        s["default"] = default
    return s


def boolean(description: str, *, default: bool | None = None) -> Schema:
    s: Schema = {"type": "boolean", "description": description}
    if default is not None:
        s["default"] = default
    return s


def array(
    description: str,
    items: Schema,
    *,
    default: list[Any] | None = None,
    max_items: int | None = None,
    list_type: str | None = None,
) -> Schema:
    s: Schema = {"type": "array", "description": description, "items": items}
    if default is not None:
        s["default"] = default
    if max_items is not None:
        s["maxItems"] = max_items
    if list_type:
        s["x-kubernetes-list-type"] = list_type
    return s


def obj(
    description: str,
    properties: dict[str, Schema],
    *,
    required: list[str] | None = None,
    default: dict[str, Any] | None = None,
) -> Schema:
    s: Schema = {"type": "object", "description": description, "properties": properties}
    if required:
        s["required"] = required
    if default is not None:
        s["default"] = default
    return s


def string_map(description: str) -> Schema:
    return {
        "type": "object",
        "description": description,
        "additionalProperties": {"type": "string"},
    }


# --- cross-field rules ----------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    """A cross-field rule: CEL for the API server, Python for `mailrelay validate`."""

    path: str  # dotted path of the object the rule sits on, e.g. "spec.tls"
    cel: str
    message: str
    check: Callable[[Any], bool]


# Rules that sit on a schema node itself (a CIDR string, a grant): the CRD
# carries the CEL, and `mailrelay validate` finds the Python check by the CEL
# text when it walks the schema (validate._node_rules).
NODE_RULES: dict[str, Rule] = {}


def checked(schema: Schema, *rules: Rule) -> Schema:
    """The schema node with the rules' CEL on it; registers their Python checks."""
    for rule in rules:
        NODE_RULES[rule.cel] = rule
    out = dict(schema)
    out["x-kubernetes-validations"] = [
        *schema.get("x-kubernetes-validations", []),
        *({"rule": r.cel, "message": r.message} for r in rules),
    ]
    return out


def immutable(schema: Schema, what: str) -> Schema:
    """A transition rule: the API server refuses any change after creation.
    (Offline validation sees one version only: nothing to compare.)"""
    out = dict(schema)
    out["x-kubernetes-validations"] = [
        *schema.get("x-kubernetes-validations", []),
        {
            "rule": "self == oldSelf",
            "message": f"{what} is immutable: create a new RelayDomain (and delete this one) "
            "to move it",
        },
    ]
    return out


def _is_network(value: Any) -> bool:
    try:
        ipaddress.ip_network(str(value), strict=False)
    except ValueError:
        return False
    return True


def _is_ip(value: Any) -> bool:
    try:
        ipaddress.ip_address(str(value))
    except ValueError:
        return False
    return True


def _nameserver_ok(value: str) -> bool:
    host, port = value, "53"
    if value.startswith("["):
        host, _, port = value[1:].partition("]:")
    elif value.count(":") == 1:
        host, _, port = value.partition(":")
    return _is_ip(host) and 1 <= int(port) <= 65535


def _milter_port_ok(value: str) -> bool:
    if not value.startswith("inet:"):
        return True
    port = value.rpartition(":")[2]
    return port.isdigit() and 1 <= int(port) <= 65535


# The CEL IP library (k8s 1.31+) refuses IPv4-mapped IPv6 ("::ffff:1.2.3.4",
# one of spf.skipAddresses' defaults); those are checked by pattern only.
CIDR_RULE = Rule(
    path="",
    cel="self.startsWith('::ffff:') || (self.contains('/') ? isCIDR(self) : isIP(self))",
    message="must be a valid IP address or CIDR (e.g. 192.0.2.0/24, 2001:db8::/32)",
    check=lambda v: _is_network(v),
)
RETURN_CODE_RULE = Rule(
    path="",
    cel="self.findAll('[0-9]+').all(n, int(n) <= 255)",
    message="each number of a reply filter must be 0..255",
    check=lambda v: all(int(n) <= 255 for n in re.findall("[0-9]+", str(v))),
)
NAMESERVER_RULE = Rule(
    path="",
    cel="self.startsWith('[') ? "
    "(isIP(self.substring(1, self.indexOf(']'))) && "
    "int(self.substring(self.indexOf(']') + 2)) >= 1 && "
    "int(self.substring(self.indexOf(']') + 2)) <= 65535) : "
    "(self.contains('.') && self.contains(':') ? "
    "(isIP(self.split(':')[0]) && int(self.split(':')[1]) >= 1 && "
    "int(self.split(':')[1]) <= 65535) : isIP(self))",
    message="must be an IP address, optionally with a port 1..65535",
    check=lambda v: _nameserver_ok(str(v)),
)
# The pattern allows five digits; the relay cannot connect to a port over 65535.
MILTER_ADDRESS_RULE = Rule(
    path="",
    cel="!self.startsWith('inet:') || "
    "(int(self.substring(self.lastIndexOf(':') + 1)) >= 1 && "
    "int(self.substring(self.lastIndexOf(':') + 1)) <= 65535)",
    message="the port of an inet: address must be 1..65535",
    check=lambda v: _milter_port_ok(str(v)),
)


def cidr_string(description: str = "A CIDR.") -> Schema:
    # maxLength bounds the CEL cost estimate (an IPv6 CIDR is at most 49 characters).
    return checked(string(description, pattern=CIDR_PATTERN, max_length=64), CIDR_RULE)


def return_code_string() -> Schema:
    return checked(
        string("A reply filter.", pattern=RETURN_CODE_PATTERN, max_length=64), RETURN_CODE_RULE
    )


# List bounds: the API server estimates each CEL rule's cost from them (an
# unbounded list of CIDRs costs more than a CRD may), so lists that carry
# rules have one, well above any real use.
MAX_CIDRS = 1000
MAX_RETURN_CODES = 32
MAX_DNSBL_SITES = 64
MAX_NAMESERVERS = 8


def _dig(obj_: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(obj_, dict):
            return None
        obj_ = obj_.get(key)
    return obj_


# --- shared pieces ---------------------------------------------------------------
DURATION = "A Postfix-style time: a number with a unit ms, s, m, h, d or w (e.g. 10d, 4000s)."

CONDITION = obj(
    "A status condition, shaped like metav1.Condition.",
    {
        "type": string("Condition type, e.g. Ready, Reconciled, Accepted."),
        "status": string("True, False or Unknown.", enum=["True", "False", "Unknown"]),
        "reason": string("A CamelCase reason."),
        "message": string("A human-readable explanation."),
        "observedGeneration": integer("The generation this condition was computed from."),
        "lastTransitionTime": {
            "type": "string",
            "format": "date-time",
            "description": "When the status last changed.",
        },
    },
    required=["type", "status"],
)
CONDITIONS = {
    **array("Conditions, written whole.", CONDITION),
    "x-kubernetes-list-type": "map",
    "x-kubernetes-list-map-keys": ["type"],
}

LABEL_SELECTOR = obj(
    "A Kubernetes LabelSelector.",
    {
        "matchLabels": string_map("Labels that must all match."),
        "matchExpressions": array(
            "Set-based requirements.",
            obj(
                "A label selector requirement.",
                {
                    "key": string("The label key."),
                    "operator": string(
                        "In, NotIn, Exists or DoesNotExist.",
                        enum=["In", "NotIn", "Exists", "DoesNotExist"],
                    ),
                    "values": array("Values for In and NotIn.", string("A value.")),
                },
                required=["key", "operator"],
            ),
        ),
    },
)

DNSBL_SITE = obj(
    "A DNSBL site, as Postfix's domain=filter*weight.",
    {
        "zone": string("The DNSBL zone queried with the reversed client IP.", pattern=FQDN_PATTERN),
        "returnCodes": array(
            "Reply filters d.d.d.d (each d a number or [a;b;c..d]); empty = any reply "
            "in 127.0.0.0/24 except the 127.255.255.x error codes.",
            return_code_string(),
            default=[],
            max_items=MAX_RETURN_CODES,
        ),
        "weight": integer(
            "Added to the score once when the site lists the client; negative allowlists.",
            default=1,
        ),
    },
    required=["zone"],
)

RBL_CLIENT = obj(
    "A reject_rbl_client entry.",
    {
        "zone": string("The RBL zone.", pattern=FQDN_PATTERN),
        "returnCodes": array(
            "Reply filters d.d.d.d; empty = any reply in 127.0.0.0/24 except 127.255.255.x.",
            return_code_string(),
            default=[],
            max_items=MAX_RETURN_CODES,
        ),
    },
    required=["zone"],
)


AUTHENTICATION = obj(
    "Sender authentication in the relay (OpenDKIM and OpenDMARC in verify mode): the results "
    "go in one Authentication-Results header with the relay's hostname as authserv-id "
    "(forged ones claiming it are removed).",
    {
        "dkim": obj(
            "DKIM signatures (RFC 6376).",
            {"enabled": boolean("Verify DKIM signatures.", default=False)},
            default={},
        ),
        "arc": obj(
            "ARC chains (RFC 8617).",
            {"enabled": boolean("Validate the ARC chain.", default=False)},
            default={},
        ),
        "dmarc": obj(
            "DMARC (RFC 7489) of the From domain, from the DKIM results and SPF's "
            "(when restrictions.spf ran).",
            {
                "enabled": boolean(
                    "Evaluate DMARC (the DKIM signatures are verified, and reported, for it "
                    "even without dkim.enabled).",
                    default=False,
                ),
                "enforce": string(
                    "What a DMARC fail does when the domain's policy asks for more than none: "
                    "none = only report; quarantine = hold p=quarantine and p=reject mail in the "
                    "queue; reject = 550 for p=reject, hold for p=quarantine.",
                    enum=values(DmarcEnforce),
                    default="none",
                ),
            },
            default={},
        ),
    },
    default={},
)

MILTER = obj(
    "A milter (Sendmail milter protocol 6), like an entry of Postfix smtpd_milters.",
    {
        "name": string(
            "Names the milter in logs and metrics.",
            pattern=r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$",
            max_length=63,
        ),
        "address": checked(
            string(
                "inet:host:port, inet:[ipv6]:port or unix:/path.",
                pattern=MILTER_ADDRESS_PATTERN,
                max_length=1024,
            ),
            MILTER_ADDRESS_RULE,
        ),
        "connectTimeout": string(
            "milter_connect_timeout: connecting and negotiating. " + DURATION,
            pattern=DURATION_PATTERN,
            default="30s",
        ),
        "commandTimeout": string(
            "milter_command_timeout: waiting for each answer. " + DURATION,
            pattern=DURATION_PATTERN,
            default="30s",
        ),
        "defaultAction": string(
            "milter_default_action: what a milter that is down, slow or broken means "
            "(tempfail: 451 4.7.1; accept: go on without it; reject: 550 5.7.1).",
            enum=values(MilterDefaultAction),
            default="tempfail",
        ),
    },
    required=["name", "address"],
)


# --- MailRelay ------------------------------------------------------------------
ALLOWED_NAMESPACES = checked(
    obj(
        "Namespaces whose RelayDomains may attach.",
        {
            "from": string(
                "Same: this namespace; All: any; Selector: those matching selector.",
                enum=values(NamespacesFrom),
                default="Same",
            ),
            "selector": LABEL_SELECTOR,
        },
        default={},
    ),
    Rule(
        path="",
        # has(): the API server also checks rules against the schema defaults ({}).
        cel="!has(self.from) || self.from != 'Selector' || has(self.selector)",
        message="selector is required when from is Selector",
        check=lambda o: o.get("from") != "Selector" or "selector" in o,
    ),
)
NEXT_HOP_ENTRY_RULE = Rule(
    path="",
    cel="has(self.cidr) != has(self.host)",
    message="set exactly one of cidr and host",
    check=lambda o: ("cidr" in o) != ("host" in o),
)
# The mail ports a tenant's next hop may use by default (SMTP, submissions, submission).
DEFAULT_NEXT_HOP_PORTS = (25, 465, 587)

RESOURCE_QUANTITY = {
    "x-kubernetes-int-or-string": True,
    "anyOf": [{"type": "integer"}, {"type": "string"}],
    "pattern": r"^[0-9]+(\.[0-9]+)?(m|Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$",
}
SPREAD = values(Spread)
TOLERATION = obj(
    "A core/v1 Toleration.",
    {
        "key": string("The taint key; empty with Exists matches every taint."),
        "operator": string("Exists or Equal.", enum=["Exists", "Equal"]),
        "value": string("The taint value (Equal)."),
        "effect": string(
            "NoSchedule, PreferNoSchedule or NoExecute; empty: all.",
            enum=["NoSchedule", "PreferNoSchedule", "NoExecute", ""],
        ),
        "tolerationSeconds": integer("How long a NoExecute taint is tolerated."),
    },
)
# The relay pods' scheduling, as the pod spec has it.
POD_SCHEDULING: dict[str, Schema] = {
    "resources": {
        **obj(
            "The relay container's core/v1 ResourceRequirements. The defaults come from "
            "the benchmarks (docs/benchmarks.md): about 1.4 ms of CPU per message, so "
            "250m carries some 180 messages/s, and 68 MB peak for a relay with two "
            "workers, so 128Mi requested; the 512Mi limit leaves room for a large "
            "recipient table. With requests the pod is Burstable, not BestEffort (the "
            "first evicted under pressure, with mail on board).",
            {
                "requests": {
                    "type": "object",
                    "description": "Requested cpu and memory.",
                    "additionalProperties": RESOURCE_QUANTITY,
                },
                "limits": {
                    "type": "object",
                    "description": "Limits; a cpu limit also sets the workers of `auto`.",
                    "additionalProperties": RESOURCE_QUANTITY,
                },
            },
        ),
        "default": {"requests": {"cpu": "250m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}},
    },
    "workers": checked(
        {
            "x-kubernetes-int-or-string": True,
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "description": "Relay worker processes per pod: auto (the CPUs the container "
            "may use: its cpu limit, else its request, rounded up) or a number.",
            "default": "auto",
        },
        Rule(
            path="",
            cel="type(self) == int ? (self >= 1 && self <= 64) : self == 'auto'",
            message="must be auto or a number 1..64",
            check=lambda v: (
                v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 64)
            ),
        ),
    ),
    "affinity": obj(
        "Where relay pods may run.",
        {
            "nodeSelector": string_map("Node labels the pods' nodes must have."),
            "tolerations": array("Taints the pods tolerate.", TOLERATION, max_items=32),
            "nodeAffinity": {
                "type": "object",
                "description": "A core/v1 NodeAffinity, passed to the pods as written.",
                "x-kubernetes-preserve-unknown-fields": True,
            },
        },
        default={},
    ),
    "priorityClassName": string(
        "The pods' PriorityClass: a relay holds queued mail, so rank it above "
        "workloads that can be restarted anywhere.",
        pattern=K8S_NAME_PATTERN,
        max_length=253,
    ),
    "imagePullSecrets": array(
        "Secrets (in this namespace) to pull the relay image with.",
        obj("A Secret reference.", {"name": string("The Secret's name.")}, required=["name"]),
        max_items=16,
    ),
    "spread": obj(
        "How relay pods spread across zones and hosts. Preferred: the scheduler tries "
        "(whenUnsatisfiable: ScheduleAnyway); Required: a pod waits rather than share a "
        "zone or host while another is free (DoNotSchedule, with minDomains: two zones, "
        "a host per pod).",
        {
            "zones": string("topology.kubernetes.io/zone.", enum=SPREAD, default="Preferred"),
            "hosts": string("kubernetes.io/hostname.", enum=SPREAD, default="Preferred"),
        },
        default={},
    ),
}

MX_ENTRY = obj(
    "One MX host: a Service on port 25 in front of the relay pods.",
    {
        "hostname": string("The MX host name published in DNS.", pattern=FQDN_PATTERN),
        "priority": integer("The MX preference.", minimum=0, maximum=65535),
        "service": obj(
            "Passed to the Service.",
            {
                "type": string(
                    "The Service type.",
                    enum=values(ServiceType),
                    default="LoadBalancer",
                ),
                "externalTrafficPolicy": string(
                    "Local keeps the client IP.", enum=values(TrafficPolicy), default="Local"
                ),
                "annotations": string_map(
                    "Annotations for the Service (external-dns, LB options)."
                ),
                "loadBalancerClass": string("The Service's loadBalancerClass."),
                "loadBalancerSourceRanges": array(
                    "CIDRs allowed through the load balancer.",
                    cidr_string(),
                    max_items=MAX_CIDRS,
                ),
            },
            default={},
        ),
        "pods": checked(
            obj(
                "Only these relay pods serve this MX (a backup MX in its own failure "
                "domain): those with one of the ordinals or in one of the zones. Unset: "
                "every pod.",
                {
                    "ordinals": array(
                        "StatefulSet ordinals (0 is <relay>-0).",
                        integer("An ordinal.", minimum=0, maximum=99),
                        max_items=100,
                    ),
                    "zones": array(
                        "Values of the nodes' topology.kubernetes.io/zone label.",
                        string("A zone.", max_length=63),
                        max_items=16,
                    ),
                },
            ),
            Rule(
                path="",
                cel="(has(self.ordinals) && size(self.ordinals) > 0) || "
                "(has(self.zones) && size(self.zones) > 0)",
                message="name at least one ordinal or zone (or leave pods out: every pod)",
                check=lambda o: bool(o.get("ordinals") or o.get("zones")),
            ),
        ),
    },
    required=["hostname", "priority"],
)

MAILRELAY_SPEC = obj(
    "One relay tier: the pods, their Services, their policy.",
    {
        "hostname": string("Banner and HELO name (Postfix myhostname).", pattern=FQDN_PATTERN),
        "replicas": integer("Relay pods.", minimum=0, maximum=100, default=2),
        "image": string("The relay image; empty = the operator's default."),
        "mx": array(
            "One Service per entry, port 25 to the pods. Empty: one entry with spec.hostname "
            "at priority 10.",
            MX_ENTRY,
            default=[],
            max_items=16,  # bounds the cost of the uniqueness CEL rule
        ),
        "allowedDomains": obj(
            "Which RelayDomains may attach, and which domains they may claim (Gateway "
            "API style). An accepted claim is sticky: status.domains records its holder, "
            "and no other RelayDomain gets the domain until the holder has been gone for "
            "releaseAfter.",
            {
                "namespaces": ALLOWED_NAMESPACES,
                "grants": array(
                    "Who may claim which domains. Empty: any domain, from the namespaces "
                    "above. Otherwise a RelayDomain is accepted only when a grant for its "
                    "namespace matches its domain, and `namespaces` above is not used.",
                    obj(
                        "Namespaces and the domains they may claim.",
                        {
                            "namespaces": ALLOWED_NAMESPACES,
                            "domains": array(
                                'Domain names, "*.suffix" (any name under suffix, not '
                                'suffix itself) or "*" (every domain).',
                                string("A domain or pattern.", pattern=DOMAIN_GRANT_PATTERN),
                                max_items=256,
                            ),
                        },
                        required=["domains"],
                    ),
                    default=[],
                    max_items=64,
                ),
                "releaseAfter": string(
                    "How long a domain stays with its holder after the holder's RelayDomain "
                    "is gone (deleted, or no longer allowed); re-created under the same "
                    "namespace and name within this time, it gets the domain back. " + DURATION,
                    pattern=DURATION_PATTERN,
                    default="1h",
                ),
            },
            default={},
        ),
        "allowedNextHops": array(
            "Where RelayDomains may send mail: an entry with cidr or host, and its ports. "
            "Empty: RelayDomains in this MailRelay's namespace may use any next hop; those "
            "of other namespaces only hosts outside the cluster (not a cluster-internal name, "
            "not an address in the operator's cluster ranges, loopback or link-local) on "
            "ports 25, 465 and 587. A RelayDomain whose nextHop is not allowed is not "
            "Accepted (NextHopNotAllowed).",
            checked(
                obj(
                    "A next-hop range or host pattern and its ports.",
                    {
                        "cidr": cidr_string("Next-hop addresses (nextHop.host an IP)."),
                        "host": string(
                            'A host name or "*.suffix" (nextHop.host a name; with mxLookup '
                            "the domain whose MX is looked up).",
                            pattern=HOST_GRANT_PATTERN,
                            max_length=253,
                        ),
                        "ports": array(
                            "Allowed ports.",
                            integer("A port.", minimum=1, maximum=65535),
                            default=list(DEFAULT_NEXT_HOP_PORTS),
                            max_items=16,
                        ),
                    },
                ),
                NEXT_HOP_ENTRY_RULE,
            ),
            default=[],
            max_items=64,
        ),
        **POD_SCHEDULING,
        "storage": obj(
            "The queue PVC of each pod.",
            {
                "size": string("Requested size.", pattern=QUANTITY_PATTERN, default="10Gi"),
                "storageClassName": string("StorageClass; null = the default.", nullable=True),
            },
            default={},
        ),
        "tls": obj(
            "STARTTLS certificate: a cert-manager Certificate, or an existing Secret.",
            {
                "issuerRef": obj(
                    "cert-manager issuer for the MX host names.",
                    {
                        "kind": string(
                            "Issuer or ClusterIssuer.",
                            enum=values(IssuerKind),
                            default="ClusterIssuer",
                        ),
                        "name": string("The issuer's name."),
                        "group": string("The issuer's API group.", default="cert-manager.io"),
                    },
                    required=["name"],
                ),
                "secretName": string(
                    "An existing kubernetes.io/tls Secret (or the Certificate's target name).",
                    default="",
                ),
            },
            default={},
        ),
        "proxyProtocol": obj(
            "HAProxy PROXY protocol v1/v2 from trusted load balancers.",
            {
                "enabled": boolean("Expect a PROXY header on the proxy port.", default=False),
                "trustedCIDRs": array(
                    "Only these peers may send a PROXY header.",
                    cidr_string(),
                    default=[],
                    max_items=MAX_CIDRS,
                ),
            },
            default={},
        ),
        "network": obj(
            "Which clients are trusted or refused.",
            {
                "mynetworks": array(
                    "Trusted clients (skip spam checks); default: none at all.",
                    cidr_string(),
                    default=[],
                    max_items=MAX_CIDRS,
                ),
                "clientAccess": array(
                    "Postfix check_client_access cidr table: first match wins.",
                    obj(
                        "A CIDR and what to do with it.",
                        {
                            "cidr": cidr_string(),
                            "action": string("permit or reject.", enum=values(ClientAction)),
                        },
                        required=["cidr", "action"],
                    ),
                    default=[],
                    max_items=MAX_CIDRS,
                ),
            },
            default={},
        ),
        "limits": obj(
            "Size and count limits.",
            {
                "messageSize": integer(
                    "Bytes; advertised with SIZE.", minimum=1024, default=25600000
                ),
                "recipientsPerMessage": integer("smtpd_recipient_limit.", minimum=1, default=1000),
                "connectionsPerClient": integer(
                    "Concurrent connections per client IP (0 = unlimited).", minimum=0, default=50
                ),
                "connectionRatePerClient": integer(
                    "New connections per client IP per rateTimeUnit "
                    "(smtpd_client_connection_rate_limit; 0 = off). 421 when over.",
                    minimum=0,
                    default=0,
                ),
                "messageRatePerClient": integer(
                    "MAIL FROM per client IP per rateTimeUnit "
                    "(smtpd_client_message_rate_limit; 0 = off). 450 4.7.1 when over.",
                    minimum=0,
                    default=0,
                ),
                "recipientRatePerClient": integer(
                    "RCPT TO per client IP per rateTimeUnit "
                    "(smtpd_client_recipient_rate_limit; 0 = off). 450 4.7.1 when over.",
                    minimum=0,
                    default=0,
                ),
                "rateTimeUnit": string(
                    "The window the rates are counted in (anvil_rate_time_unit). " + DURATION,
                    pattern=DURATION_PATTERN,
                    default="60s",
                ),
                "errorsPerSession": integer(
                    "Errors before a session is closed with 421 (smtpd_hard_error_limit).",
                    minimum=1,
                    default=20,
                ),
            },
            default={},
        ),
        "queue": obj(
            "Retry schedule and lifetime.",
            {
                "lifetime": string(
                    "maximal_queue_lifetime. " + DURATION, pattern=DURATION_PATTERN, default="10d"
                ),
                "minBackoff": string(
                    "minimal_backoff_time. " + DURATION, pattern=DURATION_PATTERN, default="5m"
                ),
                "maxBackoff": string(
                    "maximal_backoff_time. " + DURATION, pattern=DURATION_PATTERN, default="4000s"
                ),
                "dsnOnExpiry": string(
                    "Who is told when mail expires in the queue: sender (a DSN to the "
                    "envelope sender, as Postfix does) or none (log only: no backscatter "
                    "to forged senders from a backup MX).",
                    enum=values(DsnOnExpiry),
                    default="sender",
                ),
            },
            default={},
        ),
        "bounces": obj(
            "Delivery status notifications (DSNs) this relay writes when mail bounces or "
            "expires, and the relayed notice a client asks for with NOTIFY=SUCCESS when the "
            "next hop does not offer DSN; a recipient whose NOTIFY leaves out FAILURE (e.g. "
            "NOTIFY=NEVER) gets no bounce (RFC 3461, as Postfix). They come from the null "
            "sender and are never bounced themselves: one that cannot be delivered is "
            "dropped and logged.",
            {
                "delivery": string(
                    "mx (to the sender's domain by its MX records, opportunistic TLS, as "
                    "Postfix does), relayDomainsOnly (only to senders in this relay's "
                    "domains, through their next hop) or none (log only).",
                    enum=values(BounceDelivery),
                    default="mx",
                ),
                "lifetime": string(
                    "bounce_queue_lifetime: how long a message from the null sender (a "
                    "DSN) is retried before it is dropped. " + DURATION,
                    pattern=DURATION_PATTERN,
                    default="5d",
                ),
            },
            default={},
        ),
        "scaleDown": obj(
            "How pods leave when spec.replicas goes down: each leaving pod stops taking "
            "mail, delivers what it can and hands the rest of its queue over to a pod that "
            "stays; the StatefulSet shrinks only once their queues are empty.",
            {
                "drainTimeout": string(
                    "How long the operator waits for the leaving pods' queues to empty. "
                    + DURATION,
                    pattern=DURATION_PATTERN,
                    default="15m",
                ),
                "onTimeout": string(
                    "After drainTimeout: Wait (keep the pods and say so in the status; no "
                    "mail is left behind) or Proceed (remove them anyway; what they still "
                    "hold stays on their retained volumes until the replicas come back).",
                    enum=values(OnTimeout),
                    default="Wait",
                ),
            },
            default={},
        ),
        "postscreen": obj(
            "Connection-time tests before the SMTP session (Postfix postscreen).",
            {
                "greet": obj(
                    "The pregreet test.",
                    {
                        "action": string(
                            "ignore | enforce | drop.",
                            enum=values(ScreenAction),
                            default="enforce",
                        ),
                        "wait": string(
                            "How long to wait after the 220- teaser. " + DURATION,
                            pattern=DURATION_PATTERN,
                            default="6s",
                        ),
                    },
                    default={},
                ),
                "denylist": obj(
                    "What happens to a client that network.clientAccess rejects "
                    "(postscreen_denylist_action).",
                    {
                        "action": string(
                            "ignore (Postfix's default: the RCPT check still answers 554) | "
                            "enforce (550 5.3.2 on every RCPT) | drop (521 5.3.2, disconnect).",
                            enum=values(ScreenAction),
                            default="ignore",
                        ),
                    },
                    default={},
                ),
                "dnsbl": obj(
                    "Weighted DNSBL scoring.",
                    {
                        "action": string(
                            "ignore | enforce | drop.",
                            enum=values(ScreenAction),
                            default="enforce",
                        ),
                        "threshold": integer("Fail at score >= threshold.", default=1),
                        "allowlistThreshold": integer(
                            "Score at or below this skips all other tests (0 = off; negative "
                            "turns it on).",
                            default=0,
                        ),
                        "sites": array(
                            "DNSBL sites and weights.",
                            DNSBL_SITE,
                            default=[],
                            max_items=MAX_DNSBL_SITES,
                        ),
                    },
                    default={},
                ),
            },
            default={},
        ),
        "restrictions": obj(
            "Checks at RCPT, in the seed setup's order.",
            {
                "rejectUnauthPipelining": boolean("reject_unauth_pipelining.", default=True),
                "rejectNonFqdnRecipient": boolean("reject_non_fqdn_recipient.", default=True),
                "rejectUnknownRecipientDomain": boolean(
                    "reject_unknown_recipient_domain.", default=True
                ),
                "rejectUnknownReverseClientHostname": boolean(
                    "reject_unknown_reverse_client_hostname.", default=True
                ),
                "rblClients": array(
                    "reject_rbl_client entries.", RBL_CLIENT, default=[], max_items=MAX_DNSBL_SITES
                ),
                "spf": obj(
                    "SPF checks with spf-engine's semantics.",
                    {
                        "enabled": boolean("Check SPF.", default=True),
                        "heloReject": string(
                            "spf-engine HELO_reject.", enum=values(SpfReject), default="Fail"
                        ),
                        "mailFromReject": string(
                            "spf-engine Mail_From_reject.",
                            enum=values(SpfMailFromReject),
                            default="Fail",
                        ),
                        "permErrorReject": boolean("Reject Permerror.", default=False),
                        "tempErrorDefer": boolean("Defer Temperror.", default=False),
                        "skipAddresses": array(
                            "Clients never checked.",
                            cidr_string(),
                            default=["127.0.0.0/8", "::ffff:127.0.0.0/104", "::1"],
                            max_items=MAX_CIDRS,
                        ),
                    },
                    default={},
                ),
                "greylist": obj(
                    "Greylisting, as postgrey does it behind Postfix's check_policy_service "
                    "(opt-in): the first attempt of a triplet (the client's network: IPv4 /24, "
                    "IPv6 /64; the sender; the recipient) is answered 450 4.2.0, a retry after "
                    "delay and within retryWindow passes and the triplet is remembered for ttl. "
                    "mynetworks and clientAccess permit are never greylisted. The state is on "
                    "the queue volume, shared by the pod's worker processes, kept across "
                    "restarts.",
                    {
                        "enabled": boolean("Greylist at RCPT.", default=False),
                        "delay": string(
                            "How long a new triplet is deferred (postgrey --delay, 300s). "
                            + DURATION,
                            pattern=DURATION_PATTERN,
                            default="300s",
                        ),
                        "retryWindow": string(
                            "How long after the first attempt a retry still counts (postgrey "
                            "--retry-window, 2d); later, the triplet starts over. " + DURATION,
                            pattern=DURATION_PATTERN,
                            default="2d",
                        ),
                        "ttl": string(
                            "How long a triplet that passed is remembered after its last mail "
                            "(postgrey --max-age, 35d). " + DURATION,
                            pattern=DURATION_PATTERN,
                            default="35d",
                        ),
                        "skipAllowlisted": boolean(
                            "Clients postscreen allowlisted (a clientAccess permit, a DNSBL score "
                            "at or below allowlistThreshold) are not greylisted.",
                            default=True,
                        ),
                        "autoAllowlistClients": integer(
                            "postgrey --auto-whitelist-clients (5): a client network (IPv4 /24, "
                            "IPv6 /64) whose mail passed greylisting this many times is no longer "
                            "greylisted, for any sender or recipient, until it sends no mail for "
                            "ttl. A pass is a triplet retried after delay, or a remembered "
                            "triplet's mail at most once an hour. 0: off.",
                            minimum=0,
                            maximum=1000,
                            default=5,
                        ),
                    },
                    default={},
                ),
            },
            default={},
        ),
        "contentFilters": obj(
            "Checks on the message content.",
            {
                "rejectAttachmentExtensions": array(
                    "File name extensions (no dot, any case) rejected in any MIME part.",
                    string("An extension.", pattern=r"^[A-Za-z0-9_-]{1,32}$"),
                    default=["bat", "com", "exe", "jar", "pif", "scr", "swf"],
                ),
                "milters": array(
                    "Milters applied in order (Postfix smtpd_milters): events at connect, "
                    "HELO, MAIL, RCPT, the message as it streams in, end of message.",
                    MILTER,
                    default=[],
                    max_items=16,
                ),
                "authentication": AUTHENTICATION,
            },
            default={},
        ),
        "dns": obj(
            "The resolver for DNSBL, RBL, PTR, SPF and MX lookups.",
            {
                "nameservers": array(
                    '"ip" or "ip:port"; empty = the pod\'s resolver.',
                    checked(
                        string("A name server.", pattern=NAMESERVER_PATTERN, max_length=64),
                        NAMESERVER_RULE,
                    ),
                    default=[],
                    max_items=MAX_NAMESERVERS,
                ),
                "timeout": string(
                    "Per-query timeout. " + DURATION, pattern=DURATION_PATTERN, default="5s"
                ),
            },
            default={},
        ),
        "logging": obj(
            "The relay's log lines (on stderr). Applied at start and on every reload; "
            "`mailrelay relay --log-format/--log-level` override it.",
            {
                "format": string(
                    "text: one line per event, greppable like Postfix's, with the level "
                    "and the component; json: one JSON object per line (time, level, "
                    "component, pid, message, queue_id) for log pipelines.",
                    enum=values(LogFormat),
                    default="text",
                ),
                "level": string(
                    "The least severe lines written; debug is verbose.",
                    enum=values(LogLevel),
                    default="info",
                ),
            },
            default={},
        ),
    },
    required=["hostname"],
)

MAILRELAY_STATUS = obj(
    "Observed state, written by the operator.",
    {
        "observedGeneration": integer("The generation last reconciled."),
        "conditions": CONDITIONS,
        "replicas": integer("Pods the StatefulSet has."),
        "readyReplicas": integer("Pods ready."),
        "acceptedDomains": integer("RelayDomains attached."),
        "domains": array(
            "Who holds each accepted domain (sticky claims; see spec.allowedDomains). Over "
            "10,000 domains only the claims of gone holders; every claim is then in the "
            "ConfigMaps <relay>-claims-N (a status that large would exceed etcd's request size).",
            obj(
                "A domain and its holder.",
                {
                    "domain": string("The domain."),
                    "holder": string("The RelayDomain holding it, as namespace/name."),
                    "goneSince": string(
                        "When the holder was last seen gone (deleted or no longer "
                        "allowed); the claim is released releaseAfter later."
                    ),
                },
                required=["domain", "holder"],
            ),
        ),
        "recipients": integer("Recipient addresses in the rendered tables."),
        "configHash": string("Hash of the rendered configuration."),
        "mxRecords": array("MX records to publish.", string("An MX record.")),
        "mxRecordsOmittedDomains": integer(
            "Accepted domains left out of mxRecords (it lists the first 100); "
            "they take the same MX hosts."
        ),
    },
)

MAILRELAY_RULES = [
    Rule(
        path="spec.mx",
        # Without case, as DNS compares names (and as the Python check does).
        cel="self.all(a, self.exists_one(b, b.hostname.lowerAscii() == a.hostname.lowerAscii()))",
        message="each mx hostname may appear only once (whatever its case)",
        check=lambda o: len({str(m.get("hostname", "")).lower() for m in o}) == len(o),
    ),
    Rule(
        path="spec.contentFilters.milters",
        cel="self.all(a, self.exists_one(b, b.name == a.name))",
        message="each milter name may appear only once",
        check=lambda o: len({str(m.get("name", "")) for m in o}) == len(o),
    ),
    Rule(
        path="spec.proxyProtocol",
        cel="!has(self.enabled) || !self.enabled || "
        "(has(self.trustedCIDRs) && size(self.trustedCIDRs) > 0)",
        message="trustedCIDRs must name the load balancers when enabled is true",
        check=lambda o: not o.get("enabled") or bool(o.get("trustedCIDRs")),
    ),
]

# --- RelayDomain ------------------------------------------------------------------
RELAYDOMAIN_SPEC = obj(
    "A domain this relay accepts, and where its mail goes.",
    {
        "domain": immutable(
            string("The mail domain; immutable.", pattern=FQDN_PATTERN), "spec.domain"
        ),
        "relayRef": immutable(
            obj(
                "The MailRelay to attach to; immutable.",
                {
                    "name": string("The MailRelay's name.", pattern=K8S_NAME_PATTERN),
                    "namespace": string(
                        "Its namespace; defaults to this object's own.",
                        pattern=DNS_LABEL_PATTERN,
                    ),
                },
                required=["name"],
            ),
            "spec.relayRef",
        ),
        "nextHop": obj(
            "Where accepted mail is forwarded (Postfix transport smtp:[host]:port).",
            {
                "host": string("Next-hop host name or IP.", pattern=HOSTNAME_PATTERN),
                "port": integer("Next-hop port.", minimum=1, maximum=65535, default=25),
                "mxLookup": boolean(
                    "true = look up MX records of host (Postfix smtp:host).", default=False
                ),
                "tls": string(
                    "none | may | encrypt | verify.",
                    enum=values(TlsMode),
                    default="may",
                ),
            },
            required=["host"],
        ),
        "recipients": string(
            "listed = only RecipientList addresses; any = every address @domain; verify = "
            "the addresses the next hop accepts, asked at RCPT time with a probe (MAIL FROM:<>, "
            "RCPT TO, no DATA) and cached (Postfix reject_unverified_recipient).",
            enum=values(RecipientsMode),
            default="listed",
        ),
        "verify": obj(
            "The probe cache of recipients: verify (verify(8)).",
            {
                "positiveTTL": string(
                    "How long an address the next hop accepted is known good "
                    "(address_verify_positive_expire_time; Postfix 31d). " + DURATION,
                    pattern=DURATION_PATTERN,
                    default="31d",
                ),
                "negativeTTL": string(
                    "How long an address the next hop refused with 5xx is refused with 550 "
                    "(address_verify_negative_expire_time; Postfix 3d, shorter here: a "
                    "mailbox created on the primary is reachable within it). " + DURATION,
                    pattern=DURATION_PATTERN,
                    default="1h",
                ),
                "whenUnreachable": string(
                    "When the probe gets no definite answer (next hop down, 4xx): defer "
                    "(450 4.1.1, the sender retries) or accept (queue it, as recipients: any).",
                    enum=values(WhenUnreachable),
                    default="defer",
                ),
            },
            default={},
        ),
    },
    required=["domain", "relayRef", "nextHop"],
)

RELAYDOMAIN_STATUS = obj(
    "Observed state.",
    {
        "observedGeneration": integer("The generation last reconciled."),
        "conditions": CONDITIONS,
        "recipients": integer("Addresses merged from RecipientLists."),
    },
)

# --- RecipientList ------------------------------------------------------------------
RECIPIENTLIST_SPEC = obj(
    "The addresses a listed domain accepts.",
    {
        "domainRef": obj(
            "A RelayDomain in the same namespace.",
            {"name": string("The RelayDomain's name.", pattern=K8S_NAME_PATTERN)},
            required=["name"],
        ),
        "addresses": array(
            "Recipient addresses (matched case-insensitively).",
            string("An address.", pattern=ADDRESS_PATTERN, max_length=320),
            default=[],
        ),
    },
    required=["domainRef"],
)

RECIPIENTLIST_STATUS = obj(
    "Observed state.",
    {
        "observedGeneration": integer("The generation last reconciled."),
        "conditions": CONDITIONS,
    },
)


@dataclass(frozen=True)
class Kind:
    kind: str
    plural: str
    singular: str
    short_names: list[str]
    spec: Schema
    status: Schema
    rules: list[Rule]
    printer_columns: list[dict[str, Any]]


AGE_COLUMN = {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}


def _condition_column(name: str, ctype: str, field: str = "status") -> dict[str, Any]:
    return {
        "name": name,
        "type": "string",
        "jsonPath": f".status.conditions[?(@.type=='{ctype}')].{field}",
    }


KINDS: dict[str, Kind] = {
    "MailRelay": Kind(
        kind="MailRelay",
        plural="mailrelays",
        singular="mailrelay",
        short_names=["mr"],
        spec=MAILRELAY_SPEC,
        status=MAILRELAY_STATUS,
        rules=MAILRELAY_RULES,
        printer_columns=[
            {"name": "Hostname", "type": "string", "jsonPath": ".spec.hostname"},
            {"name": "Replicas", "type": "integer", "jsonPath": ".spec.replicas"},
            {"name": "Ready", "type": "integer", "jsonPath": ".status.readyReplicas"},
            {"name": "Domains", "type": "integer", "jsonPath": ".status.acceptedDomains"},
            _condition_column("Status", "Ready", "reason"),
            AGE_COLUMN,
        ],
    ),
    "RelayDomain": Kind(
        kind="RelayDomain",
        plural="relaydomains",
        singular="relaydomain",
        short_names=["rd"],
        spec=RELAYDOMAIN_SPEC,
        status=RELAYDOMAIN_STATUS,
        rules=[],
        printer_columns=[
            {"name": "Domain", "type": "string", "jsonPath": ".spec.domain"},
            {"name": "Relay", "type": "string", "jsonPath": ".spec.relayRef.name"},
            {"name": "Next hop", "type": "string", "jsonPath": ".spec.nextHop.host"},
            _condition_column("Accepted", "Accepted"),
            _condition_column("Reason", "Accepted", "reason"),
            AGE_COLUMN,
        ],
    ),
    "RecipientList": Kind(
        kind="RecipientList",
        plural="recipientlists",
        singular="recipientlist",
        short_names=["rl"],
        spec=RECIPIENTLIST_SPEC,
        status=RECIPIENTLIST_STATUS,
        rules=[],
        printer_columns=[
            {"name": "Domain", "type": "string", "jsonPath": ".spec.domainRef.name"},
            AGE_COLUMN,
        ],
    ),
}


def namespace_of(obj: Mapping[str, Any]) -> str:
    """An object's namespace; "default" when its manifest names none."""
    return str(obj["metadata"].get("namespace") or "default")


def name_of(obj: Mapping[str, Any]) -> str:
    return str(obj["metadata"]["name"])


def _place_rules(schema: Schema, rules: list[Rule]) -> Schema:
    """Returns a copy of the object schema with each rule's CEL at its path."""
    import copy

    root = copy.deepcopy(schema)
    for rule in rules:
        node = root
        for key in rule.path.split(".")[1:]:  # path starts at "spec"
            node = node["properties"][key]
        node.setdefault("x-kubernetes-validations", []).append(
            {"rule": rule.cel, "message": rule.message}
        )
    return root


def openapi_schema(kind: str) -> Schema:
    """The openAPIV3Schema of a kind, as it goes into the CRD."""
    k = KINDS[kind]
    return {
        "type": "object",
        "description": f"{k.kind} ({API_VERSION}).",
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": _place_rules(k.spec, k.rules),
            "status": k.status,
        },
        "required": ["spec"],
    }


def crd(kind: str) -> dict[str, Any]:
    """The CustomResourceDefinition of a kind."""
    k = KINDS[kind]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{k.plural}.{GROUP}",
            "labels": {"app.kubernetes.io/part-of": "mailrelay"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": k.kind,
                "listKind": f"{k.kind}List",
                "plural": k.plural,
                "singular": k.singular,
                "shortNames": k.short_names,
                # Not "mailrelay": a category named like the MailRelay singular
                # makes `kubectl get mailrelay NAME` expand to all three kinds.
                "categories": ["mail"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": k.printer_columns,
                    "schema": {"openAPIV3Schema": openapi_schema(kind)},
                }
            ],
        },
    }
