"""The streaming attachment filter: every rejection the stdlib parser's
reading of the whole message makes, whatever the chunking, in bounded memory."""

from __future__ import annotations

import base64
import email.parser
import email.policy
import tracemalloc
from collections.abc import Iterator
from email.message import Message
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.config import RelayConfig
from relay.smtpd.content import (
    MAX_HEADER_LINES,
    MAX_LINE,
    MAX_PARTS,
    AttachmentScanner,
    LimitExceeded,
    content_check,
    find_rejected_attachment,
    normalise,
    part_filenames,
    rejected_name,
)

EXTS = frozenset({"exe", "scr"})


def stdlib_reading(data: bytes, extensions: frozenset[str]) -> str | None:
    """The oracle: the whole message parsed by the stdlib, every part walked."""
    msg = email.parser.BytesParser(policy=email.policy.compat32).parsebytes(data)

    def walk(part: Message) -> Iterator[Message]:
        yield part
        payload = part.get_payload()
        if part.is_multipart() and isinstance(payload, list):
            for sub in payload:
                yield from walk(sub)

    for part in walk(msg):
        hit = rejected_name(part_filenames(part), extensions)
        if hit is not None:
            return hit
    return None


def scan_in_chunks(data: bytes, size: int) -> str | None:
    scanner = AttachmentScanner(EXTS)
    for i in range(0, len(data), size):
        scanner.feed(data[i : i + size])
    return scanner.finish()


# -- generated MIME trees -----------------------------------------------------------------------

boundaries = st.sampled_from(["b", "bb", "b1", "=_Part_0", "x y", "----=_NextPart", "b:c"])
names = st.sampled_from(["a.pdf", "a.exe", "B.SCR", "notes.txt", "x.exe.txt", "setup.exe. "])
body_lines = st.lists(
    st.sampled_from(["hello", "--", "--b-", "--bbb", "-- b", "", "TVqQAAMA", ".", "--=_Part"]),
    max_size=4,
)


def name_header(draw: Any) -> str:
    name = draw(names)
    form = draw(st.integers(0, 4))
    if form == 0:
        return f'Content-Disposition: attachment; filename="{name}"'
    if form == 1:
        return f'Content-Disposition: attachment;\r\n\tfilename="{name}"'
    if form == 2:
        half = len(name) // 2
        return (
            f'Content-Disposition: attachment;\r\n filename*0="{name[:half]}";\r\n'
            f' filename*1="{name[half:]}"'
        )
    if form == 3:
        encoded = base64.b64encode(name.encode()).decode()
        return f'Content-Type: application/octet-stream; name="=?utf-8?B?{encoded}?="'
    return f"Content-Type: application/octet-stream; name={name.strip()}"


@st.composite
def entity(draw: Any, depth: int = 0) -> str:
    """Headers and body of one MIME entity (a message or a part)."""
    headers = draw(st.lists(st.sampled_from(["X-A: 1", "Subject: s\r\n folded"]), max_size=2))
    kind = draw(
        st.sampled_from(["leaf", "leaf", "multipart", "message"] if depth < 3 else ["leaf"])
    )
    if kind == "leaf":
        if draw(st.booleans()):
            headers.append(name_header(draw))
        body = "\r\n".join(draw(body_lines))
        return "\r\n".join(headers) + "\r\n\r\n" + body
    if kind == "message":
        headers.append("Content-Type: message/rfc822")
        return "\r\n".join(headers) + "\r\n\r\n" + draw(entity(depth + 1))
    boundary = draw(boundaries)
    subtype = draw(st.sampled_from(["mixed", "alternative", "digest"]))
    headers.append(f'Content-Type: multipart/{subtype}; boundary="{boundary}"')
    parts = draw(st.lists(entity(depth + 1), max_size=3))
    text = "\r\n".join(headers) + "\r\n\r\n" + "\r\n".join(draw(body_lines)) + "\r\n"
    for part in parts:
        text += f"--{boundary}{draw(st.sampled_from(['', ' ', chr(9)]))}\r\n{part}\r\n"
    if draw(st.integers(0, 4)):  # sometimes the close delimiter is missing
        text += f"--{boundary}--\r\n" + "\r\n".join(draw(body_lines))
    return text


@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(entity(), st.sampled_from([1, 2, 3, 7, 64, 10_000]))
def test_stdlib_verdicts_kept_whatever_the_chunks(text: str, chunk: int) -> None:
    data = ("Received: from x\r\n\tby y; now\r\n" + text).encode()
    whole = find_rejected_attachment(data, EXTS)
    # What the stdlib sees, we see; we may see more (a boundary reused inside
    # its own multipart: Postfix, and this scanner, read parts after the
    # inner close that the stdlib puts in the epilogue), but never a name
    # that was not written.
    if stdlib_reading(data, EXTS) is not None:
        assert whole is not None
    if whole is not None:
        assert normalise(whole) in {"a.exe", "b.scr", "setup.exe"}
    assert scan_in_chunks(data, chunk) == whole


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=600), st.integers(1, 50))
def test_junk_never_crashes_and_chunking_does_not_matter(junk: bytes, chunk: int) -> None:
    data = b'Content-Type: multipart/mixed; boundary="x"\r\n\r\n--x\r\n' + junk
    try:
        whole = find_rejected_attachment(data, EXTS)
    except LimitExceeded:
        return
    assert scan_in_chunks(data, chunk) == whole


class LineMachineOnly(AttachmentScanner):
    """The scanner without its fast path for plain header sections."""

    def _skim_plain_header(self, buf: bytearray) -> int:
        return 0


header_lines = st.sampled_from(
    [
        b"Subject: hi",
        b"From foo@example.com",
        b"X-A : b",
        b"\tfolded",
        b"no colon here",
        b"",
        b"Content-Type: multipart/mixed; boundary=b",
        b"content-TYPE : text/plain; name=a.exe",
        b"Content-Disposition: attachment; filename=b.scr",
        b"X-Note: content-type",
        b"--b",
        b"x" * (MAX_LINE + 10) + b": long",
    ]
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(header_lines, max_size=8),
    st.sampled_from([b"\r\n", b"\n"]),
    st.integers(1, 80),
)
def test_plain_header_fast_path_reads_as_the_line_machine(
    lines: list[bytes], eol: bytes, chunk: int
) -> None:
    data = eol.join([*lines, b"", b"--b", b"Content-Type: x/y; name=c.exe", b"", b"MZ"]) + eol
    verdicts = []
    for scanner_class in (AttachmentScanner, LineMachineOnly):
        scanner = scanner_class(EXTS)
        try:
            for i in range(0, len(data), chunk):
                scanner.feed(data[i : i + chunk])
            verdicts.append(scanner.finish())
        except LimitExceeded as e:
            verdicts.append(f"limit: {e}")
    assert verdicts[0] == verdicts[1]


# -- bounds -------------------------------------------------------------------------------------


HEAD = (
    b'Subject: big\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="XYZ"\r\n'
    b"\r\n--XYZ\r\nContent-Type: application/pdf; name=a.pdf\r\n\r\n"
)
TAIL = b'--XYZ\r\nContent-Disposition: attachment; filename="late.exe"\r\n\r\nTVo=\r\n--XYZ--\r\n'


def big_message(body_bytes: int, *, line: int = 76) -> Iterator[bytes]:
    """A multipart with a big part of `line`-byte lines, then an .exe part, in 64 KB chunks."""
    row = b"A" * line + b"\r\n"
    period = row * (65536 // len(row) + 2)  # made before the caller measures

    def chunks() -> Iterator[bytes]:
        yield HEAD
        for sent in range(0, body_bytes, 65536):
            offset = sent % len(row)
            yield period[offset : offset + 65536]
        yield b"\r\n" + TAIL

    return chunks()


@pytest.mark.parametrize("line", [76, 999, 3 * MAX_LINE])
def test_memory_stays_bounded_for_big_messages(line: int) -> None:
    tracemalloc.start()
    try:
        scanner = AttachmentScanner(EXTS)
        message = big_message(16_000_000, line=line)
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        for chunk in message:
            scanner.feed(chunk)
        assert scanner.finish() == "late.exe"
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # a chunk (64 KB) plus at most one kept line: nothing grows with the message
    assert peak - base < 4 * MAX_LINE + 256 * 1024


def test_long_lines_in_headers() -> None:
    filler = "a" * (2 * MAX_LINE)
    other = f"X-Long: {filler}\r\nContent-Disposition: attachment; filename=a.exe"
    assert find_rejected_attachment(f"Subject: s\r\n{other}\r\n\r\nbody\r\n".encode(), EXTS)
    # A name-bearing header too long to read is refused, not skipped.
    hidden = f'Content-Disposition: attachment; x="{filler}"; filename=a.exe'
    with pytest.raises(LimitExceeded, match="too long"):
        scan_in_chunks(f"Subject: s\r\n{hidden}\r\n\r\nbody\r\n".encode(), 4096)


def test_structure_limits() -> None:
    parts = "".join("--b\r\nContent-Type: text/plain\r\n\r\nx\r\n" for _ in range(MAX_PARTS + 1))
    data = f'Content-Type: multipart/mixed; boundary="b"\r\n\r\n{parts}--b--\r\n'.encode()
    with pytest.raises(LimitExceeded, match="parts"):
        find_rejected_attachment(data, EXTS)
    many = b"Subject: s\r\n" + b"X: y\r\n" * (MAX_HEADER_LINES + 1) + b"\r\nbody\r\n"
    with pytest.raises(LimitExceeded, match="header lines"):
        find_rejected_attachment(many, EXTS)


def test_delimiter_split_across_chunks() -> None:
    data = (
        b'Content-Type: multipart/mixed; boundary="BOUNDARY"\r\n\r\n--BOUNDARY\r\n\r\nhi\r\n'
        b'--BOUNDARY\r\nContent-Type: text/plain; name="run.scr"\r\n\r\nx\r\n--BOUNDARY--\r\n'
    )
    for cut in range(1, len(data)):
        scanner = AttachmentScanner(EXTS)
        scanner.feed(data[:cut])
        scanner.feed(data[cut:])
        assert scanner.finish() == "run.scr", cut


async def test_content_check_feeds_big_chunks_off_the_loop() -> None:
    config = RelayConfig(
        name="t", hostname="mx.test", domains={}, recipients=set(),
        reject_attachment_extensions=EXTS,
    )  # fmt: skip
    check = content_check(config)
    assert check is not None
    data = b"".join(big_message(1_000_000))
    for i in range(0, len(data), 200_000):  # above the inline limit: scanned on the pool
        await check.feed(data[i : i + 200_000])
    reply = check.verdict()
    assert reply is not None and (reply.code, reply.status) == (550, "5.7.1")
    assert "late.exe" in reply.text
    empty = RelayConfig(name="t", hostname="mx.test", domains={}, recipients=set())
    assert content_check(empty) is None
