"""relay.process.eventloop: which loop the workers run on, and its fallback."""

from __future__ import annotations

import asyncio
import logging
import sys

import pytest

from relay.process import eventloop


async def _running_loop_name() -> str:
    return eventloop.name_of(asyncio.get_running_loop())


def test_workers_default_to_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(eventloop.ENV_EVENT_LOOP, raising=False)
    assert eventloop.requested() == eventloop.DEFAULT_EVENT_LOOP == "uvloop"
    assert eventloop.run(_running_loop_name()) == "uvloop"


def test_asyncio_on_request(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(eventloop.ENV_EVENT_LOOP, " AsyncIO ")
    assert eventloop.run(_running_loop_name()) == "asyncio"


def test_unknown_name_is_logged_and_ignored(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(eventloop.ENV_EVENT_LOOP, "trio")
    with caplog.at_level(logging.WARNING):
        assert eventloop.requested() == eventloop.DEFAULT_EVENT_LOOP
    assert "MAILRELAY_EVENT_LOOP=trio: not one of uvloop, asyncio" in caplog.text


def test_falls_back_to_asyncio_without_uvloop(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv(eventloop.ENV_EVENT_LOOP, raising=False)
    monkeypatch.setitem(sys.modules, "uvloop", None)  # `import uvloop` raises ImportError
    with caplog.at_level(logging.WARNING):
        assert eventloop.run(_running_loop_name()) == "asyncio"
    assert "uvloop unavailable" in caplog.text


async def test_async_tests_run_on_the_workers_loop() -> None:
    """tests/conftest.py gives pytest-asyncio the loop the workers use."""
    assert await _running_loop_name() == eventloop.requested()
