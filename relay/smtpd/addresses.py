"""SMTP envelope addresses: parsing MAIL FROM / RCPT TO paths, and Postfix's
routed-address rule.

A small hand-written parser instead of the `email` header parser aiosmtpd
uses: it is faster (it runs for every MAIL and RCPT), it keeps what the
client sent (source routes, quotes) so the relay decision can see it, and it
refuses what must never reach the queue or the next hop (CR, LF, NUL, other
controls, unbalanced quotes or brackets).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Postfix resolve.c: an address is "routed" when the first of these is not
# followed by exactly the recipient domain.
ROUTING_CHARACTERS = "@!%"

# RFC 5321 limits the path to 256 octets; Postfix is lenient. We allow more,
# but bound it so a client cannot make us hold huge addresses.
MAX_ADDRESS_LENGTH = 1000

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_CONTROL_BUT_TAB = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_LOCAL_SPECIAL = re.compile(r"[ \\<>()\[\],;:]")  # not allowed unquoted in a local part


class AddressError(ValueError):
    """The text is not a syntactically valid SMTP path."""


@dataclass(frozen=True)
class Address:
    """One envelope address as the client sent it.

    `text` is the mailbox without angle brackets and without a source route
    (what goes into the queue and the logs); `local` is the local part with
    its quotes removed; `domain` is "" when the address has none. `route` is
    the RFC 821 source route (`@a,@b`) that was in front of it, if any.
    """

    text: str
    local: str
    domain: str
    route: str = ""
    quoted: bool = False

    @property
    def is_null(self) -> bool:
        return self.text == ""

    @property
    def domain_key(self) -> str:
        """The domain as the configuration stores it: lowercase, no trailing dot."""
        return self.domain.lower().rstrip(".")

    @property
    def lookup_key(self) -> str:
        """local@domain lowercased, as the recipient tables store it."""
        return f"{self.local}@{self.domain_key}".lower()

    @property
    def original(self) -> str:
        """The path as the client wrote it (inside the brackets)."""
        return f"{self.route}:{self.text}" if self.route else self.text


def _split_path(arg: str) -> tuple[str, str]:
    """'<path> params' or 'path params' -> (path without brackets, params)."""
    arg = arg.lstrip(" \t")
    if arg.startswith("<") and '"' not in arg:  # no quotes: the first ">" ends it
        end = arg.find(">")
        if end < 0:
            raise AddressError("missing '>'")
        return arg[1:end], arg[end + 1 :].strip(" \t")
    if arg.startswith("<"):
        in_quotes = False
        i = 1
        while i < len(arg):
            c = arg[i]
            if c == "\\" and in_quotes:
                i += 2
                continue
            if c == '"':
                in_quotes = not in_quotes
            elif c == ">" and not in_quotes:
                return arg[1:i], arg[i + 1 :].strip(" \t")
            i += 1
        raise AddressError("missing '>'")
    # Postfix accepts an address without brackets (smtpd_strict_rfc821_envelope=no).
    path, _, params = arg.partition(" ")
    return path, params.strip(" \t")


def _check_characters(text: str) -> None:
    if _CONTROL.search(text):
        raise AddressError("control character in address")


def _last_at_outside_quotes(mailbox: str) -> int:
    if '"' not in mailbox:  # the common case: no quotes, no escapes
        return mailbox.rfind("@")
    at = -1
    in_quotes = False
    i = 0
    while i < len(mailbox):
        c = mailbox[i]
        if in_quotes and c == "\\":
            i += 2
            continue
        if c == '"':
            in_quotes = not in_quotes
        elif c == "@" and not in_quotes:
            at = i
        i += 1
    if in_quotes:
        raise AddressError("unbalanced quotes")
    return at


def _dequote_local(local: str) -> tuple[str, bool]:
    """Removes quotes and backslash escapes; refuses specials outside quotes.
    An unquoted @ stays allowed: `a@b@c` is a routed address, not a syntax error."""
    if '"' not in local:  # the common case, without the character loop
        special = _LOCAL_SPECIAL.search(local)
        if special is not None:
            raise AddressError(f"bad character {special.group()!r} in local part")
        return local, False
    out: list[str] = []
    in_quotes = False
    quoted = False
    i = 0
    while i < len(local):
        c = local[i]
        if in_quotes:
            if c == "\\" and i + 1 < len(local):
                out.append(local[i + 1])
                i += 2
                continue
            if c == '"':
                in_quotes = False
            else:
                out.append(c)
        elif c == '"':
            in_quotes = quoted = True
        elif c in " \\<>()[],;:":
            raise AddressError(f"bad character {c!r} in local part")
        else:
            out.append(c)
        i += 1
    return "".join(out), quoted


def _split_mailbox(mailbox: str) -> tuple[str, str, bool]:
    """'local@domain' -> (dequoted local, domain, quoted); the domain is after
    the last @ outside quotes."""
    at = _last_at_outside_quotes(mailbox)
    if at < 0:
        local, quoted = _dequote_local(mailbox)
        return local, "", quoted
    local, quoted = _dequote_local(mailbox[:at])
    domain = mailbox[at + 1 :]
    if not domain:
        raise AddressError("empty domain")
    if domain.startswith("["):
        if not domain.endswith("]") or any(c in domain[1:-1] for c in ' []\\"'):
            raise AddressError("bad address literal")
    elif any(c in domain for c in ' "\\<>()[],;:@'):
        raise AddressError("bad character in domain")
    return local, domain, quoted


def parse_path(arg: str) -> tuple[Address, str]:
    """Parses the argument of MAIL FROM:/RCPT TO: (after the colon).

    Returns the address and the ESMTP parameters text. Raises AddressError.
    """
    path, params = _split_path(arg)
    if len(path) > MAX_ADDRESS_LENGTH:
        raise AddressError("address too long")
    _check_characters(path)
    route = ""
    if path.startswith("@"):
        # RFC 821 source route "@a,@b:user@c": kept so the relay decision can
        # refuse it (aiosmtpd silently drops it).
        route, colon, path = path.partition(":")
        if not colon:
            raise AddressError("bad source route")
    if path == "":
        if route:
            raise AddressError("source route without mailbox")
        return Address("", "", ""), params
    local, domain, quoted = _split_mailbox(path)
    if local == "" and not quoted:
        raise AddressError("empty local part")
    return Address(path, local, domain, route, quoted), params


def is_routed(address: Address) -> bool:
    """Postfix's sender-specified routing test (resolve.c), with
    resolve_dequoted_address=yes and allow_untrusted_routing=no: the address
    is routed when the first of @ ! % is not followed by exactly the domain.
    A source route, a missing domain and an @ % ! inside a quoted local part
    all count as routing, so none of them can make us an open relay.
    """
    if address.route:
        return True
    if not address.domain:
        return True
    dequoted = f"{address.local}@{address.domain}"
    first = min(i for i in (dequoted.find(c) for c in ROUTING_CHARACTERS) if i >= 0)
    return dequoted[first + 1 :] != address.domain


def is_ip_literal(domain: str) -> bool:
    return domain.startswith("[")


def is_fqdn(domain: str) -> bool:
    """Postfix reject_non_fqdn_*: a valid hostname with at least one dot."""
    name = domain.rstrip(".")
    if "." not in name:
        return False
    labels = name.split(".")
    for label in labels:
        if not label or len(label) > 63:
            return False
        if label.startswith("-") or label.endswith("-"):
            return False
        if not all(c.isalnum() or c in "-_" for c in label) or not label.isascii():
            return False
    return not labels[-1].isdigit()


def esmtp_param_items(params: str) -> list[tuple[str, str, str]] | None:
    """'SIZE=123 RET=' -> [('SIZE', '123', 'SIZE=123'), ('RET', '', 'RET=')]:
    (upper-case keyword, value, the parameter as sent), in order, repeats
    kept; None if malformed (a keyword that is not esmtp-keyword syntax)."""
    if _CONTROL_BUT_TAB.search(params):
        return None  # str.split() would take CR, FF, \x1c.. for spaces
    out = []
    for item in params.split():
        key, _, value = item.partition("=")
        if not key or not (key.isascii() and key.replace("-", "").isalnum()):
            return None
        out.append((key.upper(), value, item))
    return out
