"""A corpus of hostile MIME: header spellings and structures that a filter
may read differently from Postfix or from a recipient's mail client. Every
case hides an `.exe` (written EXT in the templates); its control, the same
bytes with `.pdf`, must pass."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Case:
    id: str
    template: bytes  # EXT where the extension goes

    @property
    def data(self) -> bytes:
        return self.template.replace(b"EXT", b"exe")

    @property
    def control(self) -> bytes:
        return self.template.replace(b"EXT", b"pdf")


TOP = "From: a@example.org\r\nTo: b@example.com\r\nSubject: hostile\r\nMIME-Version: 1.0\r\n"
BODY = "TVqQAAMAAAAEAAAA//8AALgAAAAA"


def multipart(
    part_headers: str,
    *,
    top: str = 'Content-Type: multipart/mixed; boundary="B"',
    delimiter: str = "B",
) -> bytes:
    """A two-part message: some text, then a part with part_headers."""
    d = "--" + delimiter
    return (
        f"{TOP}{top}\r\n\r\npreamble\r\n"
        f"{d}\r\nContent-Type: text/plain\r\n\r\nhello\r\n"
        f"{d}\r\n{part_headers}\r\n\r\n{BODY}\r\n"
        f"{d}--\r\n"
    ).encode()


CD = "Content-Disposition: attachment; "
MULTI = "Content-Type: multipart/mixed; "
ATTACHMENT = f'Content-Type: application/octet-stream\r\n{CD}filename="a.EXT"'

# The attachment part's own header, spelled every way.
PART_HEADERS = {
    "space-before-colon-type": 'Content-Type : application/octet-stream; name="a.EXT"',
    "tab-before-colon-disposition": 'Content-Disposition\t: attachment; filename="a.EXT"',
    "space-before-colon-unquoted": "Content-Disposition :attachment; filename=a.EXT",
    "upper-case": 'CONTENT-DISPOSITION: ATTACHMENT; FILENAME="A.EXT"',
    "comment-before-parameter": f'{CD}(note) filename="a.EXT"',
    "comment-before-value": f'{CD}filename=(note)"a.EXT"',
    "comment-after-value": f'{CD}filename="a.EXT" (note)',
    "comment-after-unquoted": f"{CD}filename=a.EXT(note)",
    "quote-in-comment": 'Content-Disposition: attachment (it\'s "quoted); filename="a.EXT"',
    "quote-in-comment-after": f'{CD}(") filename="a.EXT"; x="("',
    "semicolon-in-comment": f'{CD}(a;b) filename="a.EXT"',
    "nested-comment": f'{CD}(a (b) ") filename="a.EXT"',
    "paren-in-quoted": f'{CD}x="(";filename="a.EXT"',
    "spaces-around-equals": f'{CD}filename = "a.EXT"',
    "quoted-pair": f'{CD}filename="a.\\EXT"',
    "unterminated-quote": f'{CD}filename="a.EXT',
    "junk-after-quote": f'{CD}filename="a.EXT"x',
    "semicolon-after": f"{CD}filename=a.EXT;",
    "no-semicolon": 'Content-Disposition: attachment filename="a.EXT"',
    "folded-value": 'Content-Disposition: attachment;\r\n filename=\r\n "a.EXT"',
    "folded-name": f"{CD}filename=\r\n\ta.EXT",
    "two-filenames-last": f'{CD}filename="a.pdf"; filename="a.EXT"',
    "two-filenames-first": f'{CD}filename="a.EXT"; filename="a.txt"',
    "type-name-only": "Content-Type: application/x-msdownload; name=a.EXT\r\n"
    "Content-Disposition: inline",
    "two-dispositions": f'Content-Disposition: inline\r\n{CD}filename="a.EXT"',
    "two-types": 'Content-Type: text/plain\r\nContent-Type: application/octet-stream; name="a.EXT"',
    "rfc2231": f"{CD}filename*=utf-8''a%2EEXT",
    "rfc2231-language": f"{CD}filename*=utf-8'en'a.EXT",
    "rfc2231-continued": f'{CD}filename*0="a."; filename*1="EXT"',
    "rfc2231-continued-unordered": f"{CD}filename*1=EXT; filename*0=a.",
    "rfc2231-idna": f"{CD}filename*=idna''a.EXT",
    "rfc2231-unknown-charset": f"{CD}filename*=x-unknown''a%2EEXT",
    "rfc2231-broken-utf8": f"{CD}filename*0*=utf-8''%E2%80; filename*1=.EXT",
    "rfc2231-twice": f"{CD}filename*=utf-8''a.pdf; filename*=utf-8''a.EXT",
    "rfc2231-section-twice": f'{CD}filename*0="a."; filename*1="pdf"; filename*1="EXT"',
    "rfc2231-no-charset": f"{CD}filename*=''a.EXT",
    "rfc2047-idna": f'{CD}filename="=?idna?q?a.EXT?="',
    "rfc2047-unknown-charset": f'{CD}filename="=?x-unknown?q?a=2EEXT?="',
    "rfc2047-unquoted": "Content-Type: application/octet-stream; name==?utf-8?q?a.EXT?=",
    "nul-in-name": f'{CD}filename="a.EXT\x00"',
    "trailing-dot": f'{CD}filename="a.EXT."',
}

# The message's structure, spelled every way: (top Content-Type header(s), delimiter).
STRUCTURES = {
    "boundary-junk-after-quote": (f'{MULTI}boundary="B"x', "B"),
    "boundary-junk-after-quote-joined": (f'{MULTI}boundary="B"x', "Bx"),
    "boundary-junk-after-quote-raw": (f'{MULTI}boundary="B"x', '"B"x'),
    "comment-before-type": ("Content-Type: (c) multipart/mixed; boundary=B", "B"),
    "comment-after-type": ("Content-Type: multipart/mixed (c); boundary=B", "B"),
    "comment-in-type": ("Content-Type: multipart(c)/(d)mixed; boundary=B", "B"),
    "comment-before-boundary": (f"{MULTI}(c) boundary=B", "B"),
    "comment-after-boundary": (f"{MULTI}boundary=B (c)", "B"),
    "comment-before-boundary-value": (f"{MULTI}boundary=(c)B", "B"),
    "quote-in-comment": (f'{MULTI}(a "quote) boundary="B"', "B"),
    "semicolon-in-comment": ("Content-Type: multipart/mixed (x;boundary=A); boundary=B", "B"),
    "no-subtype": ("Content-Type: multipart; boundary=B", "B"),
    "empty-subtype": ("Content-Type: multipart/; boundary=B", "B"),
    "unknown-subtype": ("Content-Type: multipart/x-anything; boundary=B", "B"),
    "upper-case": ("Content-Type: MULTIPART/MIXED; BOUNDARY=B", "B"),
    "space-before-colon": ("Content-Type : multipart/mixed; boundary=B", "B"),
    "two-boundaries-first": (f'{MULTI}boundary="B"; boundary="A"', "B"),
    "two-boundaries-last": (f'{MULTI}boundary="A"; boundary="B"', "B"),
    "two-types-text-first": (
        "Content-Type: text/plain\r\nContent-Type: multipart/mixed; boundary=B",
        "B",
    ),
    "two-types-multipart-first": (f"{MULTI}boundary=B\r\nContent-Type: text/plain", "B"),
    "two-multiparts-second": (
        f"{MULTI}boundary=A\r\nContent-Type: multipart/mixed; boundary=B",
        "B",
    ),
    "boundary-continued": (f"{MULTI}boundary*0=B; boundary*1=C", "BC"),
    "boundary-2231": (f"{MULTI}boundary*=us-ascii''B%43", "BC"),
    "boundary-unquoted-equals": (f"{MULTI}boundary=----=_Part_1.2", "----=_Part_1.2"),
    "boundary-unquoted-equals-short": (f"{MULTI}boundary=----=_Part_1.2", "----"),
    "boundary-spaces-around-equals": (f"{MULTI}boundary = B", "B"),
    "boundary-trailing-space-quoted": (f'{MULTI}boundary="B "', "B "),
    "boundary-folded": ("Content-Type: multipart/mixed;\r\n boundary=\r\n B", "B"),
    "no-mime-version": (f"{MULTI}boundary=B", "B"),
}


def nested(part_headers: str) -> bytes:
    """The attachment inside a forwarded message inside the message."""
    inner = multipart(part_headers).decode()
    return multipart("Content-Type: message/rfc822", delimiter="B").replace(
        BODY.encode(), inner.encode(), 1
    )


NESTED = {
    "space-before-colon": 'Content-Disposition : attachment; filename="a.EXT"',
    "comment-before-parameter": f'{CD}(c) filename="a.EXT"',
}


# Whole messages: structures the two-part template cannot write.
REUSED_BOUNDARY = (
    f"{TOP}{MULTI}boundary=B\r\n\r\n"
    f"--B\r\n{MULTI}boundary=B\r\n\r\n--B\r\nContent-Type: text/plain\r\n\r\nhi\r\n--B--\r\n"
    f"--B\r\n{ATTACHMENT}\r\n\r\n{BODY}\r\n--B--\r\n"
)
MESSAGES = {
    # Postfix closes the inner multipart and reads the next part; the stdlib
    # puts it in the epilogue.
    "reused-boundary": REUSED_BOUNDARY,
    # A forwarded message announced with white space before the colon.
    "message-space-before-colon": multipart("Content-Type : message/rfc822")
    .decode()
    .replace(BODY, f"{MULTI}boundary=C\r\n\r\n--C\r\n{ATTACHMENT}\r\n\r\n{BODY}\r\n--C--", 1),
    # multipart/digest parts are messages unless they say otherwise.
    "digest-default": f"{TOP}Content-Type: multipart/digest; boundary=D\r\n\r\n"
    f"--D\r\n\r\n{MULTI}boundary=E\r\n\r\n--E\r\n{ATTACHMENT}\r\n\r\nx\r\n--E--\r\n--D--\r\n",
}


def corpus() -> list[Case]:
    """Every case, with an id that says what it tries."""
    cases = [Case("part/" + k, multipart(v)) for k, v in PART_HEADERS.items()]
    for key, (top, delimiter) in STRUCTURES.items():
        data = multipart(ATTACHMENT, top=top, delimiter=delimiter)
        if key == "no-mime-version":
            data = data.replace(b"MIME-Version: 1.0\r\n", b"")
        cases.append(Case("structure/" + key, data))
    cases += [Case("nested/" + k, nested(v)) for k, v in NESTED.items()]
    cases += [Case("message/" + k, v.encode()) for k, v in MESSAGES.items()]
    return cases
