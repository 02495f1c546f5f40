"""SMTPUTF8, BODY and DSN parameters at delivery: passed to next hops that
offer them (Postfix), the 5.6.7 bounce when a message needs SMTPUTF8 and the
next hop lacks it, and our own DSNs under NOTIFY, RET, ENVID and ORCPT."""

from __future__ import annotations

import asyncio
import email
import email.policy
import logging
import smtplib
import subprocess
from pathlib import Path
from typing import Any

import pytest
from mrtest import postfix
from mrtest.delivery_helpers import FakeClock, Relay, make_config, message
from mrtest.peers import PostfixSink, swaks
from mrtest.relayproc import free_port, wait_until

from relay.config import NextHop
from relay.delivery.dsn import Failure, is_international
from relay.queue.mailparams import MailParams, RecipientParams


async def send(relay: Relay, data: bytes, sender: str, rcpts: list[str], params: MailParams) -> str:
    msg = relay.queue.incoming()
    msg.write(data)
    qid = await msg.commit(sender, rcpts, "127.0.0.9", params=params)
    relay.delivery.wake(qid)
    return qid


def hops(dest_port: int, home_port: int, dest: str = "127.0.0.2") -> dict[str, NextHop]:
    return {
        "example.com": NextHop(dest, dest_port, tls="none"),
        "example.org": NextHop("127.0.0.3", home_port, tls="none"),
    }


def parts(data: bytes) -> list[Any]:
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    return [parsed, *parsed.iter_parts()]


UTF8_MESSAGE = "From: a@example.org\r\nSubject: Grüße\r\n\r\nKäse\r\n".encode()


async def test_needs_smtputf8_next_hop_without_it_bounces_5_6_7(
    sink_factory: Any, relay_factory: Any, caplog: Any
) -> None:
    caplog.set_level(logging.INFO, logger="relay.delivery")
    dest = await sink_factory("127.0.0.2")  # aiosmtpd without SMTPUTF8
    home = await sink_factory("127.0.0.3")
    relay = await relay_factory(make_config(hops(dest.port, home.port)))
    await send(relay, UTF8_MESSAGE, "a@example.org", ["b@example.com"], MailParams(smtputf8=True))
    await relay.delivery.idle()
    assert dest.messages == []
    label = f"127.0.0.2[127.0.0.2]:{dest.port}"
    reason = f"SMTPUTF8 is required, but was not offered by host {label}"
    assert f"dsn=5.6.7, status=bounced ({reason})" in caplog.text
    [bounce] = home.messages
    _, text, status, _ = parts(bounce.data)
    assert f"<b@example.com>: {reason}" in text.get_content()
    assert "Status: 5.6.7" in status.as_string()


async def test_smtputf8_requested_but_not_needed_goes_without_it(
    sink_factory: Any, relay_factory: Any
) -> None:
    dest = await sink_factory("127.0.0.2")
    home = await sink_factory("127.0.0.3")
    relay = await relay_factory(make_config(hops(dest.port, home.port)))
    await send(relay, message(), "a@example.org", ["b@example.com"], MailParams(smtputf8=True))
    await relay.delivery.idle()
    [got] = dest.messages
    assert "SMTPUTF8" not in got.mail_options and home.messages == []


async def test_smtputf8_passed_on_when_offered(sink_factory: Any, relay_factory: Any) -> None:
    dest = await sink_factory("127.0.0.2", smtputf8=True)
    home = await sink_factory("127.0.0.3")
    relay = await relay_factory(make_config(hops(dest.port, home.port)))
    params = MailParams(smtputf8=True, body="8BITMIME")
    await send(relay, UTF8_MESSAGE, "a@example.org", ["ü@example.com"], params)
    await relay.delivery.idle()
    [got] = dest.messages
    assert got.recipients == ["ü@example.com"] and "Grüße".encode() in got.data
    assert set(got.mail_options) >= {"SMTPUTF8", "BODY=8BITMIME"}


async def test_body_7bit_is_passed_as_declared(sink_factory: Any, relay_factory: Any) -> None:
    dest = await sink_factory("127.0.0.2")
    relay = await relay_factory(make_config(hops(dest.port, dest.port)))
    await send(relay, message(), "a@example.org", ["b@example.com"], MailParams(body="7BIT"))
    await relay.delivery.idle()
    assert dest.messages[0].mail_options == ["BODY=7BIT"]


async def test_notify_never_and_success_only_suppress_the_bounce(
    sink_factory: Any, relay_factory: Any, caplog: Any
) -> None:
    caplog.set_level(logging.INFO, logger="relay.delivery")
    refused = "550 5.1.1 User unknown"
    dest = await sink_factory(
        "127.0.0.2", rcpt_replies={"never@example.com": refused, "succ@example.com": refused}
    )
    home = await sink_factory("127.0.0.3")
    relay = await relay_factory(make_config(hops(dest.port, home.port)))
    params = MailParams(
        recipients={
            "never@example.com": RecipientParams(("NEVER",)),
            "succ@example.com": RecipientParams(("SUCCESS",)),
        }
    )
    qid = await send(
        relay, message(), "a@example.org", ["never@example.com", "succ@example.com"], params
    )
    await relay.delivery.idle()
    assert home.messages == [] and list(relay.queue.messages()) == []
    assert (
        f"{qid}: to=<never@example.com>: non-delivery notification not sent (NOTIFY=NEVER)"
        in caplog.text
    )
    assert "to=<succ@example.com>: non-delivery notification not sent (NOTIFY=SUCCESS)" in (
        caplog.text
    )


async def test_notify_never_expired_is_logged_as_not_returned(
    sink_factory: Any, relay_factory: Any, clock: FakeClock, caplog: Any
) -> None:
    """An expired recipient that asked for no notice: the expiry line says so
    (never "returned to sender"), once; the one who asked gets the bounce."""
    caplog.set_level(logging.INFO, logger="relay.delivery")
    home = await sink_factory("127.0.0.3")
    down = hops(free_port("127.0.0.2"), home.port)
    relay = await relay_factory(make_config(down, lifetime=3600))
    params = MailParams(recipients={"never@example.com": RecipientParams(("NEVER",))})
    rcpts = ["never@example.com", "dflt@example.com"]
    qid = await send(relay, message(), "a@example.org", rcpts, params)
    await relay.delivery.idle()
    while list(relay.queue.messages()):
        [m] = list(relay.queue.messages())
        clock.now = m.next_attempt
        await relay.delivery.process_due()
    log = caplog.text
    assert f"{qid}: to=<never@example.com>" in log
    assert "status=expired, not returned (NOTIFY=NEVER) (connect to" in log
    assert "to=<never@example.com>: non-delivery notification not sent" not in log
    assert log.count("status=expired, returned to sender") == 1  # dflt@example.com's
    [bounce] = home.messages
    assert b"dflt@example.com" in bounce.data and b"never@example.com" not in bounce.data


async def test_notify_success_without_dsn_at_the_next_hop_is_a_relayed_notice(
    sink_factory: Any, relay_factory: Any, caplog: Any
) -> None:
    caplog.set_level(logging.INFO, logger="relay.delivery")
    dest = await sink_factory("127.0.0.2")
    home = await sink_factory("127.0.0.3")
    relay = await relay_factory(make_config(hops(dest.port, home.port)))
    params = MailParams(
        envid="env-1",
        recipients={"b@example.com": RecipientParams(("SUCCESS",), "rfc822", "orig@example.net")},
    )
    qid = await send(relay, message(), "a@example.org", ["b@example.com", "c@example.com"], params)
    await relay.delivery.idle()
    assert [m.recipients for m in dest.messages] == [["b@example.com", "c@example.com"]]
    [notice] = home.messages
    top, text, status, returned = parts(notice.data)
    assert top["Subject"] == "Successful Mail Delivery Report"
    assert "Your message was successfully delivered" in text.get_content()
    assert "<b@example.com>: delivery via 127.0.0.2[127.0.0.2]: 250 2.0.0 Ok" in text.get_content()
    report = status.as_string()
    assert "Original-Envelope-Id: env-1" in report
    assert "Original-Recipient: rfc822;orig@example.net" in report
    assert "Action: relayed" in report and "Status: 2.0.0" in report
    assert "c@example.com" not in report  # no NOTIFY=SUCCESS: no notice
    assert returned.get_content_type() == "text/rfc822-headers"
    assert f"{qid}: sender delivery status notification:" in caplog.text
    # The notice delivered: a delivery status notification, not a "non-delivery" one.
    assert "delivery status notification to <a@example.org> sent (relay=127.0.0.3" in caplog.text
    assert "non-delivery" not in caplog.text


@pytest.mark.parametrize("ret", ["HDRS", "FULL", ""])
async def test_ret_returns_headers_or_the_whole_message(
    sink_factory: Any, relay_factory: Any, ret: str
) -> None:
    dest = await sink_factory("127.0.0.2", rcpt_replies={"b@example.com": "550 5.1.1 unknown"})
    home = await sink_factory("127.0.0.3")
    relay = await relay_factory(make_config(hops(dest.port, home.port)))
    params = MailParams(
        ret=ret,
        envid="E+1",
        recipients={"b@example.com": RecipientParams(("FAILURE",), "utf-8", "ü@example.com")},
    )
    body = b"the secret body\r\n"
    await send(relay, message(body=body), "a@example.org", ["b@example.com"], params)
    await relay.delivery.idle()
    [bounce] = home.messages
    top, _, status, returned = parts(bounce.data)
    assert top["Subject"] == "Undelivered Mail Returned to Sender"
    assert "Original-Envelope-Id: E+1" in status.as_string()
    assert "Original-Recipient: utf-8;\\x{FC}@example.com" in status.as_string()
    if ret != "HDRS":  # RET=FULL, and no RET at all (Postfix 3.7 too: the message)
        assert returned.get_content_type() == "message/rfc822"
        assert returned["Content-Description"] == "Undelivered Message"
        assert body in bounce.data
    else:
        assert returned.get_content_type() == "text/rfc822-headers"
        assert body not in bounce.data and b"Subject: test" in bounce.data


def status_blocks(part: Any) -> list[dict[str, str]]:
    """A (global-)delivery-status part's field blocks, per-message first,
    each parsed by the email package as a header section."""
    fields = part.get_payload()[0]  # message/*: one message, the per-message block its headers
    rest = fields.get_payload(decode=True).decode().replace("\r\n", "\n")  # 8bit: UTF-8
    blocks = [email.message_from_string(text + "\n") for text in rest.strip().split("\n\n")]
    return [dict(b.items()) for b in [fields, *blocks]]


@pytest.mark.parametrize(("ret", "home_smtputf8"), [("HDRS", True), ("FULL", True), ("", False)])
async def test_smtputf8_bounce_is_rfc_6533_global_notice(
    sink_factory: Any, relay_factory: Any, ret: str, home_smtputf8: bool
) -> None:
    """Postfix 3.7 for a message that asked for SMTPUTF8: message/global-
    delivery-status with utf-8 addresses, message/global(-headers), and the
    notice itself sent with SMTPUTF8; to a sender's server without it (the
    notice's own envelope and headers are ASCII), with 8BITMIME."""
    refused = {"ü@example.com": "550 5.1.1 unknown", "b@example.com": "550 5.1.1 unknown"}
    dest = await sink_factory("127.0.0.2", smtputf8=True, rcpt_replies=refused)
    home = await sink_factory("127.0.0.3", smtputf8=home_smtputf8)
    relay = await relay_factory(make_config(hops(dest.port, home.port)))
    params = MailParams(
        smtputf8=True,
        ret=ret,
        recipients={"b@example.com": RecipientParams((), "utf-8", "ö+1@example.com")},
    )
    await send(relay, UTF8_MESSAGE, "a@example.org", ["ü@example.com", "b@example.com"], params)
    await relay.delivery.idle()
    [bounce] = home.messages
    assert ("SMTPUTF8" in bounce.mail_options) is home_smtputf8
    assert "BODY=8BITMIME" in bounce.mail_options
    top, text, status, returned = parts(bounce.data)
    assert top.get_content_type() == "multipart/report"
    assert "<ü@example.com>: host 127.0.0.2[127.0.0.2] said: 550" in text.get_content()
    assert status.get_content_type() == "message/global-delivery-status"
    per_message, first, second = status_blocks(status)
    assert per_message["X-Mailrelay-Sender"] == "rfc822; a@example.org"
    assert first["Final-Recipient"] == "utf-8; ü@example.com"
    assert first["Original-Recipient"] == "utf-8;ü@example.com"
    assert second["Final-Recipient"] == "rfc822; b@example.com"
    # The client's utf-8 ORCPT, in the unitext form ("+" escaped).
    assert second["Original-Recipient"] == "utf-8;ö\\x{2B}1@example.com"
    assert first["Status"] == second["Status"] == "5.1.1"
    if ret == "HDRS":
        assert returned.get_content_type() == "message/global-headers"
        assert "Grüße".encode() in bounce.data and "Käse".encode() not in bounce.data
    else:
        assert returned.get_content_type() == "message/global"
        [original] = returned.get_payload()
        assert original["From"] == "a@example.org" and "Käse".encode() in bounce.data


async def test_utf8_recipient_without_smtputf8_also_gets_a_global_notice(
    sink_factory: Any, relay_factory: Any
) -> None:
    """Beyond Postfix (which keys on SMTPUTF8 alone): a UTF-8 address cannot
    be written in message/delivery-status, so its notice is global too; the
    notice goes without SMTPUTF8 to a next hop that lacks it (its envelope
    is ASCII)."""
    dest = await sink_factory("127.0.0.2")  # no SMTPUTF8: the recipient bounces 5.6.7
    home = await sink_factory("127.0.0.3")
    relay = await relay_factory(make_config(hops(dest.port, home.port)))
    await send(relay, message(), "a@example.org", ["ü@example.com"], MailParams())
    await relay.delivery.idle()
    [bounce] = home.messages
    assert "SMTPUTF8" not in bounce.mail_options
    _, _, status, returned = parts(bounce.data)
    assert status.get_content_type() == "message/global-delivery-status"
    assert status_blocks(status)[1]["Final-Recipient"] == "utf-8; ü@example.com"
    assert returned.get_content_type() == "message/global"


def submit_smtputf8(address: tuple[str, int], sender: str, rcpt: str, data: bytes) -> None:
    with smtplib.SMTP(*address, timeout=30) as c:
        c.ehlo("client.test")
        c.sendmail(sender, [rcpt], data, mail_options=["SMTPUTF8"])


@pytest.mark.skipif(not postfix.available(), reason="needs root and Postfix")
async def test_smtputf8_notice_as_postfixs(sink_factory: Any, relay_factory: Any) -> None:
    """The same SMTPUTF8 message to a recipient that fails, through Postfix
    3.7 and through us: the same MIME types, the same Final-Recipient, both
    notices sent with SMTPUTF8. (Postfix's Original-Recipient, made up,
    says rfc822;ü@down.test, not an rfc822 address: ours says utf-8.)"""
    home = await sink_factory("127.0.0.13", smtputf8=True)  # a@example.com's server
    pf = postfix.PostfixServer("127.0.0.9", main_cf={"relay_domains": "example.com down.test"})
    transport = pf.workdir / "transport"
    down = free_port("127.0.0.12")  # nothing listens: Postfix returns the message at once
    transport.write_text(
        f"example.com smtp:[127.0.0.13]:{home.port}\ndown.test smtp:[127.0.0.12]:{down}\n"
    )
    pf.settings |= {"transport_maps": f"texthash:{transport}", "maximal_queue_lifetime": "0"}
    with pf:
        await asyncio.to_thread(
            submit_smtputf8, pf.address, "a@example.com", "ü@down.test", UTF8_MESSAGE
        )
        for _ in range(600):  # (the sink answers on this event loop: no blocking wait)
            if home.messages:
                break
            await asyncio.sleep(0.1)
    dest = await sink_factory(
        "127.0.0.2", smtputf8=True, rcpt_replies={"ü@down.test": "550 5.1.1 no"}
    )
    relay = await relay_factory(
        make_config(
            {
                "down.test": NextHop("127.0.0.2", dest.port, tls="none"),
                "example.com": NextHop("127.0.0.13", home.port, tls="none"),
            }
        )
    )
    params = MailParams(smtputf8=True)
    await send(relay, UTF8_MESSAGE, "a@example.com", ["ü@down.test"], params)
    await relay.delivery.idle()
    theirs, ours = home.messages
    assert b"X-Postfix-Queue-ID" in theirs.data and b"X-Mailrelay-Queue-ID" in ours.data
    for bounce in (theirs, ours):
        assert "SMTPUTF8" in bounce.mail_options
        assert [p.get_content_type() for p in parts(bounce.data)] == [
            "multipart/report",
            "text/plain",
            "message/global-delivery-status",
            "message/global",
        ]
        _, _, status, _ = parts(bounce.data)
        assert status["Content-Transfer-Encoding"] == "8bit"
        assert status_blocks(status)[1]["Final-Recipient"] == "utf-8; ü@down.test"


def test_only_smtputf8_or_utf8_makes_a_notice_international() -> None:
    def international(smtputf8: bool = False, rcpt: str = "b@x", headers: bytes = b"") -> bool:
        failures = [Failure(rcpt, "5.1.1", "550 no")]
        return is_international(
            smtputf8=smtputf8, sender="a@x", failures=failures, original_headers=headers
        )

    assert not international()  # all-ASCII mail: the RFC 3464 notice, as before
    assert international(smtputf8=True)
    assert international(rcpt="ü@x")
    assert international(headers="Subject: Grüße\r\n".encode())


@pytest.mark.parametrize("ret", ["FULL", ""])
async def test_a_message_over_the_bounce_size_limit_returns_its_headers(
    sink_factory: Any, relay_factory: Any, ret: str
) -> None:
    """Postfix 3.7 (bounce_size_limit 50000) returns a larger message's
    headers, whatever RET says."""
    dest = await sink_factory("127.0.0.2", rcpt_replies={"b@example.com": "550 5.1.1 unknown"})
    home = await sink_factory("127.0.0.3")
    relay = await relay_factory(make_config(hops(dest.port, home.port)))
    body = b"x" * 70 + b"\r\n"
    await send(
        relay, message(body=body * 1000), "a@example.org", ["b@example.com"], MailParams(ret=ret)
    )
    await relay.delivery.idle()
    [bounce] = home.messages
    *_, returned = parts(bounce.data)
    assert returned.get_content_type() == "text/rfc822-headers"
    assert body not in bounce.data and b"Subject: test" in bounce.data


@pytest.mark.skipif(not postfix.available(), reason="needs root and Postfix")
async def test_postfix_next_hop_receives_the_dsn_parameters(
    relay_factory: Any, caplog: Any
) -> None:
    caplog.set_level(logging.INFO, logger="relay.delivery")
    settings = {
        "relay_domains": "example.com",
        "smtputf8_enable": "yes",
        # Every message stays in Postfix's hold queue, where postcat shows its envelope.
        "smtpd_data_restrictions": "check_client_access static:HOLD",
    }
    with postfix.PostfixServer("127.0.0.9", main_cf=settings) as pf:
        relay = await relay_factory(
            make_config({"example.com": NextHop(pf.host, pf.port, tls="none")})
        )
        params = MailParams(
            smtputf8=True,
            ret="HDRS",
            envid="id+1 x",
            recipients={
                "b@example.com": RecipientParams(("SUCCESS", "FAILURE"), "rfc822", "o@example.net"),
                "ü@example.com": RecipientParams(("NEVER",)),
            },
        )
        await send(relay, UTF8_MESSAGE, "a@example.org", ["b@example.com", "ü@example.com"], params)
        await relay.delivery.idle()
        assert list(relay.queue.messages()) == []
        # NOTIFY=SUCCESS went to a next hop that offers DSN: its notice, not ours.
        assert "notification" not in caplog.text
        hold = Path(pf.settings["queue_directory"]) / "hold"
        wait_until(lambda: any(hold.iterdir()), 30, "a held message")
        [held] = list(hold.iterdir())
        shown = subprocess.run(
            ["postcat", "-c", str(pf.etc), "-e", str(held)], capture_output=True, text=True
        ).stdout
    # Postfix's record of what it received (src/global/dsn.h, smtputf8.h).
    assert "named_attribute: envelope_id=id+1 x\n" in shown
    assert "named_attribute: ret_flags=2\n" in shown  # DSN_RET_HDRS
    assert (
        "named_attribute: notify_flags=6\n"  # SUCCESS|FAILURE
        "named_attribute: dsn_orig_rcpt=rfc822;o@example.net\n"
        "original_recipient: b@example.com\n"
    ) in shown
    assert "named_attribute: notify_flags=1\n" in shown  # NEVER
    # No ORCPT from the client: ours, as Postfix makes one up (RFC 6533's utf-8
    # type, utf-8;\x{FC}@example.com, which Postfix decodes).
    assert "named_attribute: dsn_orig_rcpt=utf-8;ü@example.com\n" in shown
    assert "recipient: ü@example.com" in shown
    # message_size's last field: SMTPUTF8 requested (1) and UTF-8 in a header (2).
    [sizes] = [line for line in shown.splitlines() if line.startswith("message_size:")]
    assert sizes.split()[-1] == "3"


async def test_smtp_sink_without_8bitmime_and_smtputf8(
    sink_factory: Any, relay_factory: Any, tmp_path: Path, caplog: Any
) -> None:
    """smtp-sink -8 offers DSN but neither 8BITMIME nor SMTPUTF8: an 8-bit body
    goes as it is (no BODY=, no conversion), the DSN parameters are passed
    on (an ORCPT made up when the client gave none, as Postfix does), and a
    message that needs SMTPUTF8 bounces 5.6.7."""
    caplog.set_level(logging.INFO, logger="relay.delivery")
    home = await sink_factory("127.0.0.3")
    with PostfixSink("127.0.0.11", tmp_path, options=["-8"]) as sink:
        relay = await relay_factory(make_config(hops(sink.port, home.port, "127.0.0.11")))
        params = MailParams(
            body="8BITMIME",
            ret="FULL",
            envid="e 1",
            recipients={"b@example.com": RecipientParams(("FAILURE",), "rfc822", "o@example.net")},
        )
        body = "Käse\r\n".encode()
        await send(relay, message(body=body), "a@example.org", ["b@example.com"], params)
        await send(
            relay, UTF8_MESSAGE, "a@example.org", ["c@example.com"], MailParams(smtputf8=True)
        )
        await relay.delivery.idle()
        await send(relay, message(), "a@example.org", ["c+x=y@example.com"], MailParams())
        await relay.delivery.idle()
        dumps = sink.wait_for(2)
    [got] = [m for m in dumps if "RET=FULL" in m.mail_args]
    [plain] = [m for m in dumps if m is not got]
    assert got.mail_args == "<a@example.org> RET=FULL ENVID=e+201"
    # ORCPT first, as Postfix's smtp client sends it; without the client's, Postfix's own.
    assert got.rcpt_args == ["<b@example.com> ORCPT=rfc822;o@example.net NOTIFY=FAILURE"]
    assert plain.rcpt_args == ["<c+x=y@example.com> ORCPT=rfc822;c+2Bx+3Dy@example.com"]
    assert body in got.data
    [bounce] = home.messages
    assert b"Status: 5.6.7" in bounce.data and b"c@example.com" in bounce.data
    assert "SMTPUTF8 is required, but was not offered by host 127.0.0.11[127.0.0.11]" in caplog.text


@pytest.mark.skipif(not postfix.available(), reason="needs root and Postfix")
async def test_orcpt_made_up_and_returned_message_as_postfix(
    relay_factory: Any, tmp_path: Path
) -> None:
    """The same recipients through Postfix 3.7 and through us to smtp-sink
    (which offers DSN): the same RCPT parameters. And Postfix, like us,
    returns the whole message in a bounce when the sender gave no RET."""
    rcpts = ["c+x=y@example.com", "d@example.com"]
    with PostfixSink("127.0.0.11", tmp_path) as sink:
        relay = await relay_factory(make_config(hops(sink.port, sink.port, "127.0.0.11")))
        await send(relay, message(), "a@example.org", rcpts, MailParams())
        await relay.delivery.idle()
        [ours] = sink.wait_for(1)
        pf = postfix.PostfixServer("127.0.0.9", main_cf={"relay_domains": "example.com down.test"})
        transport = pf.workdir / "transport"
        down = free_port("127.0.0.12")
        transport.write_text(
            f"example.com smtp:[127.0.0.11]:{sink.port}\ndown.test smtp:[127.0.0.12]:{down}\n"
        )
        pf.settings |= {"transport_maps": f"texthash:{transport}", "maximal_queue_lifetime": "0"}
        with pf:
            sent = swaks(pf.address, to=",".join(rcpts), sender="a@example.org")
            assert sent.returncode == 0, sent.output
            body = "body of the bounced one"
            sent = swaks(
                pf.address, to="x@down.test", sender="a@example.com", extra=["--body", body]
            )
            assert sent.returncode == 0, sent.output
            dumps = sink.wait_for(3)
    [theirs] = [m for m in dumps if m.recipients == rcpts and b"(Postfix)" in m.data]
    assert theirs.rcpt_args == ours.rcpt_args
    assert ours.rcpt_args == [
        "<c+x=y@example.com> ORCPT=rfc822;c+2Bx+3Dy@example.com",
        "<d@example.com> ORCPT=rfc822;d@example.com",
    ]
    [bounce] = [m for m in dumps if m.recipients == ["a@example.com"]]
    *_, returned = parts(bounce.data)
    assert returned.get_content_type() == "message/rfc822" and body.encode() in bounce.data
