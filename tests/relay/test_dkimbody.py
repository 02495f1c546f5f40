"""relay.smtpd.dkimbody's streamed body hashes are dkimpy's, byte for byte:
every canonicalization, l=, and any split of the body into chunks."""

from __future__ import annotations

import hashlib
import io

import pytest
from dkim import rfc822_parse
from dkim.canonicalization import Relaxed, Simple
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.smtpd import dkimbody
from relay.smtpd.dkimbody import BodyKey, body_hashes, body_key

PIECES = [b"a", b"b c", b" ", b"\t", b"  \t ", b"\r\n", b"\r\n", b"\n", b"\r", b"x\r\n"]
KEYS: list[BodyKey] = [
    (b"simple", b"rsa-sha256", None),
    (b"relaxed", b"rsa-sha256", None),
    (b"simple", b"rsa-sha1", 7),
    (b"relaxed", b"rsa-sha256", 3),
    (b"relaxed", b"rsa-sha256", 0),
]


def dkimpy_hash(body: bytes, key: BodyKey) -> bytes:
    """What dkimpy's verify_sig_process hashes for this body."""
    _headers, parsed = rfc822_parse(b"X: y\r\n\r\n" + body)
    canonical = (Relaxed if key[0] == b"relaxed" else Simple).canonicalize_body(parsed)
    if key[2] is not None:
        canonical = canonical[: key[2]]
    return hashlib.new(dkimbody.HASHES[key[1]], canonical).digest()


@settings(max_examples=400, deadline=None)
@given(
    parts=st.lists(st.sampled_from(PIECES), max_size=40),
    rest=st.integers(0, 8),
    chunk=st.integers(1, 9),
)
def test_streamed_body_hashes_are_dkimpys(parts: list[bytes], rest: int, chunk: int) -> None:
    body = b"".join(parts)
    src = io.BytesIO(body[rest:])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dkimbody, "CHUNK", chunk)
        got = body_hashes(src, body[:rest], set(KEYS))
    assert got == {key: dkimpy_hash(body, key) for key in KEYS}


def test_body_keys_of_signature_tags() -> None:
    assert body_key({b"a": b"rsa-sha256"}, b"simple/simple") == (b"simple", b"rsa-sha256", None)
    assert body_key({b"a": b"rsa-sha1", b"c": b"relaxed", b"l": b"12"}, b"") == (
        b"simple", b"rsa-sha1", 12,
    )  # fmt: skip
    assert body_key({b"a": b"rsa-sha256"}, b"relaxed/relaxed")[0] == b"relaxed"  # type: ignore[index]
    assert body_key({b"a": b"rsa-md5"}, b"simple/simple") is None
    assert body_key({b"a": b"rsa-sha256", b"c": b"relaxed/odd"}, b"") is None
    assert body_key({b"a": b"rsa-sha256", b"l": b"-1"}, b"") is None
