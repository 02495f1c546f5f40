"""Signed mail for the authentication tests: RSA keys made by openssl and
ed25519 keys made by PyNaCl (RFC 8463), their DKIM key records for the test
DNS server, messages DKIM-signed and ARC-sealed with dkimpy, and dkimpy's own
verification of what the relay stored."""

from __future__ import annotations

import base64
import subprocess
from dataclasses import dataclass
from pathlib import Path

import dkim
import nacl.signing


@dataclass(frozen=True)
class Key:
    private: bytes  # rsa: PEM; ed25519: base64 of the 32-byte seed
    public: str  # rsa: base64 of the DER SubjectPublicKeyInfo; ed25519: of the raw key
    kind: str = "rsa"  # the record's k=

    @property
    def text(self) -> str:
        return f"v=DKIM1; k={self.kind}; p={self.public}"

    @property
    def record(self) -> str:
        """The key's TXT record in zone-file text (strings of at most 255 bytes)."""
        text = self.text
        return " ".join(f'"{text[i : i + 200]}"' for i in range(0, len(text), 200))

    @property
    def algorithm(self) -> bytes:
        return b"ed25519-sha256" if self.kind == "ed25519" else b"rsa-sha256"


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


def make_ed25519_key() -> Key:
    """An ed25519 key as RFC 8463 publishes it: k=ed25519, p= the raw 32 bytes."""
    key = nacl.signing.SigningKey.generate()
    public = base64.b64encode(bytes(key.verify_key)).decode()
    return Key(base64.b64encode(bytes(key)), public, "ed25519")


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
        signature_algorithm=key.algorithm,
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
        return key.text.encode() if key else None

    return bool(dkim.verify(stored, dnsfunc=dnsfunc))
