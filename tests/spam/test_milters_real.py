"""The milter client against real filters from Debian: rspamd's milter proxy
(local rules only) and OpenDKIM (signing with a key the test makes, verifying
with the public key served by the test's DNS server). See mrtest.realmilters."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from mrtest.dnsserver import DnsServer
from mrtest.realmilters import (
    REJECT_MARKER,
    SPAM_MARKER,
    dkim_key,
    have,
    opendkim,
    rspamd,
    unbound_forwarding_to,
)

from relay.config import Milter
from relay.smtpd.milteredit import rewrite_message
from relay.smtpd.milters import MessageVerdict, MilterChain
from relay.smtpd.session import Reply

MACROS = {"j": "mx.example.net", "{daemon_name}": "mailrelay", "v": "mailrelay"}


def message(subject: str, body: str = "Hello there.\r\n") -> bytes:
    return (
        "From: Alice <alice@example.org>\r\n"
        "To: bob@example.net\r\n"
        f"Subject: {subject}\r\n"
        "Date: Wed, 02 Dec 2026 01:00:00 +0000\r\n"
        "Message-ID: <m1@example.org>\r\n"
        "\r\n"
        f"{body}"
    ).encode()


async def scan(address: str, data: bytes, client_ip: str = "127.0.0.1") -> MessageVerdict:
    chain = MilterChain((Milter("real", address, 10.0, 30.0, "tempfail"),), dict(MACROS))
    try:
        for step in (
            lambda: chain.connect("client.example.org", client_ip, 40000),
            lambda: chain.helo("client.example.org", {"{tls_version}": "", "{cipher}": ""}),
            lambda: chain.mail("alice@example.org", [], {"i": "QID1", "{auth_type}": ""}),
            lambda: chain.rcpt("bob@example.net", [], {"i": "QID1"}),
            chain.data,
            lambda: chain.feed(data),
        ):
            refusal: Reply | None = await step()
            assert refusal is None, refusal
        return await chain.end_of_message()
    finally:
        chain.close()


def edited(data: bytes, verdict: MessageVerdict) -> bytes:
    out = io.BytesIO()
    rewrite_message(io.BytesIO(data), out.write, verdict.modifications)
    return out.getvalue()


# --- rspamd ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rspamd_milter(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if not have("rspamd"):
        pytest.skip("rspamd is not installed (hack/setup.sh installs it)")
    with rspamd(tmp_path_factory.mktemp("rspamd")) as address:
        yield address


async def test_rspamd_rejects_the_marker(rspamd_milter: str):
    verdict = await scan(rspamd_milter, message(f"offer {REJECT_MARKER}"))
    assert verdict.reply is not None
    assert (verdict.reply.code, verdict.reply.status) == (554, "5.7.1")
    assert verdict.reply.text == "Spam message rejected"


async def test_rspamd_adds_its_headers(rspamd_milter: str):
    data = message("hello")
    verdict = await scan(rspamd_milter, data)
    assert verdict.reply is None
    out = edited(data, verdict)
    assert b"\r\nX-Spamd-Result: default: False" in out
    assert b"X-Spam: Yes" not in out
    spam = message(f"cheap {SPAM_MARKER}")
    verdict = await scan(rspamd_milter, spam)
    assert verdict.reply is None
    out = edited(spam, verdict)
    assert b"\r\nX-Spam: Yes\r\n" in out
    assert b"MAILRELAY_SPAM" in out
    assert out.endswith(b"\r\n\r\nHello there.\r\n")


async def test_rspamd_scans_a_big_body_streamed(rspamd_milter: str):
    body = "a line of text that is not spam at all\r\n" * 60_000  # 2.4 MB
    verdict = await scan(rspamd_milter, message("big", body + REJECT_MARKER + "\r\n"))
    assert verdict.reply is not None and verdict.reply.code == 554


# --- OpenDKIM -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dkim_workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not have("opendkim") or not have("opendkim-genkey"):
        pytest.skip("opendkim is not installed (hack/setup.sh installs it)")
    return tmp_path_factory.mktemp("opendkim")


async def test_opendkim_signs_and_verifies(dkim_workdir: Path):
    key, record = dkim_key(dkim_workdir / "keys", "example.org", "test")
    signer = {"Mode": "s", "Domain": "example.org", "Selector": "test", "KeyFile": str(key)}
    data = message("signed")
    with opendkim(dkim_workdir / "signer", signer) as address:
        verdict = await scan(address, data)  # from 127.0.0.1: an internal host
    assert verdict.reply is None
    signed = edited(data, verdict)
    assert signed.startswith(b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.org")
    assert signed.endswith(data[data.index(b"From:") :])

    with DnsServer({"test._domainkey.example.org": [("TXT", record)]}) as dns:
        workdir = dkim_workdir / "verifier"
        workdir.mkdir()
        verifier = {
            "Mode": "v",
            "ResolverConfiguration": str(unbound_forwarding_to(workdir, dns.nameserver)),
        }
        with opendkim(workdir, verifier) as address:
            good = edited(signed, await scan(address, signed, client_ip="192.0.2.7"))
            tampered = signed.replace(b"Hello there.", b"Hello thereX")
            bad = edited(tampered, await scan(address, tampered, client_ip="192.0.2.7"))
    assert b"Authentication-Results: mx.example.net;\r\n\tdkim=pass" in good
    assert b"dkim=fail" in bad
