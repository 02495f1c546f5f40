"""hopcount_limit, differential: a message with as many Received: headers as
Postfix's hopcount_limit (50, the receiving server's own included) is a mail
loop between relays, refused at end of DATA as Postfix 3.7 refuses it."""

from __future__ import annotations

from typing import Any

import pytest
from mrtest.hostile import converse

from mailrelay_api.spec import HOPCOUNT_LIMIT
from relay.smtpd.smtpdata import HopCount


def hops(n: int, name: bytes = b"Received") -> bytes:
    return b"".join(
        name + b": from h%d.test by relay.test; Mon, 1 Jan 2024 00:00:00 +0000\r\n" % i
        for i in range(n)
    )


def transaction(head: bytes) -> list[bytes | tuple[bytes, int]]:
    return [
        b"EHLO client.test\r\n",
        b"MAIL FROM:<a@x.org>\r\n",
        b"RCPT TO:<b@example.com>\r\n",
        b"DATA\r\n",
        head + b"Subject: loop\r\n\r\nReceived: in the body does not count\r\n.\r\n",
    ]


# The client's Received: headers; the server adds its own, which counts.
CASES = {
    "one hop below the limit": hops(HOPCOUNT_LIMIT - 2),
    "at the limit": hops(HOPCOUNT_LIMIT - 1),
    "over the limit": hops(HOPCOUNT_LIMIT + 5),
    "Delivered-To does not count": hops(HOPCOUNT_LIMIT - 2) + hops(5, b"Delivered-To"),
    "any case, a space before the colon": hops(HOPCOUNT_LIMIT - 2) + b"RECEIVED : x\r\n",
}


@pytest.mark.parametrize("name", list(CASES))
async def test_hop_count_as_postfix(name: str, relay: Any, postfix: tuple[str, int]) -> None:
    chunks = transaction(CASES[name])
    door = await relay()
    theirs = await converse(postfix, chunks)
    ours = await converse(door.address, chunks)
    # Postfix names its queue file in the 250: compare the replies without it.
    assert ours[-1].split(": queued as")[0] == theirs[-1].split(": queued as")[0], (theirs, ours)
    refused = name in ("at the limit", "over the limit", "any case, a space before the colon")
    expected = "554 5.4.0 Error: too many hops" if refused else "250 2.0.0 Ok"
    assert theirs[-1].split(": queued as")[0] == expected, theirs
    assert len(door.queued()) == (0 if refused else 1)


def test_counts_only_the_header_section_whatever_the_chunks() -> None:
    data = (
        b"Received: a\r\nX: b\r\n\tReceived: folded, no header\r\nreceived:c\r\n\r\nReceived: d\r\n"
    )
    for size in range(1, len(data) + 1):
        count = HopCount()
        for i in range(0, len(data), size):
            count.feed(data[i : i + size])
        assert (count.hops, count.done) == (2, True), size
