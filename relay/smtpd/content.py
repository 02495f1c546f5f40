"""Content checks during DATA: the attachment filter.

The message is scanned as it arrives, chunk by chunk (AttachmentScanner),
in bounded memory: a 25 MB message costs no more than a 5 KB one, and the
spooled file is never read again. ContentCheck is what smtpd feeds: the
headers we prepend first, then the client's data.

Every MIME part's file names are looked at the way any reader could read
them (mimeparams: RFC 2045/2231/2047, a naive split, a Postfix header
regexp, the stdlib), and the message is rejected if any reading ends in a
rejected extension, after normalising as a desktop would (NFKC, any case,
controls, trailing dots and spaces dropped). Where readers could disagree
about the structure, the scanner takes the union: see AttachmentScanner.
A name or charset that cannot be decoded never raises.

Bounded work: linear in the message size (capped by the SMTP size limit);
the scan stops at MAX_PARTS parts, MAX_DEPTH levels or MAX_BOUNDARIES
boundaries, and a structure past those limits (or a name-bearing header
over MAX_LINE bytes) is rejected rather than half-checked.
"""

from __future__ import annotations

import asyncio
import logging
import re
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from email.message import Message
from pathlib import Path

from relay.config import RelayConfig
from relay.smtpd import mimeparams
from relay.smtpd.session import Reply

log = logging.getLogger("mailrelay.content")

MAX_PARTS = 1000
MAX_DEPTH = 50  # Postfix mime_nesting_limit is 100; real mail nests a few levels
MAX_LINE = 64 * 1024  # longest line kept; also the cap on a part's name-bearing headers
# Header lines are read one by one (the rest of a body is skipped by regex):
# capped per message so that scanning stays cheap whatever is sent.
MAX_HEADER_LINES = 20_000
# Distinct boundaries per message: each is an alternative of the delimiter
# regex, compiled again when one is added.
MAX_BOUNDARIES = 100
# Longer boundaries are cut, as Postfix does (mime_boundary_length_limit):
# delimiters match by prefix, so a cut one still matches its lines.
MAX_BOUNDARY_LENGTH = 2048
# Chunks bigger than this are scanned off the event loop, at most
# SCAN_THREADS at a time per process.
INLINE_SCAN_BYTES = 64 * 1024
SCAN_THREADS = 2
READ_CHUNK = 256 * 1024


def part_filenames(part: Message) -> set[str]:
    """Every reading of a parsed part's file names, decoded, before normalising."""
    headers = [(k, str(v)) for k, v in part.items() if k.strip().lower() in _NAME_HEADER_NAMES]
    return mimeparams.file_names(headers)


def normalise(name: str) -> str:
    """What a desktop would make of the name: NFKC, no controls, no trailing dots/spaces."""
    name = unicodedata.normalize("NFKC", name)
    name = "".join(c for c in name if unicodedata.category(c)[0] != "C")
    return name.strip().rstrip(". \t").lower()


def rejected_name(names: set[str], extensions: frozenset[str]) -> str | None:
    for raw in sorted(names):
        base = normalise(raw).replace("\\", "/").rsplit("/", 1)[-1]
        if "." in base and base.rsplit(".", 1)[1] in extensions:
            return raw
    return None


class LimitExceeded(Exception):
    pass


# A header line, as the stdlib reads one ("From ", a label and a colon, a
# continuation) or as Postfix's is_header() does: white space may come
# between the label and the colon (RFC 822's obsolete syntax; clients
# still read `Content-Type : ...`).
_HEADER_LINE = re.compile(rb"^(From |[\041-\071\073-\176]*[\t ]*:|[\t ])")
_NAME_HEADER_NAMES = frozenset({"content-type", "content-disposition"})
_HEADERS, _BODY, _DONE = "headers", "body", "done"
_NO_DELIMITER = re.compile(rb"(?!)")  # matches nothing
# The start of a line that is not a header line (_HEADER_LINE), the blank
# line included; and where a name-bearing header could be, however spelled.
_NOT_HEADER_LINE = re.compile(rb"^(?!From |[\041-\071\073-\176]*[\t ]*:|[\t ])", re.MULTILINE)
_MAY_BEAR_NAMES = re.compile(rb"content-(?:type|disposition)", re.IGNORECASE)


@dataclass
class _Multipart:
    """A multipart entity seen so far, by one of its boundaries."""

    depth: int
    digest: bool  # multipart/digest: parts default to message/rfc822


class AttachmentScanner:
    """The attachment filter over a stream: feed() the message in chunks as it
    arrives, then finish() says which name (if any) is rejected.

    The stdlib parser would keep every part in memory. This keeps only what
    decides: the boundaries declared so far, the name-bearing header lines of
    the part whose header is being read, and one line at most MAX_LINE long.
    Body lines are skipped by one regex search for the next delimiter line.

    Where readers disagree about the structure, this takes the union, so
    that every header section any of them reads is read here:
    - every reading of a Content-Type (mimeparams) counts: a part is
      multipart, or holds a message, if any reading says so;
    - a delimiter is a line starting with "--" and any boundary seen so far,
      as Postfix matches them (a prefix: `--Bx` delimits boundary `B`), which
      includes the stdlib's exact match; a close delimiter closes nothing:
      later delimiter lines of that boundary still start parts (a reader
      that disagrees about what closed where still sees them);
    - a header line is one for the stdlib or for Postfix.
    """

    def __init__(self, extensions: frozenset[str]) -> None:
        self.extensions = extensions
        self.found: str | None = None
        self._buf = bytearray()
        self._state = _HEADERS
        self._skip_line = False  # inside a line too long to matter: drop to its end
        self._boundaries: dict[bytes, _Multipart] = {}
        self._delimiters_dirty = False
        self._delimiter_re = _NO_DELIMITER
        self._longest = 0  # of a delimiter line's start that tells whose it is
        self._header_line_count = 0
        self._parts = 0
        self._depth = 0
        self._default_type = "text/plain"
        self._status_blocks = False  # message/delivery-status: blocks of headers
        self._name_headers: list[list[bytes]] = []  # lines of each name-bearing header
        self._header_lines: list[bytes] | None = None  # the open header's lines, if it bears names
        self._header_bytes = 0
        self._begin_entity(0, "text/plain")

    @property
    def done(self) -> bool:
        """Nothing that follows can change the verdict."""
        return self._state == _DONE

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Scans one more chunk. Raises LimitExceeded for a structure too big to check."""
        if self._state == _DONE:
            return
        self._buf += data
        pos = self._scan(self._buf, self._skim_plain_header(self._buf))
        del self._buf[:pos]

    def finish(self) -> str | None:
        """End of message: the first rejected name, or None."""
        if self._state != _DONE and self._buf and not self._skip_line:
            self._buf += b"\n"  # the last line, unterminated
            self._buf[:] = self._buf[self._scan(self._buf, 0) :]
        if self._state == _HEADERS:
            self._end_headers()
        self._state = _DONE
        self._buf = bytearray()
        return self.found

    # -- the line machine --------------------------------------------------

    def _scan(self, buf: bytearray, pos: int) -> int:
        """Consumes whole lines from pos; returns where the unconsumed part starts."""
        n = len(buf)
        while pos < n and self._state != _DONE:
            if self._skip_line:
                end = buf.find(b"\n", pos)
                if end < 0:
                    return n
                pos = end + 1
                self._skip_line = False
                continue
            if self._state == _BODY:
                pos = self._scan_body(buf, pos)
                if self._state == _BODY:  # no whole delimiter line left in buf
                    return pos
                continue
            end = buf.find(b"\n", pos)
            if end < 0:
                if n - pos > MAX_LINE:
                    self._long_line(bytes(buf[pos : pos + MAX_LINE]))
                    continue
                return pos
            line = bytes(buf[pos : end - 1 if end > pos and buf[end - 1] == 0x0D else end])
            if self._header_line(line):
                pos = end + 1
        return pos if self._state != _DONE else n

    def _skim_plain_header(self, buf: bytearray) -> int:
        """The fast path of a message without MIME structure: while the
        top-level header section has no Content-Type or Content-Disposition
        anywhere in it, its lines are consumed at once, and its end means
        done (the body of a text/plain message holds no parts). What the line
        machine would do with the same lines; returns where it goes on."""
        if (
            self._state != _HEADERS
            or self._parts != 1
            or self._skip_line
            or self._header_lines is not None
            or self._name_headers
        ):
            return 0
        limit = buf.rfind(b"\n", 0, MAX_LINE) + 1  # whole lines, none of them long
        end = _NOT_HEADER_LINE.search(buf, 0, limit)
        stop = end.start() if end is not None and end.start() < limit else limit
        if _MAY_BEAR_NAMES.search(buf, 0, stop) is not None:
            return 0
        lines = buf.count(b"\n", 0, stop)
        if self._header_line_count + lines > MAX_HEADER_LINES:
            return 0
        self._header_line_count += lines
        if stop < limit:  # the header section ends at this line
            self._end_headers()
        return stop

    def _scan_body(self, buf: bytearray, pos: int) -> int:
        """Skips body lines up to the next delimiter line: one regex search."""
        if self._delimiters_dirty:
            self._compile_delimiters()
        n = len(buf)
        while True:
            if buf.startswith(b"--", pos):  # the line at pos may be one
                start = pos
            else:
                m = self._delimiter_re.search(buf, pos)
                if m is None:
                    break
                start = m.start(1)
            end = buf.find(b"\n", start)
            if end < 0 and n - start <= MAX_LINE:
                return start  # the line goes on in the next chunk
            if self._start_part(bytes(buf[start : start + self._longest])):
                if end >= 0:
                    return end + 1
                self._skip_line = True  # the rest of a long delimiter line
                return n
            if end < 0:
                self._skip_line = True
                return n
            pos = end + 1
        # No delimiter line: keep the last line if it may become one.
        start = max(pos, buf.rfind(b"\n", pos) + 1)
        rest = n - start
        if rest <= MAX_LINE and buf.startswith(b"--"[: min(rest, 2)], start):
            return start
        self._skip_line = start < n  # it goes on in the next chunk
        return n

    def _long_line(self, start: bytes) -> None:
        """A line longer than MAX_LINE in a header: it must not bear names
        (those are rejected as too big to check)."""
        if start[:1] in (b" ", b"\t"):
            bears_names = self._header_lines is not None
        elif _HEADER_LINE.match(start):
            bears_names = _header_name(start) in _NAME_HEADER_NAMES
            self._header_lines = None
        elif not self._status_blocks:
            # The header ends before this line; it is read again in the new
            # state (a long delimiter line still starts a part).
            self._end_headers()
            return
        else:
            bears_names = False  # a delivery-status block goes on
        if bears_names:
            raise LimitExceeded("MIME header too long")
        self._skip_line = True

    def _compile_delimiters(self) -> None:
        """One regex finds the lines that start a part: "--", a boundary, and
        not "--" right after it (that closes it)."""
        self._delimiters_dirty = False
        alternatives = sorted(self._boundaries, key=len, reverse=True)
        self._longest = len(alternatives[0]) + 4  # "--", the boundary, 2 more to tell a close
        line = rb"(--(?:" + b"|".join(re.escape(d) for d in alternatives) + rb")(?!--))"
        # A literal "\n" first lets the regex engine skip ahead fast (memchr).
        self._delimiter_re = re.compile(rb"\n" + line)

    def _start_part(self, line: bytes) -> bool:
        """If line (its start) is a delimiter line, the next part's header
        section starts. It belongs to every multipart whose boundary the line
        starts with (one, unless boundaries overlap): the deepest gives its
        depth (Postfix tries the innermost first), a digest its default type."""
        owners = [
            multipart
            for boundary, multipart in self._boundaries.items()
            if line.startswith(boundary, 2) and line[2 + len(boundary) : 4 + len(boundary)] != b"--"
        ]
        if not owners:
            return False
        depth = max(m.depth for m in owners)
        digest = any(m.digest for m in owners)
        self._state = _HEADERS
        self._begin_entity(depth + 1, "message/rfc822" if digest else "text/plain")
        return True

    def _header_line(self, line: bytes) -> bool:
        """One line of a header section; False if it must be read again in the new state."""
        self._header_line_count += 1
        if self._header_line_count > MAX_HEADER_LINES:
            raise LimitExceeded(f"more than {MAX_HEADER_LINES} header lines")
        if not _HEADER_LINE.match(line):
            if self._status_blocks:
                # delivery-status: a blank line starts the next block of fields
                self._header_lines = None
                if not line:
                    self._end_headers()
                    if self._state == _HEADERS:
                        self._begin_entity(self._depth, "text/plain", status_block=True)
                return True
            self._end_headers()
            return not line  # the blank line is consumed; a body line is read again
        if line[:1] in (b" ", b"\t"):
            if self._header_lines is not None:
                self._add_header_bytes(len(line))
                self._header_lines.append(line)
            return True
        if _header_name(line) in _NAME_HEADER_NAMES:
            self._add_header_bytes(len(line))
            self._header_lines = [line]
            self._name_headers.append(self._header_lines)
        else:
            self._header_lines = None
        return True

    def _add_header_bytes(self, count: int) -> None:
        self._header_bytes += count
        if self._header_bytes > MAX_LINE:
            raise LimitExceeded("MIME header too long")

    # -- entities ------------------------------------------------------------

    def _begin_entity(self, depth: int, default_type: str, *, status_block: bool = False) -> None:
        self._parts += 1
        if self._parts > MAX_PARTS:
            raise LimitExceeded(f"more than {MAX_PARTS} MIME parts")
        if depth > MAX_DEPTH:
            raise LimitExceeded(f"MIME nesting deeper than {MAX_DEPTH}")
        self._depth = depth
        self._default_type = default_type
        self._status_blocks = status_block
        self._name_headers = []
        self._header_lines = None
        self._header_bytes = 0

    def _end_headers(self) -> None:
        """The header section of an entity is complete: check its names and
        see what its body holds."""
        headers = [_unfold(lines) for lines in self._name_headers]
        self._name_headers = []
        self._header_lines = None
        if headers:
            hit = rejected_name(mimeparams.file_names(headers), self.extensions)
            if hit is not None:
                self.found = hit
                self._state = _DONE
                return
        if self._status_blocks:
            return  # a block of delivery-status fields: the next block follows
        values = [value for name, value in headers if name == "content-type"]
        types = mimeparams.content_types(values) if values else {self._default_type}
        mains = {t.partition("/")[0].strip() for t in types}
        if "multipart" in mains:
            digest = any(t.endswith("/digest") for t in types)
            for boundary in mimeparams.boundaries(values):
                encoded = mimeparams.to_bytes(boundary)[:MAX_BOUNDARY_LENGTH]
                self._add_boundary(encoded, digest)
        if "message" in mains and types != {"message/delivery-status"}:
            self._begin_entity(self._depth + 1, "text/plain")
        elif "message/delivery-status" in types:
            self._begin_entity(self._depth + 1, "text/plain", status_block=True)
        else:
            self._enter_body()

    def _add_boundary(self, boundary: bytes, digest: bool) -> None:
        known = self._boundaries.get(boundary)
        if known is not None:
            known.digest = known.digest or digest
            return
        if len(self._boundaries) >= MAX_BOUNDARIES:
            raise LimitExceeded(f"more than {MAX_BOUNDARIES} MIME boundaries")
        self._boundaries[boundary] = _Multipart(self._depth, digest)
        self._delimiters_dirty = True

    def _enter_body(self) -> None:
        self._status_blocks = False
        # With no boundary seen, nothing more can start a part.
        self._state = _BODY if self._boundaries else _DONE


def _header_name(line: bytes) -> str:
    return line.partition(b":")[0].strip().lower().decode("ascii", "replace")


def _unfold(lines: list[bytes]) -> tuple[str, str]:
    """A header's lines -> (lower-case name, value with the line breaks removed)."""
    text = b"".join(lines).decode("utf-8", "surrogateescape")
    name, _, value = text.partition(":")
    return name.strip().lower(), value.strip(" \t")


def find_rejected_attachment(data: bytes, extensions: frozenset[str]) -> str | None:
    """The first attachment name ending in a rejected extension, or None. Raises
    LimitExceeded for a structure too big to check."""
    scanner = AttachmentScanner(extensions)
    scanner.feed(data)
    return scanner.finish()


def rejection(name: str) -> Reply:
    """Postfix-like 550 naming the attachment (made printable, cut short)."""
    shown = "".join(c if c.isprintable() else "?" for c in name)[:200]
    log.info("reject: attachment %r: rejected file name extension", shown)
    ext = normalise(name).rsplit(".", 1)[-1]
    return Reply(550, "5.7.1", f'Attachment "{shown}" rejected: .{ext} files are not accepted')


def limit_rejection(error: LimitExceeded) -> Reply:
    log.info("reject: message content: %s", error)
    return Reply(550, "5.7.1", f"Message content rejected: {error}")


_scan_pool: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    global _scan_pool
    if _scan_pool is None:
        _scan_pool = ThreadPoolExecutor(SCAN_THREADS, thread_name_prefix="content-scan")
    return _scan_pool


class ContentCheck:
    """The content checks of one message, fed during DATA.

    Small chunks are scanned inline (a few microseconds); big ones on a
    small shared pool, so a message of 25 MB of header lines cannot hold
    the event loop. After the first error or rejection the rest is ignored.
    """

    def __init__(self, extensions: frozenset[str]) -> None:
        self._scanner = AttachmentScanner(extensions)
        self._verdict: Reply | None = None

    @property
    def done(self) -> bool:
        return self._verdict is not None or self._scanner.done

    def feed_inline(self, data: bytes) -> None:
        if self.done:
            return
        try:
            self._scanner.feed(data)
        except LimitExceeded as e:
            self._verdict = limit_rejection(e)

    async def feed(self, data: bytes) -> None:
        if self.done:
            return
        if len(data) <= INLINE_SCAN_BYTES:
            self.feed_inline(data)
            return
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(_pool(), self.feed_inline, data)

    def verdict(self) -> Reply | None:
        """None to accept, or the 550 5.7.1 to answer (call once, at the end)."""
        if self._verdict is not None:
            return self._verdict
        try:
            name = self._scanner.finish()
        except LimitExceeded as e:
            return limit_rejection(e)
        return rejection(name) if name is not None else None


def content_check(config: RelayConfig) -> ContentCheck | None:
    """A check to feed the message to, or None when nothing is checked."""
    extensions = config.reject_attachment_extensions
    return ContentCheck(extensions) if extensions else None


def _check_file(path: Path, extensions: frozenset[str]) -> Reply | None:
    check = ContentCheck(extensions)
    with path.open("rb") as f:
        while not check.done and (chunk := f.read(READ_CHUNK)):
            check.feed_inline(chunk)
    return check.verdict()


async def check_message(path: Path, config: RelayConfig) -> Reply | None:
    """A spooled message file, streamed: None to accept, or a 550 5.7.1 Reply."""
    extensions = config.reject_attachment_extensions
    if not extensions:
        return None
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_pool(), _check_file, path, extensions)
