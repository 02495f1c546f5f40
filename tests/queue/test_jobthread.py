"""The queue's per-message thread: jobs in order, outcomes on the event loop."""

from __future__ import annotations

import asyncio
import threading

import pytest

from relay.queue.jobthread import JobThread


async def test_jobs_run_in_order_off_the_loop_and_report_on_it() -> None:
    thread = JobThread("test-jobs")
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

    try:
        for n in range(3):
            thread.start_job(loop, job, n, done)
        await all_told.wait()
    finally:
        thread.shutdown()
    assert ran == [(0, "test-jobs"), (1, "test-jobs"), (2, "test-jobs")]
    main = threading.current_thread().name
    assert told == [(0, main), (10, main), (20, main)]


async def test_run_returns_the_result_or_raises_the_jobs_exception() -> None:
    thread = JobThread("test-jobs")

    def fails(_: None) -> None:
        raise OSError("disk full")

    try:
        assert await thread.run(lambda n: n + 1, 41) == 42
        with pytest.raises(OSError, match="disk full"):
            await thread.run(fails, None)
    finally:
        thread.shutdown()


def test_wait_idle_and_shutdown_run_every_started_job() -> None:
    thread = JobThread("test-jobs")
    ran: list[int] = []
    gate = threading.Event()
    loop = asyncio.new_event_loop()
    try:
        thread.start_job(loop, lambda _: gate.wait(), None, lambda _: None)
        thread.start_job(loop, ran.append, 1, lambda _: None)
        gate.set()
        thread.wait_idle()
        assert ran == [1]
        thread.start_job(loop, ran.append, 2, lambda _: None)
        thread.shutdown()  # runs what was started first
        assert ran == [1, 2]
    finally:
        loop.close()
