"""The durable queue: Postfix's incoming/active/deferred/hold, on one volume.

One file per message, named by its queue id: the message data as received,
then a JSON envelope trailer and a fixed-size footer that locates it. The
folder a file sits in is its state:

    incoming/  being received (the writer holds a flock on it)
    active/    committed, waiting for or in its first delivery
    deferred/  failed at least once; the file's mtime is the next attempt
               (as Postfix's qmgr does it)
    hold/      put on hold by an administrator
    state/     per-message delivery progress (attempts, recipients done,
               last reason), written atomically only after an attempt

Commit order (what makes `250` safe): data + trailer written, file fsynced,
renamed from incoming/ into active/, active/ fsynced. A crash before the
rename leaves an incoming file nobody holds a lock on: removed at start.

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
import json
import os
import threading
import time
import zlib
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

INCOMING, ACTIVE, DEFERRED, HOLD, STATE = "incoming", "active", "deferred", "hold", "state"
QUEUE_STATES = (ACTIVE, DEFERRED, HOLD)  # where committed messages live
CORRUPT = "corrupt"  # damaged files, set aside for a person to look at
FLUSH_MARKER = "flush"  # touched by `mailrelay queue flush`; relays watch its mtime

# Messages up to this size stay in memory from receipt to delivery (no read
# back); bigger ones are written out in chunks of this size while received.
SPILL_BYTES = 256 * 1024
# A receiver may run this far ahead of the disk before drain() makes it wait.
MAX_PENDING_BYTES = 1024 * 1024
READ_CHUNK = 256 * 1024
# Threads committing batches. Measured here: a second one costs more in GIL
# hand-offs with the event loop than its overlapping fsyncs gain.
COMMIT_THREADS = 1

_FOOTER_MAGIC = b"\nMRQ1 "
_FOOTER_LEN = len(_FOOTER_MAGIC) + 10 + 1 + 8 + 1  # magic, json length, space, crc32, LF

# An incoming file younger than this is never removed as stale: closes the
# window between a writer creating it and taking its lock.
STALE_INCOMING_AGE = 60.0

# Queue ids: Crockford base32, 12 characters, sortable by time. 7 characters
# of seconds since 2024-01-01, then 14 bits of pid and an 11-bit counter, so
# ids are unique across the worker processes that share a queue folder.
_B32 = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_ID_EPOCH = 1704067200
_ID_LEN = 12


def _b32(value: int, width: int) -> str:
    out = []
    for _ in range(width):
        out.append(_B32[value & 31])
        value >>= 5
    return "".join(reversed(out))


class _IdGenerator:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._second = 0
        self._counter = 0
        self._pid = -1

    def next(self) -> str:
        with self._lock:
            pid = os.getpid()
            if pid != self._pid:  # a forked worker starts its own sequence
                self._pid, self._second, self._counter = pid, 0, 0
            now = int(time.time()) - _ID_EPOCH
            if now > self._second:
                self._second, self._counter = now, 0
            elif self._counter >= 2048:  # more than 2048/s: borrow the next second
                self._second, self._counter = self._second + 1, 0
            tail = ((pid & 0x3FFF) << 11) | self._counter
            self._counter += 1
            return _b32(self._second, 7) + _b32(tail, 5)


_ids = _IdGenerator()


def new_queue_id() -> str:
    return _ids.next()


def is_queue_id(text: str) -> bool:
    return len(text) == _ID_LEN and all(c in _B32 for c in text)


def id_time(queue_id: str) -> float:
    """The second a queue id was made (its arrival, give or take)."""
    value = 0
    for c in queue_id[:7]:
        value = value * 32 + _B32.index(c)
    return float(value + _ID_EPOCH)


# One encoder for every trailer (json.dumps with separators builds one per call).
_COMPACT_JSON = json.JSONEncoder(separators=(",", ":"))


@dataclass
class QueuedMessage:
    queue_id: str
    sender: str
    recipients: list[str]  # still pending
    arrival: float  # unix time
    next_attempt: float
    attempts: int = 0
    held: bool = False
    last_reason: str = ""
    done: dict[str, str] = field(default_factory=dict)  # recipient -> final result
    client: str = ""  # client ip, for logs and DSNs
    size: int = 0
    state: str = ACTIVE  # active | deferred | hold
    all_recipients: list[str] = field(default_factory=list)


@dataclass
class Envelope:
    """The committed envelope, as stored in a queue file's trailer."""

    queue_id: str
    sender: str
    recipients: list[str]
    arrival: float
    client: str
    size: int  # bytes of message data (the trailer starts here)

    def to_json(self) -> bytes:
        return _COMPACT_JSON.encode(
            {
                "v": 1,
                "id": self.queue_id,
                "sender": self.sender,
                "recipients": self.recipients,
                "arrival": self.arrival,
                "client": self.client,
                "size": self.size,
            }
        ).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Envelope:
        d = json.loads(raw)
        return cls(
            queue_id=d["id"],
            sender=d["sender"],
            recipients=list(d["recipients"]),
            arrival=float(d["arrival"]),
            client=d.get("client", ""),
            size=int(d["size"]),
        )


@dataclass
class Progress:
    """What delivery attempts have found out so far (the state/ sidecar)."""

    attempts: int = 0
    done: dict[str, str] = field(default_factory=dict)  # recipient -> sent|bounced|expired
    last_reason: str = ""
    reasons: dict[str, str] = field(default_factory=dict)  # recipient -> last deferral

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "attempts": self.attempts,
                "done": self.done,
                "last_reason": self.last_reason,
                "reasons": self.reasons,
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Progress:
        d = json.loads(raw)
        return cls(
            attempts=int(d.get("attempts", 0)),
            done=dict(d.get("done", {})),
            last_reason=d.get("last_reason", ""),
            reasons=dict(d.get("reasons", {})),
        )


def _trailer(envelope: Envelope) -> bytes:
    raw = envelope.to_json()
    footer = _FOOTER_MAGIC + b"%010d %08x\n" % (len(raw), zlib.crc32(raw))
    return raw + footer


def read_envelope(fd: int) -> Envelope:
    """Reads the trailer of an open queue file; ValueError if it has none."""
    size = os.fstat(fd).st_size
    if size < _FOOTER_LEN:
        raise ValueError("no queue trailer")
    footer = os.pread(fd, _FOOTER_LEN, size - _FOOTER_LEN)
    if not footer.startswith(_FOOTER_MAGIC) or not footer.endswith(b"\n"):
        raise ValueError("no queue trailer")
    length_text, crc_text = footer[len(_FOOTER_MAGIC) : -1].split(b" ")
    length = int(length_text)
    raw = os.pread(fd, length, size - _FOOTER_LEN - length)
    if len(raw) != length or zlib.crc32(raw) != int(crc_text, 16):
        raise ValueError("damaged queue trailer")
    envelope = Envelope.from_json(raw)
    if envelope.size != size - _FOOTER_LEN - length:
        raise ValueError("queue trailer does not match the data size")
    return envelope


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class _GroupSync:
    """Group commit for one folder: one fsync covers every caller waiting for it.

    A folder fsync costs a journal commit (milliseconds); under load many
    commits wait at once. The first caller syncs; whoever arrives meanwhile
    waits and is covered by the next fsync, which one of them runs.
    """

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._cond = threading.Condition()
        self._requested = 0  # tickets handed out
        self._synced = 0  # every ticket up to this one is durable
        self._syncing = False

    def sync(self) -> None:
        with self._cond:
            self._requested += 1
            ticket = self._requested
            while self._synced < ticket:
                if self._syncing:
                    self._cond.wait()
                    continue
                self._syncing = True
                covered = self._requested  # renames of these tickets are already done
                self._cond.release()
                try:
                    os.fsync(self._fd)
                finally:
                    self._cond.acquire()
                    self._syncing = False
                    self._cond.notify_all()
                self._synced = max(self._synced, covered)

    def close(self) -> None:
        os.close(self._fd)


class QueueError(Exception):
    """The queue could not store a message (disk full, permissions): answer 4xx."""


class IncomingMessage:
    """A message being received: chunks go to disk, `commit()` makes it durable.

    Small messages stay in memory until `flush()` or `commit()`; call
    `await flush()` before reading `path` (e.g. for content checks).
    """

    def __init__(self, queue: Queue, queue_id: str) -> None:
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
                await self._writes
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
        _write_all(self._open_sync(), data)

    async def flush(self) -> Path:
        """Writes everything received so far to `path` (not fsynced); returns it."""
        if self._buffer:
            self._spill()
        await self._wait_writes()
        if self._fd is None:  # an empty message still gets its file
            await self.queue.run_io(self._open_sync)
        return self.path

    async def commit(
        self,
        sender: str,
        recipients: list[str],
        client: str = "",
        *,
        arrival: float | None = None,
    ) -> str:
        """Makes the message durable (data and envelope fsynced, folder fsynced); returns the id.

        `arrival` keeps the original arrival of mail handed over by a peer pod
        (its retry schedule and lifetime go on from there)."""
        if self._closed:
            raise QueueError("message already committed or aborted")
        await self._wait_writes()
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
        )
        try:
            await self.queue.commit_batched(self, tail, envelope)
        except OSError as e:
            await self.queue.run_io(self._discard_sync)
            raise QueueError(f"cannot queue {self.queue_id}: {e}") from e
        assert self._fd is not None
        # Small messages are handed to delivery from memory: no read back.
        data = None if self._spilled else tail
        self.queue.keep_fresh(Claim(self.queue_id, self._fd, ACTIVE, envelope, Progress(), data))
        self._fd = None
        return self.queue_id

    def _commit_sync(self, tail: bytes, envelope: Envelope) -> None:
        """Data and trailer written and fsynced, renamed into active/ (the
        caller fsyncs active/ before anyone is told)."""
        if self._fd is None:
            # Never written out: O_DSYNC makes the one write durable by itself
            # (fdatasync semantics: data and size), one syscall less than fsync.
            fd = self._open_sync(os.O_DSYNC)
            _write_all(fd, tail + _trailer(envelope))
        else:
            fd = self._fd
            _write_all(fd, tail + _trailer(envelope))
            os.fsync(fd)
        os.rename(self._file, f"{self.queue.root}/{ACTIVE}/{self.queue_id}")

    def _discard_sync(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._file)
        if self._fd is not None:
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


def _commit_batch_sync(
    queue: Queue, batch: list[tuple[IncomingMessage, bytes, Envelope, Any]]
) -> list[OSError | None]:
    """The blocking half of Queue.commit_batched: one result per message."""
    errors: list[OSError | None] = []
    for message, tail, envelope, _ in batch:
        try:
            message._commit_sync(tail, envelope)
            errors.append(None)
        except OSError as e:
            errors.append(e)
    if any(e is None for e in errors):
        try:
            queue.fsync_state_dir(ACTIVE)  # makes every rename above durable
        except OSError as e:
            return [e] * len(batch)
    return errors


@dataclass
class Claim:
    """A message this process holds the delivery lock of (an open, flocked fd)."""

    queue_id: str
    fd: int
    state: str  # the folder it was claimed in
    envelope: Envelope
    progress: Progress
    data: bytes | None = None  # the whole message data, when still in memory
    # A state/ sidecar may exist (read at claim, or saved since): remove it at the end.
    progress_saved: bool = False

    @property
    def pending(self) -> list[str]:
        return [r for r in self.envelope.recipients if r not in self.progress.done]


class Queue:
    def __init__(
        self,
        directory: Path,
        *,
        clock: Any = time.time,
        io_threads: int = 16,
    ) -> None:
        self.directory = Path(directory)
        self.root = str(self.directory)
        self.clock = clock  # arrival times; tests inject a fake clock
        for name in (INCOMING, *QUEUE_STATES, STATE):
            (self.directory / name).mkdir(parents=True, exist_ok=True)
        # fsyncs of different files overlap on disk; a pool lets them group.
        self._pool = ThreadPoolExecutor(io_threads, thread_name_prefix="queue-io")
        # The per-message work (commit batches, removals) runs on one thread of
        # its own: every extra thread that wakes for a few syscalls fights the
        # event loop for the GIL, and that costs more than the syscalls.
        self._hot_pool = ThreadPoolExecutor(COMMIT_THREADS, thread_name_prefix="queue-commit")
        self._fresh: dict[str, Claim] = {}
        self._tasks: set[asyncio.Future[Any]] = set()
        self._dir_syncs: dict[str, _GroupSync] = {}
        self._finishing: collections.deque[Claim] = collections.deque()
        self._finish_job: asyncio.Future[Any] | None = None
        self._dir_lock = threading.Lock()
        self._commits: list[tuple[IncomingMessage, bytes, Envelope, asyncio.Future[None]]] = []
        self._committing = 0  # batches on the commit threads

    # -- plumbing ----------------------------------------------------------

    async def run_io(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def commit_batched(
        self, message: IncomingMessage, tail: bytes, envelope: Envelope
    ) -> None:
        """Commits a message together with whichever others are waiting.

        One job on the commit thread writes, fsyncs and renames every message
        of its batch, fsyncs active/ once for all of them and wakes the event
        loop once; the next batch takes whoever arrived meanwhile. Far fewer
        thread hand-offs than a job per message. A big message (already
        written out while received) commits on its own on the I/O pool, so
        that its long fsync holds up no small one. Raises this message's
        own OSError.
        """
        loop = asyncio.get_running_loop()
        if message._spilled:
            errors = await loop.run_in_executor(
                self._pool, _commit_batch_sync, self, [(message, tail, envelope, None)]
            )
            if errors[0] is not None:
                raise errors[0]
            return
        future: asyncio.Future[None] = loop.create_future()
        self._commits.append((message, tail, envelope, future))
        self._start_commit_job()
        await future

    def _start_commit_job(self) -> None:
        if not self._commits or self._committing >= COMMIT_THREADS:
            return
        batch, self._commits = self._commits, []
        self._committing += 1
        job = asyncio.get_running_loop().run_in_executor(
            self._hot_pool, _commit_batch_sync, self, batch
        )

        def done(job: asyncio.Future[list[OSError | None]]) -> None:
            self._committing -= 1
            if job.cancelled():
                errors: list[OSError | None] = [OSError("commit cancelled")] * len(batch)
            elif isinstance(job.exception(), OSError):
                errors = [job.exception()] * len(batch)  # type: ignore[list-item]
            elif job.exception() is not None:
                errors = [OSError(f"commit failed: {job.exception()!r}")] * len(batch)
            else:
                errors = job.result()
            for (_, _, _, future), error in zip(batch, errors, strict=True):
                if future.done():
                    continue
                if error is None:
                    future.set_result(None)
                else:
                    future.set_exception(error)
            self._start_commit_job()

        job.add_done_callback(done)

    def track(self, task: asyncio.Future[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def settle(self) -> None:
        """Waits for background work (chunk writes, removals of delivered mail)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def fsync_state_dir(self, state: str) -> None:
        """fsyncs a state folder: durable are all renames into it done before the call."""
        with self._dir_lock:
            syncer = self._dir_syncs.get(state)
            if syncer is None:
                syncer = self._dir_syncs[state] = _GroupSync(self.directory / state)
        syncer.sync()

    async def close(self) -> None:
        """Waits for background writes, releases fresh claims, stops the I/O pool."""
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        for claim in list(self._fresh.values()):
            self.release_sync(claim)
        self._fresh.clear()
        self._pool.shutdown(wait=True)
        self._hot_pool.shutdown(wait=True)
        for syncer in self._dir_syncs.values():
            syncer.close()
        self._dir_syncs.clear()

    def path_of(self, state: str, queue_id: str) -> Path:
        return self.directory / state / queue_id

    # -- receiving ---------------------------------------------------------

    def incoming(self) -> IncomingMessage:
        return IncomingMessage(self, new_queue_id())

    def keep_fresh(self, claim: Claim) -> None:
        self._fresh[claim.queue_id] = claim

    def take_fresh(self, queue_id: str) -> Claim | None:
        """The claim of a message this process just committed, if still unclaimed."""
        return self._fresh.pop(queue_id, None)

    def fresh_ids(self) -> list[str]:
        return list(self._fresh)

    async def enqueue(self, data: bytes, sender: str, recipients: list[str]) -> str:
        """Queues a message made here (a DSN) like any received one."""
        msg = self.incoming()
        msg.write(data)
        return await msg.commit(sender, recipients)

    # -- claiming and recording results (blocking: run on the pool) --------

    def locate_sync(self, queue_id: str) -> str | None:
        for state in QUEUE_STATES:
            if os.path.exists(self.path_of(state, queue_id)):
                return state
        return None

    def claim_sync(self, queue_id: str, state: str) -> Claim | None:
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
                # Committed files are whole (fsynced before the rename): this
                # one is damaged or foreign. Set aside, as Postfix's corrupt/.
                (self.directory / CORRUPT).mkdir(exist_ok=True)
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
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            _write_all(fd, claim.progress.to_json())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, final)
        claim.progress_saved = True
        self.fsync_state_dir(STATE)

    def read_data_sync(self, claim: Claim, offset: int, length: int) -> bytes:
        end = min(claim.envelope.size, offset + length)
        if claim.data is not None:
            return claim.data[offset:end]
        return os.pread(claim.fd, max(0, end - offset), offset)

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
        if self._finish_job is None or self._finish_job.done():
            loop = asyncio.get_running_loop()
            self._finish_job = loop.run_in_executor(self._hot_pool, self._finish_batch_sync)
            self.track(self._finish_job)

    def _finish_batch_sync(self) -> None:
        while self._finishing:
            claim = self._finishing.popleft()
            with contextlib.suppress(OSError):
                self.finish_sync(claim)
            if claim.fd >= 0:
                self.release_sync(claim)

    def defer_sync(self, claim: Claim, next_attempt: float) -> str | None:
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

    def scan_sync(self) -> list[tuple[str, str, float]]:
        """(queue_id, state, mtime) of every committed message: cheap, no file opened."""
        out = []
        for state in QUEUE_STATES:
            folder = self.directory / state
            with os.scandir(folder) as it:
                for entry in it:
                    if not is_queue_id(entry.name):
                        continue
                    try:
                        out.append((entry.name, state, entry.stat().st_mtime))
                    except FileNotFoundError:
                        continue
        return out

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
        self, queue_id: str, state: str, mtime: float | None = None
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
            held=state == HOLD,
            last_reason=progress.last_reason,
            done=dict(progress.done),
            client=envelope.client,
            size=envelope.size,
            state=state,
            all_recipients=list(envelope.recipients),
        )

    def read_message_data_sync(self, queue_id: str, limit: int | None = None) -> bytes | None:
        state = self.locate_sync(queue_id)
        if state is None:
            return None
        with open(self.path_of(state, queue_id), "rb") as f:
            envelope = read_envelope(f.fileno())
            return f.read(envelope.size if limit is None else min(limit, envelope.size))

    def move_sync(self, queue_id: str, to_state: str, *, mtime: float | None = None) -> bool:
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
