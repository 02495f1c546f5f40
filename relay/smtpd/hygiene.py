"""Hostile input at the SMTP door: what a client sends is checked or made safe
where it comes in, so no later stage (headers we prepend, log lines, the
queue, delivery) ever sees bytes it cannot write.

- command lines must be UTF-8 (Postfix with smtputf8_enable=yes:
  `500 5.5.2 Error: bad UTF-8 syntax`), so no undecodable byte reaches an
  envelope and fails every later delivery attempt;
- text we write into a header or a log line goes through `printable()`
  (Postfix's printable(): anything but printable ASCII becomes "?"), so a
  bare CR in a HELO cannot become a header line of the client's choosing;
- numbers from the client are ASCII digits only (`"²".isdigit()` is true);
- Postfix's error counting: smtpd_soft_error_limit / smtpd_error_sleep_time
  slow a client down, smtpd_junk_command_limit makes NOOP/VRFY/ETRN/RSET
  floods count as errors (the hard limit is limits.errorsPerSession).
"""

from __future__ import annotations

import re

SOFT_ERROR_LIMIT = 10  # Postfix smtpd_soft_error_limit
ERROR_SLEEP = 1.0  # Postfix smtpd_error_sleep_time, seconds
JUNK_COMMAND_LIMIT = 100  # Postfix smtpd_junk_command_limit
JUNK_COMMANDS = frozenset({"NOOP", "VRFY", "ETRN", "RSET"})
# A number longer than this is bigger than any limit we have: no int() of
# an arbitrarily long string.
MAX_DIGITS = 18

_NOT_PRINTABLE = re.compile(r"[^\x20-\x7e]")
_UNSAFE_IN_HEADER = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # controls but TAB


def decode_command(line: bytes) -> str | None:
    """The command line as text; None when it is not UTF-8."""
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError:
        return None


def printable(text: str, limit: int = 255) -> str:
    """Client-supplied text made safe for a header or a log line."""
    text = text[:limit]
    if text.isascii() and text.isprintable():  # the common case, without the regex
        return text
    return _NOT_PRINTABLE.sub("?", text)


def header_safe(line: str) -> str:
    """One header line (no CRLF) with any CR, LF or other control turned into
    "?": the last guard before a header we build is written to the queue."""
    return _UNSAFE_IN_HEADER.sub("?", line)


def ascii_number(text: str) -> int | None:
    """A decimal number of ASCII digits; None for anything else."""
    if not (text.isascii() and text.isdigit()):
        return None
    if len(text) > MAX_DIGITS:
        return 10**MAX_DIGITS
    return int(text)


def junk_is_error(junk_before: int) -> bool:
    """Postfix smtpd.c: a junk command counts as an error once more than
    smtpd_junk_command_limit came before it (so the 102nd NOOP is the first)."""
    return junk_before > JUNK_COMMAND_LIMIT
