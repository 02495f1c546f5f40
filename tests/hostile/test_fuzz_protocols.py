"""Property-based tests (hypothesis) of the parsers that face other machines
before anything else: the PROXY protocol header (relay.smtpd.proxy) and the
handover protocol (relay.handover.transfer: its envelope and its session).
Whatever comes in, the only outcomes are a parsed value or the parser's own
refusal (ProxyError / ValueError / a reply and a closed session): no crash.

The `long` variants run 20 times the examples (MAILRELAY_LONG=1)."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mrtest.edgeserver import long_test

from relay.handover.transfer import MECHANISM, HandedEnvelope, HandoverServer, sign
from relay.queue.store import Queue
from relay.smtpd.proxy import (
    V1_MAX_LENGTH,
    V2_SIGNATURE,
    ProxyError,
    ProxyInfo,
    parse_v1,
    parse_v2,
    read_header,
)

SECRET = b"fuzz-secret-0123456789abcdef"


def examples(n: int) -> Any:
    return settings(
        max_examples=n,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )


def both_sizes(n: int) -> Callable[[Callable[..., Any]], list[Any]]:
    """The test at `n` examples, and a `long` one at 20 times as many."""

    def wrap(fn: Callable[..., Any]) -> Any:
        long = [pytest.mark.long, long_test, pytest.mark.timeout(1800)]
        return pytest.mark.parametrize("scale", [1, pytest.param(20, marks=long)])(fn)

    return wrap


# -- PROXY ------------------------------------------------------------------------

v1_words = st.sampled_from(["PROXY", "TCP4", "TCP6", "UNKNOWN", "127.0.0.1", "::1", "0", "65535"])
v1_lines = st.one_of(
    st.binary(max_size=120),
    st.lists(st.one_of(v1_words, st.text(max_size=40)), max_size=8).map(
        lambda parts: " ".join(parts).encode("utf-8", "surrogatepass") + b"\r\n"
    ),
)
v2_headers = st.tuples(
    st.integers(0, 255), st.integers(0, 255), st.binary(max_size=300), st.integers(0, 0xFFFF)
).map(lambda t: (V2_SIGNATURE + bytes([t[0], t[1]]) + struct.pack("!H", t[3]), t[2]))


def check_proxy(data: bytes) -> None:
    async def run() -> None:
        reader = asyncio.StreamReader(limit=V1_MAX_LENGTH + 2)
        reader.feed_data(data)
        reader.feed_eof()
        try:
            info = await read_header(reader)
        except (ProxyError, asyncio.IncompleteReadError):
            return
        assert isinstance(info, ProxyInfo)

    asyncio.run(run())


@both_sizes(1)
def test_proxy_v1_never_crashes(scale: int) -> None:
    @examples(300 * scale)
    @given(v1_lines)
    def run(line: bytes) -> None:
        try:
            info = parse_v1(line)
        except ProxyError:
            return
        assert info.version == 1

    run()


@both_sizes(1)
def test_proxy_v2_never_crashes(scale: int) -> None:
    @examples(300 * scale)
    @given(v2_headers)
    def run(header_payload: tuple[bytes, bytes]) -> None:
        header, payload = header_payload
        try:
            info = parse_v2(header, payload)
        except ProxyError:
            return
        assert info.version == 2

    run()


@both_sizes(1)
def test_proxy_stream_never_crashes(scale: int) -> None:
    streams = st.one_of(
        st.binary(max_size=200),
        v1_lines,
        v2_headers.map(lambda hp: hp[0] + hp[1]),
        st.binary(max_size=200).map(lambda b: b"PROXY " + b),
    )

    @examples(200 * scale)
    @given(streams)
    def run(data: bytes) -> None:
        check_proxy(data)

    run()


# -- the handover envelope ------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=10,
)
envelope_docs = st.fixed_dictionaries(
    {},
    optional={
        "id": json_values,
        "sender": st.one_of(st.text(max_size=30), json_values),
        "recipients": st.one_of(st.lists(st.text(max_size=30), max_size=4), json_values),
        "arrival": st.one_of(
            st.floats(allow_nan=True, allow_infinity=True), st.integers(), json_values
        ),
        "client": json_values,
        "hold": json_values,
    },
)


def b64json(doc: Any) -> str:
    return base64.b64encode(json.dumps(doc).encode()).decode()


def check_envelope(text: str) -> None:
    try:
        env = HandedEnvelope.decode(text)
    except ValueError:
        return
    assert env.recipients and math.isfinite(env.arrival)
    assert HandedEnvelope.decode(env.encode()) == env


@both_sizes(1)
def test_handover_envelope_never_crashes(scale: int) -> None:
    texts = st.one_of(
        st.text(max_size=200),
        envelope_docs.map(b64json),
        json_values.map(b64json),
    )

    @examples(400 * scale)
    @given(texts)
    def run(text: str) -> None:
        check_envelope(text)

    run()


@pytest.mark.parametrize(
    "doc",
    [
        # Each once crashed decode() with a non-ValueError (OverflowError) or
        # let a non-finite arrival into the queue.
        {"sender": "", "recipients": ["a@b"], "arrival": 10**400},
        {"sender": "", "recipients": ["a@b"], "arrival": float("inf")},
        {"sender": "", "recipients": ["a@b"], "arrival": float("nan")},
    ],
)
def test_handover_envelope_regressions(doc: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        HandedEnvelope.decode(b64json(doc))


def test_handover_envelope_deep_nesting_is_refused() -> None:
    deep = base64.b64encode(b"[" * 100_000 + b"]" * 100_000).decode()
    with pytest.raises(ValueError):
        HandedEnvelope.decode(deep)


def test_non_ascii_auth_answer_is_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Found by the long fuzz run: an answer to the challenge with non-ASCII
    characters crashed the session (compare_digest refuses such str)."""
    caplog.set_level(logging.ERROR, logger="mailrelay.handover")
    script = b"AUTH " + MECHANISM.encode() + b"\r\n\xc3\xa9\xff\r\n"
    replies = run_session(tmp_path / "queue", script, authenticate=False)
    assert b"535 " in replies
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


# -- the handover session ---------------------------------------------------------------


class ScriptedPeer:
    """The listener's writer: answers the AUTH challenge, then plays `script`."""

    def __init__(self, reader: asyncio.StreamReader, script: bytes, authenticate: bool) -> None:
        self.reader = reader
        self.script = script
        self.authenticate = authenticate
        self.replies = b""
        self.closed = False

    def write(self, data: bytes) -> None:
        self.replies += data
        if data.startswith(b"334 ") and self.authenticate:
            challenge = data[4:].strip()
            self.reader.feed_data(sign(SECRET, challenge).encode() + b"\r\n" + self.script)
            self.reader.feed_eof()

    async def drain(self) -> None:
        pass

    def get_extra_info(self, name: str) -> Any:
        return ("192.0.2.1", 1234) if name == "peername" else None

    def close(self) -> None:
        self.closed = True

    async def wait_closed(self) -> None:
        pass


@pytest.fixture
def handover_queue(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "queue"


commands = st.sampled_from(
    [b"NOOP", b"RSET", b"QUIT", b"DATA", b"XENVELOPE", b"AUTH " + MECHANISM.encode(), b"HELO x"]
)
session_lines = st.lists(
    st.one_of(
        commands,
        st.binary(max_size=60),
        envelope_docs.map(lambda d: b"XENVELOPE " + b64json(d).encode()),
        st.just(
            b"XENVELOPE " + b64json({"sender": "", "recipients": ["a@b"], "arrival": 1}).encode()
        ),
    ),
    max_size=8,
).map(lambda lines: b"\r\n".join(lines) + b"\r\n.\r\n")


def run_session(queue_dir: Path, script: bytes, authenticate: bool) -> bytes:
    """One listener session against `script` (after a good AUTH, if asked); its replies."""

    async def session() -> bytes:
        queue = Queue(queue_dir)
        try:
            receiver = HandoverServer(
                queue,
                SECRET,
                hostname=lambda: "peer.test",
                max_size=lambda: 64 * 1024,
                draining=lambda: False,
                idle_timeout=5,
                auth_timeout=5,
            )
            reader = asyncio.StreamReader()
            peer = ScriptedPeer(reader, script, authenticate)
            if authenticate:
                reader.feed_data(b"AUTH " + MECHANISM.encode() + b"\r\n")
            else:
                reader.feed_data(script)
                reader.feed_eof()
            await receiver.handle(reader, peer)  # type: ignore[arg-type]
            assert peer.closed
            return peer.replies
        finally:
            await queue.close()

    return asyncio.run(session())


@both_sizes(1)
def test_handover_session_never_crashes(
    scale: int, handover_queue: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="mailrelay.handover")

    @examples(60 * scale)
    @given(session_lines, st.booleans())
    def run(script: bytes, authenticate: bool) -> None:
        caplog.clear()
        run_session(handover_queue, script, authenticate)
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text

    run()
