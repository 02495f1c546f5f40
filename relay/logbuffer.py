"""The relay's log handler: one write per event-loop iteration, not per line.

A relay logs a few lines per message (Postfix does the same); written one
by one, each is a write(2) and a chance for another thread to take the GIL.
Lines logged on the event loop's thread are kept until the loop's next
iteration and then written together, so they still appear at once; lines
from other threads, and WARNING and above, are written straight away.
Timestamps are formatted once a second.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import IO, Any

FORMAT = "%(asctime)s mailrelay[%(process)d]: %(message)s"


class SecondCachedFormatter(logging.Formatter):
    """asctime costs a strftime per line; within one second it is the same text."""

    def __init__(self, fmt: str = FORMAT) -> None:
        super().__init__(fmt)
        self._second = -1
        self._text = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        if second != self._second:
            self._second = second
            self._text = time.strftime("%Y-%m-%d %H:%M:%S", self.converter(second))
        return f"{self._text},{int(record.msecs):03d}"


class LoopBufferedHandler(logging.StreamHandler):  # type: ignore[type-arg,unused-ignore]
    def __init__(self, stream: IO[str]) -> None:
        super().__init__(stream)
        self._pending: list[str] = []
        self._scheduled: asyncio.AbstractEventLoop | None = None
        # A forked worker must not write what its parent had pending.
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._pending = []
        self._scheduled = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
        except Exception:
            self.handleError(record)
            return
        self._pending.append(line)
        loop = asyncio._get_running_loop()
        if record.levelno >= logging.WARNING or loop is None or loop.is_closed():
            self._write_pending()
        elif self._scheduled is not loop:
            self._scheduled = loop
            loop.call_soon(self._flush_from_loop)

    def _flush_from_loop(self) -> None:
        self.acquire()
        try:
            self._scheduled = None
            self._write_pending()
        finally:
            self.release()

    def _write_pending(self) -> None:
        if not self._pending:
            return
        text = "".join(self._pending)
        self._pending = []
        try:
            self.stream.write(text)
            self.stream.flush()
        except Exception:
            pass  # a closed or full stderr must not take the relay down

    def flush(self) -> None:
        self.acquire()
        try:
            self._write_pending()
            super().flush()
        finally:
            self.release()


def install(stream: IO[str], level: str | int) -> Any:
    """The root logger writes through a LoopBufferedHandler (unless it has handlers)."""
    root = logging.getLogger()
    if not root.handlers:
        handler = LoopBufferedHandler(stream)
        handler.setFormatter(SecondCachedFormatter())
        root.addHandler(handler)
    root.setLevel(level)
    # The format needs no thread or multiprocessing names nor the caller's file
    # and line: skip looking them up (the logging module's documented switches).
    logging.logThreads = False
    logging.logMultiprocessing = False
    logging._srcfile = None
    return root
