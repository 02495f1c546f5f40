"""Offline checks of manifests against the CRD schemas, and structural defaulting.

The same schemas as the CRDs (mailrelay_api.schema); errors name the field
the way the API server does: `spec.limits.messageSize: must be >= 1024`.

Warnings (`manifest_warnings`) are what the schema lets through and the
relay then ignores: addresses outside their RecipientList's domain, a
RecipientList of a domain that is not `listed`, a reply filter range that
runs backwards; and a RecipientList too big for one object.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import jsonschema

from mailrelay_api import schema as S
from mailrelay_api.shards import RECIPIENT_LIST_ADVISE_BYTES, foreign_addresses, listed_bytes


@dataclass(frozen=True)
class ManifestError:
    """An error or a warning: where (file#document, object, field) and what."""

    source: str  # file name (and document index) or object reference
    field: str  # dotted path, "" for the whole object
    message: str
    document: str = ""  # "Kind namespace/name", when known

    def __str__(self) -> str:
        where = [self.source, self.document, self.field]
        return ": ".join([*(w for w in where if w), self.message])


def _to_json_schema(node: Any) -> Any:
    """OpenAPI v3 (structural) -> JSON Schema: `nullable` becomes a null type."""
    if isinstance(node, dict):
        out = {k: _to_json_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes")}
        if out.pop("nullable", False) and "type" in out:
            out["type"] = [out["type"], "null"]
        if (
            out.get("type") == "object"
            and "properties" in out
            and "additionalProperties" not in out
        ):
            # The API server prunes unknown fields; offline we say so instead.
            out["additionalProperties"] = False
        return out
    if isinstance(node, list):
        return [_to_json_schema(v) for v in node]
    return node


_VALIDATORS: dict[str, jsonschema.Draft202012Validator] = {}


def _validator(kind: str) -> jsonschema.Draft202012Validator:
    if kind not in _VALIDATORS:
        js = _to_json_schema(S.openapi_schema(kind))
        js["properties"]["metadata"] = {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "pattern": S.K8S_NAME_PATTERN, "maxLength": 253},
                "namespace": {"type": "string", "pattern": S.DNS_LABEL_PATTERN, "maxLength": 63},
            },
        }
        js["required"] = ["apiVersion", "kind", "metadata", "spec"]
        _VALIDATORS[kind] = jsonschema.Draft202012Validator(js)
    return _VALIDATORS[kind]


_PATTERN_NAMES = {
    S.FQDN_PATTERN: "a fully-qualified domain name such as mx1.example.net",
    S.HOSTNAME_PATTERN: "a host name or IP address",
    S.ADDRESS_PATTERN: "a plain address such as joe@example.com",
    S.CIDR_PATTERN: "a CIDR such as 192.0.2.0/24",
    S.NAMESERVER_PATTERN: 'a name server "ip" or "ip:port"',
    S.DURATION_PATTERN: "a time such as 10d, 4000s or 5m",
    S.RETURN_CODE_PATTERN: "a reply filter such as 127.0.0.2 or 127.0.0.[2..11]",
    S.QUANTITY_PATTERN: "a quantity such as 10Gi",
    S.DNS_LABEL_PATTERN: "a DNS label (lowercase letters, digits, -)",
    S.K8S_NAME_PATTERN: "a Kubernetes object name (lowercase letters, digits, -, .)",
}


def _path(parts: Any) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _message(err: jsonschema.ValidationError) -> str:
    v = err.validator
    if v == "required":
        return str(err.message).replace("is a required property", "is required")
    if v == "additionalProperties":
        return str(err.message).replace("Additional properties are not allowed", "unknown field")
    if v == "enum":
        return f"must be one of {', '.join(map(str, err.validator_value))}, not {err.instance!r}"
    if v == "pattern":
        expected = _PATTERN_NAMES.get(
            err.validator_value, f"a value matching {err.validator_value}"
        )
        return f"{err.instance!r} is not valid: expected {expected}"
    if v == "type":
        return f"must be of type {err.validator_value}, not {type(err.instance).__name__}"
    if v == "minimum":
        return f"must be >= {err.validator_value}"
    if v == "maximum":
        return f"must be <= {err.validator_value}"
    return str(err.message)


def apply_defaults(schema: S.Schema, value: Any) -> Any:
    """Fills in schema defaults, as the API server's structural defaulting does."""
    if not isinstance(schema, dict):
        return value
    if schema.get("type") == "object" and isinstance(value, dict):
        for key, sub in schema.get("properties", {}).items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                value[key] = apply_defaults(sub, value[key])
    elif schema.get("type") == "array" and isinstance(value, list):
        value[:] = [apply_defaults(schema["items"], v) for v in value]
    return value


def _node_rules(schema: S.Schema, value: Any, path: str) -> list[tuple[str, str]]:
    """The CEL rules written on schema nodes (S.checked), checked in Python."""
    problems: list[tuple[str, str]] = []
    if not isinstance(schema, dict) or value is None:
        return problems
    for v in schema.get("x-kubernetes-validations", []):
        rule = S.NODE_RULES.get(v["rule"])
        if rule is not None and not rule.check(value):
            problems.append(
                (path, f"{value!r}: {rule.message}" if isinstance(value, str) else rule.message)
            )
    if schema.get("type") == "object" and isinstance(value, dict):
        for key, sub in (schema.get("properties") or {}).items():
            if key in value:
                problems += _node_rules(sub, value[key], f"{path}.{key}")
    elif schema.get("type") == "array" and isinstance(value, list):
        for i, item in enumerate(value):
            problems += _node_rules(schema["items"], item, f"{path}[{i}]")
    return problems


def _semantic_checks(kind: str, obj: dict[str, Any]) -> list[tuple[str, str]]:
    """What a pattern cannot check: the CEL rules of the CRD, run in Python."""
    spec = obj.get("spec") or {}
    problems = _node_rules(S.KINDS[kind].spec, spec, "spec")
    for rule in S.KINDS[kind].rules:
        node: Any = obj
        for key in rule.path.split("."):
            node = node.get(key) if isinstance(node, dict) else None
        if node is not None and not rule.check(node):
            problems.append((rule.path, rule.message))
    return problems


_ADDRESS = S.RECIPIENTLIST_SPEC["properties"]["addresses"]["items"]
_ADDRESS_MATCH = re.compile(_ADDRESS["pattern"]).match


def _without_plain_addresses(obj: dict[str, Any]) -> dict[str, Any]:
    """The object minus spec.addresses when every address passes the item schema
    (pattern, maxLength): jsonschema takes seconds over 200,000 of them, this
    check a tenth of that. Else the object itself, for jsonschema's messages."""
    spec = obj.get("spec")
    if not isinstance(spec, dict) or not isinstance(spec.get("addresses"), list):
        return obj
    addresses = spec["addresses"]
    limit = _ADDRESS["maxLength"]
    for a in addresses:
        if not isinstance(a, str) or len(a) > limit or _ADDRESS_MATCH(a) is None:
            return obj
    return {**obj, "spec": {**spec, "addresses": []}}


def validate_object(obj: dict[str, Any], source: str = "") -> list[ManifestError]:
    """Schema errors of one mailrelay.io object (after defaults are applied)."""
    kind = obj.get("kind")
    if obj.get("apiVersion") != S.API_VERSION or kind not in S.KINDS:
        return [
            ManifestError(
                source,
                "apiVersion" if obj.get("apiVersion") != S.API_VERSION else "kind",
                f"not a {S.API_VERSION} MailRelay, RelayDomain or RecipientList",
            )
        ]
    checked = _without_plain_addresses(obj) if kind == "RecipientList" else obj
    errors = [
        ManifestError(source, _path(e.absolute_path), _message(e))
        for e in sorted(_validator(kind).iter_errors(checked), key=lambda e: list(map(str, e.path)))
    ]
    if not errors:
        errors = [ManifestError(source, f, m) for f, m in _semantic_checks(kind, obj)]
    return errors


def with_defaults(obj: dict[str, Any]) -> dict[str, Any]:
    """A copy of a mailrelay.io object with its spec defaults filled in."""
    return fill_defaults(copy.deepcopy(obj))


def fill_defaults(obj: dict[str, Any]) -> dict[str, Any]:
    """`obj` itself, its spec defaults filled in (nested values changed in place)."""
    kind = obj.get("kind")
    if kind in S.KINDS and isinstance(obj.get("spec"), dict):
        apply_defaults(S.KINDS[kind].spec, obj["spec"])
    return obj


# --- warnings: valid, but the relay ignores it ------------------------------------
FOREIGN_SHOWN = 5  # foreign addresses named one by one per RecipientList, then a count
_RANGE = re.compile(r"([0-9]+)\.\.([0-9]+)")


def _where(obj: Mapping[str, Any]) -> tuple[str, str]:
    """The object's file#document and "Kind namespace/name"."""
    meta = obj["metadata"]
    source = str((meta.get("annotations") or {}).get(S.SOURCE_ANNOTATION, ""))
    return source, f"{obj.get('kind')} {S.namespace_of(obj)}/{meta.get('name')}"


def relay_warnings(relay: dict[str, Any]) -> list[ManifestError]:
    """A MailRelay's: reply filters with a range a..b where a > b (the relay
    skips them). The operator puts them in the Reconciled condition's message."""
    spec = relay.get("spec") or {}
    holders = [
        ("spec.postscreen.dnsbl.sites", ((spec.get("postscreen") or {}).get("dnsbl") or {})),
        ("spec.restrictions.rblClients", spec.get("restrictions") or {}),
    ]
    source, document = _where(relay)
    out = []
    for path, holder in holders:
        entries = holder.get("sites" if path.endswith("sites") else "rblClients") or []
        for i, entry in enumerate(entries):
            for j, code in enumerate(entry.get("returnCodes") or []):
                if any(int(a) > int(b) for a, b in _RANGE.findall(str(code))):
                    out.append(
                        ManifestError(
                            source,
                            f"{path}[{i}].returnCodes[{j}]",
                            f"{code!r} has a range a..b with a > b: it matches nothing "
                            "and the relay ignores this filter",
                            document,
                        )
                    )
    return out


def unused_list_note(dom: Mapping[str, Any]) -> str:
    """Why a RecipientList of this RelayDomain is not used, or "" (it is)."""
    mode = dom["spec"].get("recipients", "listed")
    if mode == "listed":
        return ""
    return (
        f"RelayDomain {dom['metadata']['name']} has recipients: {mode}: the relay "
        "uses no RecipientList for it (only for recipients: listed)"
    )


def _list_warnings(rl: Mapping[str, Any], dom: Mapping[str, Any]) -> list[ManifestError]:
    addresses = (rl.get("spec") or {}).get("addresses") or []
    domain = str(dom["spec"]["domain"]).lower().rstrip(".")
    source, document = _where(rl)
    unused = unused_list_note(dom)
    if unused and addresses:
        return [ManifestError(source, "spec.addresses", unused, document)]
    out = []
    foreign = foreign_addresses(addresses, domain)
    for i in foreign[:FOREIGN_SHOWN]:
        out.append(
            ManifestError(
                source,
                f"spec.addresses[{i}]",
                f"{addresses[i]!r} is not in {domain}: the relay ignores it",
                document,
            )
        )
    if len(foreign) > FOREIGN_SHOWN:
        more = len(foreign) - FOREIGN_SHOWN
        out.append(
            ManifestError(
                source,
                "spec.addresses",
                f"{more} more address(es) not in {domain}: the relay ignores them",
                document,
            )
        )
    size = listed_bytes(addresses)
    if size > RECIPIENT_LIST_ADVISE_BYTES:
        out.append(ManifestError(source, "spec.addresses", list_size_advice(size), document))
    return out


def list_size_advice(size: int) -> str:
    """What to do about a RecipientList of `size` bytes of addresses."""
    return (
        f"{size / 2**20:.1f} MiB of addresses, over "
        f"{RECIPIENT_LIST_ADVISE_BYTES / 2**20:.0f} MiB: the API server stores at most "
        "1.5 MiB per object (etcd); split it into several RecipientLists with the same "
        "domainRef"
    )


def manifest_warnings(
    relays: Iterable[dict[str, Any]],
    domains: Iterable[Mapping[str, Any]],
    recipient_lists: Iterable[Mapping[str, Any]],
) -> list[ManifestError]:
    """Valid objects (defaults applied) holding values the relay ignores."""
    out: list[ManifestError] = []
    for relay in relays:
        out += relay_warnings(relay)
    by_key = {(S.namespace_of(d), d["metadata"]["name"]): d for d in domains}
    for rl in recipient_lists:
        key = (S.namespace_of(rl), rl["spec"]["domainRef"]["name"])
        if key in by_key:  # else an error (cross_reference_errors)
            out += _list_warnings(rl, by_key[key])
    return out
