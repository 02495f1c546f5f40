"""relay.durable: every file the relay replaces is whole or not at all.

A writer killed before its rename (here: an exception out of the write,
after half the bytes reached the temp file) leaves the old file as it was,
for each of the helper's users outside the queue (the queue's own files are
tested in tests/queue and tests/delivery/test_durability.py).
"""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

import relay.durable
from relay.config import NextHop
from relay.durable import replace_file_sync
from relay.handover.drain import read_order_sync, write_order_sync
from relay.smtpd.screen import CacheEntry, PostscreenCache
from relay.verify_cache import ProbeResult, Status, Verifier

NOW = 1_000_000.0


class Killed(BaseException):
    """The writer's process dies here: nothing after it runs, no cleanup."""


@pytest.fixture
def killed_mid_write(monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    """Arms a kill: the next write puts half its bytes in the temp file, then dies."""

    def arm() -> None:
        def half_then_die(fd: int, data: bytes | bytearray | memoryview) -> None:
            os.write(fd, bytes(data)[: len(data) // 2])
            raise Killed

        monkeypatch.setattr(relay.durable, "write_all", half_then_die)

    return arm


def test_replace_fsyncs_the_file_renames_then_fsyncs_the_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    steps: list[str] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd: int) -> None:
        steps.append("fsync folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def rename(src: str | Path, dst: str | Path) -> None:
        steps.append("rename")
        real_rename(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    replace_file_sync(tmp_path / "f", b"new", tmp_path / ".f.tmp")
    assert steps == ["fsync file", "rename", "fsync folder"]
    assert (tmp_path / "f").read_bytes() == b"new"
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == 0o600


def test_a_failed_write_removes_its_temp_file_and_keeps_the_old(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "f").write_bytes(b"old")

    def full_disk(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError):
        replace_file_sync(tmp_path / "f", b"new", tmp_path / ".f.tmp")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]
    assert (tmp_path / "f").read_bytes() == b"old"


async def test_postscreen_cache_killed_mid_save_keeps_the_old_file(
    tmp_path: Path, killed_mid_write: Callable[[], None]
) -> None:
    cache = PostscreenCache(tmp_path, clock=lambda: NOW)
    cache.put("192.0.2.1", CacheEntry(dnsbl=NOW + 3600))
    await cache.flush()
    killed_mid_write()
    cache.put("192.0.2.2", CacheEntry(dnsbl=NOW + 3600))
    with pytest.raises(Killed):
        await cache.flush()
    restarted = PostscreenCache(tmp_path, clock=lambda: NOW)
    await restarted.load()
    assert sorted(restarted.entries) == ["192.0.2.1"]


def test_drain_order_killed_mid_write_keeps_the_old_order(
    tmp_path: Path, killed_mid_write: Callable[[], None]
) -> None:
    write_order_sync(tmp_path, ["a:1"], ttl=60, now=NOW)
    killed_mid_write()
    with pytest.raises(Killed):
        write_order_sync(tmp_path, ["b:1"], ttl=60, now=NOW + 1)
    order = read_order_sync(tmp_path, now=NOW + 2)
    assert order is not None and order.peers == ["a:1"]


async def never_probed(address: str, hop: NextHop) -> ProbeResult:
    raise AssertionError("the test probes nothing")


async def test_verify_cache_killed_mid_write_keeps_the_old_answer(
    tmp_path: Path, killed_mid_write: Callable[[], None]
) -> None:
    probe: Callable[[str, NextHop], Awaitable[ProbeResult]] = never_probed
    cache = Verifier(tmp_path, probe, clock=lambda: NOW)
    ok = ProbeResult(Status.OK, "250 2.1.5 Ok")
    await asyncio.to_thread(cache._write_sync, "joe@example.com", ok, 60)
    killed_mid_write()
    rejected = ProbeResult(Status.REJECTED, "550 5.1.1 unknown")
    with pytest.raises(Killed):
        await asyncio.to_thread(cache._write_sync, "joe@example.com", rejected, 60)
    assert cache._read_sync("joe@example.com") == ok


# -- FilesystemSync: one syncfs for a batch where that is sound and cheap ----------


def test_filesystem_sync_is_usable_on_a_journaling_filesystem(tmp_path: Path) -> None:
    if relay.durable.filesystem_type(tmp_path) not in relay.durable.SYNCFS_FILESYSTEMS:
        pytest.skip("the test folder is not on ext4, xfs or btrfs")
    syncer = relay.durable.FilesystemSync(tmp_path)
    try:
        assert syncer.usable
        (tmp_path / "f").write_bytes(b"x")
        syncer.sync()  # no error: the filesystem reported no lost writeback
    finally:
        syncer.close()
        syncer.close()  # idempotent


def test_filesystem_sync_is_not_used_on_other_filesystems_or_old_kernels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(relay.durable, "filesystem_type", lambda path: 0x01021994)  # tmpfs
    syncer = relay.durable.FilesystemSync(tmp_path)
    assert not syncer.usable and not syncer.cheap()
    syncer.close()
    monkeypatch.setattr(relay.durable, "filesystem_type", lambda path: 0xEF53)  # ext4
    monkeypatch.setattr(relay.durable, "_kernel_release", lambda: (5, 4))  # syncfs hid errors
    syncer = relay.durable.FilesystemSync(tmp_path)
    assert not syncer.usable and not syncer.cheap()
    syncer.close()


def test_filesystem_sync_is_cheap_only_while_little_is_dirty(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(relay.durable, "filesystem_type", lambda path: 0xEF53)
    syncer = relay.durable.FilesystemSync(tmp_path)
    try:
        meminfo = (
            b"MemTotal: 100 kB\nDirty:    %d kB\nWriteback:   %d kB\nWritebackTmp: 9999999 kB\n"
        )
        limit = relay.durable.SYNCFS_MAX_DIRTY_KB
        for dirty, writeback, cheap in [(0, 0, True), (limit - 10, 10, True), (limit, 1, False)]:
            monkeypatch.setattr(
                os, "pread", lambda fd, n, offset, d=dirty, w=writeback: meminfo % (d, w)
            )
            assert syncer.cheap() is cheap
        monkeypatch.setattr(os, "pread", lambda fd, n, offset: b"no such fields\n")
        assert not syncer.cheap()  # unreadable: file by file
    finally:
        syncer.close()


def test_a_failed_syncfs_raises_its_errno(tmp_path: Path) -> None:
    syncer = relay.durable.FilesystemSync(tmp_path)
    if not syncer.usable:
        pytest.skip("no syncfs here")
    syncer.close()
    syncer._fd = 10_000  # not open: EBADF, as a lost writeback would give EIO
    with pytest.raises(OSError) as raised:
        syncer.sync()
    assert raised.value.errno == 9
    syncer._fd = -1
