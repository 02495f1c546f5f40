"""The durable queue: Postfix's incoming/active/deferred/hold, on one volume.

The folder a queue file sits in is its state (relay.queue.format has the
file format and the names):

    incoming/  being received (the writer holds a flock on it)
    active/    committed, waiting for or in its first delivery
    deferred/  failed at least once; the file's mtime is the next attempt
               (as Postfix's qmgr does it)
    hold/      put on hold by an administrator
    state/     per-message delivery progress (attempts, recipients done,
               last reason), written atomically only after an attempt

Receiving and committing is relay.queue.incoming (`Queue.incoming()`); this
module is the rest: claims, progress, deferral, removal, scans, recovery,
and the administration of `mailrelay queue`.

Several processes share one queue folder. Delivering a message needs an
exclusive flock on its file (a lock dies with its process, so nothing stale
ever blocks a restart); the process that received a message keeps the lock
from receipt to delivery, so nobody else races it.

File I/O runs on the queue's own thread pool, never on the event loop. The
`*_sync` methods are the blocking halves, for the pool and for the
`mailrelay queue` command (which runs outside any event loop).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import fcntl
import functools
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, TypeVarTuple

from relay.durable import FilesystemSync, GroupSync, replace_file_sync
from relay.queue.format import (
    ACTIVE,
    CORRUPT,
    DEFERRED,
    FLUSH_MARKER,
    HOLD,
    INCOMING,
    QUEUE_STATES,
    READ_CHUNK,
    STATE,
    Claim,
    Progress,
    QueueState,
    is_queue_id,
    new_queue_id,
    read_envelope,
)
from relay.queue.incoming import Committer, IncomingMessage
from relay.queue.jobs import await_owned, run_awaited
from relay.queue.mailparams import NO_PARAMS, MailParams

# An incoming file younger than this is never removed as stale: closes the
# window between a writer creating it and taking its lock.
STALE_INCOMING_AGE = 60.0
# Delivered messages are removed in batches, gathered over this long.
FINISH_DELAY = 0.01

T = TypeVar("T")
Ts = TypeVarTuple("Ts")


@dataclass
class QueuedMessage:
    queue_id: str
    sender: str
    recipients: list[str]  # still pending
    arrival: float  # unix time
    next_attempt: float
    attempts: int = 0
    last_reason: str = ""
    done: dict[str, str] = field(default_factory=dict)  # recipient -> final result
    client: str = ""  # client ip, for logs and DSNs
    size: int = 0
    state: QueueState = ACTIVE
    all_recipients: list[str] = field(default_factory=list)
    params: MailParams = NO_PARAMS  # SMTPUTF8, BODY, DSN (relay.queue.mailparams)


class Queue:
    """One queue folder, as one process uses it."""

    def __init__(
        self,
        directory: Path,
        *,
        clock: Callable[[], float] = time.time,
        io_threads: int = 16,
    ) -> None:
        self.directory = Path(directory)
        self.root = str(self.directory)
        self.clock = clock  # arrival times; tests inject a fake clock
        for name in (INCOMING, *QUEUE_STATES, STATE):
            (self.directory / name).mkdir(mode=0o700, parents=True, exist_ok=True)  # as Postfix
        # fsyncs of different files overlap on disk; a pool lets them group.
        self._pool = ThreadPoolExecutor(io_threads, thread_name_prefix="queue-io")
        self._fresh: dict[str, Claim] = {}
        self.committing: set[str] = set()  # in commit(): maybe in active/ already, not fresh yet
        self._tasks: set[asyncio.Future[Any]] = set()
        self._dir_syncs: dict[str, GroupSync] = {}
        self._finishing: collections.deque[Claim] = collections.deque()
        self._finish_job: asyncio.Task[None] | None = None
        self._dir_lock = threading.Lock()
        # Batches of small messages made durable by one syncfs (Committer).
        self._filesystem = FilesystemSync(self.directory / ACTIVE)
        self.committer = Committer(
            self._pool, functools.partial(self.fsync_state_dir, ACTIVE), filesystem=self._filesystem
        )

    # -- plumbing ----------------------------------------------------------

    async def run_io(self, fn: Callable[[*Ts], T], *args: *Ts) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def track(self, task: asyncio.Future[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def settle(self) -> None:
        """Waits for background work (chunk writes, removals of delivered mail)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def fsync_state_dir(self, state: str) -> None:
        """fsyncs a state folder: durable are all renames into it done before the call."""
        self._dir_sync(state).sync()

    def _dir_sync(self, state: str) -> GroupSync:
        with self._dir_lock:
            syncer = self._dir_syncs.get(state)
            if syncer is None:
                syncer = self._dir_syncs[state] = GroupSync(self.directory / state)
        return syncer

    async def close(self) -> None:
        """Waits for background writes, releases fresh claims, stops the I/O pool."""
        await self.settle()
        if self._finishing:  # delivered meanwhile (a removal batch cancelled while it waited)
            self._finish_batch_sync(list(self._finishing))
            self._finishing.clear()
        for claim in list(self._fresh.values()):
            self.release_sync(claim)
        self._fresh.clear()
        self.committer.shutdown()
        self._pool.shutdown(wait=True)
        for syncer in self._dir_syncs.values():
            syncer.close()
        self._filesystem.close()
        self._dir_syncs.clear()

    def path_of(self, state: str, queue_id: str) -> Path:
        return self.directory / state / queue_id

    # -- receiving ---------------------------------------------------------

    def incoming(self) -> IncomingMessage:
        return IncomingMessage(self, new_queue_id())

    def keep_fresh(self, claim: Claim) -> None:
        self._fresh[claim.queue_id] = claim

    async def hold_fresh(self, queue_id: str) -> None:
        """Moves a message this process just committed to hold/, then lets go of
        its claim (held first: no scan may find it in active/ unlocked meanwhile)."""
        claim = self.take_fresh(queue_id)

        def move_then_release() -> None:
            try:
                self.move_sync(queue_id, HOLD)
            finally:
                if claim is not None:
                    self.release_sync(claim)

        # Shielded: a cancelled caller (its client hung up) stops waiting, not
        # the release (out of the fresh claims, nothing else would close it).
        await asyncio.shield(self.run_io(move_then_release))

    def take_fresh(self, queue_id: str) -> Claim | None:
        """The claim of a message this process just committed, if still unclaimed."""
        return self._fresh.pop(queue_id, None)

    def fresh_ids(self) -> list[str]:
        """Messages this process holds from receipt to wake(), those being committed too
        (a scan may list one in active/ before its commit() has handed it back)."""
        return [*self._fresh, *self.committing]

    # -- claiming and recording results (blocking: run on the pool) --------

    def locate_sync(self, queue_id: str) -> QueueState | None:
        for state in QUEUE_STATES:
            if os.path.exists(self.path_of(state, queue_id)):
                return state
        return None

    def claim_sync(self, queue_id: str, state: QueueState) -> Claim | None:
        """Locks a queued message for delivery; None if someone else has it or it is gone."""
        path = self.path_of(state, queue_id)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            # While we waited for nothing, the holder may have finished it
            # (unlinked) or moved it on: only the file still at `path` counts.
            st = os.fstat(fd)
            try:
                now_st = os.stat(path)
            except FileNotFoundError:
                now_st = None
            if st.st_nlink == 0 or now_st is None or now_st.st_ino != st.st_ino:
                os.close(fd)
                return None
            try:
                envelope = read_envelope(fd)
            except ValueError:
                if st.st_size == 0:
                    # A batch committed by syncfs is renamed before it is synced:
                    # after a machine crash in between, its files may be empty.
                    # Never acknowledged (the 250 waits for the sync): removed.
                    os.unlink(path)
                else:
                    # Committed files are whole (synced before anyone is told):
                    # this one is damaged or foreign. Set aside, as Postfix's corrupt/.
                    (self.directory / CORRUPT).mkdir(mode=0o700, exist_ok=True)
                    os.rename(path, self.directory / CORRUPT / queue_id)
                os.close(fd)
                return None
            progress = self.read_progress_sync(queue_id)
            return Claim(
                queue_id, fd, state, envelope, progress, progress_saved=progress != Progress()
            )
        except OSError:
            os.close(fd)
            raise

    async def claim(self, queue_id: str, state: QueueState) -> Claim | None:
        """claim_sync on the pool. Cancelled while it runs (a stop's grace ran
        out), the claim it still returns is let go: no lock outlives its owner."""
        job = asyncio.ensure_future(self.run_io(self.claim_sync, queue_id, state))
        return await await_owned(job, self._release_unwanted)

    def _release_unwanted(self, job: asyncio.Future[Claim | None]) -> None:
        if not job.cancelled() and job.exception() is None and (claim := job.result()):
            self.release_sync(claim)

    def next_attempt_sync(self, claim: Claim) -> float:
        """The claimed file's mtime: when a deferred message is due."""
        return os.fstat(claim.fd).st_mtime

    def read_progress_sync(self, queue_id: str) -> Progress:
        try:
            raw = (self.directory / STATE / queue_id).read_bytes()
        except FileNotFoundError:
            return Progress()
        try:
            return Progress.from_json(raw)
        except (ValueError, KeyError, TypeError):
            return Progress()  # a torn sidecar can only come from before an attempt ended

    def save_progress_sync(self, claim: Claim) -> None:
        """Persists recipients done so far (atomically: temp file, fsync, rename)."""
        final = self.directory / STATE / claim.queue_id
        tmp = self.directory / STATE / f".{claim.queue_id}.tmp"
        claim.progress_saved = True  # (finish_sync removes it, if it is there)
        replace_file_sync(final, claim.progress.to_json(), tmp, self._dir_sync(STATE))

    def read_data_sync(self, claim: Claim, offset: int, length: int) -> bytes:
        end = min(claim.envelope.size, offset + length)
        if claim.data is not None:
            return claim.data[offset:end]
        return os.pread(claim.fd, max(0, end - offset), offset)

    async def read_chunks(self, claim: Claim) -> AsyncIterator[bytes]:
        """The claimed message's data, READ_CHUNK at a time (from memory when it is there)."""
        if claim.data is not None:
            yield claim.data
            return
        offset = 0
        while offset < claim.envelope.size:
            chunk = await self.run_io(self.read_data_sync, claim, offset, READ_CHUNK)
            if not chunk:
                break
            offset += len(chunk)
            yield chunk

    def read_headers_sync(self, claim: Claim, limit: int = 64 * 1024) -> bytes:
        """The header section of the message (up to the blank line), capped at `limit`."""
        head = self.read_data_sync(claim, 0, limit)
        for sep in (b"\r\n\r\n", b"\n\n"):
            i = head.find(sep)
            if i >= 0:
                return head[: i + len(sep) // 2]
        return head

    def finish_sync(self, claim: Claim) -> None:
        """Every recipient is done: the message leaves the queue."""
        for state in (claim.state, *QUEUE_STATES):
            try:
                os.unlink(f"{self.root}/{state}/{claim.queue_id}")
                break
            except FileNotFoundError:
                continue
        if claim.state != ACTIVE or claim.progress.attempts or claim.progress_saved:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{self.root}/{STATE}/{claim.queue_id}")
        self.release_sync(claim)

    def finish_later(self, claim: Claim) -> None:
        """finish_sync in the background, batched: one pool job for many messages.

        The lock is kept until the file is gone (no one else may take it);
        the unlink need not be durable (at worst a message goes out twice).
        """
        # The batch owns the lock from here: the caller's claim lets go of it.
        self._finishing.append(dataclasses.replace(claim))
        claim.fd = -1
        if self._finish_job is None:
            self._finish_job = asyncio.ensure_future(self._finish_batches())
            self.track(self._finish_job)

    async def _finish_batches(self) -> None:
        """Waits FINISH_DELAY for more messages to finish, then hands all that
        wait to one job on the commit thread (a hand-off to a thread per message
        costs more than its unlink); again while more came meanwhile.

        Only the event loop touches `_finishing`: a job takes its batch whole,
        and this task ends only once none is left (in the same loop step as
        it looks), so a removal queued while a job ends is never left behind.
        """
        try:
            await asyncio.sleep(FINISH_DELAY)
            while self._finishing:
                batch = list(self._finishing)
                self._finishing.clear()
                await run_awaited(self.committer.start_job, self._finish_batch_sync, batch)
        finally:
            self._finish_job = None

    def _finish_batch_sync(self, batch: list[Claim]) -> None:
        for claim in batch:
            with contextlib.suppress(OSError):
                self.finish_sync(claim)
            if claim.fd >= 0:
                self.release_sync(claim)

    def defer_sync(self, claim: Claim, next_attempt: float) -> QueueState | None:
        """Records progress and moves the message to deferred/ until `next_attempt`.

        A message put on hold meanwhile stays on hold; one deleted meanwhile
        stays deleted. Returns the state it ends in (None: gone).
        """
        state = self.locate_sync(claim.queue_id)
        if state is None:
            self.release_sync(claim)
            return None
        self.save_progress_sync(claim)  # before the move: a crash keeps the progress
        os.utime(claim.fd, (next_attempt, next_attempt))
        if state == ACTIVE:
            try:
                os.rename(
                    self.path_of(ACTIVE, claim.queue_id), self.path_of(DEFERRED, claim.queue_id)
                )
                self.fsync_state_dir(DEFERRED)
                state = DEFERRED
            except FileNotFoundError:  # moved (held) in between
                state = self.locate_sync(claim.queue_id)
        self.release_sync(claim)
        return state

    def release_sync(self, claim: Claim) -> None:
        """Gives up the lock without changing anything."""
        if claim.fd >= 0:
            os.close(claim.fd)
            claim.fd = -1

    # -- scanning ----------------------------------------------------------

    def scan_sync(self) -> list[tuple[str, QueueState, float]]:
        """(queue_id, state, mtime) of every committed message: cheap, no file opened."""
        return [(queue_id, state, mtime) for queue_id, state, mtime, _ in self.scan_sizes_sync()]

    def scan_sizes_sync(self) -> list[tuple[str, QueueState, float, int]]:
        """(queue_id, state, mtime, bytes) of every committed message (one stat each)."""
        out: list[tuple[str, QueueState, float, int]] = []
        for state in QUEUE_STATES:
            folder = self.directory / state
            with os.scandir(folder) as it:
                for entry in it:
                    if not is_queue_id(entry.name):
                        continue
                    try:
                        st = entry.stat()
                    except FileNotFoundError:
                        continue
                    out.append((entry.name, state, st.st_mtime, st.st_size))
        return out

    def volume_sync(self) -> tuple[int, int]:
        """(bytes available to us, size) of the queue's filesystem."""
        st = os.statvfs(self.directory)
        return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize

    def recover_sync(self, stale_age: float = STALE_INCOMING_AGE) -> list[str]:
        """Start-up cleanup: removes half-received messages and orphaned sidecars.

        Only files no living process holds a lock on are touched, so a worker
        starting next to running ones is safe. Returns what was removed.
        """
        removed = []
        now = time.time()
        with os.scandir(self.directory / INCOMING) as it:
            for entry in it:
                path = Path(entry.path)
                try:
                    young = now - entry.stat().st_mtime < stale_age
                    if young or self._locked(path):
                        continue  # being received (or about to be locked by its writer)
                    path.unlink()
                    removed.append(str(path))
                except FileNotFoundError:
                    continue
        with os.scandir(self.directory / STATE) as it:
            for entry in it:
                name = entry.name
                torn = name.startswith(".") and name.endswith(".tmp")
                qid = name[1:-4] if torn else name
                state = self.locate_sync(qid)
                if state is not None and (not torn or self._locked(self.path_of(state, qid))):
                    continue  # a live message's progress, or one being written now
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed.append(entry.path)
        return removed

    def _locked(self, path: Path) -> bool:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    # -- listing and administration (postqueue / postsuper) -----------------

    def messages(self) -> Iterator[QueuedMessage]:
        """Every committed message, oldest first (reads each file: not for the event loop)."""
        for queue_id, state, mtime in sorted(self.scan_sync()):
            message = self.read_message_sync(queue_id, state, mtime)
            if message is not None:
                yield message

    def read_message_sync(
        self, queue_id: str, state: QueueState, mtime: float | None = None
    ) -> QueuedMessage | None:
        path = self.path_of(state, queue_id)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            envelope = read_envelope(fd)
            if mtime is None:
                mtime = os.fstat(fd).st_mtime
        except ValueError:
            return None
        finally:
            os.close(fd)
        progress = self.read_progress_sync(queue_id)
        pending = [r for r in envelope.recipients if r not in progress.done]
        return QueuedMessage(
            queue_id=queue_id,
            sender=envelope.sender,
            recipients=pending,
            arrival=envelope.arrival,
            next_attempt=mtime if state == DEFERRED else envelope.arrival,
            attempts=progress.attempts,
            last_reason=progress.last_reason,
            done=dict(progress.done),
            client=envelope.client,
            size=envelope.size,
            state=state,
            all_recipients=list(envelope.recipients),
            params=envelope.params,
        )

    def read_message_data_sync(self, queue_id: str, limit: int | None = None) -> bytes | None:
        state = self.locate_sync(queue_id)
        if state is None:
            return None
        with open(self.path_of(state, queue_id), "rb") as f:
            envelope = read_envelope(f.fileno())
            return f.read(envelope.size if limit is None else min(limit, envelope.size))

    def move_sync(self, queue_id: str, to_state: QueueState, *, mtime: float | None = None) -> bool:
        """hold/release: renames the file between state folders (safe while delivering)."""
        for state in QUEUE_STATES:
            if state == to_state:
                continue
            src = self.path_of(state, queue_id)
            try:
                if mtime is not None:
                    os.utime(src, (mtime, mtime))
                os.rename(src, self.path_of(to_state, queue_id))
            except FileNotFoundError:
                continue
            self.fsync_state_dir(to_state)
            return True
        return False

    def delete_sync(self, queue_id: str) -> bool:
        deleted = False
        for state in QUEUE_STATES:
            try:
                os.unlink(self.path_of(state, queue_id))
                deleted = True
            except FileNotFoundError:
                continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.directory / STATE / queue_id)
        return deleted

    def flush_sync(self, now: float | None = None) -> int:
        """Makes every deferred message due now and tells running relays."""
        now = time.time() if now is None else now
        count = 0
        with os.scandir(self.directory / DEFERRED) as it:
            for entry in it:
                if is_queue_id(entry.name):
                    with contextlib.suppress(FileNotFoundError):
                        os.utime(entry.path, (now, now))
                        count += 1
        marker = self.directory / FLUSH_MARKER
        marker.touch()
        os.utime(marker, None)
        return count

    def flush_marker_mtime_sync(self) -> float:
        try:
            return os.stat(self.directory / FLUSH_MARKER).st_mtime_ns / 1e9
        except FileNotFoundError:
            return 0.0

    def resolve_ids_sync(self, ids: Iterable[str]) -> tuple[list[str], list[str]]:
        """Expands ALL; returns (known ids, unknown ids)."""
        wanted = list(ids)
        present = {qid for qid, _, _ in self.scan_sync()}
        if any(i.upper() == "ALL" for i in wanted):
            return sorted(present), []
        known = [i.upper() for i in wanted if i.upper() in present]
        unknown = [i for i in wanted if i.upper() not in present]
        return known, unknown
