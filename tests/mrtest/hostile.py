"""Helpers for the hostile-input tests (tests/hostile): a conversation of
exact bytes, and a Postfix 3.7 instance configured like the relay.

    replies = await converse(relay.address, [b"EHLO a\\rb\\r\\n", ...])
    with HostilePostfix(workdir) as (host, port): ...
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mrtest.benchscripts import load_bench
from mrtest.peers import RawClient
from mrtest.relayproc import next_loopback

# Both servers see the same relay domain; every recipient there is valid.
DOMAINS: dict[str, list[str] | str] = {"example.com": "any"}
RECIPIENT_LIMIT = 3  # smtpd_recipient_limit / recipientsPerMessage, small to test


async def converse(address: tuple[str, int], chunks: list[bytes | tuple[bytes, int]]) -> list[str]:
    """Sends each chunk and reads its reply (or `(chunk, n)`: its n replies),
    from a client address of its own; stops at a 421 or the end of the
    connection. Returns each reply's last line."""
    replies: list[str] = []
    async with RawClient(*address, local=next_loopback(), timeout=10) as c:
        banner = await c.read_reply()
        assert banner.startswith("220"), banner
        for chunk in chunks:
            data, count = chunk if isinstance(chunk, tuple) else (chunk, 1)
            await c.send(data)
            for _ in range(count):
                reply = (await c.read_reply()).split("\n")[-1]
                replies.append(reply)
                if not reply or reply.startswith("421"):
                    return replies
    return replies


class _NoSink:
    port = 9  # nothing is delivered in these tests


def start_postfix(workdir: Path) -> tuple[Any, tuple[str, int]]:
    """The benchmark's Postfix (relay_domains + relay_recipient_maps), with
    the test clients (127.0.0.x, x > 1) outside mynetworks, no error sleep
    and a small recipient limit. Returns the instance (`.stop()`) and address."""
    bench = load_bench("relay_vs_postfix")

    class HostilePostfix(bench.Postfix):  # type: ignore[name-defined,misc]
        def _main_cf(self) -> str:
            main_cf: str = super()._main_cf()
            main_cf = main_cf.replace("mynetworks = 127.0.0.0/8", "mynetworks = 127.0.0.1/32")
            return main_cf + (
                f"smtpd_error_sleep_time = 0s\nsmtpd_recipient_limit = {RECIPIENT_LIMIT}\n"
            )

    server = HostilePostfix(workdir, _NoSink()).start()
    return server, (bench.HOST, server.port)
