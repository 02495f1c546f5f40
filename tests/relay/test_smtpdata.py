"""relay.smtpd.smtpdata: end of DATA only at CRLF.CRLF, Postfix 3.9 normalization."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.smtpd.smtpdata import MAX_PENDING, DataDecoder, MessageIdPeek


def decode(raw: bytes, chunk: int | None = None) -> tuple[bytes, bool, bytes]:
    d = DataDecoder()
    out = b""
    step = chunk or len(raw) or 1
    for i in range(0, len(raw), step):
        if d.done:
            break
        out += d.feed(raw[i : i + step])
    return out, d.done, d.rest


@pytest.mark.parametrize("chunk", [None, 1, 2, 3, 7])
def test_plain_message_and_rest(chunk: int | None) -> None:
    out, done, rest = decode(b"Subject: x\r\n\r\nbody\r\n.\r\nQUIT\r\n", chunk)
    assert done
    assert out == b"Subject: x\r\n\r\nbody\r\n"
    if chunk is None:
        assert rest == b"QUIT\r\n"


def test_empty_message() -> None:
    assert decode(b".\r\n") == (b"", True, b"")


@pytest.mark.parametrize("chunk", [None, 1, 4])
def test_dot_unstuffing(chunk: int | None) -> None:
    out, done, _ = decode(b"..\r\n..x\r\n.y\r\n...\r\n.\r\n", chunk)
    assert done
    assert out == b".\r\n.x\r\ny\r\n..\r\n"


# The end-of-data variants of SMTP smuggling (SEC Consult, smtp_smuggling_checker):
# none of them ends DATA; the real end comes later, so there is one message.
SMUGGLING = [
    b"\r\n.\r",
    b"\r\n\x00.\r\n",
    b"\r\n\x00.\r",
    b"\n.\r\n",
    b"\r.\r\n",
    b"\n\n.\r\n",
    b"\n.\n",
    b"\r\n.\n",
    b"\r.\r",
    b"\n.\r",
    b"\r\n.\r\r\n",
    b"\r.\n",
]


@pytest.mark.parametrize("chunk", [None, 1])
@pytest.mark.parametrize("variant", SMUGGLING, ids=repr)
def test_smuggling_variants_do_not_end_data(variant: bytes, chunk: int | None) -> None:
    smuggled = b"MAIL FROM:<evil@evil.test>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\nevil\r\n"
    raw = b"Subject: a\r\n\r\nfirst" + variant + smuggled + b"last\r\n.\r\n"
    out, done, rest = decode(raw, chunk)
    assert done
    assert rest == b""
    assert b"MAIL FROM:<evil@evil.test>\r\n" in out
    assert out.endswith(b"last\r\n")
    # Nothing bare is stored: every CR is followed by LF and every LF preceded by CR.
    assert out.count(b"\r") == out.count(b"\n") == out.count(b"\r\n")


def test_bare_lf_becomes_crlf_and_stray_cr_a_space() -> None:
    out, done, _ = decode(b"a\nb\rc\r\n.\r\n")
    assert done
    assert out == b"a\r\nb c\r\n"


def test_long_line_is_kept_whole_in_bounded_pieces() -> None:
    line = b"x" * (3 * MAX_PENDING + 5)
    d = DataDecoder()
    out = b""
    for i in range(0, len(line), 1000):
        out += d.feed(line[i : i + 1000])
        assert len(d._pending) <= MAX_PENDING + 1000
    out += d.feed(b"\r\n.\r\n")
    assert d.done
    assert out == line + b"\r\n"


def test_long_line_split_between_cr_and_lf() -> None:
    d = DataDecoder()
    out = d.feed(b"y" * (MAX_PENDING + 10) + b"\r")
    out += d.feed(b"\n.\r\n")
    assert d.done
    assert out == b"y" * (MAX_PENDING + 10) + b"\r\n"


def test_size_counts_output() -> None:
    d = DataDecoder()
    d.feed(b"abc\r\n..\r\n.\r\n")
    assert d.size == len(b"abc\r\n.\r\n")


@pytest.mark.parametrize(
    "raw",
    [
        b"a\r\nb\r\n.\r\n",
        b".\r\n",
        b"a\r\n..b\r\n.\r\n",
        b"a\nb\r\n.\r\n",
        b"a\r\n\r\n.\r\nQUIT\r\n",
        b"a\rb\r\n.\r\n",
    ],
)
def test_fast_path_agrees_with_line_by_line(raw: bytes) -> None:
    assert decode(raw)[:2] == decode(raw, chunk=1)[:2]


def test_fast_path_keeps_state_across_chunks() -> None:
    d = DataDecoder()
    assert d.feed(b"a\r\nb\r\n") == b"a\r\nb\r\n"
    assert not d.done
    assert d.feed(b"c\n") == b"c\r\n"  # careful path: bare LF
    assert d.feed(b".\r\n") == b"\r\n"  # after a bare LF a dot line is content
    assert not d.done
    assert d.feed(b"d\r\n.\r\n") == b"d\r\n"
    assert d.done


class CarefulOnly(DataDecoder):
    """The decoder without its clean-chunk fast path."""

    def _feed_clean(self, data: bytes) -> bytes | None:
        return None


pieces = st.sampled_from([b"ab", b"\r\n", b"\r", b"\n", b".", b"..", b"\r\n.\r\n", b"QUIT"])


@settings(max_examples=500, deadline=None)
@given(st.lists(pieces, max_size=30), st.integers(1, 12))
def test_clean_fast_path_decodes_as_the_careful_path(parts: list[bytes], chunk: int) -> None:
    raw = b"".join(parts) + b"\r\n.\r\n"
    results = []
    for decoder in (DataDecoder(), CarefulOnly()):
        out = b""
        for i in range(0, len(raw), chunk):
            if decoder.done:
                break
            out += decoder.feed(raw[i : i + chunk])
        results.append((out, decoder.done, decoder.rest, decoder.size))
    assert results[0] == results[1]


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"Subject: a\r\nMessage-ID: <1@x>\r\n\r\nbody\r\n", "<1@x>"),
        (b"Subject: a\r\nmessage-id :\r\n\t<2@x>\r\n\r\n", "<2@x>"),  # folded, spaced
        (b"Subject: no id\r\n\r\nMessage-ID: <in the body>\r\n", ""),
        (b"line one\r\nline two without a header section end\r\n", ""),
        (b"X-Message-ID: <3@x>\r\n\r\n", ""),
    ],
)
def test_message_id_peek(head: bytes, expected: str) -> None:
    peek = MessageIdPeek()
    peek.feed(head)
    assert peek.value() == expected
