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
        return self._time(record.created)

    def _time(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            self._second = second
            self._text = time.strftime("%Y-%m-%d %H:%M:%S", self.converter(second))
        return f"{self._text},{int((created - second) * 1000):03d}"

    def prefix(self, created: float) -> str:
        """FORMAT's text before the message (asctime and pid), without a record."""
        return f"{self._time(created)} mailrelay[{os.getpid()}]: "


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
        self.add_line(line, urgent=record.levelno >= logging.WARNING)

    def add_line(self, line: str, *, urgent: bool = False) -> None:
        """Queues a formatted line (call with the handler's lock held)."""
        self._pending.append(line)
        loop = asyncio._get_running_loop()
        if urgent or loop is None or loop.is_closed():
            self._write_pending()
        elif self._scheduled is not loop:
            self._scheduled = loop
            loop.call_soon(self._flush_from_loop)

    def formatter_prefix(self, created: float) -> str:
        """What FORMAT puts before the message, for a line made without a record."""
        formatter = self.formatter
        if isinstance(formatter, SecondCachedFormatter):
            return formatter.prefix(created)
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(created)) + " "

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


def info(logger: logging.Logger, msg: str, *args: object) -> None:
    """logger.info() for the per-message lines: when the relay's own handler is
    the only one the record would reach, the line is formatted straight into
    it (a LogRecord and the handler chain cost more than the line itself).
    Anywhere else (tests capturing logs, other handlers) it is logger.info()."""
    handler = _FAST
    if handler is None or not logger.isEnabledFor(logging.INFO) or not _only_root_handles(logger):
        logger.info(msg, *args)
        return
    now = time.time()
    line = f"{handler.formatter_prefix(now)}{msg % args if args else msg}\n"
    handler.acquire()
    try:
        handler.add_line(line)
    finally:
        handler.release()


def _only_root_handles(logger: logging.Logger) -> bool:
    node: logging.Logger | None = logger
    root = logging.getLogger()
    while node is not None and node is not root:
        if node.handlers or node.filters or not node.propagate:
            return False
        node = node.parent
    return root.handlers == [_FAST] and not root.filters


_FAST: LoopBufferedHandler | None = None


def install(stream: IO[str], level: str | int) -> Any:
    """The root logger writes through a LoopBufferedHandler (unless it has handlers)."""
    global _FAST
    root = logging.getLogger()
    if not root.handlers:
        handler = LoopBufferedHandler(stream)
        handler.setFormatter(SecondCachedFormatter())
        root.addHandler(handler)
        _FAST = handler
    root.setLevel(level)
    # The format needs no thread or multiprocessing names nor the caller's file
    # and line: skip looking them up (the logging module's documented switches).
    logging.logThreads = False
    logging.logMultiprocessing = False
    logging._srcfile = None
    return root
