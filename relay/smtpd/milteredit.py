"""Milter modifications applied to a received message and its envelope.

At end of message each milter may have asked to add, insert, change or
delete headers, replace the body, add or delete recipients and change the
sender (relay.smtpd.milter.Modifications). They are applied in milter
order, each milter's in the order it sent them, as Postfix's cleanup does.

The message is copied, never held: the header section is read (it is
bounded: HEADER_SECTION_LIMIT), edited, written, then the body is copied in
chunks from the original or from the milter's spooled replacement. These
functions do blocking file I/O: the session runs them in the queue's I/O
thread.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import IO

from relay.smtpd.milter import HeaderEdit, Modifications

COPY_CHUNK = 256 * 1024
# A header section longer than this is copied unedited past this point (as
# body): Postfix stops header processing at header_size_limit too.
HEADER_SECTION_LIMIT = 1024 * 1024


def split_headers(section: bytes) -> list[bytes]:
    """A header section (without the blank line) as raw headers, each with
    its folded lines and final CRLF."""
    headers: list[bytes] = []
    for line in section.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and headers:
            headers[-1] += line
        else:
            headers.append(line)
    return headers


def _name(header: bytes) -> bytes:
    return header.split(b":", 1)[0].strip().lower()


def _render(edit: HeaderEdit, leading_space: bool) -> bytes:
    """A milter's header as message bytes: its "\\n" folds become CRLF, and a
    space after the colon unless the milter negotiated SMFIP_HDR_LEADSPC."""
    value = edit.value.encode("utf-8", "surrogateescape")
    value = value.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    space = b"" if leading_space else b" "
    return edit.name.encode("utf-8", "surrogateescape") + b":" + space + value + b"\r\n"


def edit_headers(headers: list[bytes], edits: Iterable[HeaderEdit], leading_space: bool) -> None:
    """Applies header edits in place (smfi_addheader, insheader, chgheader)."""
    for edit in edits:
        if edit.kind == "add":
            headers.append(_render(edit, leading_space))
        elif edit.kind == "insert":
            headers.insert(min(edit.index, len(headers)), _render(edit, leading_space))
        else:  # change: the index-th header of that name (1-based); "" deletes it
            wanted = edit.name.encode("utf-8", "surrogateescape").lower()
            positions = [i for i, h in enumerate(headers) if _name(h) == wanted]
            n = max(edit.index, 1)
            if n <= len(positions):
                if edit.value:
                    headers[positions[n - 1]] = _render(edit, leading_space)
                else:
                    del headers[positions[n - 1]]
            elif edit.value:  # no such header: sendmail and Postfix add it
                headers.append(_render(edit, leading_space))


def read_header_section(src: IO[bytes]) -> tuple[bytes, bytes]:
    """(header section without its blank line, what was read past it)."""
    data = b""
    while len(data) < HEADER_SECTION_LIMIT:
        chunk = src.read(COPY_CHUNK)
        if not chunk:
            break
        data += chunk
        end = data.find(b"\r\n\r\n")
        if data.startswith(b"\r\n"):
            return b"", data[2:]
        if end >= 0:
            return data[: end + 2], data[end + 4 :]
    if len(data) >= HEADER_SECTION_LIMIT:
        return b"", data  # no header section we can edit: the whole is copied as is
    return data, b""


def edited_head(section: bytes, modifications: list[Modifications]) -> bytes:
    """The header section with every milter's edits, and the blank line after it."""
    headers = split_headers(section)
    for mods in modifications:
        edit_headers(headers, mods.header_edits, mods.leading_space)
    return b"".join(headers) + b"\r\n"


def replacement_body(modifications: list[Modifications]) -> IO[bytes] | None:
    """The body a milter sent instead of the message's (the last one's wins)."""
    bodies = [mods.new_body for mods in modifications if mods.new_body is not None]
    return bodies[-1] if bodies else None


def rewrite_message(
    src: IO[bytes], write: Callable[[bytes], None], modifications: list[Modifications]
) -> None:
    """Copies the message from src through write, with the modifications applied."""
    section, rest = read_header_section(src)
    write(edited_head(section, modifications))
    replacement = replacement_body(modifications)
    if replacement is not None:
        replacement.seek(0)
        src, rest = replacement, b""
    if rest:
        write(rest)
    while chunk := src.read(COPY_CHUNK):
        write(chunk)


def edit_envelope(
    sender: str, recipients: list[str], modifications: list[Modifications]
) -> tuple[str, list[str]]:
    """(sender, recipients) after smfi_chgfrom, smfi_addrcpt and smfi_delrcpt."""
    result = list(recipients)
    for mods in modifications:
        if mods.new_sender is not None:
            sender = _bare(mods.new_sender)
        for r in mods.delete_recipients:
            gone = _bare(r).lower()
            result = [x for x in result if x.lower() != gone]
        for r in mods.add_recipients:
            if _bare(r).lower() not in (x.lower() for x in result):
                result.append(_bare(r))
    return sender, result


def _bare(address: str) -> str:
    """A milter's "<a@b>" or "a@b" as the envelope stores it."""
    address = address.strip()
    return address[1:-1] if address.startswith("<") and address.endswith(">") else address


def modified(modifications: list[Modifications]) -> bool:
    """Whether the message content (not only its envelope) changes."""
    return any(mods.header_edits or mods.new_body is not None for mods in modifications)
