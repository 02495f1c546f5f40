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
import functools
import json
import logging
import os
import re
import time
from typing import IO, Any

from relay import procid

# Loggers whose last name part is not the component a line should name.
COMPONENTS = {"root": "main", "mail.log": "aiosmtpd"}
# A queue id at the start of a message ("02QV6CJ47T00: to=<...>"), for JSON's queue_id.
QUEUE_ID_AT_START = re.compile(r"(?=[0-9A-Z]*[0-9])([0-9A-Z]{10,16}): ")


@functools.cache
def component_of(logger_name: str) -> str:
    """mailrelay.smtpd -> smtpd, relay.delivery -> delivery: Postfix's program name."""
    return COMPONENTS.get(logger_name) or logger_name.rpartition(".")[2] or "main"


class SecondCachedFormatter(logging.Formatter):
    """The text format, greppable like Postfix's lines, with the level and
    the component (Postfix's program) on each:

        2026-12-02 04:00:00,123 info mailrelay/smtpd[1234]: 02QV6CJ47T00: client=...

    asctime costs a strftime per line; within one second it is the same text."""

    def __init__(self) -> None:
        super().__init__()
        self._second = -1
        self._text = ""

    def _time(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            self._second = second
            self._text = self.second_text(second)
        return f"{self._text}{self.millis_text(int((created - second) * 1000))}"

    def second_text(self, second: int) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S", self.converter(second))

    def millis_text(self, millis: int) -> str:
        return f",{millis:03d}"

    def format(self, record: logging.LogRecord) -> str:
        exception = self.formatException(record.exc_info) if record.exc_info else ""
        if record.stack_info:
            exception = "\n".join(x for x in (exception, record.stack_info) if x)
        return self.line(
            record.created, record.levelname, record.name, record.getMessage(), exception
        )

    def line(
        self, created: float, level: str, logger: str, message: str, exception: str = ""
    ) -> str:
        """One line (and the traceback under it) without a LogRecord."""
        text = (
            f"{self._time(created)} {level.lower()} "
            f"mailrelay/{component_of(logger)}[{procid.current()}]: {message}"
        )
        return f"{text}\n{exception}" if exception else text


class JsonFormatter(SecondCachedFormatter):
    """`--log-format json`: one JSON object a line, for log pipelines:
    time (UTC, RFC 3339), level, component, pid, message, and queue_id when
    the message is about one queued message; a traceback in `exception`."""

    def second_text(self, second: int) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))

    def millis_text(self, millis: int) -> str:
        return f".{millis:03d}Z"

    def line(
        self, created: float, level: str, logger: str, message: str, exception: str = ""
    ) -> str:
        doc: dict[str, object] = {
            "time": self._time(created),
            "level": level.lower(),
            "component": component_of(logger),
            "pid": procid.current(),
            "message": message,
        }
        queue_id = QUEUE_ID_AT_START.match(message)
        if queue_id:
            doc["queue_id"] = queue_id.group(1)
        if exception:
            doc["exception"] = exception
        return json.dumps(doc, ensure_ascii=False)


FORMATTERS: dict[str, type[SecondCachedFormatter]] = {
    "text": SecondCachedFormatter,
    "json": JsonFormatter,
}


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

    def format_line(self, created: float, logger: str, message: str) -> str:
        """An INFO line of `logger` without a record, as the formatter writes it."""
        formatter = self.formatter
        if isinstance(formatter, SecondCachedFormatter):
            return formatter.line(created, "INFO", logger, message) + self.terminator
        return f"{message}{self.terminator}"

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
    line = handler.format_line(time.time(), logger.name, msg % args if args else msg)
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


def install(stream: IO[str], level: str | int, log_format: str = "text") -> Any:
    """The root logger writes through a LoopBufferedHandler (unless it has handlers)."""
    global _FAST
    root = logging.getLogger()
    if not root.handlers:
        handler = LoopBufferedHandler(stream)
        handler.setFormatter(FORMATTERS[log_format]())
        root.addHandler(handler)
        _FAST = handler
    root.setLevel(level)
    # The format needs no thread or multiprocessing names nor the caller's file
    # and line: skip looking them up (the logging module's documented switches).
    logging.logThreads = False
    logging.logMultiprocessing = False
    logging._srcfile = None
    return root


def configure(log_format: str, level: str | int) -> None:
    """Switches the relay's handler to another format and the root logger to
    another level (spec.logging, at start and on every reload)."""
    handler = _FAST
    if handler is not None and type(handler.formatter) is not FORMATTERS[log_format]:
        handler.acquire()
        try:
            handler.setFormatter(FORMATTERS[log_format]())
        finally:
            handler.release()
    logging.getLogger().setLevel(level)
