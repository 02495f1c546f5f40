"""relay.smtpd.addresses: parsing paths, and Postfix's routed-address rule."""

from __future__ import annotations

import pytest

from relay.smtpd.addresses import (
    AddressError,
    esmtp_param_items,
    is_fqdn,
    is_routed,
    parse_path,
)


@pytest.mark.parametrize(
    ("arg", "text", "local", "domain", "params"),
    [
        ("<joe@example.com>", "joe@example.com", "joe", "example.com", ""),
        ("<joe@Example.COM> SIZE=10", "joe@Example.COM", "joe", "Example.COM", "SIZE=10"),
        ("joe@example.com", "joe@example.com", "joe", "example.com", ""),
        (" <>", "", "", "", ""),
        ('<"john doe"@example.com>', '"john doe"@example.com', "john doe", "example.com", ""),
        ('<"a>b"@example.com>', '"a>b"@example.com', "a>b", "example.com", ""),
        ("<user@[192.0.2.1]>", "user@[192.0.2.1]", "user", "[192.0.2.1]", ""),
    ],
)
def test_parse_path(arg: str, text: str, local: str, domain: str, params: str) -> None:
    address, rest = parse_path(arg)
    assert (address.text, address.local, address.domain, rest) == (text, local, domain, params)


def test_source_route_is_kept_apart() -> None:
    address, _ = parse_path("<@hop1,@hop2:user@example.com>")
    assert address.route == "@hop1,@hop2"
    assert address.text == "user@example.com"
    assert address.original == "@hop1,@hop2:user@example.com"
    assert is_routed(address)


@pytest.mark.parametrize(
    "arg",
    [
        "<joe@example.com",
        "<joe@>",
        '<"joe@example.com>',
        "<jo e@example.com>",
        "<joe@exa mple.com>",
        "<joe\r@example.com>",
        "<joe@example.com\x00>",
        "<@hop>",
        "<@hop:>",
        "<user@[1.2.3.4>",
        "<@example.com>",
    ],
)
def test_bad_paths_are_refused(arg: str) -> None:
    with pytest.raises(AddressError):
        parse_path(arg)


@pytest.mark.parametrize(
    ("arg", "routed"),
    [
        ("<joe@example.com>", False),
        ('<"john doe"@example.com>', False),
        ("<relaytest%evil.com@example.com>", True),
        ("<evil.com!relaytest@example.com>", True),
        ("<evil.com!relaytest>", True),
        ('<"relaytest@evil.com"@example.com>', True),
        ('<"relaytest%evil.com"@example.com>', True),
        ('<"relaytest@evil.com">', True),
        ("<relaytest@evil.com@example.com>", True),
        ("<@example.com:relaytest@evil.com>", True),
        ("<joe>", True),  # no domain: never relayed
    ],
)
def test_routed_address_rule(arg: str, routed: bool) -> None:
    address, _ = parse_path(arg)
    assert is_routed(address) is routed


def test_lookup_key_is_case_insensitive() -> None:
    address, _ = parse_path("<Info@Example.COM.>")
    assert address.domain_key == "example.com"
    assert address.lookup_key == "info@example.com"


@pytest.mark.parametrize(
    ("domain", "ok"),
    [
        ("example.com", True),
        ("example.com.", True),
        ("localhost", False),
        ("example", False),
        ("1.2.3.4", False),
        ("-bad.example.com", False),
        ("a..b", False),
    ],
)
def test_is_fqdn(domain: str, ok: bool) -> None:
    assert is_fqdn(domain) is ok


def test_esmtp_params() -> None:
    assert esmtp_param_items("SIZE=10 body=8BITMIME") == [
        ("SIZE", "10", "SIZE=10"),
        ("BODY", "8BITMIME", "body=8BITMIME"),
    ]
    assert esmtp_param_items("") == []
    # An empty value is the parameter's own syntax error (Postfix: "Bad RET parameter syntax").
    assert esmtp_param_items("RET= RET=x") == [("RET", "", "RET="), ("RET", "x", "RET=x")]
    assert esmtp_param_items("=x") is None
