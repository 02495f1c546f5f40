"""Content checks during DATA: the attachment filter.

The message is scanned as it arrives, chunk by chunk (AttachmentScanner),
in bounded memory: a 25 MB message costs no more than a 5 KB one, and the
spooled file is never read again.

Every MIME part's file names are looked at the way a mail client could
read them, and the message is rejected if any reading ends in a rejected
extension: Content-Disposition `filename` and Content-Type `name`, every
occurrence, RFC 2231 continuations (`filename*0*=`) and charsets, RFC 2047
encoded words, any case, trailing dots and spaces (Windows drops them).
Nested multiparts and message/rfc822 parts are walked. Postfix's regex on
raw headers misses encoded names; this does not.

Bounded work: linear in the message size (capped by the SMTP size limit);
the scan stops at MAX_PARTS parts or MAX_DEPTH levels, and a structure past
those limits (or a name-bearing header over MAX_LINE bytes) is rejected
rather than half-checked.
"""

from __future__ import annotations

import asyncio
import email.errors
import email.header
import email.utils
import logging
import re
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from email.message import Message
from pathlib import Path

from relay.config import RelayConfig
from relay.smtpd.session import Reply

log = logging.getLogger("mailrelay.content")

MAX_PARTS = 1000
MAX_DEPTH = 50  # Postfix mime_nesting_limit is 100; real mail nests a few levels
MAX_LINE = 64 * 1024  # longest line kept; also the cap on a part's name-bearing headers
# Header lines are read one by one (the rest of a body is skipped by regex):
# capped per message so that scanning stays cheap whatever is sent.
MAX_HEADER_LINES = 20_000
NAME_PARAMS = ("filename", "name")
_CONTINUATION = re.compile(r"^(filename|name)\*(\d+)?\*?$", re.IGNORECASE)
# Chunks bigger than this are scanned off the event loop, at most
# SCAN_THREADS at a time per process.
INLINE_SCAN_BYTES = 64 * 1024
SCAN_THREADS = 2
READ_CHUNK = 256 * 1024


def _decode_words(text: str) -> str:
    """RFC 2047 encoded words anywhere in text (also inside quotes, which RFC 2047
    forbids but mail clients decode anyway)."""
    if "=?" not in text:
        return text
    try:
        parts = email.header.decode_header(text)
    except (ValueError, LookupError, email.errors.HeaderParseError):
        return text
    out = []
    for chunk, charset in parts:
        if isinstance(chunk, bytes):
            try:
                out.append(chunk.decode(charset or "ascii", "replace"))
            except LookupError:
                out.append(chunk.decode("latin-1"))
        else:
            out.append(chunk)
    return "".join(out)


def _rfc2231_join(params: list[tuple[str, str]]) -> dict[str, str]:
    """filename*0*=utf-8''a%2E; filename*1=exe  ->  {'filename': 'a.exe'} (by hand,
    so that a part the library would skip is still seen)."""
    pieces: dict[str, list[tuple[int, str, bool]]] = {}
    for key, value in params:
        m = _CONTINUATION.match(key.strip())
        if not m:
            continue
        name = m.group(1).lower()
        index = int(m.group(2) or 0)
        encoded = key.strip().endswith("*")
        pieces.setdefault(name, []).append((index, value, encoded))
    out: dict[str, str] = {}
    for name, items in pieces.items():
        items.sort()
        charset = "utf-8"
        raw = b""
        for i, (_index, value, encoded) in enumerate(items):
            value = email.utils.unquote(value)
            if encoded:
                if i == 0 and value.count("'") >= 2:
                    cs, _lang, value = value.split("'", 2)
                    charset = cs or charset
                raw += _percent_decode(value)
            else:
                raw += value.encode("utf-8", "surrogateescape")
        try:
            out[name] = raw.decode(charset, "replace")
        except LookupError:
            out[name] = raw.decode("latin-1")
    return out


def _percent_decode(value: str) -> bytes:
    out = bytearray()
    i = 0
    data = value.encode("utf-8", "surrogateescape")
    while i < len(data):
        if data[i] == 0x25 and i + 3 <= len(data):
            try:
                out.append(int(data[i + 1 : i + 3], 16))
                i += 3
                continue
            except ValueError:
                pass
        out.append(data[i])
        i += 1
    return bytes(out)


def part_filenames(part: Message) -> set[str]:
    """Every reading of the part's file names, decoded, before normalising."""
    names: set[str] = set()
    for header in ("content-disposition", "content-type"):
        for value in part.get_all(header, []) or []:
            params = _params(str(value))
            for key, val in params:
                if key.strip().lower() in NAME_PARAMS:
                    names.add(_decode_words(email.utils.unquote(val)))
            for joined in _rfc2231_join(params).values():
                names.add(_decode_words(joined))
    # The library's own reading too (its RFC 2231 handling may differ from ours).
    for getter in (part.get_filename, lambda: part.get_param("name")):
        try:
            found: object = getter()
        except Exception:  # a malformed header: our own readings above still count
            continue
        if isinstance(found, tuple):
            found = email.utils.collapse_rfc2231_value(found)
        if isinstance(found, str):
            names.add(_decode_words(found))
    return {n for n in names if n}


def _params(header_value: str) -> list[tuple[str, str]]:
    """key=value pairs of a header, split on ';' outside quotes."""
    out: list[tuple[str, str]] = []
    cur, quoted, escaped = "", False, False
    items: list[str] = []
    for c in header_value:
        if escaped:
            cur += c
            escaped = False
        elif c == "\\" and quoted:
            cur += c
            escaped = True
        elif c == '"':
            quoted = not quoted
            cur += c
        elif c == ";" and not quoted:
            items.append(cur)
            cur = ""
        else:
            cur += c
    items.append(cur)
    for item in items[1:]:  # the first item is the value (type or disposition)
        key, sep, value = item.partition("=")
        if sep:
            out.append((key.strip(), value.strip()))
    return out


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


_HEADER_LINE = re.compile(rb"^(From |[\041-\071\073-\176]*:|[\t ])")
_NAME_HEADERS = frozenset({b"content-type", b"content-disposition"})
_HEADERS, _BODY, _DONE = "headers", "body", "done"
_NO_DELIMITER = re.compile(rb"(?!)")  # matches nothing


@dataclass
class _Multipart:
    """An open multipart entity: its delimiter line and where it sits."""

    delimiter: bytes  # b"--" + boundary
    depth: int
    digest: bool  # multipart/digest: parts default to message/rfc822


class AttachmentScanner:
    """The attachment filter over a stream: feed() the message in chunks as it
    arrives, then finish() says which name (if any) is rejected.

    The stdlib parser would keep every part in memory. This keeps only what
    decides: the open multipart delimiters, the Content-Type and
    Content-Disposition lines of the part whose header is being read, and
    one line at most MAX_LINE long. Body lines are skipped with bytes.find
    for the next line starting with "--". The structure it follows is the
    stdlib feedparser's (first Content-Type wins, any enclosing delimiter
    ends inner parts, message/* holds a message, multipart/digest parts are
    messages), and every header is read by part_filenames(), as before.
    """

    def __init__(self, extensions: frozenset[str]) -> None:
        self.extensions = extensions
        self.found: str | None = None
        self._buf = bytearray()
        self._state = _HEADERS
        self._skip_line = False  # inside a line too long to matter: drop to its end
        self._open: list[_Multipart] = []
        self._delimiter_re = self._next_delimiter_re = _NO_DELIMITER
        self._header_line_count = 0
        self._parts = 0
        self._depth = 0
        self._default_type = "text/plain"
        self._status_blocks = False  # message/delivery-status: blocks of headers
        self._name_headers: list[list[bytes]] = []  # lines of each name-bearing header
        self._header_open = False  # a header line was seen: continuations belong to it
        self._header_lines: list[bytes] | None = None  # that header's lines, if it bears names
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
        pos = self._scan(self._buf, 0)
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
                # Only delimiter lines matter in a body: found by one regex search.
                m = self._delimiter_re.match(buf, pos) or self._next_delimiter_re.search(buf, pos)
                if m is not None:
                    pos = m.end()
                    match = self._match_delimiter(bytes(buf[m.start(1) : pos]).rstrip(b"\r\n"))
                    if match is not None:  # always, unless one line delimits two ways
                        self._apply_delimiter(*match)
                    continue
                # No whole delimiter line: keep the last line if it may become one.
                start = max(pos, buf.rfind(b"\n", pos) + 1)
                rest = n - start
                if rest <= MAX_LINE and buf.startswith(b"--"[: min(rest, 2)], start):
                    return start
                self._skip_line = start < n  # it goes on in the next chunk
                return n
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

    def _long_line(self, start: bytes) -> None:
        """A line longer than MAX_LINE: never a delimiter; in a header, it must
        not bear names (those are rejected as too big to check)."""
        if self._state == _HEADERS:
            if start[:1] in (b" ", b"\t"):
                bears_names = self._header_lines is not None
            elif _HEADER_LINE.match(start):
                bears_names = start.partition(b":")[0].strip().lower() in _NAME_HEADERS
                self._header_open, self._header_lines = True, None
            else:  # the first body line: the header ends here
                self._end_headers()
                bears_names = False
            if bears_names:
                raise LimitExceeded("MIME header too long")
        self._skip_line = True

    def _delimiters_changed(self) -> None:
        """One regex finds the candidate delimiter lines of every open multipart."""
        if not self._open:
            self._delimiter_re = self._next_delimiter_re = _NO_DELIMITER
            return
        alternatives = sorted({m.delimiter for m in self._open}, key=len, reverse=True)
        line = rb"(" + b"|".join(re.escape(d) for d in alternatives) + rb")(--)?[ \t]*\r?\n"
        self._delimiter_re = re.compile(line)  # at the line start
        # A literal "\n" first lets the regex engine skip ahead fast (memchr).
        self._next_delimiter_re = re.compile(rb"\n" + line)

    def _match_delimiter(self, line: bytes) -> tuple[int, bool] | None:
        """(index of the multipart, is its close delimiter) for a delimiter line.

        The outermost multipart it delimits wins, as in the stdlib parser (an
        enclosing boundary ends the inner parts first)."""
        text = line.rstrip(b" \t")
        for i, multipart in enumerate(self._open):
            if text == multipart.delimiter:
                return i, False
            if text == multipart.delimiter + b"--":
                return i, True
        return None

    def _apply_delimiter(self, index: int, close: bool) -> None:
        # An enclosing delimiter ends every part opened inside it.
        parent = self._open[index]
        del self._open[index if close else index + 1 :]
        self._delimiters_changed()
        if close:
            self._enter_body()
            return
        self._state = _HEADERS
        self._begin_entity(parent.depth + 1, "message/rfc822" if parent.digest else "text/plain")

    def _header_line(self, line: bytes) -> bool:
        """One line of a header section; False if it must be read again in the new state."""
        self._header_line_count += 1
        if self._header_line_count > MAX_HEADER_LINES:
            raise LimitExceeded(f"more than {MAX_HEADER_LINES} header lines")
        if self._open and line.startswith(b"--"):
            match = self._match_delimiter(line)
            if match is not None:
                self._end_headers()
                if self._state != _DONE:
                    self._apply_delimiter(*match)
                return True
        if not _HEADER_LINE.match(line):
            if self._status_blocks:
                # delivery-status: a blank line starts the next block of fields
                self._header_open, self._header_lines = False, None
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
        name, colon, _ = line.partition(b":")
        if line.startswith(b"From ") or not colon or not name:
            self._header_open, self._header_lines = False, None  # the stdlib drops these
            return True
        self._header_open = True
        if name.strip().lower() in _NAME_HEADERS:
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
        self._header_open, self._header_lines = False, None
        self._header_bytes = 0

    def _end_headers(self) -> None:
        """The header section of an entity is complete: check its names and
        see what its body holds."""
        part = Message()
        part.set_default_type(self._default_type)
        for lines in self._name_headers:
            text = [x.decode("ascii", "surrogateescape") for x in lines]
            name, _, first = text[0].partition(":")
            part.set_raw(name.strip(), first.lstrip(" \t") + "".join("\r\n" + t for t in text[1:]))
        self._name_headers = []
        self._header_open, self._header_lines = False, None
        hit = rejected_name(part_filenames(part), self.extensions) if len(part) else None
        if hit is not None:
            self.found = hit
            self._state = _DONE
            return
        if self._status_blocks:
            return  # a block of delivery-status fields: the next block follows
        content_type = part.get_content_type()
        maintype = content_type.partition("/")[0]
        if maintype == "multipart":
            boundary = _boundary(part)
            if boundary:
                self._open.append(
                    _Multipart(
                        b"--" + boundary.encode("utf-8", "surrogateescape"),
                        self._depth,
                        content_type == "multipart/digest",
                    )
                )
                self._delimiters_changed()
            self._enter_body()
        elif content_type == "message/delivery-status":
            self._begin_entity(self._depth + 1, "text/plain", status_block=True)
        elif maintype == "message":
            self._begin_entity(self._depth + 1, "text/plain")
        else:
            self._enter_body()

    def _enter_body(self) -> None:
        self._status_blocks = False
        # Outside every multipart, nothing more can start a part.
        self._state = _BODY if self._open else _DONE


def _boundary(part: Message) -> str | None:
    try:
        return part.get_boundary()
    except Exception:  # a malformed parameter: no usable boundary
        return None


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
