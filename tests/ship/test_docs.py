"""docs/: the generated reference is current, and every field the hand-written
pages name exists in the schema (a renamed field cannot leave a stale doc)."""

from __future__ import annotations

import re
import sys
from typing import Any

import pytest
from ship.tools import REPO, run

from mailrelay_api import schema as S

DOCS = REPO / "docs"
PAGES = [
    "install.md",
    "migrating-from-postfix.md",
    "operations.md",
    "security.md",
    "authentication.md",
]


def test_reference_is_generated_from_the_schema() -> None:
    result = run([sys.executable, str(REPO / "hack" / "gen-docs.py"), "--check"])
    assert result.returncode == 0, result.stderr
    text = (DOCS / "reference.md").read_text()
    for kind in S.KINDS:
        assert f"## {kind}" in text


def _field_exists(path: str) -> bool:
    """True if spec.a.b[].c exists in any kind's spec or status schema."""
    root, *parts = path.replace("[]", "").split(".")
    for kind in S.KINDS.values():
        node: Any = S.openapi_schema(kind.kind)["properties"][root]
        for part in parts:
            if node.get("type") == "array":
                node = node["items"]
            props = node.get("properties", {})
            if part not in props:
                break
            node = props[part]
        else:
            return True
    return False


@pytest.mark.parametrize("page", PAGES)
def test_fields_named_in_the_docs_exist(page: str) -> None:
    text = (DOCS / page).read_text()
    named = set(re.findall(r"`((?:spec|status)(?:\.[A-Za-z]+(?:\[\])?)+)", text))
    missing = sorted(p for p in named if not _field_exists(p))
    assert not missing, f"{page} names fields the schema does not have: {missing}"


@pytest.mark.parametrize("page", PAGES)
def test_links_between_docs_resolve(page: str) -> None:
    text = (DOCS / page).read_text()
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
        assert (DOCS / target).resolve().exists(), f"{page}: broken link {target}"


def test_migration_table_covers_the_seed_parameters() -> None:
    text = (DOCS / "migrating-from-postfix.md").read_text()
    for parameter in [
        "myhostname",
        "mynetworks",
        "relay_domains",
        "relay_recipient_maps",
        "transport_maps",
        "message_size_limit",
        "maximal_queue_lifetime",
        "minimal_backoff_time",
        "maximal_backoff_time",
        "smtpd_recipient_restrictions",
        "reject_unauth_pipelining",
        "reject_non_fqdn_recipient",
        "reject_unknown_recipient_domain",
        "reject_unknown_reverse_client_hostname",
        "reject_rbl_client",
        "check_policy_service",
        "postscreen_greet_action",
        "postscreen_dnsbl_sites",
        "postscreen_dnsbl_threshold",
        "postscreen_access_list",
        "mime_header_checks",
        "smtpd_tls_cert_file",
        "smtpd_client_connection_count_limit",
        "smtpd_recipient_limit",
    ]:
        assert f"`{parameter}" in text, parameter


def test_pages_exist() -> None:
    for page in PAGES:
        assert (DOCS / page).is_file(), page
