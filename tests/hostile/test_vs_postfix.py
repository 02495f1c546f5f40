"""Differential: the same hostile command lines to Postfix 3.7 and to
mailrelay, both relaying example.com (relay_domains + relay_recipient_maps),
the client outside mynetworks. Wherever Postfix refuses, we refuse with the
same class of reply (5xx, 4xx); where we refuse and Postfix does not, the
case is listed in STRICTER with the reason."""

from __future__ import annotations

from typing import Any

import pytest
from mrtest.hostile import RECIPIENT_LIMIT, converse

EHLO = b"EHLO client.test\r\n"
MAIL = b"MAIL FROM:<a@x.org>\r\n"
RCPT = b"RCPT TO:<b@example.com>\r\n"


def size(value: bytes) -> list[bytes | tuple[bytes, int]]:
    return [EHLO, b"MAIL FROM:<a@x.org> SIZE=" + value + b"\r\n"]


CASES: dict[str, list[bytes | tuple[bytes, int]]] = {
    "bare CR in EHLO": [b"EHLO a\rb\r\n", MAIL],
    "bare LF in EHLO": [(b"EHLO a\nb\r\n", 2)],
    "NUL in EHLO": [b"EHLO a\x00b\r\n", MAIL],
    "8-bit, not UTF-8, in EHLO": [b"EHLO a\xffb\r\n", b"NOOP\r\n"],
    "UTF-8 in EHLO": [b"EHLO a\xc3\xa9b\r\n"],
    "8-bit in the command word": [b"NO\xffOP\r\n"],
    "8-bit in MAIL": [EHLO, b"MAIL FROM:<a\xff@x.org>\r\n", RCPT],
    "8-bit in RCPT": [EHLO, MAIL, b"RCPT TO:<b\xff@example.com>\r\n"],
    "8-bit in a parameter": [EHLO, b"MAIL FROM:<a@x.org> X-Y=\xff\r\n"],
    "NUL in RCPT": [EHLO, MAIL, b"RCPT TO:<b\x00@example.com>\r\n"],
    "control byte in a parameter": [EHLO, b"MAIL FROM:<a@x.org> BODY=8BIT\x01MIME\r\n"],
    "over-long command line": [b"X" * 3000 + b"\r\n", b"NOOP\r\n"],
    "SIZE=superscript two": size("\u00b2".encode()),
    "SIZE=-1": size(b"-1"),
    "SIZE= (empty)": size(b""),
    "SIZE=1a": size(b"1a"),
    "SIZE=00012": size(b"00012"),
    "SIZE=huge": size(b"9" * 23),
    "RET twice": [EHLO, b"MAIL FROM:<a@x.org> RET=HDRS RET=FULL\r\n"],
    "BODY=BINARYMIME": [EHLO, b"MAIL FROM:<a@x.org> BODY=BINARYMIME\r\n"],
    "BODY=binarymime": [EHLO, b"MAIL FROM:<a@x.org> BODY=binarymime\r\n"],
    "BODY=FOO": [EHLO, b"MAIL FROM:<a@x.org> BODY=FOO\r\n"],
    "RET=BINARY": [EHLO, b"MAIL FROM:<a@x.org> RET=BINARY\r\n"],
    "ENVID twice": [EHLO, b"MAIL FROM:<a@x.org> ENVID=a ENVID=b\r\n"],
    "ENVID with a cut-off xtext": [EHLO, b"MAIL FROM:<a@x.org> ENVID=a+2\r\n"],
    "ENVID encoding a LF": [EHLO, b"MAIL FROM:<a@x.org> ENVID=a+0Ab\r\n"],
    "SMTPUTF8 with a value": [EHLO, b"MAIL FROM:<a@x.org> SMTPUTF8=yes\r\n"],
    "UTF-8 sender with SMTPUTF8": [
        EHLO,
        "MAIL FROM:<ä@x.org> SMTPUTF8 BODY=8BITMIME RET=HDRS ENVID=x\r\n".encode(),
        b"RCPT TO:<b@example.com> NOTIFY=SUCCESS,FAILURE ORCPT=utf-8;\\x{E4}@x.org\r\n",
    ],
    "NOTIFY=NEVER with SUCCESS": [EHLO, MAIL, b"RCPT TO:<b@example.com> NOTIFY=NEVER,SUCCESS\r\n"],
    "NOTIFY with an unknown keyword": [EHLO, MAIL, b"RCPT TO:<b@example.com> NOTIFY=ALWAYS\r\n"],
    "NOTIFY twice": [EHLO, MAIL, b"RCPT TO:<b@example.com> NOTIFY=DELAY NOTIFY=SUCCESS\r\n"],
    "ORCPT without a type": [EHLO, MAIL, b"RCPT TO:<b@example.com> ORCPT=b@example.com\r\n"],
    "ORCPT with bad xtext": [EHLO, MAIL, b"RCPT TO:<b@example.com> ORCPT=rfc822;b+zz\r\n"],
    "duplicate RCPTs": [EHLO, MAIL] + [RCPT] * (RECIPIENT_LIMIT + 1),
    "junk command flood": [b"NOOP\r\n", b"RSET\r\n"] * 61,
    "error flood": [b"FOO\r\n"] * 21,
}

# Where we refuse and Postfix 3.7 accepts, on purpose.
STRICTER: dict[str, tuple[list[bytes | tuple[bytes, int]], str]] = {
    "bare CR in MAIL": (
        [EHLO, b"MAIL FROM:<a\r@x.org>\r\n"],
        "a control byte in an address would be stored in the queue and sent "
        "to the next hop: 501 5.1.7, as Postfix does for a NUL",
    ),
    "ORCPT encoding a LF": (
        [EHLO, MAIL, b"RCPT TO:<b@example.com> ORCPT=rfc822;a+0Ab@example.com\r\n"],
        "Postfix takes any ORCPT and sanitizes it when it writes a DSN; we keep "
        "no control character in the queue, a next hop's RCPT or our DSNs",
    ),
    "ORCPT with a surrogate": (
        [EHLO, MAIL, b"RCPT TO:<b@example.com> ORCPT=utf-8;\\x{D800}@example.com\r\n"],
        "not a character: nothing that is not UTF-8 reaches the queue",
    ),
    "ENVID over 100 characters": (
        [EHLO, b"MAIL FROM:<a@x.org> ENVID=" + b"e" * 101 + b"\r\n"],
        "RFC 3461 4.4: an ENVID MUST NOT exceed 100 characters",
    ),
    "over-long EHLO": (
        [b"EHLO " + b"x" * 3000 + b"\r\n"],
        "Postfix cuts the line at line_length_limit and takes the start as the "
        "name; we answer 500 5.5.2 line too long, so no cut-off text is kept",
    ),
}


def classes(replies: list[str]) -> list[str]:
    """'250 ...' -> '2': accept, 4xx temporary, 5xx permanent; '' closed."""
    return [r[:1] for r in replies]


@pytest.mark.parametrize("name", list(CASES))
async def test_we_refuse_wherever_postfix_refuses(
    name: str, relay: Any, postfix: tuple[str, int]
) -> None:
    chunks = CASES[name]
    door = await relay(spec={"limits": {"recipientsPerMessage": RECIPIENT_LIMIT}})
    theirs = await converse(postfix, chunks)
    ours = await converse(door.address, chunks)
    assert classes(ours) == classes(theirs), (theirs, ours)


@pytest.mark.parametrize("name", list(STRICTER))
async def test_deliberately_stricter_than_postfix(
    name: str, relay: Any, postfix: tuple[str, int]
) -> None:
    chunks, _reason = STRICTER[name]
    door = await relay()
    theirs = await converse(postfix, chunks)
    ours = await converse(door.address, chunks)
    assert classes(theirs)[-1] == "2" and classes(ours)[-1] == "5", (theirs, ours)
    assert classes(ours)[:-1] == classes(theirs)[:-1]


async def test_bad_utf8_reply_is_postfixs_word_for_word(
    relay: Any, postfix: tuple[str, int]
) -> None:
    chunks: list[bytes | tuple[bytes, int]] = [EHLO, b"MAIL FROM:<a\xff@x.org>\r\n"]
    door = await relay()
    theirs = await converse(postfix, chunks)
    ours = await converse(door.address, chunks)
    assert ours[-1] == theirs[-1] == "500 5.5.2 Error: bad UTF-8 syntax"


@pytest.mark.parametrize(
    "name",
    [
        "RET twice",
        "ENVID with a cut-off xtext",
        "ENVID encoding a LF",
        "SMTPUTF8 with a value",
        "BODY=BINARYMIME",
        "BODY=binarymime",
        "BODY=FOO",
        "NOTIFY=NEVER with SUCCESS",
        "NOTIFY twice",
        "ORCPT without a type",
        "ORCPT with bad xtext",
    ],
)
async def test_dsn_parameter_replies_are_postfixs_word_for_word(
    name: str, relay: Any, postfix: tuple[str, int]
) -> None:
    door = await relay()
    theirs = await converse(postfix, CASES[name])
    ours = await converse(door.address, CASES[name])
    assert ours[1:] == theirs[1:]  # (after EHLO: Postfix's ends in CHUNKING, ours in SMTPUTF8)


async def test_too_many_errors_reply_is_postfixs(relay: Any, postfix: tuple[str, int]) -> None:
    door = await relay()
    theirs = await converse(postfix, CASES["junk command flood"])
    ours = await converse(door.address, CASES["junk command flood"])
    assert len(ours) == len(theirs) == 122
    # Word for word but the host name (mx.relay.test here, relay.perf.test there).
    assert ours[-1].replace("mx.relay.test", "<host>") == theirs[-1].replace(
        "relay.perf.test", "<host>"
    )
