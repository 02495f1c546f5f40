"""Helpers for queue and delivery tests: a scripted SMTP sink, a fake clock, configs."""

from __future__ import annotations

import asyncio
import socket
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP

from relay.config import BouncePolicy, Domain, NextHop, QueuePolicy, RelayConfig
from relay.delivery.qmgr import Delivery
from relay.queue.store import Queue


class FakeClock:
    """Unix time that only moves when a test says so."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Received:
    sender: str
    recipients: list[str]
    data: bytes
    tls: bool = False
    mail_options: list[str] = field(default_factory=list)


@dataclass
class Sink:
    """An SMTP next hop. Replies are scripted per recipient / for DATA."""

    host: str
    port: int = 0
    messages: list[Received] = field(default_factory=list)
    rcpt_replies: dict[str, str] = field(default_factory=dict)  # address -> reply
    rcpts_asked: list[str] = field(default_factory=list)  # every RCPT address, in order
    rcpt_delay: float = 0.0  # seconds before each RCPT reply (a slow next hop)
    data_reply: str | None = None
    transactions: int = 0
    connections: int = 0
    tls_context: ssl.SSLContext | None = None
    server: asyncio.AbstractServer | None = None
    hostname: str = "sink.test"  # in its greeting and EHLO reply
    smtputf8: bool = False  # offer SMTPUTF8 (aiosmtpd offers neither it nor DSN by default)

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: Any
    ) -> str:
        self.rcpts_asked.append(address)
        if self.rcpt_delay:
            await asyncio.sleep(self.rcpt_delay)
        reply = self.rcpt_replies.get(address)
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.transactions += 1
        if self.data_reply:
            return self.data_reply
        self.messages.append(
            Received(
                envelope.mail_from,
                list(envelope.rcpt_tos),
                envelope.original_content,
                tls=session.ssl is not None,
                mail_options=list(envelope.mail_options),
            )
        )
        return f"250 2.0.0 Ok: queued as S{len(self.messages)}"

    async def start(self) -> Sink:
        loop = asyncio.get_running_loop()

        def factory() -> SMTP:
            self.connections += 1
            return SMTP(
                self,
                hostname=self.hostname,
                decode_data=False,
                tls_context=self.tls_context,
                auth_exclude_mechanism=["LOGIN", "PLAIN"],
                enable_SMTPUTF8=self.smtputf8,
            )

        self.server = await loop.create_server(factory, self.host, self.port)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None

    def by_message_id(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for m in self.messages:
            for line in m.data.split(b"\r\n"):
                if line.lower().startswith(b"message-id:"):
                    mid = line.split(b":", 1)[1].strip().decode()
                    counts[mid] = counts.get(mid, 0) + 1
        return counts


def server_context(certificate: tuple[Path, Path]) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(*certificate)
    return ctx


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def make_config(hops: dict[str, NextHop], **queue: float) -> RelayConfig:
    return RelayConfig(
        name="test",
        hostname="relay.test",
        domains={d: Domain(d, hop, "any") for d, hop in hops.items()},
        recipients=set(),
        queue=QueuePolicy(**queue) if queue else QueuePolicy(),
        # DSNs only to the domains above: an MX lookup of a sender's domain
        # would ask the system's resolver (tests/delivery/test_bounces.py
        # serves the sender's domain from its own DNS server instead).
        bounces=BouncePolicy(delivery="relayDomainsOnly"),
    )


@dataclass
class Relay:
    """A queue and its delivery, in this test's event loop."""

    queue: Queue
    delivery: Delivery
    config: RelayConfig

    async def send(self, data: bytes, sender: str, recipients: list[str]) -> str:
        msg = self.queue.incoming()
        msg.write(data)
        qid = await msg.commit(sender, recipients, "127.0.0.9")
        self.delivery.wake(qid)
        return qid


def message(subject: str = "test", body: bytes = b"Hello.\r\n", mid: str = "") -> bytes:
    head = f"From: a@example.org\r\nTo: b@example.com\r\nSubject: {subject}\r\n"
    if mid:
        head += f"Message-Id: <{mid}>\r\n"
    return head.encode() + b"\r\n" + body
