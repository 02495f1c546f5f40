"""A message being received, and the batched committer that makes it durable.

Commit order (what makes `250` safe): data + trailer written, file fsynced,
renamed from incoming/ into active/, active/ fsynced; or, for a batch of small
messages where that is cheap (relay.durable.FilesystemSync), the files written
and renamed without a sync, then one syncfs of the queue's filesystem. A crash
before the sync leaves files nobody holds a lock on (relay.queue.store removes
what is in incoming/ at start and keeps what is whole in active/; nothing was
acknowledged). The writer holds a flock on its file from creation
to delivery: the committed message is handed to delivery as a Claim.

Small messages stay in memory until commit; bigger ones are written out in
the background while received. Commits of small messages are batched: a
commit thread writes and renames the waiting messages and makes them durable
at once (one syncfs, or each file's O_DSYNC write and one fsync of active/),
then takes the next batch itself. The same
threads remove delivered messages (Committer.start_job), after the commit
batch they find waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from queue import Empty, SimpleQueue
from typing import Any, Protocol, TypeVar, TypeVarTuple

from relay.durable import FilesystemSync, write_all
from relay.queue.format import (
    ACTIVE,
    INCOMING,
    Claim,
    Envelope,
    Progress,
    QueueError,
    trailer,
)
from relay.queue.jobs import Job, await_owned, run_job
from relay.queue.mailparams import NO_PARAMS, MailParams

# Messages up to this size stay in memory from receipt to delivery (no read
# back); bigger ones are written out in chunks of this size while received.
SPILL_BYTES = 256 * 1024
# A receiver may run this far ahead of the disk before drain() makes it wait.
MAX_PENDING_BYTES = 1024 * 1024
# Commit batches run on this many threads at once (see Committer). On the
# 2-core test machine one thread needs about the CPU per message the
# loop-driven batches before it did and cuts the accept latency by a third;
# two threads cut it by another ~30% but cost 6-17% more CPU and gave fewer
# messages a second (measured again 2026-12-03 at ~0.85 ms per message,
# docs/benchmarks.md): the CPU per message binds here, not the latency. With
# one syncfs per batch, two threads still gave ~10% fewer (round 9).
COMMIT_THREADS = 1
# A commit thread takes at most this many waiting messages (with several
# threads, a burst is spread over them). One syncfs costs about the same for
# 4 files or 8: 16 instead of 8 gave 2-12% more msgs/s in 6 of 6 A/B pairs
# (20 sessions, SO_REUSEPORT spreads them unevenly over the workers).
MAX_BATCH = 16
T = TypeVar("T")
Ts = TypeVarTuple("Ts")


class QueueSide(Protocol):
    """What an incoming message needs of its queue (relay.queue.store.Queue)."""

    root: str
    clock: Callable[[], float]
    committer: Committer
    committing: set[str]

    async def run_io(self, fn: Callable[[*Ts], T], *args: *Ts) -> T: ...

    def track(self, task: asyncio.Future[Any]) -> None: ...

    def keep_fresh(self, claim: Claim) -> None: ...


class IncomingMessage:
    """A message being received: chunks go to disk, `commit()` makes it durable.

    Small messages stay in memory until `flush()` or `commit()`; call
    `await flush()` before reading `path` (e.g. for content checks).
    """

    def __init__(self, queue: QueueSide, queue_id: str) -> None:
        self.queue = queue
        self.queue_id = queue_id
        self._file = f"{queue.root}/{INCOMING}/{queue_id}"  # a str: no pathlib per message
        self.size = 0
        self._buffer = bytearray()
        self._fd: int | None = None
        self._spilled = False
        self._writes: asyncio.Future[None] | None = None  # the last pending chunk write
        self._pending_bytes = 0  # handed to the pool, not yet written
        self._closed = False

    @property
    def path(self) -> Path:
        return Path(self._file)

    def write(self, chunk: bytes) -> None:
        """Adds data; big messages are written out in the background, in order."""
        if self._closed:
            raise QueueError("message already committed or aborted")
        self._buffer += chunk
        self.size += len(chunk)
        if len(self._buffer) >= SPILL_BYTES:
            self._spill()

    def _spill(self) -> None:
        data = bytes(self._buffer)
        self._buffer.clear()
        self._spilled = True
        previous = self._writes
        self._pending_bytes += len(data)

        async def write_after_previous() -> None:
            try:
                if previous is not None:
                    await previous
                await self.queue.run_io(self._write_sync, data)
            finally:
                self._pending_bytes -= len(data)

        self._writes = asyncio.ensure_future(write_after_previous())

    async def drain(self) -> None:
        """Waits while too much received data is still on its way to disk.

        Call after write() in the receive loop: a slow disk then slows the
        client down instead of filling memory. Never raises (write errors
        come out of flush() and commit()).
        """
        if self._pending_bytes > MAX_PENDING_BYTES and self._writes is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._writes)

    async def _wait_writes(self) -> None:
        if self._writes is not None:
            try:
                # Shielded: a cancelled caller leaves the writes running, for
                # abort() to wait for before it removes the file.
                await asyncio.shield(self._writes)
            except OSError as e:
                raise QueueError(f"cannot write {self._file}: {e}") from e

    def _open_sync(self, flags: int = 0) -> int:
        if self._fd is None:
            flags |= os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
            fd = os.open(self._file, flags, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)  # ours until delivered: marks it alive
            self._fd = fd
        return self._fd

    def _write_sync(self, data: bytes | bytearray) -> None:
        write_all(self._open_sync(), data)

    def in_memory(self) -> bytes | None:
        """The whole message while none of it was written out (small ones until
        commit); None once it has a file: then `flush()` and read `path`."""
        if self._spilled or self._fd is not None:
            return None
        return bytes(self._buffer)

    async def flush(self) -> Path:
        """Writes everything received so far to `path` (not fsynced); returns it."""
        if self._buffer or not self._spilled:
            # Through _spill also for an empty message (it still gets its file):
            # abort() then waits for the open, whatever moment it comes.
            self._spill()
        await self._wait_writes()
        return self.path

    async def commit(
        self,
        sender: str,
        recipients: list[str],
        client: str = "",
        *,
        arrival: float | None = None,
        params: MailParams = NO_PARAMS,
    ) -> str:
        """Makes the message durable (data and envelope fsynced, folder fsynced); returns the id.

        `arrival` keeps the original arrival of mail handed over by a peer pod
        (its retry schedule and lifetime go on from there)."""
        if self._closed:
            raise QueueError("message already committed or aborted")
        try:
            await self._wait_writes()
        except BaseException:  # a failed write (disk full) or a cancel: nothing stays behind
            self.abort()
            raise
        self._closed = True
        tail = bytes(self._buffer)
        self._buffer.clear()
        envelope = Envelope(
            queue_id=self.queue_id,
            sender=sender,
            recipients=list(recipients),
            arrival=self.queue.clock() if arrival is None else arrival,
            client=client,
            size=self.size,
            params=params.only(list(recipients)),
        )
        self.queue.committing.add(self.queue_id)
        try:
            await self.queue.committer.commit(self, tail, envelope)
        except OSError as e:
            # Shielded: cancelled before the pool started it, it would never run.
            await asyncio.shield(self.queue.run_io(self._discard_sync))
            raise QueueError(f"cannot queue {self.queue_id}: {e}") from e
        finally:
            self.queue.committing.discard(self.queue_id)
        assert self._fd is not None
        # Small messages are handed to delivery from memory: no read back.
        data = None if self._spilled else tail
        self.queue.keep_fresh(Claim(self.queue_id, self._fd, ACTIVE, envelope, Progress(), data))
        self._fd = None
        return self.queue_id

    def _commit_sync(self, tail: bytes, envelope: Envelope, durable: bool = True) -> None:
        """Data and trailer written and (if `durable`) fsynced, renamed into
        active/ (the caller fsyncs active/, or syncs the whole filesystem when
        not `durable`, before anyone is told)."""
        if self._fd is None:
            # Never written out: O_DSYNC makes the one write durable by itself
            # (fdatasync semantics: data and size), one syscall less than fsync.
            fd = self._open_sync(os.O_DSYNC if durable else 0)
            write_all(fd, tail + trailer(envelope))
        else:
            fd = self._fd
            write_all(fd, tail + trailer(envelope))
            if durable:
                os.fsync(fd)
        active = f"{self.queue.root}/{ACTIVE}/{self.queue_id}"
        os.rename(self._file, active)
        # Should active/'s fsync fail, the discard removes it from there:
        # never acknowledged, it is not delivered either.
        self._file = active

    def _discard_sync(self) -> None:
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._file)
        finally:  # whatever the unlink says, the lock goes
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def _orphaned(self, error: BaseException | None) -> None:
        """The caller was cancelled (its client hung up) while the commit ran on.

        A committed message is delivered all the same: its lock is let go, for
        the queue scan to take it (the client never saw 250 and may send it
        again: RFC 1047's duplicate, as with Postfix). A failed one is removed.
        """
        if error is not None:
            self.queue.track(asyncio.ensure_future(self.queue.run_io(self._discard_sync)))
        elif self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def abort(self) -> None:
        """Drops the message (rejected, or the client went away)."""
        if self._closed:
            return
        self._closed = True
        self._buffer.clear()
        writes = self._writes

        async def discard() -> None:
            if writes is not None:
                with contextlib.suppress(Exception):
                    await writes
            await self.queue.run_io(self._discard_sync)

        if self._spilled or self._fd is not None:
            self.queue.track(asyncio.ensure_future(discard()))


# One message of a commit batch: the message, its unwritten tail, its
# envelope, and the future its commit() waits on.
_Pending = tuple[IncomingMessage, bytes, Envelope, "asyncio.Future[None]"]


def _settle(batch: list[_Pending], outcome: list[OSError | None] | BaseException) -> None:
    """Tells each committer of a finished batch how it went (on the event loop)."""
    if isinstance(outcome, OSError):
        errors: list[OSError | None] = [outcome] * len(batch)
    elif isinstance(outcome, BaseException):
        errors = [OSError(f"commit failed: {outcome!r}")] * len(batch)
    else:
        errors = outcome
    for (_, _, _, future), error in zip(batch, errors, strict=True):
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)


def _outcome(job: asyncio.Future[list[OSError | None]]) -> list[OSError | None] | BaseException:
    """A pool job's outcome as a commit thread reports one."""
    if job.cancelled():
        return OSError("commit cancelled")
    return job.exception() or job.result()


def not_preempting() -> None:
    """The calling thread runs under SCHED_BATCH (Linux; elsewhere, or when
    refused, as it was): woken, it waits for the running task of the CPU it is
    woken on to block or use up its time slice instead of preempting it. For a
    commit thread that task is mostly an event loop, its own (holding the GIL the
    thread then waits for: the preemption gains nothing) or the other worker's.
    With two workers on two CPUs the commit threads preempted the loops ~2.8
    times per message, ~0.14 with this (perf's sched_switch), and each preemption
    costs the loop its warm caches: 3-13% less CPU per message (docs/benchmarks.md,
    branch relaycpu3). Its share of the CPU stays a normal thread's."""
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))


class Committer:
    """Commits messages in batches on the queue's commit threads.

    The event loop only puts a message on a queue; a commit thread takes the
    first waiting message and whoever else waits (up to MAX_BATCH), writes
    and renames them, makes them durable and wakes the loop once for the
    batch, then takes the next batch itself: no round trip through the loop
    between batches, and no thread wake-up while batches follow each other.
    Durable means one syncfs for the batch while `filesystem` says it is
    cheap (a journal commit and a cache flush for all: on the test machine
    ~24% more msgs/s end to end and less CPU, docs/benchmarks.md), else an
    O_DSYNC write per file and active/'s fsync (a flush per file). With
    more than one thread (`threads`), batches run at once: a batch never
    waits for another's folder fsync (relay.durable.GroupSync shares
    the fsyncs), and concurrent O_DSYNC writes share ext4's journal commits
    (one thread does ~3,500 files a second on the test disk, four ~8,000),
    at a cost in CPU (COMMIT_THREADS). A big message (already written out
    while received) commits on its own on the I/O pool, so that its long
    fsync holds up no small one. The threads run under SCHED_BATCH
    (not_preempting): woken, they do not preempt an event loop.

    Jobs (start_job: the queue's removals of delivered messages) run on the
    same threads, after the commit batch taken with them. A thread of their
    own cost more CPU per message (docs/benchmarks.md, 2026-12-02): a third
    thread taking the GIL, its own wake-ups, and its unlinks and closes
    contending with the commits' metadata writes.
    """

    def __init__(
        self,
        io_pool: ThreadPoolExecutor,
        sync_active: Callable[[], None],
        threads: int = COMMIT_THREADS,
        filesystem: FilesystemSync | None = None,
    ) -> None:
        self._io_pool = io_pool
        self._sync_active = sync_active  # fsyncs active/: makes the batch's renames durable
        # Makes a batch of small messages durable at once (relay.durable.FilesystemSync).
        self._filesystem = filesystem
        self._thread_count = threads
        # Commits and removal jobs (start_job): a thread runs the jobs it finds
        # after the commit batch it takes them with.
        self._waiting: SimpleQueue[_Pending | Job[Any, Any] | None] = SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()  # starting and stopping the threads

    async def commit(self, message: IncomingMessage, tail: bytes, envelope: Envelope) -> None:
        """Commits a message together with whichever others are waiting.
        Raises this message's own OSError."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        pending: _Pending = (message, tail, envelope, future)
        if message._spilled:
            job = loop.run_in_executor(self._io_pool, self._commit_batch_sync, [pending])
            job.add_done_callback(lambda job: _settle([pending], _outcome(job)))
        else:
            if not self._threads:
                self._start()
            self._waiting.put(pending)
        # A committer cancelled (its client hung up) hands the outcome on: a
        # committed file is let go for the queue scan, a failed one removed.
        await await_owned(future, lambda settled: message._orphaned(settled.exception()))

    def start_job(
        self,
        loop: asyncio.AbstractEventLoop | None,  # None: nobody is told
        fn: Callable[[Any], Any],
        arg: Any,
        done: Callable[[Any], None],
    ) -> None:
        """Runs fn(arg) on a commit thread after the commit batch it comes
        with (whose 250s do not wait for it; a batch taken later may), then
        done(result or exception) on `loop`."""
        if not self._threads:
            self._start()
        self._waiting.put(Job(loop, fn, arg, done))

    def wait_idle(self) -> None:
        """Blocks until what was handed over before has run (for tests; one thread)."""
        ran = threading.Event()
        self.start_job(None, lambda _: ran.set(), None, lambda _: None)
        ran.wait()

    def shutdown(self) -> None:
        """Commits what waits, then ends the threads."""
        with self._lock:
            threads, self._threads = self._threads, []
        for _ in threads:
            self._waiting.put(None)  # one each: a thread ends at the first it takes
        for thread in threads:
            thread.join()

    def _start(self) -> None:
        """At the first commit, so after any fork."""
        with self._lock:
            if not self._threads:
                self._threads = [
                    threading.Thread(target=self._work, name=f"queue-commit-{i}", daemon=True)
                    for i in range(self._thread_count)
                ]
                for thread in self._threads:
                    thread.start()

    def _work(self) -> None:
        not_preempting()
        waiting = self._waiting
        while (item := waiting.get()) is not None:
            batch: list[_Pending] = []
            jobs: list[Job[Any, Any]] = []
            last = False
            while True:
                if isinstance(item, Job):
                    jobs.append(item)
                else:
                    batch.append(item)
                    if len(batch) == MAX_BATCH:
                        break
                try:
                    item = waiting.get_nowait()
                except Empty:
                    break
                if item is None:
                    last = True
                    break
            if batch:
                self._commit_and_settle(batch)
            for job in jobs:  # after the batch: its 250s wait for no removal
                run_job(job)
            if last:
                return

    def _commit_and_settle(self, batch: list[_Pending]) -> None:
        outcome: list[OSError | None] | BaseException
        try:
            outcome = self._commit_batch_sync(batch)
        except BaseException as e:  # a bug: each of the batch fails (nothing acknowledged)
            outcome = e
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            batch[0][3].get_loop().call_soon_threadsafe(_settle, batch, outcome)

    def _commit_batch_sync(self, batch: list[_Pending]) -> list[OSError | None]:
        """The blocking half of commit(): one result per message.

        Small messages are written without a sync and made durable together by
        one syncfs where that is cheap; a big one (already written out) and any
        batch when syncfs is not cheap: file by file, then active/'s fsync."""
        filesystem = self._filesystem
        together = filesystem is not None and not batch[0][0]._spilled and filesystem.cheap()
        errors: list[OSError | None] = []
        for message, tail, envelope, _ in batch:
            try:
                message._commit_sync(tail, envelope, durable=not together)
                errors.append(None)
            except OSError as e:
                errors.append(e)
        if any(e is None for e in errors):
            try:
                if together:
                    assert filesystem is not None
                    filesystem.sync()  # every file's data and rename above
                else:
                    self._sync_active()  # makes every rename above durable
            except OSError as e:
                return [e] * len(batch)
        return errors
