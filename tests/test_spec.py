"""The typed spec (mailrelay_api.spec) against the schema that owns every default:
each default the schema applies is what the dataclasses and the relay's
runtime config see, no other module writes a default down a second time,
and the drain protocol's signing round-trips."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mailrelay_api import schema as S
from mailrelay_api.drain_protocol import MAX_SKEW, DrainRequest, verify
from mailrelay_api.spec import (
    MailRelaySpec,
    RecipientListSpec,
    RelayDomainSpec,
)
from mailrelay_api.units import parse_duration
from relay import config as runtime

ROOT = Path(__file__).resolve().parents[1]
SPEC_CLASSES: dict[str, Any] = {
    "MailRelay": MailRelaySpec,
    "RelayDomain": RelayDomainSpec,
    "RecipientList": RecipientListSpec,
}


def _placeholder(node: S.Schema, items: bool) -> Any:
    """A valid-looking value for a required field without a default."""
    kind = node.get("type")
    if kind == "object":
        return _minimal(node, items)
    if kind == "integer":
        return node.get("minimum", 0)
    if kind == "array":
        return []
    return "x.example.net"


def _minimal(node: S.Schema, items: bool) -> dict[str, Any]:
    """The smallest object: required fields, and with items, one item in each
    array of objects (so the items' defaults are applied too)."""
    out: dict[str, Any] = {}
    for key, sub in node.get("properties", {}).items():
        if key in node.get("required", []):
            out[key] = _placeholder(sub, items)
        elif sub.get("type") == "object" and "properties" in sub:
            inner = _minimal(sub, items)
            if inner or "default" not in sub:
                out[key] = inner
        elif items and sub.get("type") == "array" and sub["items"].get("type") == "object":
            out[key] = [_minimal(sub["items"], items)]
    return out


def _snake(key: str) -> str:
    key = "from_" if key == "from" else key
    return re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", key).replace("CID_RS", "CIDRS").lower()


def _defaults(node: S.Schema, path: tuple[str | int, ...] = ()) -> Iterator[tuple[Any, Any]]:
    """(path, default) of every scalar or list default under a schema node."""
    for key, sub in node.get("properties", {}).items():
        here = (*path, key)
        if "default" in sub and sub.get("type") != "object":
            yield here, sub["default"]
        if sub.get("type") == "object":
            yield from _defaults(sub, here)
        elif sub.get("type") == "array" and sub["items"].get("type") == "object":
            yield from _defaults(sub["items"], (*here, 0))


def _attr(obj: Any, path: tuple[str | int, ...]) -> Any:
    for step in path:
        obj = obj[step] if isinstance(step, int) else getattr(obj, _snake(step))
    return obj


@pytest.mark.parametrize("kind", list(SPEC_CLASSES))
def test_every_schema_default_is_what_the_dataclasses_see(kind: str) -> None:
    node = S.KINDS[kind].spec
    bare = SPEC_CLASSES[kind].with_defaults(_minimal(node, items=False))
    full = SPEC_CLASSES[kind].with_defaults(_minimal(node, items=True))
    seen = 0
    for path, default in _defaults(node):
        want = tuple(default) if isinstance(default, list) else default
        # Arrays of objects are empty by default; their items' defaults need an item.
        spec = full if 0 in path else bare
        assert _attr(spec, path) == want, ".".join(map(str, path))
        seen += 1
    assert seen or kind == "RecipientList"


def test_a_missing_default_is_a_bug_not_a_guess() -> None:
    defaulted = S.KINDS["MailRelay"].spec
    assert "default" in defaulted["properties"]["limits"]
    with pytest.raises(KeyError):
        MailRelaySpec.from_dict({"hostname": "mx.example.net", "replicas": 2})


def test_the_runtime_config_defaults_are_the_schemas() -> None:
    spec = MailRelaySpec.defaults()
    assert runtime.Limits() == runtime.Limits.from_spec(spec.limits)
    assert runtime.QueuePolicy() == runtime.QueuePolicy.from_spec(spec.queue)
    assert runtime.Postscreen() == runtime.Postscreen.from_spec(spec.postscreen)
    assert runtime.DnsPolicy() == runtime.DnsPolicy.from_spec(spec.dns)
    # In code, no client skips SPF unless a test says so; the rest is the schema's.
    restrictions = runtime.Restrictions.from_spec(spec.restrictions)
    spf = dataclasses.replace(restrictions.spf, skip_addresses=())
    assert runtime.Restrictions() == dataclasses.replace(restrictions, spf=spf)
    hop = RelayDomainSpec.with_defaults(
        {"domain": "example.com", "relayRef": {"name": "r"}, "nextHop": {"host": "h"}}
    ).next_hop
    assert runtime.NextHop("h") == runtime.NextHop.from_spec(hop)


def test_a_relay_json_of_an_older_operator_gets_the_schemas_defaults() -> None:
    # An operator of an older version may render a relay.json without the
    # fields added since; the relay reads it with the schema's defaults.
    doc = {"format": 1, "name": "mail/edge", "policy": {"hostname": "mx.example.net"}}
    config = runtime.config_from_documents(doc, {"domains": []}, set())
    assert config.limits == runtime.Limits()
    greet = S.MAILRELAY_SPEC["properties"]["postscreen"]["properties"]["greet"]
    assert config.postscreen.greet_wait == parse_duration(greet["properties"]["wait"]["default"])


# Defaults that must be written down once, in the schema: durations,
# quantities and sizes are distinctive enough to find as literals.
_DISTINCTIVE = re.compile(r"^([0-9]+(ms|s|m|h|d|w))+$|^[0-9]+(Ki|Mi|Gi|Ti)$")


def _distinctive_defaults() -> set[str]:
    out: set[str] = set()
    for kind in S.KINDS.values():
        for _, default in _defaults(kind.spec):
            if isinstance(default, str) and _DISTINCTIVE.match(default):
                out.add(f'"{default}"')
            elif isinstance(default, int) and not isinstance(default, bool) and default >= 10000:
                out.add(str(default))
    return out


def _sources() -> Iterator[tuple[Path, str]]:
    for folder in ("relay", "operator"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            yield path, path.read_text()


def test_no_second_literal_of_a_schema_default() -> None:
    literals = _distinctive_defaults()
    assert {'"6s"', '"15m"', '"10Gi"', "25600000"} <= literals
    found = [
        f"{path.relative_to(ROOT)}: {lit}"
        for path, text in _sources()
        for lit in literals
        if re.search(rf"(?<![\w.]){re.escape(lit)}(?![\w.])", text)
    ]
    assert not found


def test_no_get_with_a_default_for_a_defaulted_spec_key() -> None:
    # `.get("messageSize", 25600000)` is a second owner of the default.
    keys = {
        str(path[-1])
        for kind in S.KINDS.values()
        for path, _ in _defaults(kind.spec)
        # Not "type": a Kubernetes Service's own field, with a default of its own.
        if path[-1] != "type"
    }
    pattern = re.compile(r"\.get\(\s*\"(" + "|".join(map(re.escape, keys)) + r")\"\s*,")
    found = [
        f"{path.relative_to(ROOT)}: {m.group(0)}"
        for path, text in _sources()
        for m in pattern.finditer(text)
    ]
    assert not found


def test_group_and_api_version_are_written_once() -> None:
    found = [
        str(path.relative_to(ROOT))
        for path, text in _sources()
        if f'"{S.API_VERSION}"' in text or f'"{S.GROUP}"' in text
    ]
    assert not found


def test_drain_requests_round_trip_and_are_signed() -> None:
    key = b"k" * 32
    body, headers = DrainRequest.start(["edge-0:10026"], 60).signed(key)
    (signature,) = (v for k, v in headers.items() if k.startswith("X-"))
    assert verify(key, body, signature)
    assert not verify(b"x" * 32, body, signature)
    request = DrainRequest.decode(body)
    assert request.peers == ("edge-0:10026",) and request.ttl == 60
    assert request.fresh(request.ts + MAX_SKEW) and not request.fresh(request.ts + MAX_SKEW + 1)
    assert DrainRequest.decode(DrainRequest.end().encode()).peers is None


def test_the_operator_imports_no_relay_runtime_module() -> None:
    # What operator and relay share is the contract in mailrelay_api.
    imports = re.compile(r"^\s*(from|import)\s+relay(\.|\s)", re.MULTILINE)
    found = [
        str(path.relative_to(ROOT))
        for path in sorted((ROOT / "operator").rglob("*.py"))
        if imports.search(path.read_text())
    ]
    assert not found
