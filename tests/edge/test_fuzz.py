"""Property-based tests (hypothesis): the SMTP command loop, address parsing
and the routed-address rule, DATA decoding, MIME filename extraction and DSN
generation. No crash, and nothing the rules refuse is ever accepted.

Example counts are set for CI; MAILRELAY_LONG=1 multiplies them by 20."""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import logging
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from mrtest.edgeserver import RUN_LONG, edge_config, edge_server_factory

from relay.delivery.dsn import Failure, build_dsn
from relay.process import eventloop
from relay.smtpd.addresses import AddressError, is_routed, parse_path
from relay.smtpd.content import LimitExceeded, find_rejected_attachment
from relay.smtpd.policy import Check, relay_access
from relay.smtpd.smtpdata import DataDecoder

SCALE = 20 if RUN_LONG else 1
RELAY_DOMAINS = {"example.com", "example.org"}


def examples(n: int) -> Any:
    return settings(
        max_examples=n * SCALE,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )


# -- addresses and the routed-address rule ---------------------------------------------------

local_chars = st.sampled_from([*"abcxyz019.-_+=%!@\"\\ ()<>[]:;,'`~#$&*/?^{|}", "\x00"])
domains = st.sampled_from(
    ["example.com", "example.org", "EXAMPLE.COM", "example.com.", "evil.test", "[192.0.2.1]",
     "[127.0.0.1]", "srv", "example.org@evil.test", ""]
)  # fmt: skip


@st.composite
def paths(draw: Any) -> str:
    """Paths mixing every routing form: source routes, % and ! hacks,
    quoted local parts, several @, IP literals, bare addresses."""
    local = "".join(draw(st.lists(local_chars, max_size=12)))
    if draw(st.booleans()):
        local = '"' + local.replace('"', "") + '"'
    domain = draw(domains)
    mailbox = f"{local}@{domain}" if domain or draw(st.booleans()) else local
    if draw(st.integers(0, 4)) == 0:
        mailbox = f"@{draw(domains) or 'hop'}:{mailbox}"
    return f"<{mailbox}>" if draw(st.booleans()) else mailbox


def oracle_may_relay(path: str) -> bool:
    """An independent statement of Postfix's rule for a relay-only MX: the
    mailbox is local@domain with a relay domain, no source route, and none of
    @ % ! anywhere in the (dequoted) local part."""
    inner = path[1:-1] if path.startswith("<") and path.endswith(">") else path
    if inner.startswith("@"):
        return False
    at = inner.rfind("@")
    if at <= 0:
        return False
    local, domain = inner[:at], inner[at + 1 :]
    local = local.replace('"', "").replace("\\", "")
    if any(c in local for c in "@%!"):
        return False
    return domain.lower().rstrip(".") in RELAY_DOMAINS


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return edge_config(tmp_path_factory.mktemp("fuzz"))


@examples(3000)
@given(st.text(max_size=80))
def test_parse_path_never_crashes(text: str) -> None:
    try:
        address, _ = parse_path(text)
    except AddressError:
        return
    assert "\r" not in address.text and "\n" not in address.text and "\x00" not in address.text


@examples(3000)
@given(paths())
def test_relay_access_never_relays_a_routed_address(config: Any, path: str) -> None:
    try:
        address, params = parse_path(path)
    except AddressError:
        return
    assume(not params)
    check = Check(config, None, None, address, None, None)  # type: ignore[arg-type]
    verdict = asyncio.run(relay_access(check))
    if verdict is None:  # would be relayed
        assert oracle_may_relay(path), (path, address)
        assert not is_routed(address)
    else:
        assert verdict.code == 554 and "Relay access denied" in verdict.text


# -- DATA decoding: no smuggling, whatever the chunking ----------------------------------------

data_bytes = st.lists(
    st.sampled_from([b"\r\n", b"\n", b"\r", b".", b"..", b"\r\n.\r\n", b"\n.\n", b"\r\n.\r",
                     b"\n.\r\n", b"\r.\r\n", b"a", b"line", b"\x00", b"\r\n..\r\n"]),
    max_size=40,
).map(b"".join)  # fmt: skip


def decode(data: bytes, cuts: list[int]) -> tuple[bytes, bool, bytes]:
    decoder = DataDecoder()
    out = b""
    last = 0
    for cut in [*sorted(c % (len(data) + 1) for c in cuts), len(data)]:
        if decoder.done:
            break
        out += decoder.feed(data[last:cut])
        last = cut
    rest = decoder.rest + data[last:] if decoder.done else b""
    return out, decoder.done, rest


@examples(3000)
@given(data_bytes, st.lists(st.integers(0, 10_000), max_size=6))
def test_data_decoder_split_invariant_and_smuggling_free(data: bytes, cuts: list[int]) -> None:
    whole = decode(data, [])
    assert decode(data, cuts) == whole
    out, done, rest = whole
    # Only CRLF line ends, no stray CR or LF in what is stored.
    assert out.replace(b"\r\n", b"").count(b"\r") == 0
    assert out.replace(b"\r\n", b"").count(b"\n") == 0
    if done:
        # The end was a real <CRLF>.<CRLF> (or "." + CRLF first thing).
        consumed = data[: len(data) - len(rest)]
        assert consumed.endswith(b"\r\n.\r\n") or consumed == b".\r\n"
    else:
        assert b"\r\n.\r\n" not in b"\r\n" + data


# -- MIME attachment names ------------------------------------------------------------------------

name_stems = st.text(alphabet="abcXYZ09 _-ü", min_size=1, max_size=10)


@st.composite
def attachment(draw: Any) -> tuple[bytes, str]:
    """A message with one attachment whose name ends in .exe, written in one
    of the ways mail clients (or attackers) write names."""
    stem = draw(name_stems).strip() or "x"
    name = f"{stem}.{draw(st.sampled_from(['exe', 'EXE', 'Exe']))}"
    form = draw(st.integers(0, 5))
    if form == 0:
        header = f'Content-Disposition: attachment; filename="{name}"'
    elif form == 1:
        header = f"Content-Type: application/octet-stream; name={name.replace(' ', '_')}"
    elif form == 2:  # RFC 2231 with charset
        encoded = "".join(f"%{b:02X}" for b in name.encode())
        header = f"Content-Disposition: attachment; filename*=utf-8''{encoded}"
    elif form == 3:  # RFC 2231 continuations
        half = len(name) // 2
        header = (
            f'Content-Disposition: attachment; filename*0="{name[:half]}"; '
            f'filename*1="{name[half:]}"'
        )
    elif form == 4:  # RFC 2047 encoded word
        b64 = __import__("base64").b64encode(name.encode()).decode()
        header = f'Content-Type: application/x-msdownload; name="=?utf-8?B?{b64}?="'
    else:  # trailing dots and spaces, as Windows strips them
        header = f'Content-Disposition: attachment; filename="{name}. . "'
    depth = draw(st.integers(0, 3))
    part = f"{header}\r\nContent-Transfer-Encoding: base64\r\n\r\nTVo=\r\n"
    for level in range(depth):
        b = f"b{level}"
        part = (
            f'Content-Type: multipart/mixed; boundary="{b}"\r\n\r\n--{b}\r\n'
            f"Content-Type: text/plain\r\n\r\nhi\r\n--{b}\r\n{part}--{b}--\r\n"
        )
    head = "From: a@b.test\r\nSubject: s\r\nMIME-Version: 1.0\r\n"
    if depth == 0:
        head += 'Content-Type: multipart/mixed; boundary="top"\r\n'
        part = f"--top\r\n{part}--top--\r\n"
    return (head + part).encode(), name


@examples(1500)
@given(attachment())
def test_rejected_extension_is_found_however_the_name_is_written(sample: tuple[bytes, str]) -> None:
    data, _ = sample
    assert find_rejected_attachment(data, frozenset({"exe"})) is not None


@examples(1500)
@given(st.binary(max_size=2000))
def test_mime_parser_never_crashes(data: bytes) -> None:
    with contextlib.suppress(LimitExceeded):
        find_rejected_attachment(
            b"Content-Type: multipart/mixed; boundary=x\r\n\r\n" + data, frozenset({"exe"})
        )


# -- DSN generation ----------------------------------------------------------------------------


def queued_recipient(text: str) -> str | None:
    """Recipients reach a DSN only through the queue, which stores the
    address parse_path made of the RCPT argument."""
    try:
        return parse_path(text)[0].text or None
    except AddressError:
        return None


@examples(1000)
@given(
    recipient=st.one_of(st.text(max_size=60), paths()).map(queued_recipient).filter(bool),
    diagnostic=st.text(max_size=300),
    headers=st.binary(max_size=500),
    status=st.sampled_from(["5.1.1", "4.4.1", "5.7.1", "x.y.z", ""]),
    expired=st.booleans(),
    international=st.booleans(),
)
def test_dsn_is_well_formed_whatever_the_inputs(
    recipient: str, diagnostic: str, headers: bytes, status: str, expired: bool, international: bool
) -> None:
    data = build_dsn(
        hostname="relay.test",
        queue_id="ABC123",
        original_sender="sender@example.org",
        arrival=1_800_000_000.0,
        failures=[Failure(recipient, status, diagnostic, "mx.test", expired=expired)],
        original_headers=headers,
        now=1_800_000_100.0,
        lifetime_days=5,
        international=international,  # RFC 6533's global notice
    )
    # Every line ends in CRLF: no bare CR or LF anywhere, lines within 998.
    assert data.replace(b"\r\n", b"").count(b"\n") == 0
    assert data.replace(b"\r\n", b"").count(b"\r") == 0
    assert all(len(line) <= 998 for line in data.split(b"\r\n"))
    msg = email.message_from_bytes(data, policy=email.policy.compat32)
    # Nothing the remote side said can add a header to the bounce.
    assert sorted(k.lower() for k in msg) == sorted(
        k.lower() for k in email.message_from_bytes(
            build_dsn(hostname="relay.test", queue_id="ABC123",
                      original_sender="sender@example.org", arrival=1_800_000_000.0,
                      failures=[Failure("a@b.c", "5.1.1", "550 x", "mx.test")],
                      original_headers=b"Subject: x\r\n", now=1_800_000_100.0),
            policy=email.policy.compat32,
        )
    )  # fmt: skip
    assert msg.get_content_type() == "multipart/report"
    assert len(msg.get_payload()) == 3


# -- the SMTP command loop, over a real socket -------------------------------------------------


class ServerThread:
    """The edge server in its own event loop, so hypothesis can drive it
    with plain blocking sockets."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.loop = eventloop.loop_factory()()  # the workers' loop
        self.ready = threading.Event()
        self.edge: Any = None
        self.errors: list[logging.LogRecord] = []

    def start(self) -> ServerThread:
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

        async def boot() -> None:
            self._factory = edge_server_factory(self.tmp_path)
            start = await self._factory.__anext__()
            spec = {"limits": {"errorsPerSession": 1000}}
            self.edge = await start(edge_config(self.tmp_path, spec=spec), idle_timeout=10.0)

        asyncio.run_coroutine_threadsafe(boot(), self.loop).result(30)
        return self

    def stop(self) -> None:
        async def down() -> None:
            with contextlib.suppress(StopAsyncIteration):
                await self._factory.__anext__()

        asyncio.run_coroutine_threadsafe(down(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)


class ErrorCollector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    thread = ServerThread(tmp_path_factory.mktemp("smtpfuzz")).start()
    yield thread
    thread.stop()


verbs = st.sampled_from(
    ["EHLO", "HELO", "MAIL FROM:", "RCPT TO:", "DATA", "RSET", "NOOP", "VRFY", "STARTTLS",
     "AUTH", "BDAT", "ehlo", "mail from:", "rcpt to:", "", "QUIT"]
)  # fmt: skip
args = st.one_of(
    paths(), st.text(max_size=40), st.sampled_from(["", " SIZE=100", " BODY=8BITMIME"])
)
line_ends = st.sampled_from([b"\r\n", b"\n", b"\r\r\n"])


@st.composite
def command_lines(draw: Any) -> bytes:
    verb = draw(verbs)
    if verb == "QUIT":
        verb = "NOOP"  # keep the session open: we check it is alive at the end
    arg = draw(args) if verb.endswith(":") or draw(st.booleans()) else ""
    line = f"{verb}{arg}".encode("utf-8", "surrogateescape")[:600]
    if draw(st.integers(0, 9)) == 0:
        line = draw(st.binary(max_size=50))
    # An LF inside would make it two commands (and two replies).
    return line.replace(b"\n", b"") + draw(line_ends)


def session(address: tuple[str, int], lines: list[bytes]) -> tuple[str, list[tuple[bytes, str]]]:
    """Runs the lines; returns the banner and (line, reply) pairs. After a
    354 a short message is sent; its reply is paired with b"." ."""
    pairs: list[tuple[bytes, str]] = []
    with socket.create_connection(address, timeout=10) as sock:
        f = sock.makefile("rb")

        def reply() -> str:
            out = []
            while True:
                raw = f.readline()
                if not raw:
                    return "\n".join(out) or "<closed>"
                text = raw.decode("utf-8", "replace").rstrip("\r\n")
                out.append(text)
                if len(text) < 4 or text[3] != "-":
                    return "\n".join(out)

        banner = reply()
        for line in [*lines, b"NOOP\r\n"]:
            sock.sendall(line)
            r = reply()
            pairs.append((line, r))
            if r.startswith("354"):
                sock.sendall(b"Subject: fuzz\r\n\r\nbody\r\n.\r\n")
                pairs.append((b".", reply()))
            if pairs[-1][1] == "<closed>" or pairs[-1][1].startswith(("421", "221", "521")):
                break
        return banner, pairs


@examples(300)
@given(st.lists(command_lines(), min_size=1, max_size=12))
def test_command_loop_answers_everything_and_never_relays(
    server: ServerThread, lines: list[bytes]
) -> None:
    collector = ErrorCollector()
    logging.getLogger("mailrelay").addHandler(collector)
    try:
        banner, pairs = session(server.edge.address, lines)
    finally:
        logging.getLogger("mailrelay").removeHandler(collector)
    assert collector.records == [], [r.getMessage() for r in collector.records]
    assert banner.startswith("220")
    for _, r in pairs:
        assert r == "<closed>" or (r[:3].isdigit() and r[3:4] in (" ", "-", "")), pairs
    last = pairs[-1][1]
    if last != "<closed>" and not last.startswith(("221", "421", "521")):
        assert last.startswith("250"), pairs  # the closing NOOP: still alive
    if last.startswith("221"):  # the session ended at a QUIT the fuzzer sent
        assert pairs[-1][0].upper().startswith(b"QUIT"), pairs
    # Whatever was accepted at RCPT was a relay domain, not routed.
    for line, r in pairs:
        text = line.decode("utf-8", "replace").rstrip("\r\n")
        if text[:8].upper() == "RCPT TO:" and r.startswith("250"):
            path = text[8:].strip().split(" ")[0]
            assert oracle_may_relay(path), (text, r)
