"""contentFilters.authentication: DKIM, ARC and DMARC in the relay (OpenDKIM and
OpenDMARC in verify mode), end to end over SMTP. Messages are signed here with
dkimpy and keys made here; the keys and DMARC records are served by the test
DNS server, which SERVFAILs the names that stand for a DNS outage."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mrtest import postfix
from mrtest.authmail import (
    Key,
    arc_seal,
    dkim_sign,
    make_ed25519_key,
    make_key,
    message,
    verifies,
)
from mrtest.dnsserver import DnsServer
from mrtest.peers import RawClient
from mrtest.relayproc import next_loopback
from mrtest.testmilter import ScriptedMilter, add_header, cstr
from prometheus_client import REGISTRY

from relay.config import Milter
from relay.queue.format import ACTIVE, HOLD, INCOMING
from relay.queue.incoming import SPILL_BYTES, IncomingMessage
from relay.smtpd import milter as m
from relay.smtpd.authres import MAX_SIGNATURES, authserv_id, parse_head
from relay.smtpd.dmarc import parse_record

from .conftest import Harness, ServerFactory, make_config

HOST = "mx.relay.test"  # relay_spec_for_tests' hostname: our authserv-id


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Key]:
    folder = tmp_path_factory.mktemp("keys")
    made = {name: make_key(folder, name) for name in ("signer", "strict", "arc", "gone")}
    return {**made, "ed25519": make_ed25519_key()}


@pytest.fixture(scope="module")
def dns(keys: dict[str, Key]) -> Iterator[DnsServer]:
    reject = '"v=DMARC1; p=reject"'
    records = {
        "sel._domainkey.signer.test": [("TXT", keys["signer"].record)],
        "ed._domainkey.signer.test": [("TXT", keys["ed25519"].record)],
        "_dmarc.signer.test": [("TXT", reject)],
        "_dmarc.nokey.test": [("TXT", reject)],
        "_dmarc.broken.test": [("TXT", reject)],
        "sel._domainkey.mail.strict.test": [("TXT", keys["strict"].record)],
        "_dmarc.strict.test": [("TXT", '"v=DMARC1; p=reject; adkim=s"')],
        "sel._domainkey.mail.relaxed.test": [("TXT", keys["strict"].record)],
        "_dmarc.relaxed.test": [("TXT", reject)],
        "_dmarc.quar.test": [("TXT", '"v=DMARC1; p=reject; sp=quarantine"')],
        "sel._domainkey.arc.test": [("TXT", keys["arc"].record)],
        "spfonly.test": [("TXT", '"v=spf1 ip4:127.0.0.0/8 -all"')],
        "_dmarc.spfonly.test": [("TXT", reject)],
    }
    servfail = {"sel._domainkey.broken.test", "_dmarc.dnsdown.test"}
    with DnsServer(records, servfail=servfail) as server:
        yield server


def auth_spec(dns: DnsServer, enforce: str = "none", **extra: Any) -> dict[str, Any]:
    return {
        "dns": {"nameservers": [dns.nameserver]},
        "contentFilters": {
            "authentication": {
                "dkim": {"enabled": True},
                "arc": {"enabled": True},
                "dmarc": {"enabled": True, "enforce": enforce},
            }
        },
        **extra,
    }


async def start(
    relay_server: ServerFactory, tmp_path: Path, dns: DnsServer, enforce: str = "none", **extra
) -> Harness:
    config = make_config(tmp_path, spec=auth_spec(dns, enforce, **extra), name=enforce)
    return await relay_server(config=config)


async def send(h: Harness, data: bytes, sender: str = "bounce@signer.test") -> str:
    """One transaction; the reply to the message (or the first refusal)."""
    async with RawClient(h.host, h.port, local=next_loopback(), timeout=20) as c:
        await c.greet()
        for command in (f"MAIL FROM:<{sender}>", "RCPT TO:<info@example.com>", "DATA"):
            answer = await c.command(command)
            if not answer.startswith(("250", "354")):
                return answer
        await c.send(data + b".\r\n")
        return await c.read_reply()


async def stored(h: Harness, answer: str, folder: str = ACTIVE) -> bytes:
    """The queued message of a 250 "queued as" answer, from its folder."""
    assert answer.startswith("250 2.0.0 Ok: queued as "), answer
    queue_id = answer.rsplit(" ", 1)[1]
    await h.queue.settle()
    assert await h.queue.run_io(h.queue.locate_sync, queue_id) == folder
    done = await h.queue.run_io(h.queue.read_message_sync, queue_id, folder)
    assert done is not None
    path = h.queue.directory / folder / queue_id
    return path.read_bytes()[: done.size]


def results(data: bytes) -> list[str]:
    """Our Authentication-Results header, one result per entry (unfolded)."""
    head = data.split(b"\r\n\r\n", 1)[0].decode()
    assert head.startswith(f"Authentication-Results: {HOST};")
    first = head.split("\r\n")[0]
    rest = []
    for line in head.split("\r\n")[1:]:
        if not line.startswith("\t"):
            break
        rest.append(line.strip().rstrip(";"))
    assert first == f"Authentication-Results: {HOST};"
    return rest


async def test_signed_mail_passes_and_the_stored_signature_still_verifies(
    relay_server: ServerFactory, tmp_path: Path, dns: DnsServer, keys: dict[str, Key]
) -> None:
    h = await start(relay_server, tmp_path, dns, "reject")
    signed = dkim_sign(message("alice@signer.test"), keys["signer"], "signer.test")
    queried = dns.count("sel._domainkey.signer.test"), dns.count("_dmarc.signer.test")
    data = await stored(h, await send(h, signed))
    await stored(h, await send(h, signed))  # the second message's answers come from the cache
    assert dns.count("sel._domainkey.signer.test") - queried[0] == 1
    assert dns.count("_dmarc.signer.test") - queried[1] == 1
    [dkim_line, arc, dmarc] = results(data)
    assert dkim_line.startswith("dkim=pass header.d=signer.test header.s=sel header.b=")
    assert arc == "arc=none"
    assert dmarc == "dmarc=pass (p=reject dis=none) header.from=signer.test"
    # The header was added by copying the message: the body and the signature are intact.
    assert data.endswith(b"\r\n\r\nhello\r\n")
    assert verifies(data, {"sel._domainkey.signer.test": keys["signer"]})
    await h.queue.settle()
    assert os.listdir(h.queue.directory / INCOMING) == []


async def test_ed25519_signatures_pass_alone_and_beside_an_rsa_one(
    relay_server: ServerFactory, tmp_path: Path, dns: DnsServer, keys: dict[str, Key]
) -> None:
    """RFC 8463: dkimpy verifies ed25519-sha256 with PyNaCl. Senders sign with
    both algorithms side by side (a verifier without ed25519 still has RSA)."""
    h = await start(relay_server, tmp_path, dns, "reject")
    ed = dkim_sign(message("alice@signer.test"), keys["ed25519"], "signer.test", "ed")
    assert b"a=ed25519-sha256;" in ed
    [dkim_line, _arc, dmarc] = results(await stored(h, await send(h, ed)))
    assert dkim_line.startswith("dkim=pass header.d=signer.test header.s=ed header.b=")
    assert dmarc == "dmarc=pass (p=reject dis=none) header.from=signer.test"
    msg = message("alice@signer.test", "both\r\n")
    both = dkim_sign(
        dkim_sign(msg, keys["signer"], "signer.test"), keys["ed25519"], "signer.test", "ed"
    )
    data = await stored(h, await send(h, both))
    [ed_line, rsa_line, _arc, dmarc] = results(data)
    assert ed_line.startswith("dkim=pass header.d=signer.test header.s=ed header.b=")
    assert rsa_line.startswith("dkim=pass header.d=signer.test header.s=sel header.b=")
    assert dmarc == "dmarc=pass (p=reject dis=none) header.from=signer.test"
    assert verifies(data, {"ed._domainkey.signer.test": keys["ed25519"]})


@pytest.mark.parametrize(
    ("canonicalize", "length"),
    [((b"simple", b"simple"), False), ((b"relaxed", b"relaxed"), True)],
)
async def test_a_big_body_is_hashed_in_chunks(
    relay_server: ServerFactory,
    tmp_path: Path,
    dns: DnsServer,
    keys: dict[str, Key],
    canonicalize: tuple[bytes, bytes],
    length: bool,
) -> None:
    """3 MB of lines with trailing white space and empty lines, in both
    canonicalizations (and l=): the body is hashed as it is read."""
    body = "".join(f"line {i}\t  with  space \r\n\r\n" for i in range(100_000)) + "\r\n" * 5
    msg = message("alice@signer.test", body)
    h = await start(relay_server, tmp_path, dns, "reject")
    signed = dkim_sign(msg, keys["signer"], "signer.test", canonicalize=canonicalize, length=length)
    data = await stored(h, await send(h, signed))
    assert results(data)[0].startswith("dkim=pass header.d=signer.test")
    if length:  # l= covers what was signed: text appended later does not break it
        appended = signed + b"-- \r\nappended by a list\r\n"
        assert results(await stored(h, await send(h, appended)))[0].startswith("dkim=pass")


async def test_a_message_in_memory_is_checked_there_as_from_its_file(
    relay_server: ServerFactory, tmp_path: Path, dns: DnsServer, keys: dict[str, Key]
) -> None:
    """A small message is verified from its bytes: no file is written for it, it
    stays in memory for the edit, and the results are those read from its file.
    A big one (spilled to disk while received) is read from its file."""
    h = await start(relay_server, tmp_path, dns, "reject")
    config, authenticator = h.ctx.config, h.ctx.authenticator
    dkim_signed = dkim_sign(message("alice@signer.test"), keys["signer"], "signer.test")
    signed = arc_seal(dkim_signed, keys["arc"], "arc.test", "lists.arc.test")
    small = h.queue.incoming()
    big = h.queue.incoming()
    try:
        small.write(signed)
        held = small.in_memory()
        assert held is not None
        from_memory = await authenticator.check(
            config.authentication, HOST, held, ("pass", "signer.test")
        )
        assert not small.path.exists() and small.in_memory() == signed
        from_file = await authenticator.check(
            config.authentication, HOST, str(await small.flush()), ("pass", "signer.test")
        )
        assert from_memory == from_file
        assert [m.result for m in from_memory.methods] == ["pass", "pass", "pass", "pass"]
        body = "".join(f"line {i}\r\n" for i in range(SPILL_BYTES // 8))
        big.write(dkim_sign(message("alice@signer.test", body), keys["signer"], "signer.test"))
        assert big.in_memory() is None
        spilled = await authenticator.check(
            config.authentication, HOST, str(await big.flush()), None
        )
        assert [m.text() for m in spilled.methods][1:] == [
            "arc=none",
            "dmarc=pass (p=reject dis=none) header.from=signer.test",
        ]
        assert spilled.methods[0].result == "pass"
    finally:
        small.abort()
        big.abort()


async def test_a_small_message_is_never_flushed_for_the_check(
    relay_server: ServerFactory,
    tmp_path: Path,
    dns: DnsServer,
    keys: dict[str, Key],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """End to end: checked and edited in memory, the message gets no file until
    its edited copy is committed, and the same header as before."""
    flushed: list[str] = []
    flush = IncomingMessage.flush

    async def counting(self: IncomingMessage) -> Path:
        flushed.append(self.queue_id)
        return await flush(self)

    monkeypatch.setattr(IncomingMessage, "flush", counting)
    h = await start(relay_server, tmp_path, dns, "reject")
    signed = dkim_sign(message("alice@signer.test"), keys["signer"], "signer.test")
    data = await stored(h, await send(h, signed))
    assert flushed == []
    [dkim_line, arc, dmarc] = results(data)
    assert dkim_line.startswith("dkim=pass header.d=signer.test header.s=sel header.b=")
    assert (arc, dmarc) == ("arc=none", "dmarc=pass (p=reject dis=none) header.from=signer.test")
    assert data.endswith(b"\r\n\r\nhello\r\n")
    assert verifies(data, {"sel._domainkey.signer.test": keys["signer"]})


@pytest.mark.parametrize(
    ("enforce", "outcome"),
    [("none", ACTIVE), ("quarantine", HOLD), ("reject", "550")],
)
async def test_altered_body_fails_and_dmarc_reject_is_enforced_only_when_asked(
    relay_server: ServerFactory,
    tmp_path: Path,
    dns: DnsServer,
    keys: dict[str, Key],
    enforce: str,
    outcome: str,
) -> None:
    h = await start(relay_server, tmp_path, dns, enforce)
    signed = dkim_sign(message("alice@signer.test"), keys["signer"], "signer.test")
    altered = signed.replace(b"hello", b"HELLO")
    answer = await send(h, altered)
    if outcome == "550":
        assert answer == "550 5.7.1 rejected by DMARC policy for signer.test"
        await h.queue.settle()
        assert h.queued() == [] and os.listdir(h.queue.directory / INCOMING) == []
        return
    [dkim_line, _arc, dmarc] = results(await stored(h, answer, outcome))
    assert dkim_line.startswith("dkim=fail (body hash did not verify) header.d=signer.test")
    dis = "none" if enforce == "none" else "quarantine"
    assert dmarc == f"dmarc=fail (p=reject dis={dis}) header.from=signer.test"


async def test_mynetworks_clients_are_reported_never_refused(
    relay_server: ServerFactory, tmp_path: Path, dns: DnsServer, keys: dict[str, Key]
) -> None:
    h = await start(relay_server, tmp_path, dns, "reject", network={"mynetworks": ["127.0.0.0/8"]})
    signed = dkim_sign(message("alice@signer.test"), keys["signer"], "signer.test")
    answer = await send(h, signed.replace(b"hello", b"HELLO"))
    lines = results(await stored(h, answer))
    assert lines[-1] == "dmarc=fail (p=reject dis=none) header.from=signer.test"


async def test_missing_key_is_permerror(
    relay_server: ServerFactory, tmp_path: Path, dns: DnsServer, keys: dict[str, Key]
) -> None:
    h = await start(relay_server, tmp_path, dns)
    signed = dkim_sign(message("alice@nokey.test"), keys["gone"], "nokey.test")
    [dkim_line, _arc, dmarc] = results(await stored(h, await send(h, signed)))
    assert dkim_line.startswith("dkim=permerror (no key for signature) header.d=nokey.test")
    assert dmarc == "dmarc=fail (p=reject dis=none) header.from=nokey.test"


async def test_dns_temp_error_is_temperror_and_never_rejected(
    relay_server: ServerFactory, tmp_path: Path, dns: DnsServer, keys: dict[str, Key]
) -> None:
    h = await start(relay_server, tmp_path, dns, "reject")
    signed = dkim_sign(message("alice@broken.test"), keys["signer"], "broken.test")
    [dkim_line, _arc, dmarc] = results(await stored(h, await send(h, signed)))
    assert dkim_line.startswith("dkim=temperror (key query failed) header.d=broken.test")
    assert dmarc.startswith("dmarc=temperror (p=reject dis=none) header.from=broken.test")
    # A signature whose key name only dkimpy reads ("se l") is not a temperror:
    # the spoofed From is refused as without it.
    forged = dkim_sign(message("alice@signer.test"), keys["gone"], "signer.test")
    assert b"s=sel;" in forged
    answer = await send(h, forged.replace(b"s=sel;", b"s=se l;", 1))
    assert answer == "550 5.7.1 rejected by DMARC policy for signer.test"
    # The DMARC record itself unavailable: temperror too, and accepted.
    [_dkim, _arc, dmarc] = results(await stored(h, await send(h, message("a@dnsdown.test"))))
    assert dmarc.startswith("dmarc=temperror") and "header.from=dnsdown.test" in dmarc


@pytest.mark.parametrize(
    ("from_domain", "result"),
    [("relaxed.test", "pass"), ("strict.test", "fail")],
)
async def test_alignment_relaxed_and_strict(
    relay_server: ServerFactory,
    tmp_path: Path,
    dns: DnsServer,
    keys: dict[str, Key],
    from_domain: str,
    result: str,
) -> None:
    """Signed by mail.<domain>: aligned for adkim=r (same organizational
    domain), not for adkim=s (strict.test)."""
    h = await start(relay_server, tmp_path, dns)
    signed = dkim_sign(message(f"alice@{from_domain}"), keys["strict"], f"mail.{from_domain}")
    [dkim_line, _arc, dmarc] = results(await stored(h, await send(h, signed)))
    assert dkim_line.startswith(f"dkim=pass header.d=mail.{from_domain}")
    assert dmarc == f"dmarc={result} (p=reject dis=none) header.from={from_domain}"


async def test_subdomain_policy_from_the_organizational_domain_holds(
    relay_server: ServerFactory, tmp_path: Path, dns: DnsServer
) -> None:
    """No record at _dmarc.news.quar.test: quar.test's sp=quarantine applies,
    and enforce: reject holds a quarantine (only p=reject is refused)."""
    h = await start(relay_server, tmp_path, dns, "reject")
    answer = await send(h, message("alice@news.quar.test"))
    [dkim_line, _arc, dmarc] = results(await stored(h, answer, HOLD))
    assert dkim_line == "dkim=none"
    assert dmarc == "dmarc=fail (p=quarantine dis=quarantine) header.from=news.quar.test"


async def test_spf_pass_aligns_for_dmarc_when_spf_ran(
    relay_server: ServerFactory, tmp_path: Path, dns: DnsServer
) -> None:
    spf = {"restrictions": {"spf": {"enabled": True, "skipAddresses": []}}}
    h = await start(relay_server, tmp_path, dns, "reject", **spf)
    answer = await send(h, message("alice@spfonly.test"), sender="bounce@spfonly.test")
    lines = results(await stored(h, answer))
    assert "spf=pass smtp.mailfrom=spfonly.test" in lines
    assert lines[-1] == "dmarc=pass (p=reject dis=none) header.from=spfonly.test"
    # Without the SPF check, DKIM alone decides: the same unsigned mail is refused.
    h = await start(relay_server, tmp_path / "nospf", dns, "reject")
    answer = await send(h, message("alice@spfonly.test"), sender="bounce@spfonly.test")
    assert answer == "550 5.7.1 rejected by DMARC policy for spfonly.test"


async def test_arc_chain_is_verified(
    relay_server: ServerFactory, tmp_path: Path, dns: DnsServer, keys: dict[str, Key]
) -> None:
    h = await start(relay_server, tmp_path, dns)
    sealed = arc_seal(message("alice@elsewhere.test"), keys["arc"], "arc.test", "lists.arc.test")
    [_dkim, arc, _dmarc] = results(await stored(h, await send(h, sealed)))
    assert arc == "arc=pass (i=1)"
    broken = sealed.replace(b"hello", b"HELLO")
    [_dkim, arc, _dmarc] = results(await stored(h, await send(h, broken)))
    assert arc.startswith("arc=fail")


async def test_forged_results_claiming_our_id_are_removed(
    relay_server: ServerFactory, tmp_path: Path, dns: DnsServer
) -> None:
    forged = (
        f"Authentication-Results: {HOST}; dkim=pass header.d=bank.test\r\n"
        "Authentication-Results: other.example; spf=pass smtp.mailfrom=x.test\r\n"
        "Authentication-Results: (sneaky) MX.RELAY.TEST;\r\n\tdmarc=pass header.from=bank.test\r\n"
    )
    h = await start(relay_server, tmp_path, dns)
    data = await stored(h, await send(h, message("alice@signer.test", extra=forged)))
    head = data.split(b"\r\n\r\n", 1)[0].decode()
    assert head.count("Authentication-Results:") == 2
    assert "bank.test" not in head
    assert "Authentication-Results: other.example; spf=pass" in head
    assert results(data)[-1] == "dmarc=fail (p=reject dis=none) header.from=signer.test"


async def test_several_from_domains_report_the_worst(
    relay_server: ServerFactory, tmp_path: Path, dns: DnsServer, keys: dict[str, Key]
) -> None:
    """RFC 7489 6.6.1: a signature aligned with one From domain does not cover another."""
    h = await start(relay_server, tmp_path, dns, "reject")
    two = message("alice@signer.test").replace(
        b"From: Alice <alice@signer.test>", b"From: alice@signer.test, mallory@relaxed.test"
    )
    answer = await send(h, dkim_sign(two, keys["signer"], "signer.test"))
    assert answer == "550 5.7.1 rejected by DMARC policy for relaxed.test"


async def test_disabled_leaves_the_message_alone(
    relay_server: ServerFactory, tmp_path: Path, dns: DnsServer
) -> None:
    forged = f"Authentication-Results: {HOST}; dkim=pass\r\n"
    h = await relay_server(
        config=make_config(tmp_path, spec={"dns": {"nameservers": [dns.nameserver]}})
    )
    data = await stored(h, await send(h, message("alice@signer.test", extra=forged)))
    assert data.startswith(b"Received: ")  # nothing above our Received header
    assert data.count(b"Authentication-Results:") == 1 and forged.encode() in data


async def test_with_milters_one_copy_carries_both_edits(
    relay_server: ServerFactory, tmp_path: Path, dns: DnsServer, keys: dict[str, Key]
) -> None:
    """A milter's header and quarantine, and ours: the milter sees the message as
    received (no Authentication-Results of ours), the stored copy has both."""
    milter = ScriptedMilter()
    try:
        milter.answers = {
            m.BODYEOB: [
                add_header("X-Milter", "seen"),
                (m.R_QUARANTINE, cstr("review")),
                (m.R_CONTINUE, b""),
            ]
        }
        config = make_config(tmp_path, spec=auth_spec(dns))
        config = dataclasses.replace(config, milters=(Milter("test", await milter.start()),))
        h = await relay_server(config=config)
        signed = dkim_sign(message("alice@signer.test"), keys["signer"], "signer.test")
        data = await stored(h, await send(h, signed), HOLD)
        assert results(data)[0].startswith("dkim=pass header.d=signer.test")
        assert data.split(b"\r\n\r\n", 1)[0].endswith(b"\r\nX-Milter: seen")
        assert "Authentication-Results" not in [name for name, _ in milter.headers]
        assert verifies(data, {"sel._domainkey.signer.test": keys["signer"]})
    finally:
        await milter.stop()


async def test_metrics_count_results(
    relay_server: ServerFactory, tmp_path: Path, dns: DnsServer, keys: dict[str, Key]
) -> None:
    def count(method: str, result: str) -> float:
        labels = {"method": method, "result": result}
        return REGISTRY.get_sample_value("mailrelay_authentication_results_total", labels) or 0.0

    def held() -> float:
        labels = {"action": "quarantine"}
        return REGISTRY.get_sample_value("mailrelay_dmarc_policy_total", labels) or 0.0

    before = count("dkim", "pass"), count("dmarc", "pass"), count("dkim", "fail"), held()
    h = await start(relay_server, tmp_path, dns, "quarantine")
    signed = dkim_sign(message("alice@signer.test"), keys["signer"], "signer.test")
    await stored(h, await send(h, signed))
    await stored(h, await send(h, signed.replace(b"hello", b"HELLO")), HOLD)
    after = count("dkim", "pass"), count("dmarc", "pass"), count("dkim", "fail"), held()
    assert [a - b for a, b in zip(after, before, strict=True)] == [1, 1, 1, 1]


async def test_swaks_sends_a_signed_message(
    relay_server: ServerFactory, tmp_path: Path, dns: DnsServer, keys: dict[str, Key]
) -> None:
    h = await start(relay_server, tmp_path, dns, "reject")
    signed = dkim_sign(message("alice@signer.test"), keys["signer"], "signer.test")
    (tmp_path / "signed.eml").write_bytes(signed)
    swaks = await asyncio.create_subprocess_exec(
        "swaks", "--server", f"{h.host}:{h.port}", "--from", "bounce@signer.test",
        "--to", "info@example.com", "--data", f"@{tmp_path / 'signed.eml'}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await swaks.communicate()
    assert swaks.returncode == 0, out.decode()
    [data] = h.queued()
    assert results(data)[0].startswith("dkim=pass header.d=signer.test")


@pytest.mark.skipif(not postfix.available(), reason="needs root and Postfix")
async def test_through_a_real_postfix(
    relay_server: ServerFactory, tmp_path: Path, dns: DnsServer, keys: dict[str, Key]
) -> None:
    """Postfix, the sending MTA, relays a signed message and a forged one to us."""
    h = await start(relay_server, tmp_path, dns, "quarantine")
    settings = {
        "myhostname": "out.signer.test",
        "relayhost": f"[{h.host}]:{h.port}",
        "default_transport": "smtp",
    }
    signed = dkim_sign(message("alice@signer.test"), keys["signer"], "signer.test")
    spoofed = message("ceo@signer.test", "wire the money\r\n")
    with postfix.PostfixServer("127.0.0.9", main_cf=settings) as sender:
        for i, data in enumerate((signed, spoofed)):
            (tmp_path / f"{i}.eml").write_bytes(data)
            swaks = await asyncio.create_subprocess_exec(
                "swaks", "--server", "{}:{}".format(*sender.address),
                "--from", "alice@signer.test", "--to", "info@example.com",
                "--data", f"@{tmp_path / f'{i}.eml'}",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
            out, _ = await swaks.communicate()
            assert swaks.returncode == 0, out.decode()
        for _ in range(600):  # Postfix delivers to us when its queue manager gets to it
            await h.queue.settle()
            # One each: both in active/ is the moment before the hold's move.
            if [len(os.listdir(h.queue.directory / f)) for f in (ACTIVE, HOLD)] == [1, 1]:
                break
            await asyncio.sleep(0.1)
    [passed] = h.queued()
    assert results(passed)[0].startswith("dkim=pass header.d=signer.test")
    [held] = os.listdir(h.queue.directory / HOLD)
    assert b"wire the money" in (h.queue.directory / HOLD / held).read_bytes()


def test_dmarc_records_and_authserv_ids_parse() -> None:
    record = parse_record("v=DMARC1; p=Quarantine; sp=bogus; adkim=s; pct=50; rua=mailto:x@y")
    assert record is not None
    assert (record.p, record.sp, record.adkim, record.aspf, record.pct) == (
        "quarantine", "quarantine", "s", "r", 50,
    )  # fmt: skip
    assert parse_record("p=reject; v=DMARC1") is None  # v= must come first
    assert parse_record("v=DMARC1; p=maybe") is None
    none = parse_record("v=DMARC1; p=maybe; rua=mailto:x@y")
    assert none is not None and none.p == "none"  # RFC 7489 6.6.3
    assert authserv_id(" (c) Mx.Relay.Test 1; dkim=pass") == "mx.relay.test"
    assert authserv_id(" mx.relay.test;") == "mx.relay.test"
    assert authserv_id(" other.test; x") == "other.test"


def test_what_a_message_can_make_us_look_up_is_bounded() -> None:
    section = b"".join(
        f"ARC-Seal: i={i}; a=rsa-sha256; cv=pass; d=d{i}.test; s=s; t=1; b=x\r\n"
        f"ARC-Message-Signature: i={i}; a=rsa-sha256; c=relaxed/relaxed; l={i}; d=m{i}.test;"
        f" s=s; h=from; bh=x; b=x\r\n"
        f"DKIM-Signature: v=1; a=rsa-sha256; d=k{i}.test; s=s; h=from; bh=x; b=x\r\n".encode()
        for i in range(1, 51)
    )
    head = parse_head(section + b"From: a@b.test\r\n", HOST)
    assert len(head.dkim) == MAX_SIGNATURES
    # Ten sets' worth: a seal's key and a message signature's key and body each.
    assert (len(head.arc_keys), len(head.arc_bodies)) == (20, 10)
    assert len(head.names) == MAX_SIGNATURES + 20
