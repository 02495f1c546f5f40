"""Content-Type and Content-Disposition values, read every way a reader could.

Pure functions over one header section's name-bearing headers (unfolded
values, any number of each). A filter that reads a header one way while the
recipient's mail client reads it another lets files through, so nothing
here picks one reading: every function returns the union of

- the RFC reading: RFC 2045 tokens, comments (nested, with quoted pairs,
  quotes inside ignored) skipped, quoted strings unquoted, as Postfix's
  header_token() and the stdlib's `email.policy.default` read it; a value
  with junk after it (`"B"x`) read both as its first word and all words;
  a parameter wherever `attribute =` appears, also before the first `;`;
- the naive reading: split on `;` outside quotes (what compat32 and many
  clients do; a quote inside a comment changes what it sees);
- the regexp reading: what a Postfix `mime_header_checks` regexp such as
  `/name\\s*=\\s*"?[^;]*\\.exe"?\\s*(;|$)/` would match on the raw text;
- the stdlib compat32 reading (`Message.get_filename`, `get_boundary`).

Every name is then decoded both ways a client may: RFC 2231 (`name*0*=`,
charsets, in any order) and RFC 2047 encoded words. A charset we cannot
decode with (unknown, or one like `idna` that refuses error handlers) never
raises: the bytes are read as UTF-8 with replacement and as Latin-1, so the
extension, which is ASCII, still shows.

Content types are read the same way: a part is multipart (or message/*)
when any reading says so; its boundary is every reading of every boundary
parameter of every Content-Type header (Postfix pushes each of them too).
"""

from __future__ import annotations

import email.errors
import email.header
import email.utils
import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass
from email.message import Message

NAME_PARAMS = frozenset({"filename", "name"})
# A token (RFC 2045: no white space, controls or tspecials), a quoted string
# (closing quote optional: an unterminated one runs to the end), a comment
# start, or any other single character (a tspecial).
_TOKEN = re.compile(
    r'[ \t\r\n]*(?:([^ \t\r\n()<>@,;:\\"/\[\]?=]+)|"((?:[^"\\]|\\.)*)"?|(\()|(.))', re.S
)
_QUOTED_PAIR = re.compile(r"\\(.)", re.S)
# The regexp reading: a name parameter (also inside a longer attribute such
# as `xname`, as a header regexp would) and its value up to the next `;`.
_NAME_IN_TEXT = re.compile(r'name[ \t]*=[ \t]*"?([^;]*)', re.I)
_CONTINUATION = re.compile(r"^([a-z0-9_.-]+)\*(?:(\d{1,4})\*?|\*?)$", re.I)
CACHED_VALUE_LENGTH = 200
# A sane cap: a header is at most MAX_LINE bytes, so this only stops
# pathological `a*9999=` sections from allocating much.
MAX_SECTIONS = 1000


@dataclass(frozen=True)
class Token:
    kind: str  # "atom", "quoted" or "special"
    text: str


def tokens(value: str) -> list[Token]:
    """RFC 822/2045 tokens of a header value, comments dropped."""
    out: list[Token] = []
    pos, end = 0, len(value)
    while pos < end:
        m = _TOKEN.match(value, pos)
        if m is None:  # only trailing white space is left
            break
        pos = m.end()
        atom, quoted, comment, special = m.groups()
        if atom is not None:
            out.append(Token("atom", atom))
        elif quoted is not None:
            out.append(Token("quoted", _QUOTED_PAIR.sub(r"\1", quoted)))
        elif comment is not None:
            pos = _skip_comment(value, pos)
        elif special is not None:
            out.append(Token("special", special))
    return out


def _skip_comment(value: str, pos: int) -> int:
    """The position after the comment whose "(" ends just before pos (nested
    comments count, quoted pairs are skipped, quotes mean nothing)."""
    depth = 1
    end = len(value)
    while pos < end and depth:
        c = value[pos]
        if c == "\\":
            pos += 1
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        pos += 1
    return pos


@dataclass(frozen=True)
class Reading:
    """One reading of a header value: its type (or disposition) and parameters."""

    value: str  # lower case: "multipart/mixed", "multipart", "attachment", ""
    params: tuple[tuple[str, str], ...]  # (attribute, value unquoted), in order


def rfc_readings(value: str) -> list[Reading]:
    """The RFC reading, in up to three forms where words follow a parameter's
    `=`: the first word alone (`"B"x` -> `B`), the words up to the next
    `attribute =`, and the words up to the next `;` (an unquoted
    `boundary=----=_Part_1` is one value, not a value and a parameter)."""
    groups: list[list[Token]] = [[]]
    for t in tokens(value):
        if t.kind == "special" and t.text == ";":
            groups.append([])
        else:
            groups[-1].append(t)
    head = groups[0]
    main = head[0].text.lower() if head and head[0].kind == "atom" else ""
    if main and len(head) >= 3 and head[1].text == "/" and head[2].kind == "atom":
        main += "/" + head[2].text.lower()
    first: list[tuple[str, str]] = []
    to_next: list[tuple[str, str]] = []
    to_end: list[tuple[str, str]] = []
    for group in groups:
        starts = [i for i in range(len(group) - 1) if _is_attribute(group, i)]
        for n, i in enumerate(starts):
            rest = group[i + 2 :]
            # Up to the next `attribute =`, unless that is right here (`=----=x`).
            words = group[i + 2 : starts[n + 1] if n + 1 < len(starts) else len(group)] or rest
            attribute = group[i].text
            first.append((attribute, rest[0].text if rest else ""))
            to_next.append((attribute, "".join(t.text for t in words)))
            to_end.append((attribute, "".join(t.text for t in (rest if n == 0 else words))))
    readings: list[Reading] = []
    for params in (first, to_next, to_end):
        reading = Reading(main, tuple(params))
        if reading not in readings:
            readings.append(reading)
    return readings


def _is_attribute(group: list[Token], i: int) -> bool:
    """An atom followed by "=": a parameter starts at group[i]."""
    after = group[i + 1]
    return group[i].kind == "atom" and after.kind == "special" and after.text == "="


def naive_reading(value: str) -> Reading:
    """Split on ";" outside quotes, then on the first "=" (comments not known)."""
    items: list[str] = []
    cur: list[str] = []
    quoted = escaped = False
    for c in value:
        if escaped:
            escaped = False
        elif c == "\\" and quoted:
            escaped = True
        elif c == '"':
            quoted = not quoted
        elif c == ";" and not quoted:
            items.append("".join(cur))
            cur = []
            continue
        cur.append(c)
    items.append("".join(cur))
    params = []
    for item in items[1:]:
        key, sep, val = item.partition("=")
        if sep:
            params.append((key.strip(), email.utils.unquote(val.strip())))
    return Reading(items[0].strip().lower(), tuple(params))


def readings(value: str) -> tuple[Reading, ...]:
    """Every reading of one header value (common short values are cached:
    `text/plain; charset=utf-8` is read once per process, not per part)."""
    if len(value) > CACHED_VALUE_LENGTH:
        return _readings(value)
    return _cached_readings(value)


def _readings(value: str) -> tuple[Reading, ...]:
    return (*rfc_readings(value), naive_reading(value))


_cached_readings = functools.lru_cache(maxsize=1024)(_readings)


# -- decoding ---------------------------------------------------------------------


def decode_bytes(raw: bytes, charset: str) -> set[str]:
    """raw in charset; where that fails, as UTF-8 (with replacement) and as Latin-1."""
    try:
        return {raw.decode(charset or "utf-8", "replace")}
    except (LookupError, UnicodeError, ValueError):  # unknown, or refuses "replace" (idna)
        return {raw.decode("utf-8", "replace"), raw.decode("latin-1")}


def decode_words(text: str) -> set[str]:
    """text and its RFC 2047 decoding (encoded words also inside quotes, which
    RFC 2047 forbids but clients decode)."""
    if "=?" not in text:
        return {text}
    try:
        chunks = email.header.decode_header(text)
    except (ValueError, LookupError, UnicodeError, email.errors.HeaderParseError):
        return {text}
    out = [""]
    for chunk, charset in chunks:
        pieces = decode_bytes(chunk, charset or "ascii") if isinstance(chunk, bytes) else {chunk}
        out = [done + piece for done in out for piece in sorted(pieces)]
    return {text, *out}


def to_bytes(text: str) -> bytes:
    """Text read from raw bytes (surrogateescape) back to those bytes; any
    other lone surrogate is kept rather than raising."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")


def _percent_decode(value: str) -> bytes:
    data = to_bytes(value)
    out = bytearray()
    i = 0
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


def rfc2231_values(params: Iterable[tuple[str, str]], wanted: frozenset[str]) -> set[str]:
    """`filename*0*=utf-8''a%2E; filename*1=exe` -> {"a.exe"}: the sections of
    each wanted attribute put in order and decoded (by hand, so that a
    parameter a library would drop is still seen). A section given twice
    is read both ways (first wins, last wins), and each first section
    (`name*=`, `name*0=`) alone too."""
    sections: dict[str, list[tuple[int, str, bool]]] = {}
    for key, value in params:
        m = _CONTINUATION.match(key.strip())
        if m is None or m.group(1).lower() not in wanted:
            continue
        items = sections.setdefault(m.group(1).lower(), [])
        if len(items) < MAX_SECTIONS:
            items.append((int(m.group(2) or 0), value, key.strip().endswith("*")))
    out: set[str] = set()
    for items in sections.values():
        first = {index: (value, enc) for index, value, enc in reversed(items)}
        last = {index: (value, enc) for index, value, enc in items}
        for chosen in (first, last):
            out |= _decode_sections([chosen[i] for i in sorted(chosen)])
        for index, value, encoded in items:
            if index == 0:  # a reader that takes this one as the whole value
                out |= _decode_sections([(value, encoded)])
    return out


def _decode_sections(sections: list[tuple[str, bool]]) -> set[str]:
    """Joins (value, is percent-encoded) sections; the first may name a charset."""
    charset = "utf-8"
    raw = b""
    for i, (value, encoded) in enumerate(sections):
        if encoded:
            if i == 0 and value.count("'") >= 2:
                cs, _lang, value = value.split("'", 2)
                charset = cs or charset
            raw += _percent_decode(value)
        else:
            raw += to_bytes(value)
    return decode_bytes(raw, charset)


def _values(reading: Reading, wanted: frozenset[str]) -> set[str]:
    """The wanted attributes' values in one reading, RFC 2231 joined too."""
    found = {v for k, v in reading.params if k.strip().lower() in wanted}
    return found | rfc2231_values(reading.params, wanted)


# -- what a header section says ------------------------------------------------------


def _library(headers: list[tuple[str, str]]) -> Message:
    part = Message()
    for name, value in headers:
        part.set_raw(name, value)
    return part


def file_names(headers: list[tuple[str, str]]) -> set[str]:
    """Every reading of the file names in a part's Content-Type and
    Content-Disposition headers ((name, unfolded value) pairs), decoded."""
    names: set[str] = set()
    for _name, value in headers:
        for reading in readings(value):
            names |= _values(reading, NAME_PARAMS)
        # What a header regexp would see: the text after "name=" up to ";".
        for m in _NAME_IN_TEXT.finditer(value):
            names.add(m.group(1).strip().removesuffix('"').rstrip())
    part = _library(headers)
    for getter in (part.get_filename, lambda: part.get_param("name")):
        try:
            found: object = getter()
            if isinstance(found, tuple):
                found = email.utils.collapse_rfc2231_value(found)
        except Exception:  # a header the library chokes on: the readings above count
            continue
        if isinstance(found, str):
            names.add(found)
    decoded: set[str] = set()
    for name in names:
        decoded |= decode_words(name)
    return {n for n in decoded if n}


def content_types(values: list[str]) -> set[str]:
    """Every reading of the type in Content-Type values: "multipart/mixed",
    "multipart" (no subtype), "text/plain", "" (unreadable)..."""
    return {r.value for value in values for r in readings(value)}


def boundaries(values: list[str]) -> set[str]:
    """Every reading of every boundary parameter in Content-Type values."""
    found: set[str] = set()
    for value in values:
        for reading in readings(value):
            found |= _values(reading, frozenset({"boundary"}))
    try:
        library = _library([("Content-Type", v) for v in values]).get_boundary()
    except Exception:  # a malformed parameter: the readings above count
        library = None
    if library is not None:
        found.add(library)
    # Trailing white space is dropped by the stdlib (and never ends a line's
    # prefix match), so both forms count.
    return found | {b.rstrip() for b in found}
