"""Delivery to next hops: results per recipient, backoff, expiry, DSNs, streaming."""

from __future__ import annotations

import email
import email.policy
import logging
import os
from typing import Any

import pytest
from mrtest.delivery_helpers import FakeClock, free_port, make_config, message

from relay.config import NextHop
from relay.delivery.qmgr import backoff
from relay.queue.format import DEFERRED
from relay.queue.store import Queue


async def eventually(predicate: Any, timeout: float = 60.0) -> None:
    """Polls until predicate() holds (a slow, shared machine must not fail the test)."""
    import asyncio
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def queue_files(queue: Queue, state: str) -> list[str]:
    return sorted(os.listdir(queue.directory / state))


async def test_delivers_a_fresh_message_once(sink_factory: Any, relay_factory: Any) -> None:
    sink = await sink_factory("127.0.0.2")
    relay = await relay_factory(
        make_config({"example.com": NextHop("127.0.0.2", sink.port, tls="none")})
    )
    qid = await relay.send(message(mid="m1@test"), "a@example.org", ["b@example.com"])
    await relay.delivery.idle()
    assert len(sink.messages) == 1
    got = sink.messages[0]
    assert got.sender == "a@example.org" and got.recipients == ["b@example.com"]
    assert b"Subject: test\r\n" in got.data
    assert queue_files(relay.queue, "active") == [] and queue_files(relay.queue, DEFERRED) == []
    assert len(qid) == 12


async def test_outgoing_data_has_no_bare_cr_or_lf_and_is_dot_stuffed(
    sink_factory: Any, relay_factory: Any
) -> None:
    sink = await sink_factory("127.0.0.2")
    relay = await relay_factory(
        make_config({"example.com": NextHop("127.0.0.2", sink.port, tls="none")})
    )
    body = b"line1\nline2\r.\r\n.dot\r\nsmuggle\n.\r\nMAIL FROM:<x@y>\r\nend\r"
    await relay.send(message(body=body), "a@example.org", ["b@example.com"])
    await relay.delivery.idle()
    data = sink.messages[0].data
    # aiosmtpd strips the stuffed dots; what it received had CRLF everywhere
    assert b"line1\r\nline2\r\n.\r\n.dot\r\nsmuggle\r\n.\r\nMAIL FROM:<x@y>\r\nend\r\n" in data
    assert data.replace(b"\r\n", b"").count(b"\n") == 0
    assert data.replace(b"\r\n", b"").count(b"\r") == 0
    assert len(sink.messages) == 1


async def test_recipients_grouped_by_next_hop_and_connection_reused(
    sink_factory: Any, relay_factory: Any
) -> None:
    s1 = await sink_factory("127.0.0.2")
    s2 = await sink_factory("127.0.0.3")
    relay = await relay_factory(
        make_config(
            {
                "example.com": NextHop("127.0.0.2", s1.port, tls="none"),
                "example.net": NextHop("127.0.0.3", s2.port, tls="none"),
            }
        )
    )
    await relay.send(
        message(), "a@example.org", ["x@example.com", "y@example.net", "z@example.com"]
    )
    await relay.delivery.idle()
    assert [m.recipients for m in s1.messages] == [["x@example.com", "z@example.com"]]
    assert [m.recipients for m in s2.messages] == [["y@example.net"]]
    for _ in range(3):
        await relay.send(message(), "a@example.org", ["x@example.com"])
        await relay.delivery.idle()
    assert s1.transactions == 4
    assert s1.connections == 1  # one connection, reused


async def test_4xx_defers_with_postfix_backoff_then_delivers(
    sink_factory: Any, relay_factory: Any, clock: FakeClock, caplog: Any
) -> None:
    caplog.set_level(logging.INFO, logger="relay.delivery")
    sink = await sink_factory("127.0.0.2", rcpt_replies={"b@example.com": "451 4.3.0 try later"})
    relay = await relay_factory(
        make_config(
            {"example.com": NextHop("127.0.0.2", sink.port, tls="none")},
            min_backoff=300,
            max_backoff=4000,
        )
    )
    qid = await relay.send(message(), "a@example.org", ["b@example.com"])
    await relay.delivery.idle()
    assert queue_files(relay.queue, DEFERRED) == [qid]
    mtime = os.stat(relay.queue.directory / DEFERRED / qid).st_mtime
    assert mtime == pytest.approx(clock.now + 300)  # young message: minBackoff
    assert f"{qid}: to=<b@example.com>, relay=127.0.0.2[127.0.0.2]:{sink.port}" in caplog.text
    assert "status=deferred (451 4.3.0 try later)" in caplog.text
    [listed] = list(relay.queue.messages())
    assert listed.attempts == 1 and "451 4.3.0" in listed.last_reason

    clock.advance(299)
    await relay.delivery.process_due()
    assert sink.messages == [] and queue_files(relay.queue, DEFERRED) == [qid]

    clock.advance(1)
    await relay.delivery.process_due()  # due, still 451: now age 300 -> 300
    assert queue_files(relay.queue, DEFERRED) == [qid]
    clock.advance(3000)
    sink.rcpt_replies.clear()
    await relay.delivery.process_due()
    assert len(sink.messages) == 1
    assert queue_files(relay.queue, DEFERRED) == []
    assert "status=sent (250 2.0.0 Ok: queued as S1)" in caplog.text


def test_backoff_is_age_clamped() -> None:
    assert backoff(10, 300, 4000) == 300
    assert backoff(1000, 300, 4000) == 1000
    assert backoff(99999, 300, 4000) == 4000


async def test_partial_delivery_never_repeats_done_recipients(
    sink_factory: Any, relay_factory: Any, clock: FakeClock
) -> None:
    sink = await sink_factory("127.0.0.2", rcpt_replies={"later@example.com": "450 4.2.0 busy"})
    relay = await relay_factory(
        make_config({"example.com": NextHop("127.0.0.2", sink.port, tls="none")})
    )
    qid = await relay.send(message(), "a@example.org", ["now@example.com", "later@example.com"])
    await relay.delivery.idle()
    assert [m.recipients for m in sink.messages] == [["now@example.com"]]
    [listed] = list(relay.queue.messages())
    assert listed.recipients == ["later@example.com"] and listed.done == {"now@example.com": "sent"}
    sink.rcpt_replies.clear()
    clock.advance(400)
    await relay.delivery.process_due()
    assert [m.recipients for m in sink.messages] == [["now@example.com"], ["later@example.com"]]
    assert list(relay.queue.messages()) == []
    assert not (relay.queue.directory / "state" / qid).exists()


async def test_5xx_returns_a_dsn_to_a_relayed_sender(
    sink_factory: Any, relay_factory: Any, caplog: Any
) -> None:
    caplog.set_level(logging.INFO, logger="relay.delivery")
    dest = await sink_factory(
        "127.0.0.2", rcpt_replies={"gone@example.com": "550 5.1.1 <gone@example.com>: User unknown"}
    )
    home = await sink_factory("127.0.0.3")
    relay = await relay_factory(
        make_config(
            {
                "example.com": NextHop("127.0.0.2", dest.port, tls="none"),
                "example.org": NextHop("127.0.0.3", home.port, tls="none"),
            }
        )
    )
    qid = await relay.send(
        message(subject="the original"), "a@example.org", ["gone@example.com", "ok@example.com"]
    )
    await relay.delivery.idle()
    assert [m.recipients for m in dest.messages] == [["ok@example.com"]]
    assert "status=bounced (550 5.1.1 <gone@example.com>: User unknown)" in caplog.text
    [dsn] = home.messages
    assert dsn.sender in ("", "<>") and dsn.recipients == ["a@example.org"]
    parsed = email.message_from_bytes(dsn.data, policy=email.policy.default)
    assert b"\r\nFrom: MAILER-DAEMON@relay.test (Mail Delivery System)\r\n" in b"\r\n" + dsn.data
    assert parsed["Subject"] == "Undelivered Mail Returned to Sender"
    assert parsed.get_content_type() == "multipart/report"
    assert parsed.get_param("report-type") == "delivery-status"
    parts = list(parsed.iter_parts())
    assert [p.get_content_type() for p in parts] == [
        "text/plain",
        "message/delivery-status",
        "message/rfc822",  # no RET: the message, as Postfix returns it
    ]
    assert "<gone@example.com>: host 127.0.0.2[127.0.0.2] said: 550 5.1.1" in parts[0].get_content()
    status = parts[1].as_string()
    assert "Final-Recipient: rfc822; gone@example.com" in status
    assert "Action: failed" in status and "Status: 5.1.1" in status
    assert "Diagnostic-Code: smtp; 550 5.1.1 <gone@example.com>: User unknown" in status
    assert "ok@example.com" not in status
    assert b"Subject: the original" in dsn.data
    assert list(relay.queue.messages()) == []
    assert f"{qid}: sender non-delivery notification:" in caplog.text


async def test_bounce_of_a_null_sender_is_never_returned(
    sink_factory: Any, relay_factory: Any, caplog: Any
) -> None:
    caplog.set_level(logging.INFO, logger="relay.delivery")
    dest = await sink_factory("127.0.0.2", rcpt_replies={"gone@example.com": "550 5.1.1 no"})
    relay = await relay_factory(
        make_config({"example.com": NextHop("127.0.0.2", dest.port, tls="none")})
    )
    await relay.send(message(), "", ["gone@example.com"])
    await relay.delivery.idle()
    assert dest.transactions == 0 and list(relay.queue.messages()) == []
    assert "sender is null" in caplog.text


async def test_sender_outside_relay_domains_cannot_be_returned(
    sink_factory: Any, relay_factory: Any, caplog: Any
) -> None:
    caplog.set_level(logging.INFO, logger="relay.delivery")
    dest = await sink_factory("127.0.0.2", data_reply="554 5.7.1 spam")
    relay = await relay_factory(
        make_config({"example.com": NextHop("127.0.0.2", dest.port, tls="none")})
    )
    await relay.send(message(), "someone@elsewhere.test", ["b@example.com"])
    await relay.delivery.idle()
    dropped = "notification to <someone@elsewhere.test> dropped: elsewhere.test is not a relay"
    assert dropped in caplog.text
    assert "status=bounced (554 5.7.1 spam)" in caplog.text
    assert list(relay.queue.messages()) == []


async def test_next_hop_down_defers_then_expires_with_dsn(
    sink_factory: Any, relay_factory: Any, clock: FakeClock, caplog: Any
) -> None:
    caplog.set_level(logging.INFO, logger="relay.delivery")
    down_port = free_port("127.0.0.2")
    home = await sink_factory("127.0.0.3")
    relay = await relay_factory(
        make_config(
            {
                "example.com": NextHop("127.0.0.2", down_port, tls="none"),
                "example.org": NextHop("127.0.0.3", home.port, tls="none"),
            },
            lifetime=86400,
        )
    )
    qid = await relay.send(message(), "a@example.org", ["b@example.com"])
    await relay.delivery.idle()
    assert f"connect to 127.0.0.2[127.0.0.2]:{down_port}: Connection refused" in caplog.text
    attempts = 1
    while list(relay.queue.messages()):
        [m] = list(relay.queue.messages())
        clock.now = m.next_attempt
        await relay.delivery.process_due()
        attempts += 1
        assert attempts < 100
    # 300, 300, 600, 1200, 2400, 4000, ... until a day has passed
    assert 20 < attempts < 40
    assert "status=expired, returned to sender" in caplog.text
    [dsn] = home.messages
    assert b"Connection refused" in dsn.data
    assert b"Status: 4.4.1" in dsn.data
    assert qid.encode() in dsn.data


async def test_large_message_is_streamed(sink_factory: Any, relay_factory: Any) -> None:
    sink = await sink_factory("127.0.0.2")
    relay = await relay_factory(
        make_config({"example.com": NextHop("127.0.0.2", sink.port, tls="none")})
    )
    line = b"x" * 998 + b"\r\n"
    body = line * 3000 + b".leading dot\r\n"  # ~3 MB, several spill chunks
    msg = relay.queue.incoming()
    head = message(body=b"")
    msg.write(head)
    for i in range(0, len(body), 65536):
        msg.write(body[i : i + 65536])
    qid = await msg.commit("a@example.org", ["b@example.com"])
    relay.delivery.wake(qid)
    await relay.delivery.idle()
    [got] = sink.messages
    assert got.data == head + body


async def test_two_deliverers_on_one_queue_never_deliver_twice(
    sink_factory: Any, relay_factory: Any, tmp_path: Any
) -> None:
    sink = await sink_factory("127.0.0.2")
    config = make_config({"example.com": NextHop("127.0.0.2", sink.port, tls="none")})
    writer = await relay_factory(config, tmp_path / "q")
    ids = []
    for i in range(60):
        msg = writer.queue.incoming()
        msg.write(message(mid=f"{i}@test"))
        ids.append(await msg.commit("a@example.org", ["b@example.com"]))
    # the writer "crashes": its locks go, nothing was delivered
    for qid in ids:
        claim = writer.queue.take_fresh(qid)
        assert claim is not None
        writer.queue.release_sync(claim)
    a = await relay_factory(config, tmp_path / "q")
    b = await relay_factory(config, tmp_path / "q")
    import asyncio

    await asyncio.gather(a.delivery.process_due(), b.delivery.process_due())
    counts = sink.by_message_id()
    assert len(counts) == 60 and set(counts.values()) == {1}


async def test_recipient_domain_no_longer_relayed_is_deferred(
    relay_factory: Any, caplog: Any
) -> None:
    caplog.set_level(logging.INFO, logger="relay.delivery")
    relay = await relay_factory(make_config({}))
    qid = await relay.send(message(), "a@example.org", ["b@example.com"])
    await relay.delivery.idle()
    assert queue_files(relay.queue, DEFERRED) == [qid]
    assert "not a relay domain here" in caplog.text


async def test_running_relay_notices_queue_flush(
    sink_factory: Any, relay_factory: Any, clock: FakeClock
) -> None:
    import asyncio

    from relay.process.cli import main as cli_main

    sink = await sink_factory("127.0.0.2", rcpt_replies={"b@example.com": "451 4.3.0 later"})
    relay = await relay_factory(
        make_config({"example.com": NextHop("127.0.0.2", sink.port, tls="none")}),
        poll_interval=0.02,
    )
    runner = asyncio.ensure_future(relay.delivery.run())
    qid = await relay.send(message(), "a@example.org", ["b@example.com"])
    await eventually(lambda: queue_files(relay.queue, DEFERRED) == [qid])
    sink.rcpt_replies.clear()
    # not due for 300 s of the relay's clock: only the flush makes it go now
    code = await asyncio.get_running_loop().run_in_executor(
        None, cli_main, ["queue", "flush", "--queue-dir", str(relay.queue.directory)]
    )
    assert code == 0
    await eventually(lambda: bool(sink.messages))
    assert len(sink.messages) == 1
    await relay.delivery.stop()
    await runner


async def test_a_flush_as_the_attempt_that_deferred_ends_is_not_lost(
    sink_factory: Any, relay_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`mailrelay queue flush` just after the message landed in deferred/, while the
    attempt that put it there was still ending (the relay's scan for the flush saw
    it under way): it goes now, not at the next periodic rescan."""
    import asyncio
    import threading

    from relay.process.cli import main as cli_main

    sink = await sink_factory("127.0.0.2", rcpt_replies={"b@example.com": "451 4.3.0 later"})
    relay = await relay_factory(
        make_config({"example.com": NextHop("127.0.0.2", sink.port, tls="none")}),
        poll_interval=0.02,
        rescan_interval=86400,  # no periodic rescan to come to the rescue
    )
    flushed, rescanned, polled_again = threading.Event(), threading.Event(), threading.Event()
    queue = relay.queue
    real_defer, real_scan, real_stat = (
        queue.defer_sync,
        queue.scan_sizes_sync,
        queue.flush_marker_mtime_sync,
    )

    def defer_then_flush(claim: Any, at: float) -> Any:
        state = real_defer(claim, at)  # in deferred/ now, its attempt not over yet
        sink.rcpt_replies.clear()
        assert cli_main(["queue", "flush", "--queue-dir", str(queue.directory)]) == 0
        flushed.set()
        polled_again.wait(60)  # the relay has seen the flush (and scanned) meanwhile
        return state

    def scan() -> Any:
        entries = real_scan()
        if flushed.is_set():
            rescanned.set()
        return entries

    def stat() -> float:
        if rescanned.is_set():
            polled_again.set()  # the loop's turn after the scan for the flush
        return real_stat()

    monkeypatch.setattr(queue, "defer_sync", defer_then_flush)
    monkeypatch.setattr(queue, "scan_sizes_sync", scan)
    monkeypatch.setattr(queue, "flush_marker_mtime_sync", stat)
    runner = asyncio.ensure_future(relay.delivery.run())
    await relay.send(message(), "a@example.org", ["b@example.com"])
    await eventually(lambda: bool(sink.messages))
    assert polled_again.is_set() and len(sink.messages) == 1
    await relay.delivery.stop()
    await runner


async def test_a_scan_between_commit_and_hand_off_does_not_hold_the_message_up(
    sink_factory: Any, relay_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The queue scan lists a message just renamed into active/ while its commit() has
    not yet handed it back (a busy event loop): the scan must leave it to wake(), not
    try to claim it (our own lock refuses it) and so make wake() think it under way.
    (It waited for the lost hand-off grace, 60 s, and the next scan.)"""
    sink = await sink_factory("127.0.0.2")
    relay = await relay_factory(
        make_config({"example.com": NextHop("127.0.0.2", sink.port, tls="none")})
    )
    committer = relay.queue.committer
    real_commit = committer.commit

    async def commit_then_scan(*args: Any) -> None:
        await real_commit(*args)  # durable in active/, not yet handed back
        await relay.delivery._rescan(force_all=False)  # the delivery loop's scan, right then
        relay.delivery._start_due()

    monkeypatch.setattr(committer, "commit", commit_then_scan)
    await relay.send(message(), "a@example.org", ["b@example.com"])
    await relay.delivery.idle()
    assert len(sink.messages) == 1
    assert queue_files(relay.queue, "active") == []


async def test_run_returns_when_stopped_mid_scan(
    relay_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """stop() ends run(): whoever awaits run() sees it return, wherever the loop was
    (here: waiting for the queue's I/O pool), not a CancelledError."""
    import asyncio
    import threading

    relay = await relay_factory(make_config({}), poll_interval=0.01)
    in_scan, go_on = threading.Event(), threading.Event()
    real_stat = relay.queue.flush_marker_mtime_sync

    def slow_stat() -> float:  # run() asks for the flush marker's mtime on the pool
        in_scan.set()
        go_on.wait(60)
        return real_stat()

    monkeypatch.setattr(relay.queue, "flush_marker_mtime_sync", slow_stat)
    runner = asyncio.ensure_future(relay.delivery.run())
    await asyncio.get_running_loop().run_in_executor(None, in_scan.wait, 60)
    stopping = asyncio.ensure_future(relay.delivery.stop())
    await asyncio.sleep(0)  # stop() has begun while run() waits for the pool
    go_on.set()
    await stopping
    await runner  # returns: no CancelledError
    assert runner.done() and not runner.cancelled()


async def test_a_lost_hand_off_is_delivered_by_the_scan(
    sink_factory: Any, relay_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A message committed here whose wake() never came (the server lost the hand-off)
    is still delivered: the scan takes the claim this process holds."""
    import relay.delivery.qmgr

    sink = await sink_factory("127.0.0.2")
    relay_ = await relay_factory(
        make_config({"example.com": NextHop("127.0.0.2", sink.port, tls="none")})
    )
    msg = relay_.queue.incoming()
    msg.write(message(mid="lost@test"))
    qid = await msg.commit("a@example.org", ["b@example.com"], "127.0.0.9")
    await relay_.delivery.process_due(rescan=True)
    await relay_.delivery.idle()
    assert sink.messages == []  # within the grace period, the hand-off may still come
    monkeypatch.setattr(relay.delivery.qmgr, "FRESH_HANDOFF_GRACE", -1.0)
    await relay_.delivery.process_due(rescan=True)
    await eventually(lambda: len(sink.messages) == 1)
    await relay_.delivery.idle()
    relay_.delivery.wake(qid)  # a late wake-up does not deliver it twice
    await relay_.delivery.idle()
    assert len(sink.messages) == 1
    assert queue_files(relay_.queue, "active") == []
