"""mailrelay_api.allocator: glibc's fixed mmap threshold (relay workers), at most
two arenas (the operator), and malloc_trim."""

from __future__ import annotations

import platform

import pytest

from mailrelay_api.allocator import settle_allocator, settle_operator_allocator, trim_heap

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")


@glibc_only
def test_glibc_takes_the_fixed_mmap_threshold() -> None:
    assert settle_allocator() is True


@glibc_only
def test_glibc_takes_the_operators_settings() -> None:
    assert settle_operator_allocator() is True


def test_trim_heap_answers_whatever_the_c_library() -> None:
    assert trim_heap() in (True, False)
