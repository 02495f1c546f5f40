"""relay.process.worker.settle_allocator: glibc's fixed mmap threshold."""

from __future__ import annotations

import platform

import pytest

from relay.process.worker import settle_allocator


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_glibc_takes_the_fixed_mmap_threshold() -> None:
    assert settle_allocator() is True
