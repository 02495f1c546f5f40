"""End to end: `mailrelay run` with the seed's spam policy, the real test DNS
server, a real next hop, and real SMTP clients (swaks, a raw client) on
distinct 127.0.0.x addresses; each verdict with its exact reply."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import pytest
from mrtest.dnsserver import DnsServer
from mrtest.peers import AiosmtpdSink, RawClient, swaks
from mrtest.relayproc import RelayProcess, write_manifests
from mrtest.spamzones import RECORDS, SILENT

RCPT = "info@example.com"


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RelayProcess, AiosmtpdSink]]:
    workdir = tmp_path_factory.mktemp("spam-e2e")
    with (
        DnsServer(RECORDS, silent=SILENT) as dns_server,
        AiosmtpdSink("127.0.0.1") as sink,
    ):
        spec = {
            "hostname": "mx.relay.test",
            "postscreen": {
                "greet": {"action": "enforce", "wait": "1s"},
                "dnsbl": {
                    "action": "enforce",
                    "sites": [
                        {"zone": "bl.test", "returnCodes": ["127.0.0.2"]},
                        {"zone": "bl2.test"},
                        {"zone": "allow.test", "returnCodes": ["127.0.[0..255].1"], "weight": -2},
                    ],
                },
            },
            "restrictions": {
                "rejectUnknownRecipientDomain": True,
                "rejectUnknownReverseClientHostname": True,
                "rblClients": [{"zone": "bl.test", "returnCodes": ["127.0.0.10"]}],
                "spf": {"enabled": True, "skipAddresses": []},
            },
            "contentFilters": {"rejectAttachmentExtensions": ["exe", "scr"]},
            "dns": {"nameservers": [dns_server.nameserver], "timeout": "500ms"},
        }
        manifests = write_manifests(
            workdir / "manifests",
            next_hop=sink.address,
            domains={"example.com": [RCPT], "nullmx.test": "any"},
            spec=spec,
        )
        with RelayProcess(manifests, workdir) as proc:
            yield proc, sink


def rcpt_reply(result_lines: list[str]) -> str:
    """The reply to RCPT TO in a swaks transcript."""
    for i, line in enumerate(result_lines):
        if line.startswith(" -> RCPT TO:"):
            return next(ln[4:] for ln in result_lines[i + 1 :] if ln.startswith("<"))
    raise AssertionError("no RCPT in:\n" + "\n".join(result_lines))


def test_clean_client_passes_with_received_spf(relay: tuple[RelayProcess, AiosmtpdSink]) -> None:
    proc, sink = relay
    before = len(sink.messages)
    r = swaks(
        proc.address, local="127.0.0.20", helo="helo-pass.test", sender="joe@pass.test", to=RCPT
    )
    assert r.returncode == 0, r.output
    msg = sink.wait_for(before + 1)[-1]
    assert msg.header("Received-SPF") == (
        "Pass (mailfrom) identity=mailfrom; client-ip=127.0.0.20; helo=helo-pass.test; "
        "envelope-from=joe@pass.test; receiver=<UNKNOWN>"
    )
    assert msg.text.count("Received-SPF:") == 1
    proc.wait_for_log(r"PASS NEW \[127\.0\.0\.20\]")


def test_dnsbl_listed_client_gets_550_on_every_rcpt(
    relay: tuple[RelayProcess, AiosmtpdSink],
) -> None:
    proc, _ = relay
    r = swaks(proc.address, local="127.0.0.10", helo="x.test", sender="a@pass.test", to=RCPT)
    assert r.returncode != 0
    assert rcpt_reply(r.lines) == (
        "550 5.7.1 Service unavailable; client [127.0.0.10] blocked using bl.test"
    )


def test_second_dnsbl(relay: tuple[RelayProcess, AiosmtpdSink]) -> None:
    proc, _ = relay
    r = swaks(proc.address, local="127.0.0.13", helo="x.test", sender="a@pass.test", to=RCPT)
    assert rcpt_reply(r.lines).startswith("550 5.7.1 Service unavailable; client [127.0.0.13]")


def test_rbl_client_with_txt_reason(relay: tuple[RelayProcess, AiosmtpdSink]) -> None:
    proc, _ = relay
    r = swaks(proc.address, local="127.0.0.11", helo="x.test", sender="a@pass.test", to=RCPT)
    assert rcpt_reply(r.lines) == (
        "554 5.7.1 Service unavailable; Client host [127.0.0.11] blocked using bl.test; "
        "PBL listed (dynamic range)"
    )


def test_no_reverse_hostname(relay: tuple[RelayProcess, AiosmtpdSink]) -> None:
    proc, _ = relay
    r = swaks(proc.address, local="127.0.0.21", helo="x.test", sender="a@pass.test", to=RCPT)
    assert rcpt_reply(r.lines) == (
        "450 4.7.1 Client host rejected: cannot find your reverse hostname, [127.0.0.21]"
    )


def test_spf_fail(relay: tuple[RelayProcess, AiosmtpdSink]) -> None:
    proc, _ = relay
    r = swaks(proc.address, local="127.0.0.23", helo="nospf.test", sender="a@fail.test", to=RCPT)
    reply = rcpt_reply(r.lines)
    assert reply.startswith(
        "550 5.7.23 <info@example.com>: Recipient address rejected: "
        "Message rejected due to: SPF fail - not authorized. Please see "
    ), reply


def test_null_mx_recipient_domain(relay: tuple[RelayProcess, AiosmtpdSink]) -> None:
    proc, _ = relay
    r = swaks(
        proc.address,
        local="127.0.0.23",
        helo="nospf.test",
        sender="a@pass.test",
        to="x@nullmx.test",
    )
    assert rcpt_reply(r.lines) == (
        "556 5.1.10 <x@nullmx.test>: Recipient address rejected: "
        "Domain nullmx.test does not accept mail (nullMX)"
    )


def test_encoded_exe_attachment_is_rejected(relay: tuple[RelayProcess, AiosmtpdSink]) -> None:
    proc, sink = relay
    name = "=?UTF-8?B?" + base64.b64encode("Rechnung März.EXE".encode()).decode() + "?="
    data = (
        "From: joe@pass.test\r\nTo: info@example.com\r\nSubject: invoice\r\n"
        "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=XX\r\n\r\n"
        "--XX\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n"
        "--XX\r\nContent-Type: application/octet-stream\r\n"
        f'Content-Disposition: attachment; filename="{name}"\r\n'
        "Content-Transfer-Encoding: base64\r\n\r\nTVqQAAMAAAAEAAAA\r\n--XX--\r\n"
    )
    before = len(sink.messages)
    r = swaks(
        proc.address,
        local="127.0.0.20",
        helo="helo-pass.test",
        sender="joe@pass.test",
        to=RCPT,
        data=data,
    )
    assert r.returncode != 0
    final = [ln for ln in r.replies() if ln.startswith("550 5.7.1")]
    assert final and "Rechnung März.EXE" in final[0], r.output
    assert len(sink.messages) == before


async def test_pregreet_client_is_enforced(relay: tuple[RelayProcess, AiosmtpdSink]) -> None:
    proc, _ = relay
    async with RawClient(*proc.address, local="127.0.0.24") as c:
        await c.send(b"EHLO early.test\r\n")  # before the banner
        banner = await c.read_reply()
        assert banner.startswith("220-mx.relay.test")
        assert (await c.read_reply()).startswith("250")  # the pregreeted EHLO, answered
        assert (await c.command("MAIL FROM:<a@pass.test>")).startswith("250")
        assert await c.command(f"RCPT TO:<{RCPT}>") == "550 5.5.1 Protocol error"
    proc.wait_for_log(r"PREGREET \d+ after [0-9.]+ from \[127\.0\.0\.24\]:\d+: EHLO early\.test")
