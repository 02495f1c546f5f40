"""The operator's /healthz and /readyz decisions, and the server answering them."""

from __future__ import annotations

import asyncio
import socket

import aiohttp
from mailrelay_operator.health import STUCK_PASS_SECONDS, Health, serve


def test_alive_while_the_loop_runs_and_no_pass_is_stuck() -> None:
    async def scenario() -> None:
        h = Health()
        assert h.alive() == (False, "the reconcile loop has not started")
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
