"""The batched committer: several batches at once, one file's failure stays its own;
jobs (the queue's removals) on its threads, after the batch they wait with."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path
from typing import Any

import pytest
from mrtest.relayproc import await_until

import relay.durable
from relay.queue.format import ACTIVE, INCOMING, QueueError
from relay.queue.incoming import SPILL_BYTES, Committer, IncomingMessage
from relay.queue.jobs import run_awaited
from relay.queue.store import Queue


@pytest.fixture
async def queue(tmp_path: Path):  # type: ignore[no-untyped-def]
    q = Queue(tmp_path / "q")
    yield q
    await q.close()


def files(queue: Queue, state: str) -> list[str]:
    return sorted(os.listdir(queue.directory / state))


def new_message(queue: Queue, body: bytes = b"x\r\n") -> IncomingMessage:
    msg = queue.incoming()
    msg.write(body)
    return msg


async def commit_all(messages: list[IncomingMessage]) -> list[str | BaseException]:
    return await asyncio.gather(
        *(m.commit("a@example.org", ["b@example.com"]) for m in messages), return_exceptions=True
    )


class Gate:
    """Holds the first batch on its thread until opened; records the batches."""

    def __init__(self, queue: Queue, monkeypatch: pytest.MonkeyPatch) -> None:
        self.open = threading.Event()
        self.entered = threading.Event()  # the first batch is held
        self.batches: list[list[str]] = []
        committer = queue.committer
        real_batch = committer._commit_batch_sync
        first = True

        def batch_sync(batch: list[Any]) -> list[OSError | None]:
            nonlocal first
            if first:
                first = False
                self.entered.set()
                assert self.open.wait(10)
            self.batches.append([m.queue_id for m, *_ in batch])
            return real_batch(batch)

        monkeypatch.setattr(committer, "_commit_batch_sync", batch_sync)

    async def held(self) -> None:
        while not self.entered.is_set():
            await asyncio.sleep(0.001)


@pytest.mark.parametrize("threads", [1, 4])
async def test_many_commits_at_once_are_all_durable_and_locked(queue: Queue, threads: int) -> None:
    queue.committer = Committer(queue._pool, lambda: queue.fsync_state_dir(ACTIVE), threads=threads)
    messages = [new_message(queue, b"message %d\r\n" % i) for i in range(40)]
    ids = await commit_all(messages)
    assert all(isinstance(i, str) for i in ids)
    assert files(queue, ACTIVE) == sorted(str(i) for i in ids)
    assert files(queue, INCOMING) == []
    for qid in ids:
        # the receiver keeps its claim (the lock) until delivery
        assert queue._locked(queue.path_of(ACTIVE, str(qid)))
        claim = queue.take_fresh(str(qid))
        assert claim is not None
        queue.release_sync(claim)
    assert [m.queue_id for m in queue.messages()] == sorted(str(i) for i in ids)


async def test_one_file_failing_fails_only_its_own_commit(
    queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    queue.committer = Committer(queue._pool, lambda: queue.fsync_state_dir(ACTIVE), threads=1)
    gate = Gate(queue, monkeypatch)
    first = asyncio.ensure_future(commit_all([new_message(queue)]))
    await gate.held()  # the one thread is busy: the next messages wait together
    messages = [new_message(queue) for _ in range(5)]
    bad = messages[2]
    real_commit_sync = IncomingMessage._commit_sync

    def commit_sync(
        self: IncomingMessage, tail: bytes, envelope: Any, durable: bool = True
    ) -> None:
        if self is bad:
            self._open_sync(os.O_DSYNC)  # created and locked, then the disk fails
            raise OSError(28, "No space left on device")
        real_commit_sync(self, tail, envelope, durable)

    monkeypatch.setattr(IncomingMessage, "_commit_sync", commit_sync)
    rest = asyncio.ensure_future(commit_all(messages))
    for _ in range(5):
        await asyncio.sleep(0)  # every commit() has queued its message
    gate.open.set()
    results = await rest
    assert gate.batches[1] == [m.queue_id for m in messages]  # one batch
    failed = results[2]
    assert isinstance(failed, QueueError)
    good = [str(r) for r in [*await first, *results] if r is not failed]
    assert len(good) == 5
    await queue.settle()
    assert files(queue, ACTIVE) == sorted(good)
    assert files(queue, INCOMING) == []  # the failed one is gone, not left locked
    for qid in good:
        assert queue._locked(queue.path_of(ACTIVE, qid))


@pytest.mark.parametrize("outcome", ["committed", "failed"])
async def test_a_commit_cancelled_after_it_settled_lets_go_of_its_file(
    queue: Queue, monkeypatch: pytest.MonkeyPatch, outcome: str
) -> None:
    """The client hangs up after the batch settled but before its commit() resumed
    (connection_lost in between): the committed file is left for the queue scan
    unlocked, a failed one removed; neither stays locked by a handle nobody owns."""
    import relay.queue.incoming as incoming

    if outcome == "failed":

        def commit_sync(self: IncomingMessage, *args: Any, **kwargs: Any) -> None:
            self._open_sync()  # created and locked, then the disk fails
            raise OSError(5, "Input/output error")

        monkeypatch.setattr(IncomingMessage, "_commit_sync", commit_sync)
    message = new_message(queue)
    task = asyncio.ensure_future(message.commit("a@example.org", ["b@example.com"]))
    settle = incoming._settle

    def settle_then_hang_up(*args: Any) -> None:
        settle(*args)  # the future has its result, the task's wake-up is scheduled
        task.cancel()

    monkeypatch.setattr(incoming, "_settle", settle_then_hang_up)
    with pytest.raises(asyncio.CancelledError):
        await task
    await queue.settle()
    assert files(queue, INCOMING) == []
    assert message._fd is None
    if outcome == "committed":
        assert files(queue, ACTIVE) == [message.queue_id]
        assert queue.fresh_ids() == []
        claim = queue.claim_sync(message.queue_id, ACTIVE)  # the scan can take it
        assert claim is not None
        queue.release_sync(claim)
    else:
        assert files(queue, ACTIVE) == []


async def test_a_commit_cancelled_while_its_batch_runs_lets_go_of_its_file(
    queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client hangs up while its batch is on the commit thread: the batch
    goes on, and the committed file is left for the queue scan, unlocked."""
    gate = Gate(queue, monkeypatch)
    message = new_message(queue)
    task = asyncio.ensure_future(message.commit("a@example.org", ["b@example.com"]))
    await gate.held()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    gate.open.set()
    committed = queue.path_of(ACTIVE, message.queue_id)
    await await_until(
        lambda: committed.exists() and not queue._locked(committed), what="committed, let go"
    )
    assert message._fd is None
    assert queue.fresh_ids() == []
    claim = queue.claim_sync(message.queue_id, ACTIVE)  # the scan can take it
    assert claim is not None
    queue.release_sync(claim)


async def five_commits_fail_and_leave_nothing(queue: Queue) -> None:
    results = await commit_all([new_message(queue) for _ in range(5)])
    assert all(isinstance(r, QueueError) for r in results)
    await queue.settle()
    assert files(queue, ACTIVE) == []
    assert files(queue, INCOMING) == []
    assert queue.fresh_ids() == []


async def test_a_failed_folder_fsync_fails_the_batch_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Renamed but not durable: never acknowledged, so not delivered either."""
    queue = Queue(tmp_path / "q")
    try:

        def failing_sync(state: str) -> None:
            raise OSError(5, "Input/output error")

        monkeypatch.setattr(queue, "fsync_state_dir", failing_sync)
        queue.committer = Committer(queue._pool, lambda: queue.fsync_state_dir(ACTIVE))
        await five_commits_fail_and_leave_nothing(queue)
    finally:
        await queue.close()


async def test_a_batch_waits_for_no_other_batch(
    queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With several commit threads, while one is held up (a slow disk), the others
    commit on (their folder fsyncs shared by GroupSync)."""
    queue.committer = Committer(queue._pool, lambda: queue.fsync_state_dir(ACTIVE), threads=3)
    gate = Gate(queue, monkeypatch)
    held = asyncio.ensure_future(commit_all([new_message(queue)]))
    await gate.held()
    others = await asyncio.wait_for(commit_all([new_message(queue) for _ in range(3)]), 10)
    assert all(isinstance(r, str) for r in others)
    assert not held.done()
    gate.open.set()
    [first] = await held
    assert isinstance(first, str)


async def test_close_ends_the_commit_threads(tmp_path: Path) -> None:
    queue = Queue(tmp_path / "q")
    await commit_all([new_message(queue) for _ in range(3)])
    await queue.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("queue-commit")]


async def test_jobs_run_in_order_off_the_loop_and_report_on_it(queue: Queue) -> None:
    loop = asyncio.get_running_loop()
    ran: list[tuple[int, str]] = []
    told: list[tuple[object, str]] = []
    all_told = asyncio.Event()

    def job(n: int) -> int:
        ran.append((n, threading.current_thread().name))
        return n * 10

    def done(outcome: object) -> None:
        told.append((outcome, threading.current_thread().name))
        if len(told) == 3:
            all_told.set()

    for n in range(3):
        queue.committer.start_job(loop, job, n, done)
    await all_told.wait()
    assert ran == [(0, "queue-commit-0"), (1, "queue-commit-0"), (2, "queue-commit-0")]
    main = threading.current_thread().name
    assert told == [(0, main), (10, main), (20, main)]


async def test_run_awaited_returns_the_result_or_raises_the_jobs_exception(queue: Queue) -> None:
    def fails(_: None) -> None:
        raise OSError("disk full")

    assert await run_awaited(queue.committer.start_job, lambda n: n + 1, 41) == 42
    with pytest.raises(OSError, match="disk full"):
        await run_awaited(queue.committer.start_job, fails, None)


async def test_a_job_runs_after_the_commit_batch_it_waited_with(queue: Queue) -> None:
    """A removal never holds up the 250 of a commit waiting beside it."""
    committer = queue.committer
    gate = threading.Event()
    order: list[str] = []
    loop = asyncio.get_running_loop()
    committer.start_job(loop, lambda _: gate.wait(10), None, lambda _: None)  # holds the thread
    await asyncio.sleep(0.05)  # the thread is in that job: what follows waits together
    committer.start_job(loop, lambda _: order.append("job"), None, lambda _: None)
    msg = queue.incoming()
    msg.write(b"x\r\n")
    committed = asyncio.ensure_future(msg.commit("a@example.org", ["b@example.com"]))
    await asyncio.sleep(0.05)
    real_batch = committer._commit_batch_sync

    def batch_sync(batch: list[object]) -> list[OSError | None]:
        order.append("commit")
        return real_batch(batch)  # type: ignore[arg-type]

    committer._commit_batch_sync = batch_sync  # type: ignore[method-assign]
    gate.set()
    queue_id = await committed
    committer.wait_idle()
    assert order == ["commit", "job"]
    claim = queue.take_fresh(queue_id)
    assert claim is not None
    queue.release_sync(claim)


def test_wait_idle_and_shutdown_run_every_started_job(tmp_path: Path) -> None:
    committer = Committer(None, lambda: None)  # type: ignore[arg-type]  # no pool: no big message
    ran: list[int] = []
    gate = threading.Event()
    loop = asyncio.new_event_loop()
    try:
        committer.start_job(loop, lambda _: gate.wait(), None, lambda _: None)
        committer.start_job(loop, ran.append, 1, lambda _: None)
        gate.set()
        committer.wait_idle()
        assert ran == [1]
        committer.start_job(loop, ran.append, 2, lambda _: None)
        committer.shutdown()  # runs what was started first
        assert ran == [1, 2]
    finally:
        loop.close()


async def test_removals_of_delivered_messages_run_on_the_commit_thread(queue: Queue) -> None:
    msg = queue.incoming()
    msg.write(b"x\r\n")
    claim = queue.take_fresh(await msg.commit("a@example.org", ["b@example.com"]))
    assert claim is not None
    queue.finish_later(claim)
    await queue.settle()
    assert list((queue.directory / ACTIVE).iterdir()) == []
    assert [t.name for t in threading.enumerate() if t.name.startswith("queue-finish")] == []


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="Linux scheduling policies")
async def test_the_commit_threads_run_under_sched_batch(queue: Queue) -> None:
    """Woken, a commit thread waits for the CPU's running task (mostly an event
    loop) instead of preempting it; the event loop's thread keeps its policy."""
    assert isinstance(await new_message(queue).commit("a@example.org", ["b@example.com"]), str)
    threads = queue.committer._threads
    assert threads
    for thread in threads:
        assert thread.native_id is not None
        assert os.sched_getscheduler(thread.native_id) == os.SCHED_BATCH
    assert os.sched_getscheduler(0) == os.SCHED_OTHER


class Syncs:
    """Counts how a queue's batches were made durable."""

    def __init__(self, queue: Queue, monkeypatch: pytest.MonkeyPatch) -> None:
        self.filesystem = 0
        self.folder = 0
        self.durable_writes: list[bool] = []
        filesystem = queue._filesystem
        real_fs_sync, real_folder_sync = filesystem.sync, queue.committer._sync_active
        real_commit_sync = IncomingMessage._commit_sync

        def fs_sync() -> None:
            self.filesystem += 1
            real_fs_sync()

        def folder_sync() -> None:
            self.folder += 1
            real_folder_sync()

        def commit_sync(
            message: IncomingMessage, tail: bytes, envelope: Any, durable: bool = True
        ) -> None:
            self.durable_writes.append(durable)
            real_commit_sync(message, tail, envelope, durable)

        monkeypatch.setattr(filesystem, "sync", fs_sync)
        monkeypatch.setattr(queue.committer, "_sync_active", folder_sync)
        monkeypatch.setattr(IncomingMessage, "_commit_sync", commit_sync)


def needs_syncfs(queue: Queue) -> None:
    if not queue._filesystem.usable:
        pytest.skip("the test folder's filesystem has no sound syncfs")


async def test_a_batch_of_small_messages_is_made_durable_by_one_syncfs(
    queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    needs_syncfs(queue)
    monkeypatch.setattr(relay.durable, "SYNCFS_MAX_DIRTY_KB", 1 << 40)  # whatever else runs
    syncs = Syncs(queue, monkeypatch)
    gate = Gate(queue, monkeypatch)
    first = asyncio.ensure_future(commit_all([new_message(queue)]))
    await gate.held()  # the one thread is busy: the next messages wait together
    messages = [new_message(queue) for _ in range(5)]
    batched = asyncio.ensure_future(commit_all(messages))
    for _ in range(5):
        await asyncio.sleep(0)
    gate.open.set()
    later = await batched
    ids = [*await first, *later]
    assert all(isinstance(i, str) for i in ids)
    assert [len(b) for b in gate.batches] == [1, 5]
    assert syncs.filesystem == 2 and syncs.folder == 0
    assert syncs.durable_writes == [False] * 6  # no O_DSYNC write, no fsync per file
    assert files(queue, ACTIVE) == sorted(str(i) for i in ids)
    for qid in ids:
        assert queue._locked(queue.path_of(ACTIVE, str(qid)))


async def test_file_by_file_while_much_else_is_dirty(
    queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A syncfs would wait for others' dirty data: each file synced on its own."""
    needs_syncfs(queue)
    monkeypatch.setattr(relay.durable, "SYNCFS_MAX_DIRTY_KB", -1)
    syncs = Syncs(queue, monkeypatch)
    ids = await commit_all([new_message(queue) for _ in range(3)])
    assert all(isinstance(i, str) for i in ids)
    assert syncs.filesystem == 0 and syncs.folder >= 1
    assert syncs.durable_writes == [True] * 3
    assert files(queue, ACTIVE) == sorted(str(i) for i in ids)


async def test_a_big_message_is_synced_on_its_own(
    queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    needs_syncfs(queue)
    monkeypatch.setattr(relay.durable, "SYNCFS_MAX_DIRTY_KB", 1 << 40)
    syncs = Syncs(queue, monkeypatch)
    [qid] = await commit_all([new_message(queue, b"x" * 1000 + b"\r\n" * (SPILL_BYTES // 2))])
    assert isinstance(qid, str)
    assert syncs.filesystem == 0 and syncs.folder == 1 and syncs.durable_writes == [True]


async def test_a_failed_syncfs_fails_the_batch_and_leaves_nothing(
    queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Renamed into active/ but not durable: never acknowledged, so not delivered either."""
    needs_syncfs(queue)
    monkeypatch.setattr(relay.durable, "SYNCFS_MAX_DIRTY_KB", 1 << 40)

    def failing_sync() -> None:
        raise OSError(5, "syncfs: Input/output error")

    monkeypatch.setattr(queue._filesystem, "sync", failing_sync)
    await five_commits_fail_and_leave_nothing(queue)
