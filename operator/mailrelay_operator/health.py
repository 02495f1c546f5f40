"""/healthz and /readyz of the operator (one small aiohttp server, in the
operator's event loop: a blocked loop answers neither).

Alive: the reconcile loop runs (its task has not ended) and no pass has been
stuck longer than STUCK_PASS_SECONDS; or the loop has not started because the
inputs are still being listed (the server answers from before that listing:
an API server that is down or an RBAC rule that is missing is no reason to
restart the operator, which would only list again). Ready: alive, and the
loop's first pass is done: the caches were seeded (the inputs listed) before
the loop started, and it runs that pass at once, whether or not any MailRelay
exists (a pass starts each dirty relay's reconcile, it does not wait for
them: one relay whose pods never answer keeps no operator unready); and no
list+watch of the inputs (input_watch.py) has failed for longer than
WATCH_FAILING_SECONDS: the operator would reconcile from a stale picture.
"""

from __future__ import annotations

import asyncio
import time
import urllib.parse
from dataclasses import dataclass, field

from aiohttp import web

# A pass renders and applies relays; a million recipients take seconds, not this.
STUCK_PASS_SECONDS = 600.0
# A list+watch failing this long (RBAC forbidden, API server down) makes the
# operator unready: past several of its back-offs (input_watch.py, at most
# 30 s each), so one API server restart does not flap the probe.
WATCH_FAILING_SECONDS = 120.0


@dataclass
class Health:
    """What the probes read; the reconciler keeps it up to date."""

    loop: asyncio.Task[None] | None = None
    pass_started: float | None = None  # time.monotonic() while a pass runs
    passes: int = 0
    # A watched (kind, scope) -> since when (time.monotonic()) it fails, and its last error.
    watch_failures: dict[str, tuple[float, str]] = field(default_factory=dict)

    def watch_failed(self, watch: str, error: str, now: float | None = None) -> None:
        since = self.watch_failures.get(watch, (time.monotonic() if now is None else now, ""))[0]
        self.watch_failures[watch] = (since, error)

    def watch_ok(self, watch: str) -> None:
        """The watch worked (a listing completed, or a watch delivered an event
        or bookmark): its failure, if any, is over."""
        self.watch_failures.pop(watch, None)

    def begin_pass(self) -> None:
        self.pass_started = time.monotonic()

    def end_pass(self) -> None:
        self.pass_started = None
        self.passes += 1

    def alive(self, now: float | None = None) -> tuple[bool, str]:
        if self.loop is None:
            return True, "listing the inputs"
        if self.loop.done():
            return False, "the reconcile loop has ended"
        now = time.monotonic() if now is None else now
        if self.pass_started is not None and now - self.pass_started > STUCK_PASS_SECONDS:
            return False, f"a reconcile pass has run for {now - self.pass_started:.0f}s"
        return True, "ok"

    def ready(self, now: float | None = None) -> tuple[bool, str]:
        ok, why = self.alive(now)
        if not ok:
            return ok, why
        now = time.monotonic() if now is None else now
        failing = "".join(
            f"; {watch} failing for {now - since:.0f} s: {error}"
            for watch, (since, error) in sorted(self.watch_failures.items())
        )
        if self.passes == 0:
            return False, "the first pass is not done" + failing
        if any(now - since > WATCH_FAILING_SECONDS for since, _ in self.watch_failures.values()):
            return False, "the inputs are not watched" + failing
        return True, "ok"


def _answer(result: tuple[bool, str]) -> web.Response:
    ok, why = result
    return web.Response(status=200 if ok else 503, text=why + "\n")


async def serve(endpoint: str, health: Health) -> web.AppRunner:
    """Serves endpoint's path (the liveness URL, e.g. http://0.0.0.0:8080/healthz)
    and /readyz on its host and port."""
    parts = urllib.parse.urlsplit(endpoint)
    app = web.Application()

    async def healthz(_: web.Request) -> web.Response:
        return _answer(health.alive())

    async def readyz(_: web.Request) -> web.Response:
        return _answer(health.ready())

    app.add_routes([web.get(parts.path or "/healthz", healthz), web.get("/readyz", readyz)])
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, parts.hostname or "0.0.0.0", parts.port or 8080).start()
    return runner
