"""The session side of the milters (relay.smtpd.miltersession) with a real
queue: an edited message is copied into a new queue file in chunks, the
envelope edits apply, a quarantine holds it, nothing is left behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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
