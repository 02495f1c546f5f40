"""The session side of the milters (relay.smtpd.miltersession) with a real
queue: an edited message is copied into a new queue file in chunks, the
envelope edits apply, a quarantine holds it, nothing is left behind."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from mrtest.relayproc import await_until

from relay.queue.format import ACTIVE, HOLD, INCOMING
from relay.queue.store import Queue
from relay.smtpd import milter as m
from relay.smtpd.milters import MessageVerdict
from relay.smtpd.miltersession import finish, hold, tls_macros


@pytest.fixture
async def queue(tmp_path: Path):
    q = Queue(tmp_path / "queue")
    yield q
    await q.close()


def received(queue_id: str) -> bytes:
    return f"Received: from c (c [192.0.2.1])\r\n\tby mx with ESMTP id {queue_id};\r\n".encode()


async def test_edited_message_is_copied_with_envelope_edits_and_held(queue: Queue):
    original = queue.incoming()
    body = b"x" * 998 + b"\r\n"
    original.write(received(original.queue_id) + b"Subject: s\r\n\r\n")
    for _ in range(1000):  # 1 MB: spilled to disk while received
        original.write(body)
    mods = m.Modifications(
        header_edits=[m.HeaderEdit("add", "X-Spam", "Yes")],
        add_recipients=["<new@example.net>"],
        quarantine="suspicious",
    )
    verdict = MessageVerdict(modifications=[mods], quarantine="suspicious")
    done = await finish(verdict, original, queue, "a@example.org", ["b@example.net"])
    assert done.incoming is not original
    assert done.recipients == ["b@example.net", "new@example.net"]
    assert done.hold_reason == "suspicious"
    queue_id = await done.incoming.commit(done.sender, done.recipients)
    await hold(queue, queue_id, "suspicious")
    await queue.settle()
    data = await queue.run_io(queue.read_message_data_sync, queue_id)
    assert data == received(queue_id) + b"Subject: s\r\nX-Spam: Yes\r\n\r\n" + body * 1000
    assert await queue.run_io(queue.locate_sync, queue_id) == HOLD
    assert os.listdir(queue.directory / INCOMING) == []
    assert os.listdir(queue.directory / ACTIVE) == []


async def test_a_hold_cancelled_by_a_hang_up_still_moves_and_lets_go(queue: Queue):
    """connection_lost cancels the session while hold() waits: the message is
    in hold/ all the same and no handle keeps it locked."""
    message = queue.incoming()
    message.write(b"Subject: s\r\n\r\nx\r\n")
    queue_id = await message.commit("a@example.org", ["b@example.net"])
    task = asyncio.ensure_future(hold(queue, queue_id, "suspicious"))
    await asyncio.sleep(0)  # in the wait for the move
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    held = queue.path_of(HOLD, queue_id)
    await await_until(lambda: held.exists() and not queue._locked(held), what="held, unlocked")
    assert queue.fresh_ids() == []


@pytest.mark.parametrize("body", [b"line\r\n" * 100, b"", b"no final newline"])
async def test_message_in_memory_is_edited_as_the_file_copy(queue: Queue, body: bytes):
    """A message that never left memory gets the same bytes as one read back
    from its file, and no file is written for it."""
    edits = [
        m.HeaderEdit("add", "X-Spamd-Result", "default: False [0.00 / 15.00];\n\tR_X (0.00)"),
        m.HeaderEdit("insert", "X-First", "1", 0),
        m.HeaderEdit("change", "Subject", "new", 1),
        m.HeaderEdit("change", "X-Old", "", 1),
    ]
    copies = {}
    for spilled in (False, True):
        original = queue.incoming()
        original.write(received(original.queue_id) + b"Subject: s\r\nX-Old: o\r\n\r\n" + body)
        if spilled:
            await original.flush()
        else:
            assert original.in_memory() is not None
        mods = [m.Modifications(header_edits=list(edits))]
        done = await finish(MessageVerdict(modifications=mods), original, queue, "a@b.org", ["c@d"])
        assert done.incoming is not original
        if not spilled:
            assert done.incoming.in_memory() is not None
            assert os.listdir(queue.directory / INCOMING) == []
        queue_id = await done.incoming.commit(done.sender, done.recipients)
        await queue.settle()
        data = await queue.run_io(queue.read_message_data_sync, queue_id)
        copies[spilled] = data.replace(queue_id.encode(), b"QUEUEID")
        head = b"X-First: 1\r\n" + received("QUEUEID") + b"Subject: new\r\n"
        assert copies[spilled].startswith(head)
    assert copies[False] == copies[True]
    assert copies[False].endswith(
        b"X-Spamd-Result: default: False [0.00 / 15.00];\r\n\tR_X (0.00)\r\n\r\n" + body
    )


async def test_unedited_message_stays_as_received(queue: Queue):
    original = queue.incoming()
    original.write(b"Subject: s\r\n\r\nbody\r\n")
    mods = m.Modifications(new_sender="<other@example.org>", delete_recipients=["<b@example.net>"])
    done = await finish(
        MessageVerdict(modifications=[mods]),
        original,
        queue,
        "a@example.org",
        ["b@example.net", "c@example.net"],
    )
    assert done.incoming is original and done.hold_reason is None
    assert (done.sender, done.recipients) == ("other@example.org", ["c@example.net"])
    original.abort()


def test_tls_macros():
    class FakeSsl:
        def cipher(self) -> tuple[str, str, int]:
            return ("TLS_AES_256_GCM_SHA384", "TLSv1.3", 256)

    assert tls_macros(None) == {}
    assert tls_macros(FakeSsl()) == {
        "{tls_version}": "TLSv1.3",
        "{cipher}": "TLS_AES_256_GCM_SHA384",
        "{cipher_bits}": "256",
    }
