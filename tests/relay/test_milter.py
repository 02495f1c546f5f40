"""The milter client (relay.smtpd.milter, milters, milteredit) against a
scripted milter server: negotiation, macros, every verdict and every
modification, streaming, and the defaultAction of a milter that is down,
slow or broken."""

from __future__ import annotations

import io
import socket
import struct

import pytest
from mrtest.testmilter import (
    ACCEPT,
    CONTINUE,
    DISCARD,
    REJECT,
    SKIP,
    TEMPFAIL,
    ScriptedMilter,
    add_header,
    change_header,
    cstr,
    insert_header,
    reply,
)
from prometheus_client import REGISTRY

from mailrelay_api.spec import MailRelaySpec
from mailrelay_api.validate import validate_object
from relay.config import Milter, config_from_spec
from relay.smtpd import milter as m
from relay.smtpd.milteredit import edit_envelope, rewrite_message
from relay.smtpd.milters import REJECT_REPLY, TEMPFAIL_REPLY, MessageVerdict, MilterChain
from relay.smtpd.session import Reply

MESSAGE = (
    b"Received: from client\r\n"
    b"Subject: hello\r\n"
    b"X-Folded: one\r\n\ttwo\r\n"
    b"From: a@example.org\r\n"
    b"\r\n"
    b"body line 1\r\n"
    b"body line 2\r\n"
)
SESSION_MACROS = {
    "j": "mx.example.net",
    "{daemon_name}": "mailrelay",
    "v": "mailrelay",
    "{client_addr}": "192.0.2.7",
    "{client_name}": "client.example.org",
}


def chain_of(
    *addresses: str, default_action: str = "tempfail", timeout: float = 5.0
) -> MilterChain:
    milters = tuple(
        Milter(
            f"m{i}",
            a,
            connect_timeout=timeout,
            command_timeout=timeout,
            default_action=default_action,
        )  # type: ignore[arg-type]
        for i, a in enumerate(addresses)
    )
    return MilterChain(milters, dict(SESSION_MACROS))


async def run_message(chain: MilterChain, message: bytes = MESSAGE, chunk: int = 7):
    """Connect to end of message; the first refusal, or the end-of-message verdict."""
    chain.queue_id = "QID1"
    for step in (
        lambda: chain.connect("client.example.org", "192.0.2.7", 40000),
        lambda: chain.helo("client.example.org", {"{tls_version}": "", "{cipher}": ""}),
        lambda: chain.mail("a@example.org", ["BODY=8BITMIME"], {"i": "QID1", "{auth_type}": ""}),
        lambda: chain.rcpt("b@example.net", [], {"i": "QID1", "{rcpt_addr}": "b@example.net"}),
        chain.data,
    ):
        refusal = await step()
        if refusal is not None:
            return refusal
    for start in range(0, len(message), chunk):
        refusal = await chain.feed(message[start : start + chunk])
        if refusal is not None:
            return refusal
    return await chain.end_of_message()


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def refusal_of(result: Reply | MessageVerdict | None) -> Reply | None:
    """The refusal, at a step or at end of message (where a short body goes)."""
    return result.reply if isinstance(result, MessageVerdict) else result


@pytest.fixture
async def milter():
    server = ScriptedMilter()
    yield server
    await server.stop()


async def test_negotiation_events_macros_and_headers(milter: ScriptedMilter):
    chain = chain_of(await milter.start())
    verdict = await run_message(chain)
    chain.close()
    assert milter.offered == (6, m.OFFERED_ACTIONS, m.OFFERED_PROTOCOL)
    assert milter.events == [
        m.CONNECT,
        m.HELO,
        m.MAIL,
        m.RCPT,
        m.DATA,
        m.HEADER,
        m.HEADER,
        m.HEADER,
        m.HEADER,
        m.EOH,
        m.BODY,
        m.BODYEOB,
    ]
    assert milter.envelope == ["<a@example.org>", "<b@example.net>"]
    assert milter.macros[m.CONNECT]["{client_addr}"] == "192.0.2.7"
    assert milter.macros[m.CONNECT]["j"] == "mx.example.net"
    assert milter.macros[m.MAIL]["i"] == "QID1"
    assert milter.macros[m.MAIL]["{auth_type}"] == ""
    assert "{tls_version}" in milter.macros[m.HELO]
    assert milter.macros[m.DATA] == milter.macros[m.BODYEOB] == {"i": "QID1"}
    assert "{client_addr}" not in milter.macros[m.MAIL]  # each stage its own
    assert m.HEADER not in milter.macros and m.BODY not in milter.macros
    # No SMFIP_HDR_LEADSPC: values without the space; folds joined by "\n".
    assert milter.headers[1] == ("Subject", "hello")
    assert milter.headers[2] == ("X-Folded", "one\n\ttwo")
    assert bytes(milter.body) == b"body line 1\r\nbody line 2\r\n"
    assert verdict.reply is None and not verdict.discard and verdict.quarantine is None
    await milter.closed.wait()  # SMFIC_QUIT closed it


async def test_symlist_limits_the_macros(milter: ScriptedMilter):
    milter.symlists = {2: "{mail_addr} i"}  # SMFIM_ENVFROM
    chain = chain_of(await milter.start())
    await run_message(chain)
    chain.close()
    assert set(milter.macros[m.MAIL]) == {"i"}


async def test_leading_space_kept_when_negotiated(milter: ScriptedMilter):
    milter.protocol = m.P_HDR_LEADSPC
    chain = chain_of(await milter.start())
    await run_message(chain)
    chain.close()
    assert milter.headers[1] == ("Subject", " hello")


@pytest.mark.parametrize(
    ("event", "packet", "expected"),
    [
        (m.CONNECT, REJECT, REJECT_REPLY),
        (m.HELO, TEMPFAIL, TEMPFAIL_REPLY),
        (m.MAIL, REJECT, REJECT_REPLY),
        (m.RCPT, reply("550 5.7.0 go away"), "550 5.7.0 go away"),
        (m.DATA, TEMPFAIL, TEMPFAIL_REPLY),
        (m.HEADER, REJECT, REJECT_REPLY),
        (m.EOH, reply("451 4.7.0 later"), "451 4.7.0 later"),
        (m.BODY, REJECT, REJECT_REPLY),
    ],
)
async def test_refusals_at_each_step(milter: ScriptedMilter, event, packet, expected):
    milter.answers = {event: [packet]}
    chain = chain_of(await milter.start())
    refusal = await run_message(chain)
    chain.close()
    assert str(refusal_of(refusal)) == str(expected)


async def test_replycode_421_disconnects(milter: ScriptedMilter):
    milter.answers = {m.MAIL: [reply("421 4.7.0 closing")]}
    chain = chain_of(await milter.start())
    refusal = await run_message(chain)
    chain.close()
    assert refusal.code == 421 and refusal.disconnect


async def test_end_of_message_verdicts(milter: ScriptedMilter):
    milter.answers = {m.BODYEOB: [REJECT]}
    chain = chain_of(await milter.start())
    verdict = await run_message(chain)
    assert verdict.reply == REJECT_REPLY
    milter.answers = {m.BODYEOB: [TEMPFAIL]}
    await chain.abort()
    verdict = await run_message_again(chain)
    assert verdict.reply == TEMPFAIL_REPLY
    chain.close()


async def run_message_again(chain: MilterChain):
    """A second transaction on the same session (after RSET)."""
    for step in (
        lambda: chain.mail("a@example.org", [], {}),
        lambda: chain.rcpt("c@example.net", [], {}),
        chain.data,
    ):
        refusal = await step()
        if refusal is not None:
            return refusal
    await chain.feed(MESSAGE)
    return await chain.end_of_message()


@pytest.mark.parametrize("event", [m.MAIL, m.RCPT, m.BODYEOB])
async def test_discard(milter: ScriptedMilter, event):
    milter.answers = {event: [DISCARD]}
    chain = chain_of(await milter.start())
    verdict = await run_message(chain)
    chain.close()
    assert verdict.discard and verdict.reply is None


async def test_accept_at_connect_ends_the_milters_events(milter: ScriptedMilter):
    milter.answers = {m.CONNECT: [ACCEPT]}
    chain = chain_of(await milter.start())
    verdict = await run_message(chain)
    chain.close()
    assert milter.events == [m.CONNECT]
    assert verdict.reply is None


async def test_accept_at_mail_ends_the_message_only(milter: ScriptedMilter):
    milter.answers = {m.MAIL: [ACCEPT]}
    chain = chain_of(await milter.start())
    await run_message(chain)
    assert milter.events == [m.CONNECT, m.HELO, m.MAIL]
    await run_message_again(chain)
    chain.close()
    assert milter.events.count(m.MAIL) == 2


async def test_skip_stops_the_body(milter: ScriptedMilter):
    milter.answers = {m.BODY: [SKIP]}
    chain = chain_of(await milter.start())
    body = b"x" * 70 + b"\r\n"
    verdict = await run_message(chain, MESSAGE + body * 10_000, chunk=64 * 1024)
    chain.close()
    assert milter.body_chunks == 1 and milter.events[-1] == m.BODYEOB
    assert verdict.reply is None


async def test_body_streams_in_bounded_chunks(milter: ScriptedMilter):
    chain = chain_of(await milter.start())
    body = b"0123456789" * 7 + b"\r\n"
    message = MESSAGE + body * 50_000  # 3.6 MB
    await run_message(chain, message, chunk=256 * 1024)
    chain.close()
    assert bytes(milter.body) == message[message.index(b"\r\n\r\n") + 4 :]
    assert milter.largest_chunk <= m.BODY_CHUNK
    assert len(chain._body) == 0


async def test_first_refusal_wins_and_later_milters_are_not_asked():
    first, second = ScriptedMilter(answers={m.RCPT: [REJECT]}), ScriptedMilter()
    chain = chain_of(await first.start(), await second.start())
    refusal = await run_message(chain)
    chain.close()
    await first.stop()
    await second.stop()
    assert refusal == REJECT_REPLY
    assert m.RCPT in first.events and m.RCPT not in second.events


async def test_no_reply_steps_are_not_waited_for(milter: ScriptedMilter):
    milter.protocol = m.P_NR_CONN | m.P_NR_HELO | m.P_NR_HDR | m.P_NOBODY
    chain = chain_of(await milter.start())
    verdict = await run_message(chain)
    chain.close()
    assert verdict.reply is None and m.BODY not in milter.events


async def test_what_needs_no_reply_reaches_the_milter_whole_and_in_order(milter: ScriptedMilter):
    """rspamd's negotiation: no reply to anything but the end of the message.
    The events and their macros wait for the next write, in order; a large body
    still goes out in bounded writes."""
    nr = [flags[1] for flags in m.EVENT_FLAGS.values()]
    milter.protocol = sum(set(nr))
    answers = sample("mailrelay_milter_verdicts_total", milter="m0", verdict="continue")
    timed = sample("mailrelay_milter_seconds_count", milter="m0")
    chain = chain_of(await milter.start())
    body = b"0123456789" * 7 + b"\r\n"
    message = MESSAGE + body * 20_000  # 1.4 MB
    verdict = await run_message(chain, message, chunk=64 * 1024)
    assert chain.states[0].connection._pending == b""  # all of it written
    chain.close()
    assert verdict.reply is None
    assert milter.events[:5] == [m.CONNECT, m.HELO, m.MAIL, m.RCPT, m.DATA]
    assert milter.events[5:10] == [m.HEADER] * 4 + [m.EOH]
    assert set(milter.events[10:-1]) == {m.BODY} and milter.events[-1] == m.BODYEOB
    assert milter.macros[m.CONNECT]["{client_addr}"] == "192.0.2.7"
    assert milter.macros[m.MAIL]["i"] == "QID1"
    assert bytes(milter.body) == message[message.index(b"\r\n\r\n") + 4 :]
    assert milter.largest_chunk <= m.BODY_CHUNK
    # Only what has an answer is counted and timed: the end of message (and the
    # negotiation, timed).
    assert sample("mailrelay_milter_verdicts_total", milter="m0", verdict="continue") == answers + 1
    assert sample("mailrelay_milter_seconds_count", milter="m0") == timed + 2


async def test_events_the_milter_does_not_want_are_neither_counted_nor_timed(
    milter: ScriptedMilter,
):
    """Like those it asked no reply for: not sent, nothing answered, so no
    verdict counted and no time observed, even for a caller that sends one."""
    milter.protocol = m.P_NOHELO | m.P_NOHDRS
    answers = sample("mailrelay_milter_verdicts_total", milter="m0", verdict="continue")
    timed = sample("mailrelay_milter_seconds_count", milter="m0")
    chain = chain_of(await milter.start())
    verdict = await run_message(chain)
    s = chain.states[0]
    answer, _ = await chain._call(s, m.HELO, {}, m._cstr("client.example.org"))
    assert answer is m.NO_REPLY
    assert chain._decide(s, answer, message=False) == (None, False)
    chain.close()
    assert verdict.reply is None
    assert m.HELO not in milter.events and m.HEADER not in milter.events
    # One answer counted and timed per event the milter got (and the negotiation, timed).
    got = len(milter.events)
    assert (
        sample("mailrelay_milter_verdicts_total", milter="m0", verdict="continue") == answers + got
    )
    assert sample("mailrelay_milter_seconds_count", milter="m0") == timed + got + 1


# --- modifications --------------------------------------------------------------
async def test_every_modification(milter: ScriptedMilter):
    milter.answers = {
        m.BODYEOB: [
            add_header("X-Added", "yes"),
            insert_header(0, "X-First", "top"),
            change_header(1, "Subject", "changed"),
            change_header(1, "X-Folded", ""),  # delete
            (m.R_ADDRCPT, cstr("<new@example.net>")),
            (m.R_ADDRCPT_PAR, cstr("<par@example.net>", "NOTIFY=NEVER")),
            (m.R_DELRCPT, cstr("<b@example.net>")),
            (m.R_CHGFROM, cstr("<bounce@example.org>", "SIZE=10")),
            (m.R_REPLBODY, b"new body\r\n"),
            (m.R_REPLBODY, b"second chunk\r\n"),
            (m.R_QUARANTINE, cstr("looks odd")),
            (m.R_PROGRESS, b""),
            CONTINUE,
        ]
    }
    chain = chain_of(await milter.start())
    verdict = await run_message(chain)
    chain.close()
    assert verdict.reply is None and verdict.quarantine == "looks odd"
    out = io.BytesIO()
    rewrite_message(io.BytesIO(MESSAGE), out.write, verdict.modifications)
    assert out.getvalue() == (
        b"X-First: top\r\n"
        b"Received: from client\r\n"
        b"Subject: changed\r\n"
        b"From: a@example.org\r\n"
        b"X-Added: yes\r\n"
        b"\r\n"
        b"new body\r\nsecond chunk\r\n"
    )
    sender, recipients = edit_envelope("a@example.org", ["b@example.net"], verdict.modifications)
    assert sender == "bounce@example.org"
    assert recipients == ["new@example.net", "par@example.net"]
    verdict.close()


async def test_modification_not_negotiated_is_a_failure(milter: ScriptedMilter):
    milter.actions = m.F_ADDHDRS
    milter.answers = {m.BODYEOB: [(m.R_DELRCPT, cstr("<b@example.net>")), CONTINUE]}
    chain = chain_of(await milter.start())
    verdict = await run_message(chain)
    chain.close()
    assert verdict.reply == TEMPFAIL_REPLY


def test_rewrite_keeps_an_unmodified_body_and_multiple_milters_apply_in_order():
    first = m.Modifications(header_edits=[m.HeaderEdit("add", "X-A", "1")])
    second = m.Modifications(
        header_edits=[m.HeaderEdit("change", "X-A", "2", 1)], leading_space=True
    )
    out = io.BytesIO()
    big_body = b"line\r\n" * 100_000
    rewrite_message(io.BytesIO(b"Subject: s\r\n\r\n" + big_body), out.write, [first, second])
    assert out.getvalue() == b"Subject: s\r\nX-A:2\r\n\r\n" + big_body


# --- a milter that is down, slow or broken ----------------------------------------------
def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(
    ("action", "expected"),
    [("tempfail", TEMPFAIL_REPLY), ("reject", REJECT_REPLY), ("accept", None)],
)
async def test_down_milter_applies_its_default_action(action, expected):
    chain = chain_of(f"inet:127.0.0.1:{closed_port()}", default_action=action)
    result = await run_message(chain)
    chain.close()
    if expected is None:
        assert result.reply is None
    else:
        assert result == expected
        assert (
            str(result)
            == {
                "tempfail": "451 4.7.1 Service unavailable - try again later",
                "reject": "550 5.7.1 Command rejected",
            }[action]
        )


@pytest.mark.parametrize("event", [m.OPTNEG, m.RCPT, m.BODY, m.BODYEOB])
async def test_slow_milter_applies_its_default_action(milter: ScriptedMilter, event):
    milter.hang_on = event
    # Every reply before the hang must come within the timeout: 1 s on a loaded machine.
    chain = chain_of(await milter.start(), timeout=1.0)
    result = await run_message(chain, MESSAGE * 3)
    chain.close()
    assert refusal_of(result) == TEMPFAIL_REPLY


async def test_slow_milter_with_accept_is_skipped(milter: ScriptedMilter):
    milter.hang_on = m.MAIL
    chain = chain_of(await milter.start(), default_action="accept", timeout=1.0)
    verdict = await run_message(chain)
    chain.close()
    assert verdict.reply is None


async def test_broken_negotiation_and_garbage_apply_the_default_action(milter: ScriptedMilter):
    milter.refuse_negotiation = True
    chain = chain_of(await milter.start(), default_action="reject")
    assert await run_message(chain) == REJECT_REPLY
    chain.close()
    milter.refuse_negotiation = False
    milter.answers = {m.HELO: [(b"Z", b"")]}  # no such reply
    chain = chain_of(await milter.start())
    assert await run_message(chain) == TEMPFAIL_REPLY
    chain.close()
    milter.answers = {m.RCPT: [(m.R_REPLYCODE, cstr("5²0 odd"))]}  # not a number
    chain = chain_of(await milter.start())
    assert await run_message(chain) == TEMPFAIL_REPLY
    chain.close()
    milter.answers = {m.RCPT: [(m.R_REPLYCODE, cstr("250 fine"))]}  # not a refusal code
    chain = chain_of(await milter.start())
    assert await run_message(chain) == TEMPFAIL_REPLY
    chain.close()


def test_addresses():
    assert m.parse_address("inet:127.0.0.1:11332") == ("127.0.0.1", 11332)
    assert m.parse_address("inet:[::1]:8891") == ("::1", 8891)
    assert m.parse_address("inet:8891@localhost") == ("localhost", 8891)
    assert m.parse_address("unix:/run/milter.sock") == ("unix", "/run/milter.sock")
    with pytest.raises(ValueError):
        m.parse_address("tcp:1.2.3.4")
    assert m.connect_data("h", "192.0.2.1", 25) == b"h\x004" + struct.pack("!H", 25) + (
        b"192.0.2.1\x00"
    )


# --- the manifest contract ----------------------------------------------------------
def test_spec_to_config():
    spec = MailRelaySpec.with_defaults(
        {
            "hostname": "mx.example.net",
            "contentFilters": {
                "milters": [
                    {"name": "rspamd", "address": "inet:rspamd:11332"},
                    {
                        "name": "opendkim",
                        "address": "unix:/run/opendkim/sock",
                        "connectTimeout": "5s",
                        "commandTimeout": "1m",
                        "defaultAction": "accept",
                    },
                ]
            },
        }
    )
    config = config_from_spec("r", spec, {}, set())
    assert config.milters == (
        Milter("rspamd", "inet:rspamd:11332", 30.0, 30.0, "tempfail"),
        Milter("opendkim", "unix:/run/opendkim/sock", 5.0, 60.0, "accept"),
    )
    assert MailRelaySpec.defaults().content_filters.milters == ()


def manifest(milters: list[dict[str, str]]) -> dict:
    return {
        "apiVersion": "mailrelay.io/v1alpha1",
        "kind": "MailRelay",
        "metadata": {"name": "r", "namespace": "mail"},
        "spec": {"hostname": "mx.example.net", "contentFilters": {"milters": milters}},
    }


def test_manifest_validation():
    good = [{"name": "a", "address": "inet:[::1]:8891"}, {"name": "b", "address": "unix:/s"}]
    assert validate_object(manifest(good)) == []
    for bad in (
        [{"name": "a", "address": "tcp:1.2.3.4:25"}],
        [{"name": "a", "address": "inet:h:1", "defaultAction": "quarantine"}],
        [{"name": "a", "address": "inet:h:1"}, {"name": "a", "address": "inet:h:2"}],
        [{"address": "inet:h:1"}],
    ):
        assert validate_object(manifest(bad)), bad


async def test_metrics_per_milter(milter: ScriptedMilter):
    milter.answers = {m.RCPT: [REJECT]}
    before = sample("mailrelay_milter_verdicts_total", milter="m0", verdict="reject")
    timed = sample("mailrelay_milter_seconds_count", milter="m0")
    chain = chain_of(await milter.start())
    await run_message(chain)
    chain.close()
    assert sample("mailrelay_milter_verdicts_total", milter="m0", verdict="reject") == before + 1
    assert sample("mailrelay_milter_seconds_count", milter="m0") > timed
    errors = sample("mailrelay_milter_verdicts_total", milter="m0", verdict="error")
    chain = chain_of(f"inet:127.0.0.1:{closed_port()}")
    await run_message(chain)
    chain.close()
    assert sample("mailrelay_milter_verdicts_total", milter="m0", verdict="error") == errors + 1
