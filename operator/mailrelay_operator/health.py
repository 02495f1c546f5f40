"""/healthz and /readyz of the operator (one small aiohttp server, in the
operator's event loop: a blocked loop answers neither).

Alive: the reconcile loop runs (its task has not ended) and no pass has been
stuck longer than STUCK_PASS_SECONDS. Ready: alive, and the loop's first pass
is done: the caches were seeded (the inputs listed) before the loop started,
and it runs that pass at once, whether or not any MailRelay exists (a pass
starts each dirty relay's reconcile, it does not wait for them: one relay
whose pods never answer keeps no operator unready).
"""

from __future__ import annotations

import asyncio
import time
import urllib.parse
from dataclasses import dataclass

from aiohttp import web

# A pass renders and applies relays; a million recipients take seconds, not this.
STUCK_PASS_SECONDS = 600.0


@dataclass
class Health:
    """What the probes read; the reconciler keeps it up to date."""

    loop: asyncio.Task[None] | None = None
    pass_started: float | None = None  # time.monotonic() while a pass runs
    passes: int = 0

    def begin_pass(self) -> None:
        self.pass_started = time.monotonic()

    def end_pass(self) -> None:
        self.pass_started = None
        self.passes += 1

    def alive(self, now: float | None = None) -> tuple[bool, str]:
        if self.loop is None:
            return False, "the reconcile loop has not started"
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
        if self.passes == 0:
            return False, "the first pass is not done"
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
