"""The Sendmail milter protocol, version 6, as Postfix's smtpd speaks it: one
connection to one milter for one SMTP session.

Wire format: every packet is a 4-byte big-endian length (counting the command
byte), a command byte and its data; strings are NUL-terminated. The MTA
offers the actions and protocol steps it supports in OPTNEG; the milter
answers with the subset it wants (and, in version 6, the macros it wants per
stage). Each event then waits for one reply, unless the milter asked not to
send one (SMFIP_NR_*) or asked not to get the event at all (SMFIP_NO*).

A `MilterConnection` never raises for what the milter does: a refused
connection, a timeout, a closed socket or a malformed packet all become
`MilterError`, which relay.smtpd.milters turns into the milter's
defaultAction. Replies never wait longer than the command timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import tempfile
from dataclasses import dataclass, field
from enum import StrEnum

MILTER_VERSION = 6
BODY_CHUNK = 65535  # libmilter's MILTER_CHUNK_SIZE: the largest SMFIC_BODY
SPOOL_BYTES = 256 * 1024  # a replacement body beyond this goes to a temporary file
# Packets without a reply are written together up to this much (a body chunk alone).
FLUSH_BYTES = 64 * 1024
MAX_PACKET = 64 * 1024 * 1024  # a milter answer beyond this is garbage, not mail

# MTA -> milter commands (SMFIC_*)
ABORT = b"A"
BODY = b"B"
CONNECT = b"C"
MACRO = b"D"
BODYEOB = b"E"
HELO = b"H"
HEADER = b"L"
MAIL = b"M"
EOH = b"N"
OPTNEG = b"O"
QUIT = b"Q"
RCPT = b"R"
DATA = b"T"
QUIT_NC = b"K"  # quit, but a new session follows on this connection

# milter -> MTA replies (SMFIR_*)
R_ADDRCPT = b"+"
R_DELRCPT = b"-"
R_ADDRCPT_PAR = b"2"
R_SHUTDOWN = b"4"
R_ACCEPT = b"a"
R_REPLBODY = b"b"
R_CONTINUE = b"c"
R_DISCARD = b"d"
R_CHGFROM = b"e"
R_CONN_FAIL = b"f"
R_ADDHEADER = b"h"
R_INSHEADER = b"i"
R_SETSYMLIST = b"l"
R_CHGHEADER = b"m"
R_PROGRESS = b"p"
R_QUARANTINE = b"q"
R_REJECT = b"r"
R_SKIP = b"s"
R_TEMPFAIL = b"t"
R_REPLYCODE = b"y"
R_OPTNEG = b"O"

# Actions the MTA lets the milter take (SMFIF_*): all of version 6.
F_ADDHDRS = 0x01
F_CHGBODY = 0x02
F_ADDRCPT = 0x04
F_DELRCPT = 0x08
F_CHGHDRS = 0x10
F_QUARANTINE = 0x20
F_CHGFROM = 0x40
F_ADDRCPT_PAR = 0x80
F_SETSYMLIST = 0x100
OFFERED_ACTIONS = 0x1FF

# Protocol steps (SMFIP_*).
P_NOCONNECT = 0x01
P_NOHELO = 0x02
P_NOMAIL = 0x04
P_NORCPT = 0x08
P_NOBODY = 0x10
P_NOHDRS = 0x20
P_NOEOH = 0x40
P_NR_HDR = 0x80
P_NOUNKNOWN = 0x100
P_NODATA = 0x200
P_SKIP = 0x400
P_RCPT_REJ = 0x800
P_NR_CONN = 0x1000
P_NR_HELO = 0x2000
P_NR_MAIL = 0x4000
P_NR_RCPT = 0x8000
P_NR_DATA = 0x10000
P_NR_UNKN = 0x20000
P_NR_EOH = 0x40000
P_NR_BODY = 0x80000
P_HDR_LEADSPC = 0x100000
# Everything but RCPT_REJ (we never send rejected recipients to milters).
OFFERED_PROTOCOL = 0x1FFFFF & ~P_RCPT_REJ

# Per event: the SMFIP_NO* flag that suppresses it and the SMFIP_NR_* flag
# that suppresses its reply.
EVENT_FLAGS: dict[bytes, tuple[int, int]] = {
    CONNECT: (P_NOCONNECT, P_NR_CONN),
    HELO: (P_NOHELO, P_NR_HELO),
    MAIL: (P_NOMAIL, P_NR_MAIL),
    RCPT: (P_NORCPT, P_NR_RCPT),
    DATA: (P_NODATA, P_NR_DATA),
    HEADER: (P_NOHDRS, P_NR_HDR),
    EOH: (P_NOEOH, P_NR_EOH),
    BODY: (P_NOBODY, P_NR_BODY),
}

# SMFIR_SETSYMLIST stages (SMFIM_*) -> the command whose macros they set.
SYMLIST_STAGES = {0: CONNECT, 1: HELO, 2: MAIL, 3: RCPT, 4: DATA, 5: BODYEOB, 6: EOH}


class MilterError(Exception):
    """The milter is unreachable, too slow or broke the protocol."""


class Verdict(StrEnum):
    """What a milter decided for one event."""

    CONTINUE = "continue"
    ACCEPT = "accept"  # no more events for this connection / message
    REJECT = "reject"
    TEMPFAIL = "tempfail"
    DISCARD = "discard"
    REPLY = "reply"  # SMFIR_REPLYCODE: the milter's own SMTP reply
    SKIP = "skip"  # no more body chunks


@dataclass(frozen=True)
class Answer:
    verdict: Verdict
    reply_text: str = ""  # for REPLY: "550 5.7.1 text" (lines joined by CRLF)


# What an event the milter asked no reply for (SMFIP_NR_*), or not to get at
# all (SMFIP_NO*), "answers": there is no answer to time or count
# (relay.smtpd.milters checks for this very object).
NO_REPLY = Answer(Verdict.CONTINUE)


@dataclass
class Modifications:
    """What a milter asked to change at end of message, in the order it asked."""

    header_edits: list[HeaderEdit] = field(default_factory=list)
    add_recipients: list[str] = field(default_factory=list)
    delete_recipients: list[str] = field(default_factory=list)
    new_sender: str | None = None
    new_sender_args: str = ""
    # A replacement body (SMFIR_REPLBODY), spooled: on disk beyond 256 KiB.
    new_body: tempfile.SpooledTemporaryFile[bytes] | None = None
    quarantine: str | None = None  # the reason, when the milter asked to hold the message
    leading_space: bool = False  # SMFIP_HDR_LEADSPC: header values come with their space

    def close(self) -> None:
        if self.new_body is not None:
            self.new_body.close()


@dataclass(frozen=True)
class HeaderEdit:
    """add (index None, append), insert (index: 0 = first), change (index: the
    n-th header of that name, 1-based; an empty value deletes it)."""

    kind: str  # add | insert | change
    name: str
    value: str
    index: int = 0


def _cstrings(data: bytes) -> list[str]:
    """The NUL-terminated strings of a packet (any bytes round-trip: surrogateescape)."""
    if not data.endswith(b"\0"):
        raise MilterError("string argument without NUL")
    return [s.decode("utf-8", "surrogateescape") for s in data[:-1].split(b"\0")]


def _cstr(*parts: str) -> bytes:
    return b"".join(p.encode("utf-8", "surrogateescape") + b"\0" for p in parts)


def parse_address(address: str) -> tuple[str, str | int]:
    """A Postfix milter address -> (host, port), or ("unix", path).

    inet:host:port, inet:[::1]:port, inet:port@host or unix:/path."""
    kind, _, rest = address.partition(":")
    if kind == "unix" and rest:
        return "unix", rest
    if kind in ("inet", "inet6") and ":" in rest:
        host, _, port = rest.rpartition(":")
        # Postfix also accepts "inet:port@host".
        return host.strip("[]"), int(port)
    if kind == "inet" and "@" in rest:
        port, _, host = rest.partition("@")
        return host, int(port)
    raise ValueError(f"milter address {address!r}: expected inet:host:port or unix:/path")


class MilterConnection:
    """One session's conversation with one milter."""

    def __init__(self, address: str, connect_timeout: float, command_timeout: float) -> None:
        self.address = address
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.protocol = 0  # steps the milter chose, after negotiate()
        self.actions = 0
        # command -> the macro names it wants, without braces ("{mail_addr}": "mail_addr")
        self.symlists: dict[bytes, frozenset[str]] = {}
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        # Packets not written yet: macros and the events the milter sends no
        # reply to (SMFIP_NR_*) go out with the next packet that needs one.
        self._pending = b""

    # --- connection ---------------------------------------------------------
    async def open(self) -> None:
        """Connects and negotiates, within the connect timeout."""
        try:
            async with asyncio.timeout(self.connect_timeout):  # no task, unlike wait_for
                await self._open()
        except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError) as e:
            self.close()
            raise MilterError(f"{self.address}: {str(e) or type(e).__name__}") from e

    async def _open(self) -> None:
        host, port = parse_address(self.address)
        if host == "unix":
            self._reader, self._writer = await asyncio.open_unix_connection(str(port))
        else:
            self._reader, self._writer = await asyncio.open_connection(host, int(port))
        self._send(OPTNEG, struct.pack("!III", MILTER_VERSION, OFFERED_ACTIONS, OFFERED_PROTOCOL))
        command, data = await self._read()
        self._negotiated(command, data)

    def _negotiated(self, command: bytes, data: bytes) -> None:
        if command != R_OPTNEG or len(data) < 12:
            raise MilterError(f"{self.address}: bad option negotiation reply {command!r}")
        version, actions, protocol = struct.unpack("!III", data[:12])
        if version < 2 or version > MILTER_VERSION:
            raise MilterError(f"{self.address}: protocol version {version} not supported")
        if actions & ~OFFERED_ACTIONS or protocol & ~OFFERED_PROTOCOL:
            raise MilterError(f"{self.address}: asked for actions or steps not offered")
        self.actions, self.protocol = actions, protocol
        if version < 4:  # before version 4 there was no SMFIC_DATA (Postfix skips it too)
            self.protocol |= P_NODATA | P_NOUNKNOWN
        rest = data[12:]
        while len(rest) >= 5:  # SMFIR_SETSYMLIST pairs: stage, macro names
            (stage,) = struct.unpack("!I", rest[:4])
            names, _, rest = rest[4:].partition(b"\0")
            if stage in SYMLIST_STAGES:
                wanted = names.decode("latin-1").split()
                self.symlists[SYMLIST_STAGES[stage]] = frozenset(n.strip("{}") for n in wanted)

    def close(self) -> None:
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.close()
        self._writer = self._reader = None

    def quit(self) -> None:
        """SMFIC_QUIT, then close: never waits for the milter."""
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._send(QUIT, b"")
        self.close()

    # --- events -----------------------------------------------------------------
    def wants(self, event: bytes) -> bool:
        flags = EVENT_FLAGS.get(event)
        return flags is None or not self.protocol & flags[0]

    def send_macros(self, event: bytes, macros: dict[str, str]) -> None:
        """SMFIC_MACRO for the event: those the milter asked for, else all."""
        wanted = self.symlists.get(event)
        if wanted is not None:
            macros = {k: v for k, v in macros.items() if k.strip("{}") in wanted}
        if macros:
            pairs = _cstr(*(x for kv in macros.items() for x in kv))
            self._pending += _packet(MACRO, event + pairs)

    async def event(self, event: bytes, data: bytes) -> Answer:
        """Sends one event; its answer (NO_REPLY when the milter sends none)."""
        if not self.wants(event):
            return NO_REPLY  # not sent: nothing answered
        flags = EVENT_FLAGS.get(event)
        if flags is not None and self.protocol & flags[1]:
            # No reply to wait for: the packet waits for the next write (rspamd
            # asks for no reply to anything but the end of the message), or goes
            # now with what is pending once that is FLUSH_BYTES.
            if self._writer is None:
                raise MilterError(f"{self.address}: not connected")
            self._pending += _packet(event, data)
            if len(self._pending) >= FLUSH_BYTES:
                self._writer.write(self._pending)
                self._pending = b""
                await self._drain()
            return NO_REPLY
        self._send(event, data)
        return await self._answer()

    async def abort(self) -> None:
        """SMFIC_ABORT: the message ends here (RSET, a reject); no reply."""
        self._send(ABORT, b"")
        await self._drain()

    async def end_of_message(self, body_tail: bytes = b"") -> tuple[Answer, Modifications]:
        """SMFIC_BODYEOB; the modifications the milter sends before its answer."""
        self._send(BODYEOB, body_tail)
        edits = Modifications(leading_space=bool(self.protocol & P_HDR_LEADSPC))
        while True:
            command, data = await self._read_reply()
            try:
                if not await self._modification(command, data, edits):
                    return self._verdict(command, data), edits
            except BaseException:
                edits.close()
                raise

    async def _modification(self, command: bytes, data: bytes, edits: Modifications) -> bool:
        """Records one modification; False when the packet is a verdict."""
        if command in (R_ADDHEADER, R_INSHEADER, R_CHGHEADER):
            self._allowed(F_ADDHDRS if command != R_CHGHEADER else F_CHGHDRS, command)
            index = 0
            if command != R_ADDHEADER:
                if len(data) < 4:
                    raise MilterError(f"{self.address}: short header edit")
                (index,) = struct.unpack("!I", data[:4])
                data = data[4:]
            name, value = [*_cstrings(data), ""][:2]
            kind = {R_ADDHEADER: "add", R_INSHEADER: "insert", R_CHGHEADER: "change"}[command]
            edits.header_edits.append(HeaderEdit(kind, name, value, index))
        elif command in (R_ADDRCPT, R_ADDRCPT_PAR):
            self._allowed(F_ADDRCPT if command == R_ADDRCPT else F_ADDRCPT_PAR, command)
            edits.add_recipients.append(_cstrings(data)[0])
        elif command == R_DELRCPT:
            self._allowed(F_DELRCPT, command)
            edits.delete_recipients.append(_cstrings(data)[0])
        elif command == R_CHGFROM:
            self._allowed(F_CHGFROM, command)
            args = _cstrings(data)
            edits.new_sender, edits.new_sender_args = args[0], " ".join(args[1:])
        elif command == R_REPLBODY:
            self._allowed(F_CHGBODY, command)
            if edits.new_body is None:
                # Closed by Modifications.close, once applied or refused.
                edits.new_body = tempfile.SpooledTemporaryFile(SPOOL_BYTES)  # noqa: SIM115
            await asyncio.to_thread(edits.new_body.write, data)
        elif command == R_QUARANTINE:
            self._allowed(F_QUARANTINE, command)
            edits.quarantine = _cstrings(data)[0] or "quarantined by milter"
        else:
            return False
        return True

    def _allowed(self, flag: int, command: bytes) -> None:
        if not self.actions & flag:
            raise MilterError(f"{self.address}: modification {command!r} not negotiated")

    # --- packets ------------------------------------------------------------------
    def _send(self, command: bytes, data: bytes) -> None:
        if self._writer is None:
            raise MilterError(f"{self.address}: not connected")
        self._writer.write(self._pending + _packet(command, data))
        self._pending = b""

    async def _drain(self) -> None:
        assert self._writer is not None
        try:
            async with asyncio.timeout(self.command_timeout):
                await self._drain_writer()
        except (OSError, TimeoutError) as e:
            raise MilterError(f"{self.address}: {str(e) or type(e).__name__}") from e

    async def _read(self) -> tuple[bytes, bytes]:
        assert self._reader is not None
        (length,) = struct.unpack("!I", await self._reader.readexactly(4))
        if not 1 <= length <= MAX_PACKET:
            raise MilterError(f"{self.address}: bad packet length {length}")
        packet = await self._reader.readexactly(length)
        return packet[:1], packet[1:]

    async def _read_reply(self) -> tuple[bytes, bytes]:
        """The next packet that is not SMFIR_PROGRESS, each within the timeout."""
        if self._reader is None:
            raise MilterError(f"{self.address}: not connected")
        try:
            # asyncio.timeout, not wait_for: no task per packet (a round trip per
            # header is the milter protocol's; its overhead is ours).
            async with asyncio.timeout(self.command_timeout):
                await self._drain_writer()
            while True:
                async with asyncio.timeout(self.command_timeout):
                    command, data = await self._read()
                if command != R_PROGRESS:
                    return command, data
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as e:
            raise MilterError(f"{self.address}: {str(e) or type(e).__name__}") from e

    async def _drain_writer(self) -> None:
        # Nothing buffered (the usual case): nothing to wait for; a connection
        # that is gone shows in the read that follows.
        if self._writer is not None and self._writer.transport.get_write_buffer_size():
            await self._writer.drain()

    async def _answer(self) -> Answer:
        command, data = await self._read_reply()
        return self._verdict(command, data)

    def _verdict(self, command: bytes, data: bytes) -> Answer:
        simple = {
            R_CONTINUE: Verdict.CONTINUE,
            R_ACCEPT: Verdict.ACCEPT,
            R_REJECT: Verdict.REJECT,
            R_TEMPFAIL: Verdict.TEMPFAIL,
            R_DISCARD: Verdict.DISCARD,
            R_SKIP: Verdict.SKIP,
            R_SHUTDOWN: Verdict.TEMPFAIL,  # Postfix: the milter went away
            R_CONN_FAIL: Verdict.TEMPFAIL,
        }
        if command in simple:
            return Answer(simple[command])
        if command == R_REPLYCODE:
            text = _cstrings(data)[0]
            code = text[:3]
            if not (code.isascii() and code.isdigit() and code[0] in "45"):
                raise MilterError(f"{self.address}: bad reply code {text[:40]!r}")
            return Answer(Verdict.REPLY, text)
        raise MilterError(f"{self.address}: unexpected reply {command!r}")


def _packet(command: bytes, data: bytes) -> bytes:
    return struct.pack("!I", len(data) + 1) + command + data


def connect_data(client_name: str, client_ip: str, client_port: int) -> bytes:
    """SMFIC_CONNECT: host name, family ('4', '6', 'U' unknown), port, address."""
    if not client_ip:
        return _cstr(client_name) + b"U"
    family = b"6" if ":" in client_ip else b"4"
    return _cstr(client_name) + family + struct.pack("!H", client_port) + _cstr(client_ip)


def envelope_data(address: str, args: list[str]) -> bytes:
    """SMFIC_MAIL / SMFIC_RCPT: "<address>" then its ESMTP parameters."""
    return _cstr(f"<{address}>", *args)


def header_data(name: str, value: str) -> bytes:
    return _cstr(name, value)
