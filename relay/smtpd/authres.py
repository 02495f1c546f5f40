"""In-process sender authentication: DKIM and ARC (dkimpy), DMARC
(relay.smtpd.dmarc), reported in one Authentication-Results header (RFC 8601)
with the relay's hostname as authserv-id — what OpenDKIM and OpenDMARC do
in verify mode behind Postfix (contentFilters.authentication).

It runs at END-OF-DATA (relay.smtpd.policy's `authentication` restriction),
on the message as received: its bytes while it is still in memory (a small
message: no file is written for the check, and the milters' in-memory edit
stays possible), else its spooled file:

1. the header section is read (bounded, as for milter edits) and gives the
   DNS names the message needs: `<s>._domainkey.<d>` of each DKIM-Signature,
   ARC-Seal and ARC-Message-Signature, and the DMARC records of the From
   domains;
2. those are fetched with the relay's async resolver (relay.dns, cached by
   TTL) — dkimpy is synchronous and takes a `dnsfunc`: here that function
   only reads the fetched answers, so no lookup ever blocks a thread;
3. dkimpy verifies in an executor (RSA is CPU work): the body hashes are
   computed reading the message in chunks (relay.smtpd.dkimbody), dkimpy
   gets the header section only;
4. DMARC from the DKIM results and, when the SPF check ran at RCPT, its
   MAIL FROM result (without it, DKIM alone decides).

A key lookup that fails temporarily is `temperror` (never a reject); a
missing key is `permerror (no key for signature)`. The header edits (delete
every Authentication-Results claiming our authserv-id, RFC 8601 section 5;
insert ours on top) are a milter.Modifications, applied by the same copy as
the milters' edits (relay.smtpd.milteredit): the message is copied in chunks,
never held twice.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO

import dkim
from dkim.util import InvalidTagValueList, parse_tag_value

from relay import metrics
from relay.config import Authentication
from relay.dns import DnsTempError, Resolver, txt_strings
from relay.smtpd import dmarc
from relay.smtpd.dkimbody import BodyKey, StreamedARC, StreamedDKIM, body_hashes, body_key
from relay.smtpd.milter import HeaderEdit, Modifications
from relay.smtpd.milteredit import read_header_section, split_headers
from relay.smtpd.session import Reply

log = logging.getLogger("mailrelay.auth")

HEADER = "Authentication-Results"
MAX_SIGNATURES = 5  # DKIM signatures verified per message (OpenDKIM: MaximumSignaturesToVerify 3)
MAX_ARC_SETS = 10  # a longer ARC chain fails unverified (each set costs two key lookups)
ARC_HEADERS = (b"arc-seal", b"arc-message-signature")
_TEMPFAIL = "temperror"

# dkimpy logs every failed signature at ERROR: the result is in our header and log.
_DKIMPY_LOG = logging.getLogger("mailrelay.auth.dkimpy")
_DKIMPY_LOG.setLevel(logging.CRITICAL)


class _KeyTempError(Exception):
    """A key lookup that failed temporarily, raised inside dkimpy (not a DKIMException:
    dkimpy must not turn it into a fail)."""


@dataclass(frozen=True)
class Method:
    """One result of the header: `dkim=pass (comment) header.d=example.com`."""

    method: str
    result: str
    comment: str = ""
    props: tuple[tuple[str, str], ...] = ()

    def text(self) -> str:
        parts = [f"{self.method}={self.result}"]
        if self.comment:
            parts.append(f"({_ctext(self.comment)})")
        parts += [f"{k}={_value(v)}" for k, v in self.props if v]
        return " ".join(parts)


def _ctext(text: str) -> str:
    return re.sub(r"[()\\\r\n]", " ", text)[:200]


def _value(text: str) -> str:
    """A property value: a token (a domain, local-part@domain), else a quoted string."""
    if re.fullmatch(r"[A-Za-z0-9!#$%&'*+.^_`{|}~@-]+", text):
        return text
    return '"' + re.sub(r'["\\\r\n]', "", text) + '"'


@dataclass(frozen=True)
class Signature:
    """The tags of a DKIM-Signature (or ARC) header the header reports."""

    domain: str = ""
    selector: str = ""
    b: str = ""  # the first characters of b=: which signature (RFC 6008)
    body: BodyKey | None = None  # what its bh= hashes

    @property
    def key(self) -> str:
        """selector._domainkey.domain, the name of its key ("" when unreadable)."""
        if not (self.domain and self.selector):
            return ""
        return f"{self.selector}._domainkey.{self.domain}".lower().rstrip(".")


def signature(value: bytes, default_c: bytes = b"simple/simple") -> Signature:
    try:
        tags = parse_tag_value(re.sub(rb"\r?\n", b"", value))
    except InvalidTagValueList:
        return Signature()

    def tag(name: bytes) -> str:
        return re.sub(r"\s+", "", tags.get(name, b"").decode("ascii", "replace"))

    body = body_key(tags, default_c) if b"bh" in tags else None
    return Signature(tag(b"d").lower(), tag(b"s"), tag(b"b")[:8], body)


@dataclass
class Head:
    """What the header section says about authentication."""

    dkim: list[Signature] = field(default_factory=list)  # the ones verified, top first
    arc_keys: list[str] = field(default_factory=list)
    arc_bodies: set[BodyKey] = field(default_factory=set)
    arc_headers: int = 0  # ARC-Seal and ARC-Message-Signature
    from_values: list[str] = field(default_factory=list)
    forged: list[int] = field(default_factory=list)  # 1-based among Authentication-Results

    @property
    def names(self) -> set[str]:
        return {n for n in (*(s.key for s in self.dkim), *self.arc_keys) if n}


def authserv_id(value: str) -> str:
    """The authserv-id of an Authentication-Results value (comments dropped)."""
    plain = re.sub(r"\([^()]*\)", " ", value)
    return (plain.split(";", 1)[0].split() or [""])[0].lower()


def parse_head(section: bytes, hostname: str) -> Head:
    head = Head()
    ours, seen_ar = hostname.lower(), 0
    for raw in split_headers(section):
        name, _, value = raw.partition(b":")
        key = name.strip().lower()
        if key == b"dkim-signature" and len(head.dkim) < MAX_SIGNATURES:
            head.dkim.append(signature(value))
        elif key in ARC_HEADERS:
            head.arc_headers += 1
            if head.arc_headers > 2 * MAX_ARC_SETS:  # what a chain that long needs, at most
                continue
            sig = signature(value, b"relaxed/relaxed")
            if sig.key and sig.key not in head.arc_keys:
                head.arc_keys.append(sig.key)
            if sig.body is not None:
                head.arc_bodies.add(sig.body)
        elif key == b"from":
            head.from_values.append(value.decode("utf-8", "replace").replace("\r\n", ""))
        elif key == HEADER.lower().encode():
            seen_ar += 1
            if authserv_id(value.decode("utf-8", "replace")) == ours:
                head.forged.append(seen_ar)
    return head


Answers = dict[str, tuple[bytes, ...] | None]  # name -> TXT records (joined); None: temp error


async def prefetch(resolver: Resolver, names: set[str]) -> Answers:
    """The TXT records of every key the message names, through our resolver."""

    async def one(name: str) -> tuple[bytes, ...] | None:
        try:
            answer = await resolver.query(name, "TXT")
        except DnsTempError:
            return None
        return tuple(b"".join(txt_strings(r)) for r in answer.records)

    ordered = sorted(names)
    found = await asyncio.gather(*(one(n) for n in ordered))
    return dict(zip(ordered, found, strict=True))


def _dnsfunc(answers: Answers, missing: set[str]) -> Callable[..., bytes | None]:
    """dkimpy's dnsfunc over the fetched answers. A name that was not fetched
    (tags we read otherwise than dkimpy does) has no key: never a temperror, which
    a forged signature could otherwise use to turn a DMARC fail into a temperror."""

    def lookup(name: bytes | str, timeout: float = 5) -> bytes | None:
        key = (name.decode("ascii", "replace") if isinstance(name, bytes) else name).lower()
        key = key.rstrip(".")
        if key in answers and answers[key] is None:
            raise _KeyTempError(key)
        records = answers.get(key) or ()
        if not records:
            missing.add(key)
            return None
        return records[0]

    return lookup


# --- verification, in an executor ------------------------------------------------

Source = bytes | str  # the message: its bytes while in memory, else its file's path


def _open(source: Source) -> IO[bytes]:
    """The message to read, from memory or from its file: the same reads either way."""
    return io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")


def _dkim_result(d: StreamedDKIM, idx: int, sig: Signature, answers: Answers) -> Method:
    missing: set[str] = set()
    try:
        ok = d.verify(idx, dnsfunc=_dnsfunc(answers, missing))
        if ok:
            result, comment = "pass", ""
        elif sig.key in missing:
            result, comment = "permerror", "no key for signature"
        else:
            result, comment = "fail", "signature did not verify"
    except _KeyTempError:
        result, comment = _TEMPFAIL, "key query failed"
    except dkim.ValidationError as e:
        body = "body hash mismatch" in str(e)
        result, comment = "fail", "body hash did not verify" if body else str(e)
    except dkim.DKIMException as e:
        result, comment = "permerror", str(e) or e.__class__.__name__
    except Exception as e:  # dkimpy on input it did not expect (bad base64 ...)
        log.info("DKIM signature %s.%s unreadable: %r", sig.selector, sig.domain, e)
        result, comment = "permerror", "unreadable signature"
    props = (("header.d", sig.domain), ("header.s", sig.selector), ("header.b", sig.b))
    return Method("dkim", result, comment, props)


def _arc_result(message: StreamedDKIM, answers: Answers) -> Method:
    a = StreamedARC(None, logger=_DKIMPY_LOG)
    a.headers, a.bodyhashes = message.headers, message.bodyhashes  # parsed once, for both
    try:
        cv, sets, comment = a.verify(dnsfunc=_dnsfunc(answers, set()))
    except _KeyTempError:
        return Method("arc", _TEMPFAIL, "key query failed")
    except Exception as e:  # DKIMException, or dkimpy on input it did not expect
        return Method("arc", "fail", str(e) or e.__class__.__name__)
    if cv == dkim.CV_Pass:
        return Method("arc", "pass", f"i={len(sets)}")
    if cv == dkim.CV_None:
        return Method("arc", "none")
    return Method("arc", "fail", str(comment))


def verify_sync(source: Source, head: Head, answers: Answers, arc: bool) -> list[Method]:
    """The DKIM results of head.dkim, then ARC's when asked (blocking: file and RSA).
    The body is hashed in chunks (relay.smtpd.dkimbody): dkimpy gets the headers only."""
    bodies = {s.body for s in head.dkim if s.body is not None}
    bodies |= head.arc_bodies if arc else set()
    with _open(source) as f:
        section, rest = read_header_section(f)
        hashes = body_hashes(f, rest, bodies)
    d = StreamedDKIM(section + b"\r\n", logger=_DKIMPY_LOG)
    d.bodyhashes = hashes
    methods = [_dkim_result(d, i, sig, answers) for i, sig in enumerate(head.dkim)]
    if arc and head.arc_headers > 2 * MAX_ARC_SETS:
        methods.append(Method("arc", "fail", "too many ARC sets"))
    elif arc:
        methods.append(_arc_result(d, answers) if head.arc_keys else Method("arc", "none"))
    return methods


def read_head_sync(source: Source) -> bytes:
    with _open(source) as f:
        return read_header_section(f)[0]


# --- the outcome -------------------------------------------------------------------


@dataclass
class Outcome:
    """The results, the header edits, and what DMARC enforcement decided."""

    methods: list[Method]
    edits: Modifications
    reply: Reply | None = None  # 550 by DMARC policy
    hold_reason: str | None = None  # quarantine by DMARC policy


def header_value(hostname: str, methods: list[Method]) -> str:
    """The Authentication-Results value, one result per folded line."""
    if not methods:
        return f"{hostname}; none"
    return f"{hostname};" + ";".join(f"\n\t{m.text()}" for m in methods)


def header_edits(hostname: str, head: Head, methods: list[Method]) -> Modifications:
    """Delete the forged ones (last first: the indexes stay right), add ours on top."""
    edits = [HeaderEdit("change", HEADER, "", n) for n in sorted(head.forged, reverse=True)]
    edits.append(HeaderEdit("insert", HEADER, header_value(hostname, methods), 0))
    return Modifications(header_edits=edits)


def enforce(policy: Authentication, result: dmarc.DmarcResult, trusted: bool) -> Outcome:
    """DMARC enforcement (the outcome's reply and hold only): only a fail whose
    policy asks for it, only when the operator asked for it, never for mynetworks."""
    done = Outcome([], Modifications())
    if result.result != "fail" or result.disposition == "none" or trusted:
        return done
    if policy.dmarc_enforce == "reject" and result.disposition == "reject":
        done.reply = Reply(550, "5.7.1", f"rejected by DMARC policy for {result.domain}")
    elif policy.dmarc_enforce != "none":
        done.hold_reason = f"DMARC policy {result.disposition} for {result.domain}"
    return done


def _evidence(methods: list[Method], spf: tuple[str, str] | None) -> dmarc.Evidence:
    def signers(result: str) -> tuple[str, ...]:
        return tuple(m.props[0][1] for m in methods if m.method == "dkim" and m.result == result)

    return dmarc.Evidence(signers("pass"), signers(_TEMPFAIL), spf)


def _dmarc_method(result: dmarc.DmarcResult, applied: str) -> Method:
    comment = f"p={result.policy} dis={applied}" if result.policy else result.comment
    return Method("dmarc", result.result, comment, (("header.from", result.domain),))


class Authenticator:
    """contentFilters.authentication for the sessions of one process."""

    def __init__(self, resolver: Resolver) -> None:
        self.resolver = resolver

    async def check(
        self,
        policy: Authentication,
        hostname: str,
        source: Source,
        spf: tuple[str, str] | None,
        *,
        trusted: bool = False,
    ) -> Outcome:
        """The results for the message (its bytes, or its spooled file's path);
        spf is SPF's (result, MAIL FROM domain) when the SPF check ran."""
        loop = asyncio.get_running_loop()
        if isinstance(source, bytes):  # in memory: nothing blocks, no thread needed
            section = read_head_sync(source)
        else:
            section = await loop.run_in_executor(None, read_head_sync, source)
        head = parse_head(section, hostname)
        verify_dkim = policy.dkim or policy.dmarc
        wanted = head.names if verify_dkim else set(head.arc_keys)
        answers = await prefetch(self.resolver, wanted if (verify_dkim or policy.arc) else set())
        methods: list[Method] = []
        if (verify_dkim and head.dkim) or (policy.arc and head.arc_keys):
            dkim_head = head if verify_dkim else dataclasses.replace(head, dkim=[])
            methods = await loop.run_in_executor(
                None, verify_sync, source, dkim_head, answers, policy.arc
            )
        elif policy.arc:
            methods.append(Method("arc", "none"))
        if verify_dkim and not head.dkim:
            methods.insert(0, Method("dkim", "none"))
        if spf is not None:
            methods.append(Method("spf", spf[0], props=(("smtp.mailfrom", spf[1]),)))
        outcome = Outcome([], Modifications())
        if policy.dmarc:
            result = await dmarc.check(self.resolver, head.from_values, _evidence(methods, spf))
            outcome = enforce(policy, result, trusted)
            applied = "reject" if outcome.reply else "quarantine" if outcome.hold_reason else "none"
            methods.append(_dmarc_method(result, applied))
            if result.result == "fail":
                metrics.child(metrics.DMARC_POLICY, applied).inc()
        for m in methods:
            metrics.child(metrics.AUTH_RESULTS, m.method, m.result).inc()
        outcome.methods = methods
        outcome.edits = header_edits(hostname, head, methods)
        return outcome
