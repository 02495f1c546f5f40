"""glibc malloc settings for the relay's workers and the operator (mallopt, malloc_trim).

Both are long-lived Python processes whose memory comes in bursts: a relay
worker's buffers for big messages, the operator's listing pages, watch
events and renders of 100,000 RelayDomains. glibc keeps what such bursts
freed unless told otherwise. Other C libraries: nothing is set (False).
"""

from __future__ import annotations

import ctypes
import functools

M_MMAP_THRESHOLD = -3  # glibc's <malloc.h>
M_ARENA_MAX = -8  # glibc's <malloc.h>
# Blocks this big or bigger are mmap()ed and go back to the system when freed.
MMAP_THRESHOLD = 128 * 1024
# The operator's malloc arenas: one for the event loop, one shared by its
# threads (executor, watches, the Kubernetes client). glibc's default is 8 a
# core, each keeping what its thread's bursts freed.
OPERATOR_ARENA_MAX = 2


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The process's C library, opened once (trim_heap runs after every large
    render and listing); None where it cannot be opened."""
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


def mallopt(param: int, value: int) -> bool:
    """False: not set (a C library without mallopt, or one that refuses)."""
    libc = _libc()
    try:
        return bool(libc is not None and libc.mallopt(param, value))
    except AttributeError:
        return False


def settle_allocator() -> bool:
    """glibc's malloc keeps blocks of 128 KB and more out of its heap (mmap)
    until one is freed; from then on it raises that threshold to the freed
    block's size, and later big buffers come from heaps that keep the
    memory. A fixed threshold returns them to the system when freed: 20
    messages of 25 MB at once in a relay worker peaked at ~87 MB PSS instead
    of ~97 MB (docs/benchmarks.md). False: not set."""
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def settle_operator_allocator() -> bool:
    """settle_allocator and at most OPERATOR_ARENA_MAX arenas; call it before
    the operator starts threads (an arena, once made, stays). True if both
    were set."""
    return settle_allocator() & mallopt(M_ARENA_MAX, OPERATOR_ARENA_MAX)


def trim_heap() -> bool:
    """Gives the free memory at the top and inside every arena's heap back to
    the system (malloc_trim(0)): after a burst (a listing of every
    RelayDomain, a render) what Python freed would otherwise stay in RSS.
    Takes milliseconds to tens of milliseconds: call it from a thread, not
    on the event loop. False: nothing given back, or not glibc."""
    libc = _libc()
    try:
        return bool(libc is not None and libc.malloc_trim(0))
    except AttributeError:
        return False
