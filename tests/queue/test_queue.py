"""The durable queue: commit, claims shared by processes, recovery, progress."""

from __future__ import annotations

import asyncio
import fcntl
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from mrtest.relayproc import await_until

from relay.queue.format import (
    ACTIVE,
    DEFERRED,
    HOLD,
    INCOMING,
    STATE,
    QueueError,
    id_time,
    is_queue_id,
    new_queue_id,
    read_envelope,
)
from relay.queue.store import Queue


@pytest.fixture
async def queue(tmp_path: Path):  # type: ignore[no-untyped-def]
    q = Queue(tmp_path / "q")
    yield q
    await q.close()


async def test_commit_makes_one_file_with_data_and_envelope(queue: Queue) -> None:
    msg = queue.incoming()
    msg.write(b"Subject: x\r\n\r\n")
    msg.write(b"body\r\n")
    qid = await msg.commit("a@example.org", ["b@example.com", "c@example.com"], "192.0.2.1")
    assert qid == msg.queue_id and is_queue_id(qid)
    path = queue.directory / ACTIVE / qid
    assert os.listdir(queue.directory / INCOMING) == []
    with open(path, "rb") as f:
        env = read_envelope(f.fileno())
        assert f.read(env.size) == b"Subject: x\r\n\r\nbody\r\n"
    assert env.sender == "a@example.org" and env.recipients == ["b@example.com", "c@example.com"]
    assert env.client == "192.0.2.1"
    [listed] = list(queue.messages())
    assert listed.queue_id == qid and listed.size == 20 and listed.state == ACTIVE


async def test_flush_writes_the_data_file_for_content_checks(queue: Queue) -> None:
    msg = queue.incoming()
    msg.write(b"Subject: x\r\n\r\nhello\r\n")
    path = await msg.flush()
    assert path.read_bytes() == b"Subject: x\r\n\r\nhello\r\n"
    msg.write(b"more\r\n")
    await msg.commit("", ["b@example.com"])
    assert not path.exists()


async def test_abort_removes_the_incoming_file(queue: Queue) -> None:
    msg = queue.incoming()
    msg.write(b"x" * 600_000)  # spilled to disk
    await msg.flush()
    assert msg.path.exists()
    msg.abort()
    await queue.close()
    assert not msg.path.exists()
    with pytest.raises(QueueError):
        msg.write(b"more")


def test_queue_ids_are_unique_sortable_and_carry_their_time() -> None:
    ids = [new_queue_id() for _ in range(5000)]
    assert len(set(ids)) == 5000
    assert ids == sorted(ids)
    assert all(len(i) == 12 and is_queue_id(i) for i in ids)
    import time

    assert abs(id_time(ids[0]) - time.time()) < 5


def test_queue_ids_differ_across_processes() -> None:
    code = (
        "from relay.queue.format import new_queue_id; "
        "print(' '.join(new_queue_id() for _ in range(300)))"
    )
    outs = [
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        for _ in range(3)
    ]
    ids = [i for o in outs for i in o.stdout.split()]
    assert len(ids) == 900 and len(set(ids)) == 900


async def test_the_receiving_process_keeps_the_claim(queue: Queue, tmp_path: Path) -> None:
    msg = queue.incoming()
    msg.write(b"x\r\n")
    qid = await msg.commit("a@example.org", ["b@example.com"])
    other = Queue(tmp_path / "q")  # another worker on the same folder
    assert other.claim_sync(qid, ACTIVE) is None
    fresh = queue.take_fresh(qid)
    assert fresh is not None and fresh.data == b"x\r\n"
    queue.release_sync(fresh)  # e.g. the worker died
    claim = other.claim_sync(qid, ACTIVE)
    assert claim is not None and claim.pending == ["b@example.com"]
    assert queue.claim_sync(qid, ACTIVE) is None
    other.finish_sync(claim)
    assert list(queue.messages()) == []
    await other.close()


async def test_claim_is_refused_for_a_message_moved_meanwhile(queue: Queue) -> None:
    msg = queue.incoming()
    msg.write(b"x\r\n")
    qid = await msg.commit("a@example.org", ["b@example.com"])
    fresh = queue.take_fresh(qid)
    assert fresh is not None
    fresh.progress.done["b@example.com"] = "sent"
    state = queue.defer_sync(fresh, 1234.0)
    assert state == DEFERRED
    assert queue.claim_sync(qid, ACTIVE) is None  # stale view: it moved on
    claim = queue.claim_sync(qid, DEFERRED)
    assert claim is not None and claim.pending == []
    assert queue.next_attempt_sync(claim) == 1234.0
    queue.release_sync(claim)


async def test_a_claim_cancelled_while_it_runs_is_let_go(
    queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    msg = queue.incoming()
    msg.write(b"x\r\n")
    qid = await msg.commit("a@example.org", ["b@example.com"])
    fresh = queue.take_fresh(qid)
    assert fresh is not None
    queue.release_sync(fresh)  # as after a restart: the scan's to claim
    started, go_on = threading.Event(), threading.Event()
    claim_sync = queue.claim_sync

    def slow_claim(queue_id: str, state: Any) -> Any:
        started.set()
        assert go_on.wait(10)
        return claim_sync(queue_id, state)

    monkeypatch.setattr(queue, "claim_sync", slow_claim)
    task = asyncio.ensure_future(queue.claim(qid, ACTIVE))
    await await_until(started.is_set, what="the claim under way")
    task.cancel()  # a stop's grace ran out
    go_on.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The job ends, its claim let go on the loop.
    await await_until(lambda: not queue._locked(queue.path_of(ACTIVE, qid)), what="the lock let go")


async def test_an_empty_message_aborted_while_its_file_opens_leaves_nothing(
    queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """flush() of an empty message creates its file on the pool; the session
    cancelled meanwhile aborts: the file and its lock go all the same."""
    msg = queue.incoming()
    started, go_on, opened = threading.Event(), threading.Event(), threading.Event()
    open_sync = msg._open_sync

    def slow_open(flags: int = 0) -> int:
        started.set()
        assert go_on.wait(10)
        try:
            return open_sync(flags)
        finally:
            opened.set()

    monkeypatch.setattr(msg, "_open_sync", slow_open)
    task = asyncio.ensure_future(msg.flush())
    await await_until(started.is_set, what="the open under way")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    msg.abort()  # what the session does on its way out
    go_on.set()
    await await_until(opened.is_set, what="the file opened")
    await queue.settle()
    assert os.listdir(queue.directory / INCOMING) == []
    assert msg._fd is None


async def test_hold_and_delete_while_delivering(queue: Queue) -> None:
    ids = []
    for _ in range(2):
        msg = queue.incoming()
        msg.write(b"x\r\n")
        ids.append(await msg.commit("a@example.org", ["b@example.com"]))
    held, deleted = (queue.take_fresh(i) for i in ids)
    assert held is not None and deleted is not None
    assert queue.move_sync(ids[0], HOLD)
    assert queue.delete_sync(ids[1])
    assert queue.defer_sync(held, 99.0) == HOLD  # a held message stays held
    assert queue.defer_sync(deleted, 99.0) is None  # a deleted one stays deleted
    assert [(m.queue_id, m.state) for m in queue.messages()] == [(ids[0], HOLD)]
    assert not (queue.directory / STATE / ids[1]).exists()


async def test_recover_removes_only_dead_leftovers(queue: Queue) -> None:
    incoming = queue.directory / INCOMING
    (incoming / "DEADBEEF0000").write_bytes(b"half a message")
    alive = incoming / "ALIVE0000000"
    alive.write_bytes(b"being received")
    fd = os.open(alive, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    (queue.directory / STATE / "ORPHAN000000").write_bytes(b"{}")
    removed = queue.recover_sync(stale_age=0)
    assert [Path(p).name for p in sorted(removed)] == ["DEADBEEF0000", "ORPHAN000000"]
    assert alive.exists()
    os.close(fd)


async def test_damaged_file_is_not_listed(queue: Queue) -> None:
    (queue.directory / ACTIVE / "0000000000AA").write_bytes(b"no trailer here")
    assert list(queue.messages()) == []


async def test_damaged_file_is_set_aside_on_claim(queue: Queue) -> None:
    (queue.directory / ACTIVE / "0000000000AB").write_bytes(b"no trailer here")
    assert queue.claim_sync("0000000000AB", ACTIVE) is None
    assert (queue.directory / "corrupt" / "0000000000AB").exists()


async def test_an_empty_file_is_a_commit_a_crash_cut_short_and_is_removed(queue: Queue) -> None:
    # renamed into active/ before the batch's syncfs, the machine crashed:
    # never acknowledged, so nothing to set aside
    (queue.directory / ACTIVE / "0000000000AC").write_bytes(b"")
    assert queue.claim_sync("0000000000AC", ACTIVE) is None
    assert not (queue.directory / ACTIVE / "0000000000AC").exists()
    assert not (queue.directory / "corrupt" / "0000000000AC").exists()


async def test_background_removal_owns_the_lock_and_closes_only_its_own_fd(queue: Queue) -> None:
    msg = queue.incoming()
    msg.write(b"x\r\n")
    qid = await msg.commit("a@example.org", ["b@example.com"])
    claim = queue.take_fresh(qid)
    assert claim is not None
    queue.finish_later(claim)
    assert claim.fd == -1
    queue.release_sync(claim)  # what a caller's cleanup does: must be a no-op now
    r, w = os.pipe()  # would reuse the claim's descriptor number had it been closed
    try:
        await queue.settle()
        os.fstat(r)
        os.fstat(w)
    finally:
        os.close(r)
        os.close(w)
    assert list(queue.messages()) == []


async def test_a_removal_queued_as_the_previous_batch_ends_is_not_left_behind(
    queue: Queue,
) -> None:
    """The second removal comes after the first batch's thread is through but before
    the event loop has seen its job end (the loop is busy): it must still be done.
    (A DSN delivered right after the message it reports on was left in active/,
    locked, until some other message was delivered.)"""
    claims = []
    for _ in range(2):
        msg = queue.incoming()
        msg.write(b"x\r\n")
        claim = queue.take_fresh(await msg.commit("a@example.org", ["b@example.com"]))
        assert claim is not None
        claims.append(claim)
    queue.finish_later(claims[0])
    # Without yielding to the loop: wait until the commit thread has finished
    # the first removal batch (it runs jobs in order, one at a time).
    queue.committer.wait_idle()
    queue.finish_later(claims[1])
    await queue.settle()
    assert list(queue.messages()) == []
