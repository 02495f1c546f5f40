"""Crash-safe files, as the queue writes them: whole or not at all.

A file is written to a temporary name beside it, fsynced, renamed over its
final name, and then its folder is fsynced: after a crash the final name
holds the old content or the new, never a torn mix, and a rename that was
reported done survives. A folder fsync covers every rename made before it,
so one GroupSync per folder lets many writers share it. Every file the relay
replaces goes through `replace_file_sync` (the queue's progress, greylist
buckets, the postscreen and verify caches, the drain order): shared by
every stage, so it imports none. Blocking: for threads, never the event loop.
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """os.write until all of `data` is written (a write may be short)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def sync_folder(path: Path) -> None:
    """fsyncs a folder once: renames into it made before the call are durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class GroupSync:
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


def replace_file_sync(path: Path, data: bytes, tmp: Path, folder: GroupSync | None = None) -> None:
    """Makes `data` the content of `path`, crash-safely: written to `tmp` (in
    the same folder, a name no other writer uses at the same time) and
    fsynced, renamed over `path`, the folder fsynced (by `folder` for frequent
    writers, else opened for this one fsync). On an OSError the temporary
    file is removed and the error raised."""
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if folder is not None:
        folder.sync()
    else:
        sync_folder(path.parent)
