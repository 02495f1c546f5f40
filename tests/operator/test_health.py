"""The operator's /healthz and /readyz decisions, and the server answering them."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Iterator

import aiohttp
import kopf
import pytest
from mailrelay_operator.cluster import ClusterView
from mailrelay_operator.events import EventRouter
from mailrelay_operator.health import (
    STUCK_PASS_SECONDS,
    WATCH_FAILING_SECONDS,
    Health,
    serve,
)
from mailrelay_operator.input_watch import InputWatch
from mailrelay_operator.inputs import InputCache
from mailrelay_operator.kubeapi import KubeError
from mailrelay_operator.workqueue import WorkQueue


def test_alive_while_the_loop_runs_and_no_pass_is_stuck() -> None:
    async def scenario() -> None:
        h = Health()
        assert h.alive() == (True, "listing the inputs")  # not restarted while it lists
        assert not h.ready()[0]
        h.loop = asyncio.create_task(asyncio.sleep(3600))
        assert h.alive()[0] and not h.ready()[0]  # ready after a first pass
        h.begin_pass()
        assert h.alive()[0]
        assert not h.alive(now=h.pass_started + STUCK_PASS_SECONDS + 1)[0]  # type: ignore[operator]
        h.end_pass()
        assert h.ready() == (True, "ok")
        h.loop.cancel()
        await asyncio.gather(h.loop, return_exceptions=True)
        assert h.alive() == (False, "the reconcile loop has ended")
        assert not h.ready()[0]

    asyncio.run(scenario())


def test_the_server_answers_both_paths() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def scenario() -> None:
        h = Health(loop=asyncio.create_task(asyncio.sleep(3600)))
        runner = await serve(f"http://127.0.0.1:{port}/healthz", h)
        try:
            async with aiohttp.ClientSession() as http:
                async with http.get(f"http://127.0.0.1:{port}/healthz") as r:
                    assert r.status == 200
                async with http.get(f"http://127.0.0.1:{port}/readyz") as r:
                    assert r.status == 503 and "first pass" in await r.text()
                h.end_pass()
                async with http.get(f"http://127.0.0.1:{port}/readyz") as r:
                    assert r.status == 200
        finally:
            await runner.cleanup()
            assert h.loop is not None
            h.loop.cancel()

    asyncio.run(scenario())


def test_a_failing_watch_makes_it_unready_past_the_threshold_never_dead() -> None:
    async def scenario() -> None:
        h = Health(loop=asyncio.create_task(asyncio.sleep(3600)))
        h.end_pass()
        h.watch_failed("RelayDomain in mail", "403 Forbidden: no list", now=1000.0)
        h.watch_failed("RelayDomain in mail", "503 Service Unavailable", now=1010.0)
        assert h.ready(now=1000.0 + WATCH_FAILING_SECONDS) == (True, "ok")  # a blip
        later = 1001.0 + WATCH_FAILING_SECONDS
        ok, why = h.ready(now=later)
        assert not ok
        assert "RelayDomain in mail failing for 121 s: 503 Service Unavailable" in why
        assert h.alive(now=later) == (True, "ok")  # a restart would not mend the API server
        h.watch_ok("RelayDomain in mail")
        assert h.ready(now=later) == (True, "ok")
        h.loop.cancel()
        await asyncio.gather(h.loop, return_exceptions=True)

    asyncio.run(scenario())


class ForbiddenApi:
    """A KubeApi whose every listing and watch is refused, until allowed."""

    def __init__(self) -> None:
        self.allowed = False

    def list_page_sync(
        self, path: str, limit: int, token: str | None = None
    ) -> tuple[list[dict[str, object]], str, str | None]:
        if not self.allowed:
            raise KubeError(403, "Forbidden", f"cannot list {path}")
        return [], "7", None

    def watch_sync(self, path: str, version: str, timeout_seconds: int) -> object:
        raise KubeError(403, "Forbidden", f"cannot watch {path}")


def test_the_input_watch_reports_its_failures_and_recovery(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """seed() and the watch loop tell Health what failed, a listing that
    works clears it (the kube tests do it against a real API server's RBAC)."""
    monkeypatch.setattr("mailrelay_operator.input_watch.BACKOFF_FIRST_SECONDS", 0.01)

    async def scenario() -> None:
        api = ForbiddenApi()
        events = EventRouter(WorkQueue(), InputCache(), None, ClusterView)  # type: ignore[arg-type]
        h = Health()
        watch = InputWatch(api, events, ("mail",), health=h)  # type: ignore[arg-type]
        with pytest.raises(KubeError):
            await watch.seed()
        assert h.alive()[0]
        ok, why = h.ready()
        assert not ok and "RelayDomain in mail failing for" in why and "403 Forbidden" in why
        api.allowed = True
        await watch.seed()
        assert h.watch_failures == {}
        task = asyncio.create_task(watch.run())  # lists work, watches do not
        try:
            while len(h.watch_failures) < 2:
                await asyncio.sleep(0.01)
            assert set(h.watch_failures) == {"RelayDomain in mail", "RecipientList in mail"}
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(scenario())


def test_probes_answer_while_the_start_up_listing_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """kopf retries the start-up handler while listing the inputs fails: the
    probes answer from the first try on, alive and not ready (no restart
    loop), from one server however many tries."""
    from mailrelay_operator import handlers

    host = "127.0.0.1"
    with socket.socket() as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(handlers, "HEALTH_ENDPOINT", [f"http://{host}:{port}/healthz"])
    monkeypatch.setattr(handlers.operator_key, "load", lambda: b"k" * 32)
    monkeypatch.setattr(handlers, "KubeApi", ForbiddenApi)

    async def scenario() -> None:
        memo = kopf.Memo()
        settings = kopf.OperatorSettings()
        indexes = {"relays_idx": {}, "namespaces_idx": {}}
        try:
            for _kopf_retries in range(2):
                with pytest.raises(KubeError):
                    await handlers.start(settings=settings, memo=memo, **indexes)
                async with aiohttp.ClientSession() as http:
                    async with http.get(f"http://{host}:{port}/healthz") as r:
                        assert r.status == 200
                    async with http.get(f"http://{host}:{port}/readyz") as r:
                        why = await r.text()
                        assert r.status == 503 and "403 Forbidden" in why
        finally:
            await handlers.stop(memo=memo)

    asyncio.run(scenario())


class BreakingStream:
    """A watch the API server accepts, whose stream then delivers `lines` and breaks."""

    def __init__(self, lines: list[bytes]) -> None:
        self._lines = lines
        self.closed = False

    def lines(self) -> Iterator[list[bytes]]:
        if self._lines:
            yield self._lines
        raise ConnectionResetError("connection reset by peer")

    def close(self) -> None:
        self.closed = True


class BreakingWatchApi:
    """Lists work; every watch opens and then breaks, after `lines` (none at first)."""

    def __init__(self) -> None:
        self.lines: list[bytes] = []
        self.opened = 0

    def list_page_sync(
        self, path: str, limit: int, token: str | None = None
    ) -> tuple[list[dict[str, object]], str, str | None]:
        return [], "7", None

    def watch_sync(self, path: str, version: str, timeout_seconds: int) -> BreakingStream:
        self.opened += 1
        return BreakingStream(self.lines)


class RecordingHealth(Health):
    """Health that also keeps the order of failures and recoveries."""

    def __init__(self) -> None:
        super().__init__()
        self.reports: list[str] = []

    def watch_failed(self, watch: str, error: str, now: float | None = None) -> None:
        self.reports.append("failed")
        super().watch_failed(watch, error, now)

    def watch_ok(self, watch: str) -> None:
        self.reports.append("ok")
        super().watch_ok(watch)


BOOKMARK = b'{"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "9"}}}'


@contextlib.asynccontextmanager
async def following(api: BreakingWatchApi) -> AsyncIterator[tuple[InputWatch, RecordingHealth]]:
    """An input watch of RelayDomains in "mail" on `api`, followed in a task
    that ends with the block."""
    events = EventRouter(WorkQueue(), InputCache(), None, ClusterView)  # type: ignore[arg-type]
    h = RecordingHealth()
    h.end_pass()
    watch = InputWatch(api, events, ("mail",), health=h)  # type: ignore[arg-type]
    task = asyncio.create_task(watch.follow("RelayDomain", "mail"))
    try:
        yield watch, h
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_a_watch_that_opens_and_breaks_stays_failing_until_it_delivers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An open the API server accepts is no recovery: a stream that breaks at
    once each time keeps the failure (and its start) until /readyz says so; the
    watch's first event or bookmark ends it."""
    monkeypatch.setattr("mailrelay_operator.input_watch.BACKOFF_FIRST_SECONDS", 0.001)
    monkeypatch.setattr("mailrelay_operator.input_watch.BACKOFF_MAX_SECONDS", 0.001)

    async def scenario() -> None:
        api = BreakingWatchApi()
        async with following(api) as (watch, h):
            while api.opened < 4:
                await asyncio.sleep(0.001)
            assert h.reports[0] == "ok"  # the listing worked
            assert h.reports[1:4] == ["failed"] * 3  # no "ok" at each open
            since, error = h.watch_failures["RelayDomain in mail"]
            assert "reset by peer" in error
            ok, why = h.ready(now=since + WATCH_FAILING_SECONDS + 1)
            assert not ok and why.startswith("the inputs are not watched; RelayDomain in mail")
            api.lines = [BOOKMARK]  # now each watch delivers before it breaks
            while "ok" not in h.reports[1:]:
                await asyncio.sleep(0.001)
            assert watch.versions[("RelayDomain", "mail")] == "9"

    asyncio.run(scenario())


class EndingStream(BreakingStream):
    """A watch stream that ends normally after `lines` (none: at once)."""

    def lines(self) -> Iterator[list[bytes]]:
        if self._lines:
            yield self._lines


class EndingWatchApi(BreakingWatchApi):
    def watch_sync(self, path: str, version: str, timeout_seconds: int) -> BreakingStream:
        self.opened += 1
        return EndingStream(self.lines)


def test_a_watch_that_ends_at_once_without_events_is_a_failure_with_back_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A stream that a proxy closes at once (a normal end, no event) is no
    watch: it backs off and counts as failing instead of watching again in a
    tight loop; once a watch delivers, the failure ends."""
    sleeps: list[float] = []
    real_sleep = asyncio.sleep

    async def recorded_sleep(seconds: float) -> None:
        sleeps.append(seconds)
        await real_sleep(0)

    monkeypatch.setattr("mailrelay_operator.input_watch.asyncio.sleep", recorded_sleep)

    async def scenario() -> None:
        api = EndingWatchApi()
        async with following(api) as (_, h):
            while api.opened < 4:
                await real_sleep(0.001)
            assert h.reports[1:4] == ["failed"] * 3
            assert "ended at once" in h.watch_failures["RelayDomain in mail"][1]
            assert sleeps[:3] == [1.0, 2.0, 4.0]  # backs off
            api.lines = [BOOKMARK]  # a watch that delivers, then ends: fine
            while "ok" not in h.reports[1:]:
                await real_sleep(0.001)
            assert "RelayDomain in mail" not in h.watch_failures

    asyncio.run(scenario())
