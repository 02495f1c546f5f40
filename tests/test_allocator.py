"""mailrelay_api.allocator: glibc's fixed mmap threshold (relay workers), at most
two arenas (the operator), and malloc_trim."""

from __future__ import annotations

import platform
from collections.abc import Iterator

import pytest

from mailrelay_api import allocator
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


class FakeLibc:
    """A C library without malloc_trim (musl, macOS)."""

    def mallopt(self, param: int, value: int) -> int:
        return 0


@pytest.fixture
def fresh_libc() -> Iterator[None]:
    """_libc's cache emptied before and after (the real library for the other tests)."""
    allocator._libc.cache_clear()
    yield
    allocator._libc.cache_clear()


@pytest.mark.usefixtures("fresh_libc")
@pytest.mark.parametrize("opened", [FakeLibc(), OSError("cannot open")])
def test_the_c_library_is_opened_once_and_other_ones_answer_false(
    monkeypatch: pytest.MonkeyPatch, opened: object
) -> None:
    calls: list[object] = []

    def cdll(name: object) -> object:
        calls.append(name)
        if isinstance(opened, OSError):
            raise opened
        return opened

    monkeypatch.setattr(allocator.ctypes, "CDLL", cdll)
    for _ in range(3):
        assert trim_heap() is False
        assert settle_allocator() is False
    assert calls == [None]
