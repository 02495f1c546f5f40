"""Fuzzing the attachment filter: the parameter parser and the streaming
scanner never raise whatever the input (a LimitExceeded verdict aside), and
on generated header values and MIME structures they agree with the stdlib's
`email.policy.default` on "has a blocked attachment": whatever it sees, we
reject; where no blocked name was written at all, we pass.

The default runs are short; the `long` ones (MAILRELAY_LONG=1) run the same
properties with many more examples."""

from __future__ import annotations

import base64
import email.policy
import urllib.parse
from typing import Any

import pytest
from hostile.oracle import BLOCKED, blocked, email_sees_blocked
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mrtest.edgeserver import long_test

from relay.smtpd import mimeparams
from relay.smtpd.content import AttachmentScanner, LimitExceeded, rejected_name

SHORT = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LONG = settings(max_examples=20_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- header values ----------------------------------------------------------------------

NAMES = ["a.exe", "a.pdf", "B.SCR", "x y.exe", "résumé.exe", "notes.txt", "a.exe.txt", "s.jar. "]
hostile_text = st.lists(
    st.sampled_from([*"();\"\\=*'%?:/ \t.aexAEX0129é\x00\udcff", "\r\n ", "=?", "?=", "''"]),
    max_size=60,
).map("".join)


def encoded_name(draw: Any, attribute: str, name: str) -> str:
    """attribute=name, in one of the ways mail software writes it."""
    form = draw(st.integers(0, 7))
    if form == 0:
        return f'{attribute}="{name}"'
    if form == 1:
        return (
            f"{attribute}={name}"
            if " " not in name and name.strip() == name
            else f'{attribute}="{name}"'
        )
    if form == 2:
        return f"{attribute}*=utf-8''{urllib.parse.quote(name)}"
    if form == 3:
        half = len(name) // 2
        return f'{attribute}*0="{name[:half]}"; {attribute}*1="{name[half:]}"'
    if form == 4:
        return f'{attribute}="=?utf-8?b?{base64.b64encode(name.encode()).decode()}?="'
    if form == 5:
        return f'{attribute} = "{name}"'
    if form == 6:
        return f'{attribute}="{name}" (c)'
    return f'(c) {attribute}="{name}"'


@st.composite
def disposition(draw: Any) -> tuple[str, list[str]]:
    """A Content-Disposition value and the names written in it."""
    names = draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=2))
    params = [encoded_name(draw, "filename", n) for n in names]
    if draw(st.booleans()):
        params.insert(0, draw(st.sampled_from(["size=10", 'x="a;b"', "(x) y=z", 'q="(")"'])))
    kind = draw(st.sampled_from(["attachment", "inline", "attachment (it's \"quoted)"]))
    return kind + "; " + "; ".join(params), names


def policy_default_name(value: str) -> object:
    header = email.policy.default.header_factory("Content-Disposition", value)
    return getattr(header, "params", {}).get("filename")


def check_disposition(generated: tuple[str, list[str]]) -> None:
    value, names = generated
    ours = rejected_name(mimeparams.file_names([("content-disposition", value)]), BLOCKED)
    if blocked(policy_default_name(value)):
        assert ours is not None
    if not any(blocked(n) for n in names):
        assert ours is None


def check_never_raises(value: str) -> None:
    mimeparams.tokens(value)
    mimeparams.file_names([("content-type", value), ("content-disposition", value)])
    mimeparams.content_types([value])
    mimeparams.boundaries([value])


@SHORT
@given(disposition())
def test_parameters_agree_with_email(generated: tuple[str, list[str]]) -> None:
    check_disposition(generated)


@SHORT
@given(st.one_of(hostile_text, st.text(st.characters(exclude_categories=[]), max_size=120)))
def test_parameter_parser_never_raises(value: str) -> None:
    check_never_raises(value)


# -- MIME structures -----------------------------------------------------------------

BOUNDARIES = ["B", "b1", "=_Part_0", "x y", '"B"x', "B--", "BB"]


def quote_boundary(draw: Any, boundary: str) -> tuple[str, str]:
    """(the boundary parameter as written, the delimiter a client would use)."""
    if boundary == '"B"x':
        return "boundary=" + boundary, draw(st.sampled_from(["B", "Bx"]))
    form = draw(st.integers(0, 3))
    if form == 0:
        return f'boundary="{boundary}"', boundary
    if form == 1 and " " not in boundary and "=" not in boundary:
        return f"boundary={boundary}", boundary
    if form == 2:
        return f'(c) boundary="{boundary}"', boundary
    return f'boundary="{boundary}"; boundary="other"', boundary


def header(draw: Any, name: str, value: str) -> str:
    return (
        draw(st.sampled_from([f"{name}: ", f"{name} : ", f"{name}\t: ", f"{name.upper()}:"]))
        + value
    )


@st.composite
def entity(draw: Any, depth: int = 0) -> tuple[str, list[str]]:
    """One MIME entity (headers and body) and the names written in it."""
    headers = draw(st.lists(st.sampled_from(["X-A: 1", "Subject: s\r\n folded"]), max_size=2))
    kind = draw(
        st.sampled_from(["leaf", "leaf", "multipart", "message"] if depth < 3 else ["leaf"])
    )
    if kind == "leaf":
        names: list[str] = []
        if draw(st.booleans()):
            value, names = draw(disposition())
            headers.append(header(draw, "Content-Disposition", value))
        if draw(st.booleans()):
            name = draw(st.sampled_from(NAMES))
            names.append(name)
            value = "application/octet-stream; " + encoded_name(draw, "name", name)
            headers.append(header(draw, "Content-Type", value))
        body = "\r\n".join(
            draw(st.lists(st.sampled_from(["hi", "--", "-- B", "TVqQ"]), max_size=3))
        )
        return "\r\n".join(headers) + "\r\n\r\n" + body, names
    if kind == "message":
        headers.append(header(draw, "Content-Type", "message/rfc822"))
        inner, names = draw(entity(depth + 1))
        return "\r\n".join(headers) + "\r\n\r\n" + inner, names
    boundary = draw(st.sampled_from(BOUNDARIES))
    param, delimiter = quote_boundary(draw, boundary)
    ctype = draw(st.sampled_from(["multipart/mixed", "(c) multipart/mixed", "multipart"]))
    headers.append(header(draw, "Content-Type", f"{ctype}; {param}"))
    parts = draw(st.lists(entity(depth + 1), max_size=3))
    text = "\r\n".join(headers) + "\r\n\r\npreamble\r\n"
    names = []
    for part, part_names in parts:
        text += f"--{delimiter}\r\n{part}\r\n"
        names += part_names
    if draw(st.booleans()):
        text += f"--{delimiter}--\r\n"
    return text, names


def scan(data: bytes, chunk: int) -> str | None:
    scanner = AttachmentScanner(BLOCKED)
    for i in range(0, len(data), chunk):
        scanner.feed(data[i : i + chunk])
    return scanner.finish()


def check_structure(generated: tuple[str, list[str]], chunk: int) -> None:
    text, names = generated
    data = ("Received: from x\r\n\tby y; now\r\n" + text).encode()
    try:
        whole = scan(data, len(data) + 1)
    except LimitExceeded:
        return
    assert scan(data, chunk) == whole
    if email_sees_blocked(data):
        assert whole is not None
    if not any(blocked(n) for n in names):
        assert whole is None


def check_junk(junk: bytes, chunk: int) -> None:
    data = b'Content-Type: multipart/mixed; boundary="x"\r\n\r\n--x\r\n' + junk
    try:
        whole = scan(data, len(data) + 1)
    except LimitExceeded:
        return
    assert scan(data, chunk) == whole


@SHORT
@given(entity(), st.sampled_from([1, 3, 64, 10_000]))
def test_scanner_agrees_with_email(generated: tuple[str, list[str]], chunk: int) -> None:
    check_structure(generated, chunk)


@SHORT
@given(st.binary(max_size=600), st.integers(1, 50))
def test_scanner_never_raises_on_junk(junk: bytes, chunk: int) -> None:
    check_junk(junk, chunk)


# -- the long runs -------------------------------------------------------------------


@pytest.mark.long
@long_test
@pytest.mark.timeout(3600)
@LONG
@given(disposition())
def test_parameters_agree_with_email_long(generated: tuple[str, list[str]]) -> None:
    check_disposition(generated)


@pytest.mark.long
@long_test
@pytest.mark.timeout(3600)
@LONG
@given(st.one_of(hostile_text, st.text(st.characters(exclude_categories=[]), max_size=400)))
def test_parameter_parser_never_raises_long(value: str) -> None:
    check_never_raises(value)


@pytest.mark.long
@long_test
@pytest.mark.timeout(3600)
@LONG
@given(entity(), st.sampled_from([1, 3, 64, 10_000]))
def test_scanner_agrees_with_email_long(generated: tuple[str, list[str]], chunk: int) -> None:
    check_structure(generated, chunk)


@pytest.mark.long
@long_test
@pytest.mark.timeout(3600)
@LONG
@given(st.binary(max_size=2000), st.integers(1, 50))
def test_scanner_never_raises_on_junk_long(junk: bytes, chunk: int) -> None:
    check_junk(junk, chunk)
