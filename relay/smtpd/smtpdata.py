"""Reading the DATA stream: end-of-data, dot-unstuffing and bare CR/LF
normalization, chunk by chunk, in bounded memory.

Postfix 3.9's smtpd_forbid_bare_newline=normalize and
cleanup_replace_stray_cr_lf=yes, which close SMTP smuggling
(CVE-2023-51764) in both directions:
- DATA ends only at <CR><LF>.<CR><LF>: the "." line must end in CRLF and the
  line before it too. `\\n.\\n`, `\\r\\n.\\r`, `\\r.\\r\\n`, `\\n.\\r\\n` ... are
  content, so one DATA never yields two messages;
- a bare LF ends a content line as if it were CRLF;
- a CR not followed by LF becomes a space.
So every stored line ends in CRLF and holds no other CR or LF: mail going
out never carries a bare CR or LF either.

Lines longer than 1000 bytes are stored as they are (a relay must not bounce
long-line mail); a line with no LF at all is flushed in pieces so memory
stays bounded.
"""

from __future__ import annotations

# Flush an unterminated line once it is this long.
MAX_PENDING = 64 * 1024


class DataDecoder:
    """Feed raw DATA bytes; get back normalized, unstuffed message bytes.

    After `feed()` reports the end, `rest` holds what the client sent after
    the final dot (pipelined commands), which belongs to the command reader.
    """

    def __init__(self) -> None:
        self._pending = b""  # the start of a line whose LF has not come yet
        self._mid_line = False  # _pending continues a line already flushed in part
        self._prev_crlf = True  # the previous line ended in CRLF (DATA start counts)
        self.done = False
        self.rest = b""
        self.size = 0  # bytes of message produced

    def feed(self, data: bytes) -> bytes:
        """Decodes one chunk; returns the message bytes it completes."""
        buf = self._pending + data if self._pending else data
        if not self._mid_line and self._prev_crlf:
            fast = self._feed_clean(buf)
            if fast is not None:
                return fast
        last_lf = buf.rfind(b"\n")
        if last_lf < 0:
            self._pending = buf
            return self._flush_long_line() if len(buf) > MAX_PENDING else b""
        self._pending = buf[last_lf + 1 :]
        out: list[bytes] = []
        lines = buf[:last_lf].split(b"\n")
        consumed = 0
        for raw in lines:
            consumed += len(raw) + 1
            crlf = raw.endswith(b"\r")
            line = raw[:-1] if crlf else raw
            if not self._mid_line:
                if line == b"." and crlf and self._prev_crlf:
                    self.done = True
                    self.rest = buf[consumed:]
                    self._pending = b""
                    break
                if line.startswith(b"."):
                    line = line[1:]
            self._mid_line = False
            if b"\r" in line:
                line = line.replace(b"\r", b" ")
            out.append(line)
            out.append(b"\r\n")
            self._prev_crlf = crlf
        chunk = b"".join(out)
        self.size += len(chunk)
        if not self.done and len(self._pending) > MAX_PENDING:
            chunk += self._flush_long_line()
        return chunk

    def _feed_clean(self, data: bytes) -> bytes | None:
        """The common case without a line-by-line loop: CRLF lines, no bare
        CR or LF, no line starting with a dot except the final one. `data`
        starts a line; a chunk may end inside one (TCP cuts anywhere): that
        start waits in _pending for the next chunk. None when the chunk needs
        the careful path (nothing changed then)."""
        rest = b""
        if data.endswith(b"\r\n.\r\n") or data == b".\r\n":
            body, done = data[:-3], True  # body keeps the CRLF before the dot
        elif data.endswith(b"\r\n"):
            body, done = data, False
        else:
            end = data.rfind(b"\r\n") + 2
            if end < 2:
                return None
            body, done, rest = data[:end], False, data[end:]
            if b"\n" in rest or len(rest) > MAX_PENDING:
                return None
        if body.startswith(b".") or b"\n." in body:
            return None
        crlf = body.count(b"\r\n")
        if body.count(b"\r") != crlf or body.count(b"\n") != crlf:
            return None
        self.done = done
        self._pending = rest
        self.size += len(body)
        return body

    def _flush_long_line(self) -> bytes:
        """Emits an unterminated line so far, keeping a trailing CR (its LF may
        come next)."""
        buf = self._pending
        keep = 1 if buf.endswith(b"\r") else 0
        part = buf[: len(buf) - keep]
        if not self._mid_line and part.startswith(b"."):
            part = part[1:]
        self._pending = buf[len(buf) - keep :]
        self._mid_line = True
        part = part.replace(b"\r", b" ")
        self.size += len(part)
        return part


# Header bytes kept to find the Message-ID in; past them it is not looked for.
HEADER_PEEK_LIMIT = 64 * 1024


class MessageIdPeek:
    """The Message-ID header, from the first bytes of a message (decoded
    DATA: every line ends in CRLF), for the log line Postfix's cleanup writes:
    `QUEUEID: message-id=<...>`."""

    def __init__(self) -> None:
        self._head = bytearray()
        self.done = False

    def feed(self, chunk: bytes) -> None:
        if self.done:
            return
        self._head += chunk[: HEADER_PEEK_LIMIT - len(self._head)]
        if b"\r\n\r\n" in self._head or len(self._head) >= HEADER_PEEK_LIMIT:
            self.done = True

    def value(self) -> str:
        """The header's value as sent (unfolded; "" without one); the caller
        makes it printable."""
        header = bytes(self._head).split(b"\r\n\r\n", 1)[0]
        if b"message-id" not in header.lower():  # none: no Python loop over every line
            return ""
        unfolded = header.replace(b"\r\n ", b" ").replace(b"\r\n\t", b" ")
        for line in unfolded.split(b"\r\n"):
            name, colon, value = line.partition(b":")
            if colon and name.strip().lower() == b"message-id":
                return value.strip().decode("utf-8", "replace")
        return ""


class HopCount:
    """Postfix's hop count (cleanup): the Received: headers of the primary header
    section, counted as the decoded DATA (CRLF lines) streams in. Only the start of
    each line is kept, whatever the size of the header section."""

    NAME_PEEK = 64  # enough of a line for "Received" and the spaces before its colon

    def __init__(self) -> None:
        self.hops = 0
        self.done = False  # the header section has ended
        self._line = b""  # the start of the line under way

    def feed(self, chunk: bytes) -> None:
        if self.done:
            return
        *ended, rest = chunk.split(b"\n")
        for piece in ended:
            line = (self._line + piece[: self.NAME_PEEK])[: self.NAME_PEEK]
            self._line = b""
            if line in (b"", b"\r"):
                self.done = True  # the empty line: the body begins
                return
            name, colon, _ = line.partition(b":")
            if colon and name.rstrip(b" \t").lower() == b"received":
                self.hops += 1
        self._line = (self._line + rest[: self.NAME_PEEK])[: self.NAME_PEEK]
