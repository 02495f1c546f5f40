"""Fixtures of the spam-filter tests: one real DNS server for the module, the
production resolver pointed at it, and configs built from the schema defaults."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from mrtest.dnsserver import DnsServer
from mrtest.spamzones import RECORDS, SILENT, SLOW

from relay.config import DnsPolicy, RelayConfig, config_from_documents
from relay.dns import Resolver

DNS_TIMEOUT = 0.5  # the silent names time out after this


@pytest.fixture(scope="session")
def dns_server() -> Iterator[DnsServer]:
    with DnsServer(RECORDS, silent=SILENT, slow=SLOW) as server:
        yield server


def build_config(nameserver: str, **policy: Any) -> RelayConfig:
    """A RelayConfig from a MailRelay policy dict (camelCase, as in the manifest)."""
    doc = {"name": "test", "policy": {"hostname": "mx.test.example", **policy}}
    config = config_from_documents(doc, {"domains": []}, set())
    return dataclasses.replace(
        config, dns=DnsPolicy(nameservers=(nameserver,), timeout=DNS_TIMEOUT)
    )


@pytest.fixture
def resolver(dns_server: DnsServer) -> Resolver:
    return Resolver(DnsPolicy(nameservers=(dns_server.nameserver,), timeout=DNS_TIMEOUT))


@pytest.fixture
def make_config(dns_server: DnsServer) -> Callable[..., RelayConfig]:
    """make_config(postscreen={...}, restrictions={...}) -> RelayConfig using the test DNS."""
    return lambda **policy: build_config(dns_server.nameserver, **policy)
