"""The attachment filter: every way a file name can be written in MIME."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from relay.config import RelayConfig
from relay.smtpd.content import MAX_DEPTH, check_message, find_rejected_attachment

EXTS = frozenset({"exe", "bat", "com", "jar", "pif", "scr", "swf"})


def message(part_headers: str, body: str = "TVqQAAMAAAAEAAAA//8AALgAAAAA") -> bytes:
    return (
        "From: a@example.org\r\nTo: b@example.com\r\nSubject: test\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/mixed; boundary="BOUNDARY"\r\n\r\n'
        "--BOUNDARY\r\nContent-Type: text/plain\r\n\r\nhello\r\n"
        f"--BOUNDARY\r\n{part_headers}\r\n\r\n{body}\r\n"
        "--BOUNDARY--\r\n"
    ).encode()


def b64word(text: str) -> str:
    return "=?UTF-8?B?" + base64.b64encode(text.encode()).decode() + "?="


@pytest.mark.parametrize(
    "headers",
    [
        "Content-Type: application/octet-stream\r\n"
        'Content-Disposition: attachment; filename="x.exe"',
        'Content-Type: application/octet-stream; name="INVOICE.EXE"',
        'Content-Disposition: attachment; filename="x.Exe."',  # trailing dot
        'Content-Disposition: attachment; filename="x.exe  "',  # trailing spaces
        "Content-Disposition: attachment; filename=x.scr",  # unquoted
        # RFC 2231 continuations, plain and percent-encoded with a charset
        'Content-Disposition: attachment;\r\n filename*0="invoice.";\r\n filename*1="exe"',
        "Content-Disposition: attachment; filename*=utf-8''invoice%2Eexe",
        "Content-Disposition: attachment;\r\n filename*0*=utf-8''r%C3%A9sum%C3%A9;\r\n"
        " filename*1*=%2E%65%78%65",
        "Content-Disposition: attachment; filename*=iso-8859-1'en'caf%E9.bat",
        # RFC 2047 encoded words, in the quoted value (illegal but decoded by clients)
        f'Content-Disposition: attachment; filename="{b64word("résumé.exe")}"',
        'Content-Type: application/x-msdownload; name="=?iso-8859-1?Q?rechnung=2Eexe?="',
        # A harmless name in one place, the dangerous one in the other
        'Content-Type: application/octet-stream; name="x.exe"\r\n'
        'Content-Disposition: attachment; filename="x.txt"',
        # Two filename parameters: whichever a client picks
        'Content-Disposition: attachment; filename="a.txt"; filename="a.jar"',
        # A path in the name
        'Content-Disposition: attachment; filename="C:\\\\temp\\\\run.pif"',
    ],
)
def test_encoded_dangerous_names_are_found(headers: str) -> None:
    assert find_rejected_attachment(message(headers), EXTS) is not None


@pytest.mark.parametrize(
    "headers",
    [
        'Content-Disposition: attachment; filename="report.pdf"',
        'Content-Disposition: attachment; filename="exe"',  # no extension
        'Content-Disposition: attachment; filename="setup.exe.txt"',
        'Content-Type: text/plain; name="notes.execute"',
        f'Content-Disposition: attachment; filename="{b64word("résumé.pdf")}"',
    ],
)
def test_harmless_names_pass(headers: str) -> None:
    assert find_rejected_attachment(message(headers), EXTS) is None


def test_nested_multipart_and_attached_message() -> None:
    inner = (
        "From: c@example.org\r\nSubject: fwd\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/mixed; boundary="INNER"\r\n\r\n'
        '--INNER\r\nContent-Type: multipart/alternative; boundary="ALT"\r\n\r\n'
        "--ALT\r\nContent-Type: text/plain\r\n\r\nhi\r\n--ALT--\r\n"
        '--INNER\r\nContent-Disposition: attachment; filename="deep.scr"\r\n\r\nxx\r\n'
        "--INNER--\r\n"
    )
    data = message("Content-Type: message/rfc822", inner)
    assert find_rejected_attachment(data, EXTS) == "deep.scr"


def test_deep_nesting_is_bounded() -> None:
    depth = MAX_DEPTH + 5
    head = "".join(
        f'Content-Type: multipart/mixed; boundary="b{i}"\r\n\r\n--b{i}\r\n' for i in range(depth)
    )
    tail = "".join(f"\r\n--b{i}--" for i in reversed(range(depth)))
    data = (
        f"Subject: deep\r\nMIME-Version: 1.0\r\n{head}Content-Type: text/plain\r\n\r\nx{tail}\r\n"
    )
    with pytest.raises(Exception, match="nesting"):
        find_rejected_attachment(data.encode(), EXTS)


async def test_check_message_reads_the_spooled_file(tmp_path: Path) -> None:
    config = RelayConfig(
        name="t", hostname="mx.test", domains={}, recipients=set(),
        reject_attachment_extensions=EXTS,
    )  # fmt: skip
    spooled = tmp_path / "msg"
    spooled.write_bytes(message(f'Content-Disposition: attachment; filename="{b64word("a.EXE")}"'))
    reply = await check_message(spooled, config)
    assert reply is not None and (reply.code, reply.status) == (550, "5.7.1")
    assert "a.EXE" in reply.text
    spooled.write_bytes(message('Content-Disposition: attachment; filename="a.pdf"'))
    assert await check_message(spooled, config) is None
