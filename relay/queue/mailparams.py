"""The envelope parameters a message keeps from MAIL and RCPT to delivery and
to our own DSNs: SMTPUTF8 (RFC 6531), BODY (RFC 6152) and DSN (RFC 3461:
RET, ENVID, NOTIFY, ORCPT).

The SMTP server parses them (relay.smtpd.transaction), the queue stores
them in the envelope trailer (only those given: an envelope without them,
like every queue file written before they existed, reads as "none given"),
delivery passes them to next hops that offer the extension and uses them
in its DSNs. Values are kept decoded (xtext undone) and checked: nothing
that is not printable (or, for utf-8 ORCPTs, valid UTF-8 without
controls) is ever stored.

Pure functions and frozen records; used by relay.smtpd and relay.delivery.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

# RFC 3461 4.4: "the ENVID ... MUST NOT exceed 100 characters"; 4.2: an
# ORCPT's address is at most 500 characters.
MAX_ENVID = 100
MAX_ORCPT = 500

RET_VALUES = frozenset({"FULL", "HDRS"})
NOTIFY_VALUES = frozenset({"NEVER", "SUCCESS", "FAILURE", "DELAY"})
BODY_VALUES = frozenset({"7BIT", "8BITMIME"})

_XTEXT_HEX = re.compile(r"\+([0-9A-Fa-f]{2})")
_UXTEXT_HEX = re.compile(r"\\x\{([0-9A-Fa-f]{1,6})\}")
_ADDR_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,31}")
_PRINTABLE = re.compile(r"[\x20-\x7e]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def xtext_decode(text: str) -> str | None:
    """RFC 3461 xtext ("+" and two hex digits for a byte); None when malformed
    or when the result is not printable ASCII."""
    if not text.isascii() or any(c <= " " or c == "=" or c == "\x7f" for c in text):
        return None
    if text.count("+") != len(_XTEXT_HEX.findall(text)):
        return None  # a "+" without two hex digits
    decoded = _XTEXT_HEX.sub(lambda m: chr(int(m.group(1), 16)), text)
    return decoded if _PRINTABLE.fullmatch(decoded) else None


def xtext_encode(text: str) -> str:
    """The xtext of printable ASCII text ("+", "=" and anything not in
    "!".."~" as +XX)."""
    return "".join(c if "!" <= c <= "~" and c not in "+=" else f"+{ord(c):02X}" for c in text)


def uxtext_decode(text: str) -> str | None:
    """RFC 6533 utf-8-addr-xtext/unitext (\\x{HEX} escapes, raw UTF-8 allowed);
    None when malformed, a surrogate, or a control character."""

    def char(m: re.Match[str]) -> str:
        code = int(m.group(1), 16)
        if code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:
            raise ValueError
        return chr(code)

    if any(c <= " " or c in "+=" or c == "\x7f" for c in text):
        return None
    try:
        decoded = _UXTEXT_HEX.sub(char, text)
    except ValueError:
        return None
    if "\\" in _UXTEXT_HEX.sub("", text) or _CONTROL.search(decoded):
        return None
    try:
        decoded.encode()
    except UnicodeEncodeError:  # surrogate escapes of bytes that were not UTF-8
        return None
    return decoded


def uxtext_encode(text: str) -> str:
    """utf-8-addr-xtext: ASCII as xtext, every other character as \\x{HEX}."""
    return "".join(c if "!" <= c <= "~" and c not in "+=\\" else f"\\x{{{ord(c):X}}}" for c in text)


def unitext_encode(text: str) -> str:
    """utf-8-addr-unitext (RFC 6533 3), for message/global-delivery-status:
    UTF-8 as it is, controls, space, "\\", "+" and "=" as \\x{HEX}."""
    return "".join(
        f"\\x{{{ord(c):X}}}" if c <= " " or c in "+=\\" or _CONTROL.match(c) else c for c in text
    )


def parse_notify(value: str) -> tuple[str, ...] | None:
    """NOTIFY= as its keywords (upper case, in a fixed order); None when
    malformed: empty, unknown keywords, NEVER with others (Postfix's
    dsn_notify_mask)."""
    words = {w.upper() for w in value.split(",")}
    if not words or not words <= NOTIFY_VALUES or ("NEVER" in words and len(words) > 1):
        return None
    return tuple(w for w in ("NEVER", "SUCCESS", "FAILURE", "DELAY") if w in words)


def parse_orcpt(value: str) -> tuple[str, str] | None:
    """ORCPT= as (address type, decoded address); None when malformed."""
    if len(value) > MAX_ORCPT:
        return None
    addr_type, semicolon, coded = value.partition(";")
    if not semicolon or not _ADDR_TYPE.fullmatch(addr_type) or not coded:
        return None
    decode = uxtext_decode if addr_type.lower() == "utf-8" else xtext_decode
    address = decode(coded)
    return None if not address else (addr_type.lower(), address)


def parse_envid(value: str) -> str | None:
    """ENVID= decoded; None when malformed, not printable, or too long."""
    decoded = xtext_decode(value) if value else None
    return decoded if decoded and len(decoded) <= MAX_ENVID else None


@dataclass(frozen=True)
class RecipientParams:
    """One recipient's DSN parameters; empty: not given."""

    notify: tuple[str, ...] = ()  # e.g. ("SUCCESS", "FAILURE"), ("NEVER",)
    orcpt_type: str = ""  # "rfc822", "utf-8", ...
    orcpt: str = ""  # the original recipient, decoded

    @property
    def given(self) -> bool:
        return bool(self.notify or self.orcpt)

    def wants(self, event: str) -> bool:
        """Does this recipient want a DSN on `event` (SUCCESS, FAILURE, DELAY)?
        Without NOTIFY, Postfix's default: failures and delays."""
        if not self.notify:
            return event in ("FAILURE", "DELAY")
        return event in self.notify

    def esmtp(self) -> str:
        """The RCPT parameters for a next hop that offers DSN ("" for none)."""
        out = []
        if self.notify:
            out.append("NOTIFY=" + ",".join(self.notify))
        if self.orcpt:
            encode = uxtext_encode if self.orcpt_type == "utf-8" else xtext_encode
            out.append(f"ORCPT={self.orcpt_type};{encode(self.orcpt)}")
        return " ".join(out)

    def next_hop_esmtp(self, recipient: str) -> str:
        """The RCPT parameters for a next hop that offers DSN, as Postfix's smtp
        client sends them: ORCPT first, then NOTIFY. Without the client's
        ORCPT, Postfix's own: rfc822;<recipient>, xtext-encoded. A UTF-8
        recipient gets utf-8;<utf-8-addr-xtext> (RFC 6533), where Postfix
        3.7 sends rfc822; with the UTF-8 bytes as xtext, which is not an
        rfc822 address and which a strict server (this one) refuses."""
        if self.orcpt:
            orcpt_type, orcpt = self.orcpt_type, self.orcpt
        else:
            orcpt_type, orcpt = ("rfc822" if recipient.isascii() else "utf-8"), recipient
        encode = uxtext_encode if orcpt_type == "utf-8" else xtext_encode
        out = [f"ORCPT={orcpt_type};{encode(orcpt)}"]
        if self.notify:
            out.append("NOTIFY=" + ",".join(self.notify))
        return " ".join(out)

    def original_recipient(self, *, unitext: bool = False) -> str:
        """The DSN's Original-Recipient value ("" without ORCPT); `unitext`:
        a utf-8 ORCPT in the form of message/global-delivery-status."""
        if not self.orcpt:
            return ""
        if self.orcpt_type == "utf-8":
            return f"utf-8;{(unitext_encode if unitext else uxtext_encode)(self.orcpt)}"
        return f"{self.orcpt_type};{self.orcpt}"


@dataclass(frozen=True)
class MailParams:
    """A message's MAIL parameters and its recipients' RCPT parameters."""

    smtputf8: bool = False  # MAIL ... SMTPUTF8
    body: str = ""  # "7BIT", "8BITMIME", or "" (not declared)
    ret: str = ""  # "FULL", "HDRS", or "" (not given)
    envid: str = ""  # decoded
    recipients: dict[str, RecipientParams] = field(default_factory=dict)

    def recipient(self, address: str) -> RecipientParams:
        return self.recipients.get(address, NO_RECIPIENT_PARAMS)

    def only(self, addresses: list[str]) -> MailParams:
        """The same parameters for these recipients only (after a milter's edits)."""
        kept = {a: p for a, p in self.recipients.items() if a in addresses}
        if len(kept) == len(self.recipients):
            return self
        return MailParams(self.smtputf8, self.body, self.ret, self.envid, kept)

    def to_dict(self) -> dict[str, Any]:
        """The queue trailer's "params" (only what was given; {} for none)."""
        d: dict[str, Any] = {}
        if self.smtputf8:
            d["smtputf8"] = True
        for key in ("body", "ret", "envid"):
            if getattr(self, key):
                d[key] = getattr(self, key)
        rcpts: dict[str, dict[str, list[str]]] = {}
        for address, p in self.recipients.items():
            one = rcpts[address] = {}
            if p.notify:
                one["notify"] = list(p.notify)
            if p.orcpt:
                one["orcpt"] = [p.orcpt_type, p.orcpt]
            if not one:
                del rcpts[address]
        if rcpts:
            d["rcpt"] = rcpts
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> MailParams:
        """Reads to_dict()'s output; ValueError for anything else."""
        if not d:
            return NO_PARAMS
        try:
            rcpts = {}
            for address, p in dict(d.get("rcpt", {})).items():
                notify = tuple(str(w) for w in p.get("notify", ()))
                orcpt_type, orcpt = p.get("orcpt", ["", ""])
                rcpts[str(address)] = RecipientParams(notify, str(orcpt_type), str(orcpt))
        except (TypeError, AttributeError, ValueError) as e:
            raise ValueError(f"bad params: {e}") from None
        params = cls(
            smtputf8=bool(d.get("smtputf8", False)),
            body=str(d.get("body", "")),
            ret=str(d.get("ret", "")),
            envid=str(d.get("envid", "")),
            recipients=rcpts,
        )
        params.check()
        return params

    def check(self) -> None:
        """ValueError unless every value is one the SMTP server would have
        queued: what a damaged file or a handover peer sends never reaches
        a command line or a DSN."""
        if self.body not in {"", *BODY_VALUES} or self.ret not in {"", *RET_VALUES}:
            raise ValueError("bad BODY or RET")
        if self.envid and parse_envid(xtext_encode(self.envid)) != self.envid:
            raise ValueError("bad ENVID")
        for p in self.recipients.values():
            if p.notify and parse_notify(",".join(p.notify)) != p.notify:
                raise ValueError("bad NOTIFY")
            if p.orcpt:
                encode = uxtext_encode if p.orcpt_type == "utf-8" else xtext_encode
                if parse_orcpt(f"{p.orcpt_type};{encode(p.orcpt)}") != (p.orcpt_type, p.orcpt):
                    raise ValueError("bad ORCPT")

    def esmtp_mail(self) -> str:
        """RET= and ENVID= for a next hop that offers DSN ("" for none)."""
        out = []
        if self.ret:
            out.append(f"RET={self.ret}")
        if self.envid:
            out.append(f"ENVID={xtext_encode(self.envid)}")
        return " ".join(out)


NO_RECIPIENT_PARAMS = RecipientParams()
NO_PARAMS = MailParams()
