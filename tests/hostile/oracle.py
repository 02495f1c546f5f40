"""The second opinion: the stdlib's `email` package with `email.policy.default`
(its RFC 2045/2231 header parser, not compat32's), as a recipient's MIME
parser. It decides whether a recipient would see a file with a blocked
extension; the filter must reject every message where it does."""

from __future__ import annotations

import contextlib
import email.parser
import email.policy

BLOCKED = frozenset({"bat", "com", "exe", "jar", "pif", "scr", "swf"})


def blocked(name: object, extensions: frozenset[str] = BLOCKED) -> bool:
    """A Windows reading of the name: trailing dots, spaces and NULs dropped."""
    if not isinstance(name, str):
        return False
    base = name.replace("\\", "/").rsplit("/", 1)[-1].strip().rstrip(". \x00").lower()
    return "." in base and base.rsplit(".", 1)[1] in extensions


def email_sees_blocked(data: bytes, extensions: frozenset[str] = BLOCKED) -> bool:
    """True if some part, as email.policy.default parses the message, is named
    with a blocked extension (filename, or the Content-Type name, any header).
    A name the parser cannot decode counts as not seen here."""
    msg = email.parser.BytesParser(policy=email.policy.default).parsebytes(data)
    for part in msg.walk():
        names: list[object] = []
        with contextlib.suppress(LookupError, UnicodeError):  # idna: the parser gives up
            names.append(part.get_filename())
        for header, param in (("content-type", "name"), ("content-disposition", "filename")):
            for value in part.get_all(header, []) or []:
                with contextlib.suppress(LookupError, UnicodeError):
                    names.append(getattr(value, "params", {}).get(param))
        if any(blocked(n, extensions) for n in names):
            return True
    return False
