"""Content checks at end of DATA: the attachment filter.

Called with the spooled message file (headers and body as received, CRLF
line ends); parsing runs in an executor, never on the event loop.

Every MIME part's file names are looked at the way a mail client could
read them, and the message is rejected if any reading ends in a rejected
extension: Content-Disposition `filename` and Content-Type `name`, every
occurrence, RFC 2231 continuations (`filename*0*=`) and charsets, RFC 2047
encoded words, any case, trailing dots and spaces (Windows drops them).
Nested multiparts and message/rfc822 parts are walked. Postfix's regex on
raw headers misses encoded names; this does not.

Bounded work: the stdlib parser is linear in the message size (capped by
the SMTP size limit); the walk stops at MAX_PARTS parts or MAX_DEPTH levels,
and a structure past those limits is rejected rather than half-checked.
"""

from __future__ import annotations

import asyncio
import email.errors
import email.header
import email.parser
import email.policy
import email.utils
import logging
import re
import unicodedata
from collections.abc import Iterator
from email.message import Message
from pathlib import Path

from relay.config import RelayConfig
from relay.session import Reply

log = logging.getLogger("mailrelay.content")

MAX_PARTS = 1000
MAX_DEPTH = 50  # Postfix mime_nesting_limit is 100; real mail nests a few levels
NAME_PARAMS = ("filename", "name")
_CONTINUATION = re.compile(r"^(filename|name)\*(\d+)?\*?$", re.IGNORECASE)


class LimitExceeded(Exception):
    pass


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


def _walk(msg: Message, depth: int = 0, counter: list[int] | None = None) -> Iterator[Message]:
    counter = counter if counter is not None else [0]
    counter[0] += 1
    if counter[0] > MAX_PARTS:
        raise LimitExceeded(f"more than {MAX_PARTS} MIME parts")
    if depth > MAX_DEPTH:
        raise LimitExceeded(f"MIME nesting deeper than {MAX_DEPTH}")
    yield msg
    if msg.is_multipart():
        payload = msg.get_payload()
        if isinstance(payload, list):
            for sub in payload:
                if isinstance(sub, Message):
                    yield from _walk(sub, depth + 1, counter)


def find_rejected_attachment(data: bytes, extensions: frozenset[str]) -> str | None:
    """The first attachment name ending in a rejected extension, or None. Raises
    LimitExceeded for a structure too big to check."""
    msg = email.parser.BytesParser(policy=email.policy.compat32).parsebytes(data)
    for part in _walk(msg):
        hit = rejected_name(part_filenames(part), extensions)
        if hit is not None:
            return hit
    return None


def _check_file(path: Path, extensions: frozenset[str]) -> Reply | None:
    data = path.read_bytes()
    try:
        name = find_rejected_attachment(data, extensions)
    except LimitExceeded as e:
        log.info("reject: message content: %s", e)
        return Reply(550, "5.7.1", f"Message content rejected: {e}")
    except RecursionError:
        return Reply(550, "5.7.1", "Message content rejected: MIME structure too deep")
    if name is None:
        return None
    shown = "".join(c if c.isprintable() else "?" for c in name)[:200]
    log.info("reject: attachment %r: rejected file name extension", shown)
    ext = normalise(name).rsplit(".", 1)[-1]
    return Reply(550, "5.7.1", f'Attachment "{shown}" rejected: .{ext} files are not accepted')


async def check_message(path: Path, config: RelayConfig) -> Reply | None:
    """None to accept, or a 550 5.7.1 Reply naming the rejected attachment."""
    extensions = config.reject_attachment_extensions
    if not extensions:
        return None
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, _check_file, path, extensions)
