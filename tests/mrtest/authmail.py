"""Signed mail for the authentication tests: RSA keys made by openssl, their
DKIM key records for the test DNS server, messages DKIM-signed and ARC-sealed
with dkimpy, and dkimpy's own verification of what the relay stored."""

from __future__ import annotations

import base64
import subprocess
from dataclasses import dataclass
from pathlib import Path

import dkim


@dataclass(frozen=True)
class Key:
    private: bytes  # PEM
    public: str  # base64 of the DER SubjectPublicKeyInfo

    @property
    def record(self) -> str:
        """The key's TXT record in zone-file text (strings of at most 255 bytes)."""
        text = f"v=DKIM1; k=rsa; p={self.public}"
        return " ".join(f'"{text[i : i + 200]}"' for i in range(0, len(text), 200))


def make_key(workdir: Path, name: str, bits: int = 1024) -> Key:
    workdir.mkdir(parents=True, exist_ok=True)
    private = workdir / f"{name}.pem"
    subprocess.run(
        ["openssl", "genrsa", "-traditional", "-out", str(private), str(bits)],
        check=True,
        capture_output=True,
    )
    der = subprocess.run(
        ["openssl", "rsa", "-in", str(private), "-pubout", "-outform", "DER"],
        check=True,
        capture_output=True,
    ).stdout
    return Key(private.read_bytes(), base64.b64encode(der).decode())


SIGNED_HEADERS = [b"from", b"to", b"subject", b"date", b"message-id"]


def message(from_: str, body: str = "hello\r\n", *, extra: str = "") -> bytes:
    return (
        f"From: Alice <{from_}>\r\n"
        "To: info@example.com\r\n"
        "Subject: authenticated\r\n"
        "Date: Wed, 02 Dec 2026 04:00:00 +0000\r\n"
        f"Message-ID: <{abs(hash((from_, body)))}@test>\r\n"
        f"{extra}"
        "\r\n"
        f"{body}"
    ).encode()


def dkim_sign(
    msg: bytes,
    key: Key,
    domain: str,
    selector: str = "sel",
    canonicalize: tuple[bytes, bytes] = (b"relaxed", b"relaxed"),
    length: bool = False,
) -> bytes:
    """The message with a DKIM-Signature header on top (length: with l=)."""
    sig = dkim.sign(
        msg,
        selector.encode(),
        domain.encode(),
        key.private,
        canonicalize=canonicalize,
        include_headers=SIGNED_HEADERS,
        length=length,
    )
    return sig + msg


def arc_seal(msg: bytes, key: Key, domain: str, srv_id: str, selector: str = "sel") -> bytes:
    """One ARC set on top, as a forwarder (srv_id) that authenticated it adds:
    its Authentication-Results header, then ARC-Seal, ARC-Message-Signature and
    ARC-Authentication-Results."""
    msg = f"Authentication-Results: {srv_id}; dkim=pass header.d={domain}\r\n".encode() + msg
    headers = dkim.arc_sign(
        msg,
        selector.encode(),
        domain.encode(),
        key.private,
        srv_id.encode(),
        include_headers=SIGNED_HEADERS,
    )
    return b"".join(headers) + msg


def verifies(stored: bytes, keys: dict[str, Key]) -> bool:
    """Whether the first DKIM signature of a stored message still verifies
    (keys: selector._domainkey.domain -> key)."""

    def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
        key = keys.get(name.decode().rstrip("."))
        return f"v=DKIM1; k=rsa; p={key.public}".encode() if key else None

    return bool(dkim.verify(stored, dnsfunc=dnsfunc))
