"""Issue 11 at the SMTP door: what a hostile client sends never reaches a
header, a log line, the queue or delivery in a form we cannot write; a
session never dies silently; junk and errors are counted as Postfix does."""

from __future__ import annotations

import asyncio
import logging
import stat
from pathlib import Path
from typing import Any

import pytest
from mrtest.hostile import DOMAINS, RECIPIENT_LIMIT, converse
from mrtest.peers import AiosmtpdSink, RawClient
from mrtest.relayproc import RelayProcess, next_loopback, write_manifests

from relay.queue.store import INCOMING, Queue
from relay.smtpd import transaction as smtpd_transaction
from relay.smtpd.proxy import ProxyError, parse_v1
from relay.smtpd.screen import CacheEntry, PostscreenCache
from relay.smtpd.server import RelaySMTP

SPF_ON = {"restrictions": {"spf": {"enabled": True}}}  # loopback: X-Comment with helo=
MESSAGE = [
    b"MAIL FROM:<a@x.org>\r\n",
    b"RCPT TO:<b@example.com>\r\n",
    b"DATA\r\n",
    b"Subject: hi\r\n\r\nHello.\r\n.\r\n",
]


def head_of(message: bytes) -> bytes:
    return message.split(b"\r\n\r\n", 1)[0]


def bare_cr_or_lf(data: bytes) -> bool:
    rest = data.replace(b"\r\n", b"")
    return b"\r" in rest or b"\n" in rest


# -- 1. header injection through SMTP arguments -------------------------------------


@pytest.mark.parametrize("control", [b"\r", b"\x00", b"\x0b", b"\x1b"])
async def test_control_bytes_in_helo_never_reach_a_header(relay: Any, control: bytes) -> None:
    door = await relay(spec=SPF_ON)
    helo = b"evil" + control + b"X-Injected: yes"
    replies = await converse(door.address, [b"EHLO " + helo + b"\r\n", *MESSAGE])
    assert replies[0].startswith("250") and replies[-1].startswith("250 2.0.0 Ok: queued")
    (message,) = door.queued()
    head = head_of(message)
    assert not bare_cr_or_lf(head) and control not in head.replace(b"\r\n", b""), head
    assert b"\r\nX-Injected" not in head
    # Postfix's printable(): the name is kept, its control byte shown as "?".
    assert b"from evil?X-Injected: yes (" in head
    assert b"helo=evil?X-Injected: yes;" in head  # the X-Comment SPF line


async def test_bare_lf_in_helo_ends_the_command(relay: Any) -> None:
    door = await relay(spec=SPF_ON)
    replies = await converse(door.address, [(b"EHLO evil\nX-Injected: yes\r\n", 2), *MESSAGE])
    # "X-Injected: yes" is a command of its own (unknown); sent unasked, it
    # also marks the client as an improper pipeliner.
    assert replies[0].startswith("250") and replies[1].startswith("502")
    assert not any(b"X-Injected" in m for m in door.queued())


def test_helo_with_a_bare_cr_is_not_a_header_line_at_the_next_hop(tmp_path: Path) -> None:
    """End to end: `mailrelay run` relays to a next hop, which gets one
    X-Comment line, not a second header of the client's choosing."""
    with AiosmtpdSink(next_loopback()) as sink:
        manifests = write_manifests(
            tmp_path / "m", next_hop=sink.address, domains=DOMAINS, spec=SPF_ON
        )
        with RelayProcess(manifests, tmp_path / "relay") as proc:
            replies = asyncio.run(
                converse(proc.address, [b"EHLO evil\rX-Injected: yes\r\n", *MESSAGE])
            )
            assert replies[-1].startswith("250 2.0.0 Ok: queued"), replies
            (got,) = sink.wait_for(1)
    assert got.header("X-Injected") is None
    assert "helo=evil?X-Injected: yes;" in (got.header("X-Comment") or "")


async def test_control_bytes_in_esmtp_parameters_are_refused(relay: Any) -> None:
    """str.split() takes \\x1c-\\x1f, FF, VT for spaces: a parameter with a
    control byte is a syntax error, not two parameters."""
    door = await relay()
    replies = await converse(
        door.address,
        [
            b"EHLO client.test\r\n",
            b"MAIL FROM:<a@x.org> AUTH=x\x01y\r\n",
            b"MAIL FROM:<a@x.org> SIZE=10\x1cBODY=7BIT\r\n",
            b"MAIL FROM:<a@x.org> SIZE=10\tBODY=7BIT\r\n",  # TAB separates, as before
        ],
    )
    assert [r[:3] for r in replies] == ["250", "501", "501", "250"], replies


def test_proxy_header_cannot_carry_an_ipv6_scope_id() -> None:
    """ipaddress accepts `fe80::1%<anything>` and str() gives it back: the
    client IP would carry a CR into Received: and every log line."""
    with pytest.raises(ProxyError):
        parse_v1(b"PROXY TCP6 fe80::1%a\rb ::1 1000 25\r\n")


# -- 3. poison envelopes: not UTF-8, refused at the door ---------------------------


@pytest.mark.parametrize(
    "line",
    [
        b"EHLO a\xffb",
        b"MAIL FROM:<a\xff@x.org>",
        b"RCPT TO:<b\xff@example.com>",
        b"MAIL FROM:<a@x.org> X-Y=\xff",
        b"NO\xffOP",
        b"NOOP \xff",
    ],
)
async def test_not_utf8_gets_postfixs_reply(relay: Any, line: bytes) -> None:
    door = await relay()
    setup = [b"EHLO client.test\r\n", b"MAIL FROM:<a@x.org>\r\n"] if b"RCPT" in line else []
    if b"MAIL" in line:
        setup = [b"EHLO client.test\r\n"]
    replies = await converse(door.address, [*setup, line + b"\r\n", b"NOOP\r\n"])
    assert replies[len(setup)] == "500 5.5.2 Error: bad UTF-8 syntax"
    assert replies[-1] == "250 2.0.0 Ok"  # the session goes on


async def test_a_poison_sender_never_reaches_the_queue(relay: Any) -> None:
    door = await relay()
    replies = await converse(
        door.address,
        [b"EHLO client.test\r\n", b"MAIL FROM:<a\xe9@x.org>\r\n", *MESSAGE[1:3]],
    )
    assert replies[1:] == [
        "500 5.5.2 Error: bad UTF-8 syntax",
        "503 5.5.1 Error: need MAIL command",  # no transaction was started
        "503 5.5.1 Error: need MAIL command",
    ]
    assert door.queued() == []


# -- 7. no session dies silently ---------------------------------------------------


@pytest.mark.parametrize("size", ["\u00b2", "\u0663", "\uff11"])  # ², Arabic 3, fullwidth 1
async def test_size_with_non_ascii_digits_is_a_syntax_error(relay: Any, size: str) -> None:
    door = await relay()
    replies = await converse(
        door.address,
        [b"EHLO client.test\r\n", f"MAIL FROM:<a@x.org> SIZE={size}\r\n".encode(), b"NOOP\r\n"],
    )
    assert replies[1:] == ["501 5.5.4 Bad message size syntax", "250 2.0.0 Ok"]


async def test_a_huge_size_is_too_big_not_a_crash(relay: Any) -> None:
    door = await relay()
    replies = await converse(
        door.address,
        [b"EHLO client.test\r\n", b"MAIL FROM:<a@x.org> SIZE=" + b"9" * 2000 + b"\r\n"],
    )
    assert replies[1].startswith("552 5.3.4")


async def test_a_failing_command_gets_421_and_one_log_line(
    relay: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(self: RelaySMTP, arg: str) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setitem(RelaySMTP.COMMANDS, "NOOP", broken)
    door = await relay()
    with caplog.at_level(logging.ERROR, logger="mailrelay.smtpd"):
        async with RawClient(*door.address, local=next_loopback(), timeout=10) as c:
            await c.greet()
            reply = await c.command("NOOP")
            assert reply == "421 4.3.0 mx.relay.test Error: internal error"
            assert await c.closed()
    errors = [r for r in caplog.records if "internal error" in r.getMessage()]
    assert len(errors) == 1 and "after NOOP from" in errors[0].getMessage()


async def test_a_failure_during_data_leaves_no_queue_file(
    relay: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: object) -> bytes:
        raise RuntimeError("a bug")

    monkeypatch.setattr(smtpd_transaction, "received_header", broken)
    door = await relay()
    with caplog.at_level(logging.ERROR, logger="mailrelay.smtpd"):
        replies = await converse(door.address, [b"EHLO client.test\r\n", *MESSAGE])
    assert replies[-1] == "421 4.3.0 mx.relay.test Error: internal error"
    errors = [r.getMessage() for r in caplog.records if "internal error" in r.getMessage()]
    assert len(errors) == 1 and "internal error in DATA from" in errors[0], errors
    assert door.queued() == [] and list((door.queue.directory / INCOMING).iterdir()) == []


# -- 8. junk and errors ------------------------------------------------------------


async def test_junk_command_flood_ends_as_postfixs(relay: Any) -> None:
    """smtpd_junk_command_limit=100: from the 102nd junk command each counts
    as an error, so with smtpd_hard_error_limit=20 the 122nd gets 421."""
    door = await relay()
    replies = await converse(door.address, [b"NOOP\r\n", b"RSET\r\n"] * 61)
    assert replies[:121] == ["250 2.0.0 Ok"] * 121
    assert replies[121] == "421 4.7.0 mx.relay.test Error: too many errors"


async def test_delivering_mail_resets_the_junk_count(relay: Any) -> None:
    door = await relay()
    replies = await converse(
        door.address,
        [b"EHLO client.test\r\n"] + [b"NOOP\r\n"] * 100 + MESSAGE + [b"NOOP\r\n"] * 110,
    )
    assert replies[-1] == "250 2.0.0 Ok" and len(replies) == 1 + 100 + 4 + 110


async def test_duplicate_recipients_count_toward_the_limit(relay: Any) -> None:
    door = await relay(spec={"limits": {"recipientsPerMessage": RECIPIENT_LIMIT}})
    rcpt = b"RCPT TO:<b@example.com>\r\n"
    replies = await converse(
        door.address,
        [b"EHLO client.test\r\n", b"MAIL FROM:<a@x.org>\r\n"] + [rcpt] * (RECIPIENT_LIMIT + 1),
    )
    assert replies[-1] == "452 4.5.3 Error: too many recipients"
    assert replies[2:-1] == ["250 2.1.5 Ok"] * RECIPIENT_LIMIT


async def test_too_many_errors_logs_no_control_bytes(
    relay: Any, caplog: pytest.LogCaptureFixture
) -> None:
    door = await relay()
    with caplog.at_level(logging.INFO, logger="mailrelay.smtpd"):
        replies = await converse(door.address, [b"\x1b[2J\rFOO\r\n"] * 21)
    assert replies[-1].startswith("421 4.7.0")
    lines = [r.getMessage() for r in caplog.records]
    assert any("too many errors after UNKNOWN from" in line for line in lines), lines
    assert not any("\x1b" in line or "\r" in line for line in lines)


async def test_errors_past_the_soft_limit_slow_the_client_down(
    relay: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """smtpd_soft_error_limit=10, smtpd_error_sleep_time: every reply once the
    client has made 10 errors waits error_sleep (counted, not timed)."""
    marker = 0.001234
    waits: list[float] = []
    real_sleep = asyncio.sleep

    async def counting_sleep(delay: float, *args: Any) -> Any:
        if delay == marker:
            waits.append(delay)
        return await real_sleep(0, *args)

    monkeypatch.setattr(asyncio, "sleep", counting_sleep)
    door = await relay()
    door.ctx.error_sleep = marker
    replies = await converse(door.address, [b"FOO\r\n"] * 12 + [b"NOOP\r\n"])
    assert replies == ["502 5.5.2 Error: command not recognized"] * 12 + ["250 2.0.0 Ok"]
    assert len(waits) == 4  # the replies after errors 10, 11, 12, and the NOOP's


def test_defaults_are_postfixs() -> None:
    from relay.smtpd import hygiene

    assert (hygiene.SOFT_ERROR_LIMIT, hygiene.ERROR_SLEEP, hygiene.JUNK_COMMAND_LIMIT) == (
        10,
        1.0,
        100,
    )


async def test_queue_and_postscreen_cache_are_private(tmp_path: Path) -> None:
    """Postfix: queue folders 0700. Ours: folders 0700, files 0600."""
    queue = Queue(tmp_path / "queue")
    try:
        folders = [p for p in (tmp_path / "queue").rglob("*") if p.is_dir()]
        assert folders and all(stat.S_IMODE(p.stat().st_mode) == 0o700 for p in folders)
    finally:
        await queue.close()
    cache = PostscreenCache(tmp_path / "screen")
    cache.put("192.0.2.1", CacheEntry(1e12, 1e12, 0.0))
    await cache.flush()
    assert cache.path is not None and cache.path.exists()
    assert stat.S_IMODE(cache.path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "screen").stat().st_mode) == 0o700
