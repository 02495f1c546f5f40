"""The milters of one SMTP session, applied in order like Postfix's smtpd_milters.

A `MilterChain` follows the session: connect, HELO, MAIL, RCPT, DATA, the
message as it streams in (headers one by one, the body in chunks of at most
64 KiB: nothing is held beyond one header and one chunk), end of message.
Each step returns None (go on) or the Reply the session must send instead.

Postfix's semantics:
- the first milter that refuses (reject, tempfail, a reply code) decides the
  step; a milter that answered "accept" gets no more events for the
  connection (at CONNECT or HELO) or for the message (later);
- a milter that cannot be reached, times out or breaks the protocol applies
  its defaultAction (milter_default_action) for the rest of the session:
  accept = as if it were not configured, tempfail = "451 4.7.1 Service
  unavailable - try again later", reject = "550 5.7.1 Command rejected";
- "discard" at MAIL, RCPT or end of message accepts the message (250) and
  drops it;
- modifications count only at end of message: `MessageVerdict.modifications`
  lists each milter's, in milter order (relay.smtpd.milteredit applies them).
Unlike Postfix (whose cleanup feeds each milter the previous one's edits),
every milter sees the message as received: the content streams to all of
them while DATA arrives.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from relay import metrics
from relay.config import Milter
from relay.smtpd import milter as m
from relay.smtpd.session import Reply

log = logging.getLogger("mailrelay.milter")

TEMPFAIL_REPLY = Reply(451, "4.7.1", "Service unavailable - try again later")
REJECT_REPLY = Reply(550, "5.7.1", "Command rejected")
_STATUS = re.compile(r"^[45]\.[0-9]{1,3}\.[0-9]{1,3}$")
HEADER_LIMIT = 100 * 1024  # Postfix header_size_limit: the rest of a longer header is cut


@dataclass
class _State:
    config: Milter
    connection: m.MilterConnection
    failed: Reply | None = None  # set with `down`: the defaultAction's reply (None = accept)
    down: bool = False  # unreachable or broken: the defaultAction for the session
    done_connection: bool = False  # accepted the connection
    done_message: bool = False  # accepted the message
    skip_body: bool = False

    @property
    def active_for_message(self) -> bool:
        return not (self.down or self.done_connection or self.done_message)


@dataclass
class MessageVerdict:
    """The end-of-message decision of all milters."""

    reply: Reply | None = None  # a refusal to send instead of 250
    discard: bool = False  # 250, then drop the message
    quarantine: str | None = None  # hold the message in the queue, with this reason
    modifications: list[m.Modifications] = field(default_factory=list)

    def close(self) -> None:
        for mods in self.modifications:
            mods.close()


def default_reply(action: str) -> Reply | None:
    return {"tempfail": TEMPFAIL_REPLY, "reject": REJECT_REPLY}.get(action)


def _reply_of(answer: m.Answer) -> Reply:
    """SMFIR_REPLYCODE text ("550 5.7.1 text") as a Reply: its first line."""
    first = answer.reply_text.replace("\r\n", "\n").split("\n")[0]
    code, rest = first[:3], first[4:]
    status, _, text = rest.partition(" ")
    if not _STATUS.match(status) or status[0] != code[0]:
        status, text = "", rest
    return Reply(int(code), status, text, disconnect=code == "421")


class MilterChain:
    """The configured milters for one session, in order."""

    def __init__(self, milters: tuple[Milter, ...], macros: dict[str, str]) -> None:
        self.states = [
            _State(c, m.MilterConnection(c.address, c.connect_timeout, c.command_timeout))
            for c in milters
        ]
        self.connect_macros = dict(macros)  # j, {daemon_name}, {client_addr}, ...
        self.queue_id = ""  # {i}, from DATA on
        self.discard = False  # a milter said "discard" during this message
        self._header: bytearray | None = None  # the header being received
        self._in_body = False
        self._body = bytearray()
        self._partial = bytearray()  # a header line not yet ended by LF

    # --- the session's steps -----------------------------------------------------
    async def connect(self, client_name: str, client_ip: str, client_port: int) -> Reply | None:
        if len(self.states) == 1:  # the usual case: no task for gather to make
            await self._open(self.states[0])
        else:
            await asyncio.gather(*(self._open(s) for s in self.states))
        data = m.connect_data(client_name, client_ip, client_port)
        return await self._step(m.CONNECT, data, self.connect_macros, message=False)

    async def helo(self, helo: str, tls_macros: dict[str, str]) -> Reply | None:
        return await self._step(m.HELO, m._cstr(helo), tls_macros, message=False)

    async def mail(self, sender: str, args: list[str], macros: dict[str, str]) -> Reply | None:
        for s in self.states:
            s.done_message = s.skip_body = False
        self.discard = False
        self._header, self._in_body = None, False
        self._body.clear()
        self._partial.clear()
        return await self._step(m.MAIL, m.envelope_data(sender, args), macros)

    async def rcpt(self, recipient: str, args: list[str], macros: dict[str, str]) -> Reply | None:
        return await self._step(m.RCPT, m.envelope_data(recipient, args), macros)

    async def data(self) -> Reply | None:
        return await self._step(m.DATA, b"", {"i": self.queue_id})

    async def feed(self, chunk: bytes) -> Reply | None:
        """Message data as received (CRLF lines, dot-unstuffed, no final dot)."""
        if self.discard or not any(s.active_for_message for s in self.states):
            return None
        if self._in_body:
            return await self._feed_body(chunk)
        data = bytes(self._partial) + chunk
        self._partial.clear()
        start = 0
        while start < len(data):
            end = data.find(b"\n", start)
            if end < 0:  # a line that goes on in the next chunk (kept up to the limit)
                self._partial += data[start : start + HEADER_LIMIT]
                return None
            reply = await self._feed_header_line(data[start : end + 1])
            start = end + 1
            if reply is not None:
                return reply
            if self._in_body:
                return await self._feed_body(data[start:]) if start < len(data) else None
        return None

    async def end_of_message(self) -> MessageVerdict:
        """Flushes what is pending and asks each milter for its verdict."""
        verdict = MessageVerdict(discard=self.discard)
        if self._partial and not self._in_body:
            await self._feed_header_line(bytes(self._partial))
            self._partial.clear()
        reply = await self._end_headers() if not self._in_body else None
        if reply is None and self._body:
            reply = await self._body_step(bytes(self._body))
        self._body.clear()
        if reply is not None or self.discard:
            verdict.reply, verdict.discard = reply, self.discard
            return verdict
        for s in self.states:
            if verdict.reply is not None or verdict.discard:
                break
            if s.down:
                verdict.reply = s.failed
                continue
            if not s.active_for_message:
                continue
            answer, mods = await self._call(s, m.BODYEOB, {"i": self.queue_id})
            if mods is not None:
                verdict.modifications.append(mods)
                verdict.quarantine = verdict.quarantine or mods.quarantine
            verdict.reply, verdict.discard = self._decide(s, answer, message=True)
        if verdict.reply is not None or verdict.discard:
            verdict.close()
            verdict.modifications = []
        return verdict

    async def abort(self) -> None:
        """The message ends without end of data (RSET, a refusal): SMFIC_ABORT."""
        for s in self.states:
            if not (s.down or s.done_connection):
                try:
                    await s.connection.abort()
                except m.MilterError as e:
                    self._fail(s, e)
        self._body.clear()

    def close(self) -> None:
        for s in self.states:
            s.connection.quit()

    # --- internals ----------------------------------------------------------------
    async def _open(self, s: _State) -> None:
        started = time.monotonic()
        try:
            await s.connection.open()
        except m.MilterError as e:
            self._fail(s, e)
        metrics.child(metrics.MILTER_SECONDS, s.config.name).observe(time.monotonic() - started)

    def _fail(self, s: _State, error: Exception) -> None:
        if not s.down:
            log.warning(
                "milter %s: %s; default action %s", s.config.name, error, s.config.default_action
            )
            metrics.child(metrics.MILTER_VERDICTS, s.config.name, "error").inc()
        s.down, s.failed = True, default_reply(s.config.default_action)
        s.connection.close()

    async def _step(
        self,
        event: bytes,
        data: bytes | Callable[[_State], bytes],
        macros: dict[str, str],
        *,
        message: bool = True,
    ) -> Reply | None:
        """One event to each milter in order (data: the same for all, or made
        per milter); the first refusal wins."""
        if message and self.discard:
            return None
        for s in self.states:
            if s.down:
                if s.failed is not None:
                    return s.failed
                continue
            if s.done_connection or (message and s.done_message):
                continue
            if not s.connection.wants(event) or (event == m.BODY and s.skip_body):
                continue
            payload = data if isinstance(data, bytes) else data(s)
            answer, _ = await self._call(s, event, macros, payload)
            reply, discard = self._decide(s, answer, message=message)
            if discard:
                self.discard = True
                return None
            if reply is not None:
                return reply
        return None

    async def _call(
        self, s: _State, event: bytes, macros: dict[str, str], data: bytes = b""
    ) -> tuple[m.Answer, m.Modifications | None]:
        """The stage's macros, then the event, timed and counted; a failure ->
        defaultAction. Headers and body chunks come without macros, as from Postfix."""
        started = time.monotonic()
        answer, mods = None, None
        try:
            if macros:
                s.connection.send_macros(event, macros)
            if event == m.BODYEOB:
                answer, mods = await s.connection.end_of_message()
            else:
                answer = await s.connection.event(event, data)
        except m.MilterError as e:
            self._fail(s, e)
            return _failed_answer(s), None
        except Exception as e:  # a packet we failed to read is the milter's failure too
            log.exception("milter %s: unreadable answer", s.config.name)
            self._fail(s, e)
            return _failed_answer(s), None
        finally:
            if answer is not m.NO_REPLY:  # nothing was waited for
                seconds = time.monotonic() - started
                metrics.child(metrics.MILTER_SECONDS, s.config.name).observe(seconds)
        return answer, mods

    def _decide(self, s: _State, answer: m.Answer, *, message: bool) -> tuple[Reply | None, bool]:
        """(refusal, discard) for one answer; records accept and skip."""
        v = answer.verdict
        if s.down:
            return s.failed, False
        if answer is m.NO_REPLY:  # not an answer: neither counted nor decided
            return None, False
        metrics.child(metrics.MILTER_VERDICTS, s.config.name, v.value).inc()
        if v is m.Verdict.ACCEPT:
            if message:
                s.done_message = True
            else:
                s.done_connection = True
        elif v is m.Verdict.SKIP:
            s.skip_body = True
        elif v is m.Verdict.REJECT:
            return REJECT_REPLY, False
        elif v is m.Verdict.TEMPFAIL:
            return TEMPFAIL_REPLY, False
        elif v is m.Verdict.REPLY:
            return _reply_of(answer), False
        elif v is m.Verdict.DISCARD:
            if not message:  # Postfix: discard outside a message is a protocol error
                self._fail(s, m.MilterError("discard outside a message"))
                return s.failed, False
            return None, True
        return None, False

    async def _feed_header_line(self, line: bytes) -> Reply | None:
        if line in (b"\r\n", b"\n"):
            reply = await self._end_headers()
            self._in_body = True
            return reply
        if line[:1] in (b" ", b"\t") and self._header is not None:
            if len(self._header) < HEADER_LIMIT:
                self._header += line[: HEADER_LIMIT - len(self._header)]
            return None
        reply = await self._send_header()
        self._header = bytearray(line[:HEADER_LIMIT])
        return reply

    async def _send_header(self) -> Reply | None:
        if self._header is None:
            return None
        raw, self._header = bytes(self._header), None
        name, colon, value = raw.rstrip(b"\r\n").partition(b":")
        if not colon:  # not a header: Postfix ends the headers here
            return None
        # Postfix sends folded lines joined by "\n", as its queue file stores them.
        value = value.replace(b"\r\n", b"\n")
        name = name.strip()
        stripped = value[1:] if value[:1] == b" " else value

        def header(s: _State) -> bytes:
            """Its value keeps its leading space only for HDR_LEADSPC milters."""
            kept = value if s.connection.protocol & m.P_HDR_LEADSPC else stripped
            return name + b"\0" + kept + b"\0"

        return await self._step(m.HEADER, header, {})

    async def _end_headers(self) -> Reply | None:
        reply = await self._send_header()
        return reply or await self._step(m.EOH, b"", {"i": self.queue_id})

    async def _feed_body(self, chunk: bytes) -> Reply | None:
        self._body += chunk
        while len(self._body) >= m.BODY_CHUNK:
            piece = bytes(self._body[: m.BODY_CHUNK])
            del self._body[: m.BODY_CHUNK]
            reply = await self._body_step(piece)
            if reply is not None:
                return reply
        return None

    def _body_step(self, piece: bytes) -> Awaitable[Reply | None]:
        return self._step(m.BODY, piece, {})


def _failed_answer(s: _State) -> m.Answer:
    return m.Answer(m.Verdict.CONTINUE if s.failed is None else m.Verdict.TEMPFAIL)
