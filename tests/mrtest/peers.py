"""Real SMTP peers for the tests: next hops that capture what they get, and
clients (swaks, Postfix's smtp-source, a raw byte-exact client).

Next hops:
    with AiosmtpdSink("127.0.0.5") as sink:       # in-process, replies on demand
        ... sink.wait_for(1); sink.messages[0].data
    with PostfixSink("127.0.0.6", tmp_path) as sink:  # Postfix's smtp-sink
        ... sink.wait_for(1); sink.messages()[0].data

Clients:
    swaks(server=(host, port), to="a@example.com", local="127.0.0.2")
    smtp_source((host, port), count=10, local="127.0.0.3")
    async with RawClient(host, port, local="127.0.0.4") as c:  # exact bytes
        await c.read_reply(); await c.command("EHLO x")
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from mrtest.relayproc import free_port, wait_until

# -- next hops ----------------------------------------------------------------


@dataclass
class CapturedMessage:
    sender: str
    recipients: list[str]
    data: bytes  # the message as received (CRLF line ends, unstuffed)
    client: str = ""
    helo: str = ""
    mail_args: str = ""  # smtp-sink: MAIL FROM's argument as sent ("<a@b> RET=HDRS")
    rcpt_args: list[str] = field(default_factory=list)  # and each RCPT's

    @property
    def text(self) -> str:
        return self.data.decode("utf-8", "replace")

    def header(self, name: str) -> str | None:
        head = self.data.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace")
        prefix = name.lower() + ":"
        for line in head.split("\r\n"):
            if line.lower().startswith(prefix):
                return line[len(prefix) :].strip()
        return None


class AiosmtpdSink:
    """A next hop on 127.0.0.x (aiosmtpd in its own thread) that keeps every
    message. `rcpt_reply(address)` / `data_reply(message)` may return an
    SMTP reply line ("450 4.2.0 busy") to refuse; None accepts."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        rcpt_reply: Callable[[str], str | None] | None = None,
        data_reply: Callable[[CapturedMessage], str | None] | None = None,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.rcpt_reply = rcpt_reply
        self.data_reply = data_reply
        self.tls_context = tls_context  # offers STARTTLS with it (never requires it)
        self.messages: list[CapturedMessage] = []
        self.sessions = 0
        self._lock = threading.Lock()
        self._controller: Any = None

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def start(self) -> AiosmtpdSink:
        from aiosmtpd.controller import Controller

        sink = self

        class Handler:
            async def handle_RCPT(
                self, server: Any, session: Any, envelope: Any, address: str, options: Any
            ) -> str:
                if sink.rcpt_reply is not None:
                    reply = sink.rcpt_reply(address)
                    if reply:
                        return reply
                envelope.rcpt_tos.append(address)
                return "250 2.1.5 Ok"

            async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
                msg = CapturedMessage(
                    sender=envelope.mail_from or "",
                    recipients=list(envelope.rcpt_tos),
                    data=envelope.original_content or b"",
                    client=str(session.peer[0]) if session.peer else "",
                    helo=session.host_name or "",
                )
                if sink.data_reply is not None:
                    reply = sink.data_reply(msg)
                    if reply:
                        return reply
                with sink._lock:
                    sink.messages.append(msg)
                return "250 2.0.0 Ok: captured"

        self._controller = Controller(
            Handler(),
            hostname=self.host,
            port=self.port,
            ready_timeout=10,
            tls_context=self.tls_context,
        )
        self._controller.start()
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def wait_for(self, count: int, timeout: float = 60.0) -> list[CapturedMessage]:
        wait_until(lambda: len(self.messages) >= count, timeout, f"{count} messages at the sink")
        return list(self.messages)

    def __enter__(self) -> AiosmtpdSink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class PostfixSink:
    """Postfix's smtp-sink as a next hop, dumping each message to a file."""

    def __init__(self, host: str, workdir: Path, port: int = 0, *, options: list[str] = ()) -> None:  # type: ignore[assignment]
        self.host = host
        self.port = port or free_port(host)
        # smtp-sink drops privileges to nobody, who cannot enter pytest's
        # private tmp_path: dump into a world-writable folder of its own.
        self.dump_dir = Path(tempfile.mkdtemp(prefix=f"smtp-sink-{self.port}-"))
        self.log_path = workdir / f"smtp-sink-{self.port}.log"
        self.options = list(options)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def start(self) -> PostfixSink:
        binary = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
        self.dump_dir.chmod(0o777)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                binary,
                "-u",
                "nobody",
                "-d",
                f"{self.dump_dir}/msg.",
                *self.options,
                f"{self.host}:{self.port}",
                "128",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        wait_until(lambda: _connectable(self.host, self.port), 60, "smtp-sink listening")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        shutil.rmtree(self.dump_dir, ignore_errors=True)

    def messages(self) -> list[CapturedMessage]:
        """Every complete dump (smtp-sink writes a file while it receives)."""
        out = []
        for f in sorted(self.dump_dir.glob("msg.*")):
            raw = f.read_bytes()
            if b"\nX-Rcpt-Args: " in raw and raw.endswith(b"\n\n"):
                out.append(parse_sink_dump(raw))
        return out

    def wait_for(self, count: int, timeout: float = 60.0) -> list[CapturedMessage]:
        wait_until(lambda: len(self.messages()) >= count, timeout, f"{count} messages at smtp-sink")
        return self.messages()

    def __enter__(self) -> PostfixSink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def parse_sink_dump(raw: bytes) -> CapturedMessage:
    """smtp-sink's dump: X-Client-Addr/X-Helo-Args/X-Mail-Args/X-Rcpt-Args
    lines, then the message, then an empty line; LF line ends."""
    lines = raw.split(b"\n")
    sender, client, helo, mail_args = "", "", "", ""
    recipients: list[str] = []
    rcpt_args: list[str] = []
    i = 0
    while i < len(lines) and lines[i].startswith(b"X-"):
        key, _, value = lines[i].decode("utf-8", "replace").partition(": ")
        if key == "X-Client-Addr":
            client = value
        elif key == "X-Helo-Args":
            helo = value
        elif key == "X-Mail-Args":
            sender = value.split()[0].removeprefix("FROM:").strip("<>") if value else ""
            mail_args = value
        elif key == "X-Rcpt-Args":
            recipients.append(value.split()[0].removeprefix("TO:").strip("<>"))
            rcpt_args.append(value)
        i += 1
    body = lines[i:]
    if body and body[-1] == b"":
        body = body[:-1]
    if body and body[-1] == b"":
        body = body[:-1]
    data = b"\r\n".join(body) + b"\r\n"
    return CapturedMessage(sender, recipients, data, client, helo, mail_args, rcpt_args)


# -- clients --------------------------------------------------------------------


@dataclass
class ToolResult:
    returncode: int
    output: str
    lines: list[str] = field(default_factory=list)

    def replies(self) -> list[str]:
        """Server replies in a swaks transcript (lines starting with '<-' or '<~')."""
        return [ln[4:] for ln in self.output.splitlines() if ln.startswith(("<- ", "<~ ", "<** "))]


def swaks(
    server: tuple[str, int],
    *,
    to: str | list[str] = "info@example.com",
    sender: str = "sender@client.test",
    helo: str = "client.test",
    local: str | None = None,
    data: str | None = None,
    tls: bool = False,
    pipeline: bool = False,
    extra: list[str] = (),  # type: ignore[assignment]
    timeout: float = 60.0,
) -> ToolResult:
    """Runs swaks once; returncode 0 = accepted, see swaks(1) for the others."""
    args = [
        shutil.which("swaks") or "swaks",
        "--server",
        server[0],
        "--port",
        str(server[1]),
        "--from",
        sender,
        "--to",
        to if isinstance(to, str) else ",".join(to),
        "--helo",
        helo,
        "--timeout",
        "30",
        "--hide-informational",
    ]
    if local:
        args += ["--local-interface", local]
    if data is not None:
        args += ["--data", data]
    if tls:
        args += ["--tls"]
    if pipeline:
        args += ["--pipeline"]
    args += list(extra)
    proc = subprocess.run(args, capture_output=True, timeout=timeout, check=False)
    out = proc.stdout.decode("utf-8", "replace") + proc.stderr.decode("utf-8", "replace")
    return ToolResult(proc.returncode, out, out.splitlines())


def smtp_source(
    server: tuple[str, int],
    *,
    count: int = 1,
    sessions: int = 1,
    size: int | None = None,
    to: str = "info@example.com",
    sender: str = "sender@source.test",
    helo: str = "source.test",
    extra: list[str] = (),  # type: ignore[assignment]
    timeout: float = 120.0,
) -> ToolResult:
    """Postfix's smtp-source: `count` messages over `sessions` parallel sessions.
    (It has no source-address option: for a given client address use swaks
    or RawClient.)"""
    args = [
        shutil.which("smtp-source") or "/usr/sbin/smtp-source",
        "-4",
        "-m",
        str(count),
        "-s",
        str(sessions),
        "-f",
        sender,
        "-t",
        to,
        "-M",
        helo,
    ]
    if size is not None:
        args += ["-l", str(size)]
    args += list(extra)
    args.append(f"{server[0]}:{server[1]}")
    proc = subprocess.run(args, capture_output=True, timeout=timeout, check=False)
    out = proc.stdout.decode("utf-8", "replace") + proc.stderr.decode("utf-8", "replace")
    return ToolResult(proc.returncode, out, out.splitlines())


class RawClient:
    """A byte-exact SMTP client (asyncio), for what no polite client sends."""

    def __init__(
        self, host: str, port: int, *, local: str | None = None, timeout: float = 30.0
    ) -> None:
        self.host = host
        self.port = port
        self.local = local
        self.timeout = timeout
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> RawClient:
        self.reader, self.writer = await asyncio.wait_for(
            asyncio.open_connection(
                self.host, self.port, local_addr=(self.local, 0) if self.local else None
            ),
            self.timeout,
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()

    async def read_reply(self) -> str:
        """One (possibly multi-line) reply, lines joined by '\\n'; '' at EOF."""
        assert self.reader is not None
        lines = []
        while True:
            raw = await asyncio.wait_for(self.reader.readline(), self.timeout)
            if not raw:
                return "\n".join(lines)
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            lines.append(line)
            if len(line) < 4 or line[3] != "-":
                return "\n".join(lines)

    async def send(self, data: bytes) -> None:
        assert self.writer is not None
        self.writer.write(data)
        await self.writer.drain()

    async def command(self, line: str) -> str:
        await self.send(line.encode() + b"\r\n")
        return await self.read_reply()

    async def greet(self, helo: str = "client.test") -> str:
        """Reads the banner (skipping a 220- teaser) and sends EHLO."""
        banner = await self.read_reply()
        assert banner.startswith("220"), banner
        return await self.command(f"EHLO {helo}")

    async def closed(self) -> bool:
        """True once the server has closed the connection."""
        assert self.reader is not None
        try:
            return await asyncio.wait_for(self.reader.read(1), self.timeout) == b""
        except (ConnectionError, TimeoutError):
            return True


def _connectable(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        try:
            s.connect((host, port))
            return True
        except OSError:
            return False


def connectable(host: str, port: int) -> bool:
    return _connectable(host, port)
