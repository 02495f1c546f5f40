"""The relay's log handler: lines logged on the event loop are written
together once per loop iteration, in order; warnings and other threads'
lines at once."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import threading

import pytest

from relay import logbuffer
from relay.logbuffer import LoopBufferedHandler, SecondCachedFormatter


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def make_logger(stream: CountingStream) -> logging.Logger:
    handler = LoopBufferedHandler(stream)
    handler.setFormatter(SecondCachedFormatter())
    logger = logging.getLogger(f"test.logbuffer.{id(stream)}")
    logger.propagate = False
    logger.handlers = [handler]
    logger.setLevel(logging.INFO)
    return logger


async def test_lines_of_one_iteration_are_one_write() -> None:
    stream = CountingStream()
    log = make_logger(stream)
    for i in range(5):
        log.info("line %d", i)
    assert stream.getvalue() == ""  # not yet: still in this iteration
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    lines = stream.getvalue().splitlines()
    assert [line.rsplit(" ", 2)[-2:] for line in lines] == [["line", str(i)] for i in range(5)]
    assert stream.writes == 1
    assert " info mailrelay/" in lines[0]


async def test_warnings_and_other_threads_are_written_at_once() -> None:
    stream = CountingStream()
    log = make_logger(stream)
    log.info("first")
    log.warning("careful")
    assert stream.getvalue().splitlines()[-1].endswith("careful")
    assert "first" in stream.getvalue()  # what was pending went first, in order
    thread = threading.Thread(target=log.info, args=("from a thread",))
    thread.start()
    thread.join()
    assert stream.getvalue().endswith("from a thread\n")


def test_without_a_loop_each_line_is_written() -> None:
    stream = CountingStream()
    log = make_logger(stream)
    log.info("alone")
    assert stream.getvalue().endswith("alone\n")


async def test_flush_writes_what_is_pending() -> None:
    stream = CountingStream()
    log = make_logger(stream)
    log.info("pending")
    log.handlers[0].flush()
    assert stream.getvalue().endswith("pending\n")


async def test_fast_lines_look_like_logged_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = CountingStream()
    handler = LoopBufferedHandler(stream)
    handler.setFormatter(SecondCachedFormatter())
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [handler])
    monkeypatch.setattr(logbuffer, "_FAST", handler)
    log = logging.getLogger("test.logbuffer.fast")
    monkeypatch.setattr(log, "level", logging.INFO)
    log.info("%s: to=<%s>, status=%s", "Q1", "a@b.test", "sent")
    logbuffer.info(log, "%s: to=<%s>, status=%s", "Q2", "a@b.test", "sent")
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    slow, fast = stream.getvalue().splitlines()
    pattern = (
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} info mailrelay/fast\[\d+\]: "
        r"Q\d: to=<a@b.test>, status=sent"
    )
    assert re.fullmatch(pattern, slow) and re.fullmatch(pattern, fast)
    assert stream.writes == 1


async def test_json_lines_fast_and_slow(monkeypatch: pytest.MonkeyPatch) -> None:
    """--log-format json: one object a line, the same fields either way; the
    level, the component (the logger's last name) and a leading queue id."""
    stream = CountingStream()
    handler = LoopBufferedHandler(stream)
    handler.setFormatter(SecondCachedFormatter())
    monkeypatch.setattr(logging.getLogger(), "handlers", [handler])
    monkeypatch.setattr(logbuffer, "_FAST", handler)
    monkeypatch.setattr(logging.getLogger(), "level", logging.INFO)
    logbuffer.configure("json", "INFO")
    assert isinstance(handler.formatter, logbuffer.JsonFormatter)
    log = logging.getLogger("mailrelay.smtpd")
    log.info("%s: to=<%s>", "02QV6CJ47T00", "a@b.test")
    logbuffer.info(log, "%s: to=<%s>", "02QV6CJ47T00", "a@b.test")
    log.warning('NOQUEUE: reject: RCPT from unknown[127.0.0.1]: 550 "quoted"')
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("relay.delivery").exception("delivery loop error")
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    slow, fast, warning, error = (json.loads(x) for x in stream.getvalue().splitlines())
    assert (
        slow.keys() == fast.keys() == {"time", "level", "component", "pid", "message", "queue_id"}
    )
    assert {k: v for k, v in slow.items() if k != "time"} == {
        k: v for k, v in fast.items() if k != "time"
    }
    assert slow["component"] == "smtpd" and slow["queue_id"] == "02QV6CJ47T00"
    assert slow["level"] == "info" and slow["message"] == "02QV6CJ47T00: to=<a@b.test>"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", slow["time"])
    assert warning["level"] == "warning" and "queue_id" not in warning
    assert warning["message"].endswith('550 "quoted"')
    assert error["component"] == "delivery" and "ValueError: boom" in error["exception"]
    logbuffer.configure("text", "WARNING")  # and back
    assert type(handler.formatter) is SecondCachedFormatter
    assert logging.getLogger().level == logging.WARNING


def test_fast_lines_reach_other_handlers_through_logging(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    logbuffer.info(logging.getLogger("test.logbuffer.caplog"), "hello %d", 42)
    assert "hello 42" in caplog.text
