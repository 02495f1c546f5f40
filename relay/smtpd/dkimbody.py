"""DKIM body hashes computed while reading the message in chunks.

dkimpy hashes a body it holds whole (and copies a few times while it
canonicalizes it). Here the spooled body is read in chunks and each
(canonicalization, hash, l=) combination the message's signatures ask for is
hashed as it goes; dkimpy then gets only the header section and checks
`bh=` against these hashes (`Streamed`), so a 25 MB message is never in
memory. The canonicalizations are dkimpy's, byte for byte
(dkim.canonicalization, which tests/relay/test_dkimbody.py compares them with):

- simple: the body as is, its trailing empty lines dropped; an empty body is
  one CRLF; a body that does not end with CRLF gets one;
- relaxed: white space before each CRLF dropped, runs of space and tab made
  one space, trailing empty lines dropped; an empty body is empty.
"""

from __future__ import annotations

import base64
import hashlib
import re
from typing import IO, Any

import dkim

CHUNK = 256 * 1024
_TRAILING_WSP = re.compile(rb"[\t ]+\r\n")
_WSP = re.compile(rb"[\t ]+")
_LINE_END = re.compile(rb"\r?\n")
HASHES = {b"rsa-sha256": "sha256", b"ed25519-sha256": "sha256", b"rsa-sha1": "sha1"}

# (body canonicalization, a=, l=): what one signature's bh= is computed over.
BodyKey = tuple[bytes, bytes, int | None]


def body_key(sig: dict[bytes, bytes], default_c: bytes) -> BodyKey | None:
    """The body hash a signature's tags ask for; None when they are unreadable."""
    c = sig.get(b"c", default_c).split(b"/")
    body = c[1] if len(c) == 2 else b"simple"
    algorithm = sig.get(b"a", b"")
    length = sig.get(b"l")
    if body not in (b"simple", b"relaxed") or algorithm not in HASHES or len(c) > 2:
        return None
    if length is not None and not length.isdigit():
        return None
    return body, algorithm, int(length) if length is not None else None


class BodyHasher:
    """One canonicalization and hash over a body fed as complete lines."""

    def __init__(self, key: BodyKey) -> None:
        self.relaxed = key[0] == b"relaxed"
        self.hash = hashlib.new(HASHES[key[1]])
        self.left = key[2]  # bytes still hashed under l=; None: all
        self.pending = 0  # empty lines held back: they count only if a line follows
        self.any = False  # a non-empty line was hashed

    def _emit(self, data: bytes | memoryview) -> None:
        if self.left is not None:
            data = data[: self.left]
            self.left -= len(data)
        self.hash.update(data)

    def _flush_pending(self) -> None:
        while self.pending:
            n = min(self.pending, CHUNK)
            self._emit(b"\r\n" * n)
            self.pending -= n

    def lines(self, block: bytes) -> None:
        """Complete lines, each ending with CRLF."""
        if self.relaxed:
            block = _WSP.sub(b" ", _TRAILING_WSP.sub(b"\r\n", block))
        end = len(block)
        while end >= 2 and block[end - 2 : end] == b"\r\n":
            end -= 2
        empty = (len(block) - end) // 2  # trailing empty lines, the last line's CRLF among them
        if end == 0:
            self.pending += empty
            return
        self._flush_pending()
        self._emit(memoryview(block)[: end + 2])
        self.any = True
        self.pending = empty - 1

    def end(self, partial: bytes) -> bytes:
        """The last line when it has no line end; returns the digest."""
        if self.relaxed:
            partial = _WSP.sub(b" ", partial)
        if partial:
            self._flush_pending()
            self._emit(partial + b"\r\n")
            self.any = True
        if not self.any and not self.relaxed:
            self._emit(b"\r\n")
        return self.hash.digest()


def body_hashes(src: IO[bytes], rest: bytes, keys: set[BodyKey]) -> dict[BodyKey, bytes]:
    """Hashes the body: `rest` (read past the header section), then src to its end.
    Line ends are dkimpy's: CRLF or a bare LF. A line longer than a chunk waits
    whole in the buffer (only the new data is searched for its end)."""
    hashers = {key: BodyHasher(key) for key in keys}
    buf = bytearray(rest)
    added = len(buf)
    while True:
        cut = buf.rfind(b"\n", len(buf) - added) + 1
        if cut:
            block = bytes(buf[:cut])
            del buf[:cut]
            if block[-2:] != b"\r\n" or block.count(b"\n") != block.count(b"\r\n"):
                block = _LINE_END.sub(b"\r\n", block)
            for h in hashers.values():
                h.lines(block)
        chunk = src.read(CHUNK)
        if not chunk:
            break
        buf += chunk
        added = len(chunk)
    return {key: h.end(bytes(buf)) for key, h in hashers.items()}


class Streamed:
    """A dkimpy signer whose body hashes were computed by body_hashes():
    constructed with the header section only, it checks bh= against them."""

    bodyhashes: dict[BodyKey, bytes]
    default_c: bytes

    def verify_sig_process(
        self, sig: dict[bytes, bytes], include_headers: Any, sig_header: Any, dnsfunc: Any
    ) -> Any:
        if b"bh" in sig:
            key = body_key(sig, self.default_c)
            got = self.bodyhashes.get(key) if key is not None else None
            if got is None:
                raise dkim.MessageFormatError("unreadable c=, a= or l=")
            try:
                want = base64.b64decode(re.sub(rb"\s+", b"", sig[b"bh"]))
            except ValueError as e:
                raise dkim.MessageFormatError(f"unreadable bh=: {e}") from e
            if got != want:
                raise dkim.ValidationError("body hash mismatch")
            sig = {k: v for k, v in sig.items() if k != b"bh"}
        return super().verify_sig_process(  # type: ignore[misc]
            sig, include_headers, sig_header, dnsfunc
        )


class StreamedDKIM(Streamed, dkim.DKIM):
    default_c = b"simple/simple"


class StreamedARC(Streamed, dkim.ARC):
    default_c = b"relaxed/relaxed"  # dkimpy's ARC sets it on the AMS before verifying
