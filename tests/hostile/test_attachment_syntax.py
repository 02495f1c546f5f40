"""The attachment filter against hostile header syntax and MIME structure
(issue #11 items 2 and 7): every case of the corpus hides an .exe that
Postfix's header regexp or a recipient's MIME parser would find; the filter
finds it, whatever the chunking, and passes the same bytes with a .pdf."""

from __future__ import annotations

import pytest
from hostile.corpus import Case, corpus
from hostile.oracle import BLOCKED, email_sees_blocked

from relay.smtpd.content import MAX_LINE, AttachmentScanner, ContentCheck, find_rejected_attachment

CASES = corpus()


def scan(data: bytes, chunk: int) -> str | None:
    scanner = AttachmentScanner(BLOCKED)
    for i in range(0, len(data), chunk):
        scanner.feed(data[i : i + chunk])
    return scanner.finish()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_hidden_exe_is_found_and_the_control_passes(case: Case) -> None:
    found = find_rejected_attachment(case.data, BLOCKED)
    assert found is not None and "exe" in found.lower()
    assert find_rejected_attachment(case.control, BLOCKED) is None
    for chunk in (1, 7, 64):
        assert scan(case.data, chunk) == found
        assert scan(case.control, chunk) is None


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_what_the_email_package_sees_we_see(case: Case) -> None:
    for data in (case.data, case.control):
        try:
            sees = email_sees_blocked(data)
        except (LookupError, UnicodeError):  # the stdlib itself chokes (idna): not our verdict
            continue
        if sees:
            assert find_rejected_attachment(data, BLOCKED) is not None


@pytest.mark.parametrize(
    "header",
    [
        "Content-Disposition: attachment; filename*=idna''a.exe",
        "Content-Disposition: attachment; filename*=idna''%FF%FE.exe",
        'Content-Disposition: attachment; filename="=?idna?q?a.exe?="',
        'Content-Disposition: attachment; filename="=?idna?b?/w==?=.exe"',
        "Content-Disposition: attachment; filename*=x-no-such-charset''a%2Eexe",
        "Content-Type: multipart/mixed; boundary*=idna''%FF",
        "Content-Disposition: attachment; filename*=utf-16le''a%00.%00e%00x%00e%00",
    ],
)
def test_an_odd_charset_never_ends_the_session(header: str) -> None:
    """A name we cannot decode is read as UTF-8 (with replacement) and as
    Latin-1: the verdict comes, a 550 when an ASCII .exe shows."""
    data = f"Subject: s\r\n{header}\r\n\r\nbody\r\n".encode()
    check = ContentCheck(BLOCKED)
    check.feed_inline(data)
    reply = check.verdict()
    if "e%00x" in header or ".exe" in header:
        assert reply is not None and reply.code == 550


def test_the_rejection_names_the_file_as_sent() -> None:
    header = 'Content-Disposition : attachment; filename="=?idna?q?a.exe?="'
    data = f"Subject: s\r\n{header}\r\n\r\nx\r\n".encode()
    check = ContentCheck(BLOCKED)
    check.feed_inline(data)
    reply = check.verdict()
    assert reply is not None and (reply.code, reply.status) == (550, "5.7.1")
    assert ".exe files are not accepted" in reply.text


@pytest.mark.parametrize("blank", ["", "\r\n"])
def test_a_long_delimiter_line_still_starts_a_part(blank: str) -> None:
    """`--B` and white space past MAX_LINE is a delimiter for the stdlib
    and (by prefix) for Postfix, also right after a part's header."""
    long_delimiter = "--B" + " " * (MAX_LINE + 100)
    data = (
        'Subject: s\r\nContent-Type: multipart/mixed; boundary="B"\r\n\r\n'
        f"--B\r\nContent-Type: text/plain\r\n{blank}{long_delimiter}\r\n"
        'Content-Disposition: attachment; filename="a.exe"\r\n\r\nx\r\n--B--\r\n'
    ).encode()
    assert email_sees_blocked(data)
    for chunk in (len(data), 4096, 1000):
        assert scan(data, chunk) == "a.exe"


def test_an_unquoted_boundary_with_equals_is_one_boundary() -> None:
    """`boundary=----=_Part_1` (unquoted, common) reads as that boundary and
    as Postfix's `----`, never as an empty one that would make every `--`
    line a delimiter: text quoting a MIME header in a body stays text."""
    data = (
        b"Subject: s\r\nContent-Type: multipart/mixed; boundary=----=_Part_1\r\n\r\n"
        b"------=_Part_1\r\nContent-Type: text/plain\r\n\r\nSee below:\r\n--\r\n"
        b"Content-Disposition: attachment; filename=quoted.exe\r\n\r\n"
        b"------=_Part_1--\r\n"
    )
    assert not email_sees_blocked(data)
    assert find_rejected_attachment(data, BLOCKED) is None
