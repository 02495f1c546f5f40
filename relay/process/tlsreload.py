"""Certificate rotation without a restart.

The relay's certificate is a kubernetes.io/tls Secret (tls.crt, tls.key)
mounted as a folder; cert-manager renews it every ~60 days. The kubelet
updates a Secret volume by writing a new timestamped folder and swapping the
`..data` symlink, so both files change at once and stat() (which follows the
symlinks) sees new inodes.

`TlsReloader` polls that folder and builds a new SSLContext when the files
change. The new context is used by new STARTTLS handshakes only: a session
already in TLS keeps the SSL object (and context) it shook hands with, so
nothing in flight is dropped. New files that do not load (a key that does
not match the certificate, a half-written file from a non-atomic writer)
are logged and the running context is kept; the next change is tried again.
A folder that is empty at start (the Secret not issued yet) turns STARTTLS
on as soon as the files appear.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import ssl
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("mailrelay.tls")

CERT_FILE = "tls.crt"
KEY_FILE = "tls.key"
DEFAULT_INTERVAL = 2.0

Signature = tuple[tuple[int, int, int], ...]


def file_signature(tls_dir: Path) -> Signature:
    """(inode, mtime, size) of tls.crt and tls.key, following symlinks;
    () when either is missing."""
    sig = []
    for name in (CERT_FILE, KEY_FILE):
        try:
            st = os.stat(tls_dir / name)
        except OSError:
            return ()
        sig.append((st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(sig)


def build_context(tls_dir: Path) -> ssl.SSLContext:
    """A server context from the folder; raises OSError/ssl.SSLError/ValueError."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tls_dir / CERT_FILE, tls_dir / KEY_FILE)
    return ctx


def certificate_fingerprint(tls_dir: Path) -> str:
    """SHA-256 of the first certificate in tls.crt (for the log)."""
    pem = (tls_dir / CERT_FILE).read_text(errors="replace")
    end = "-----END CERTIFICATE-----"
    first = pem[: pem.index(end) + len(end)] if end in pem else pem
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(first)).hexdigest()


class TlsReloader:
    """Keeps `context` in step with the files in `tls_dir`."""

    def __init__(self, tls_dir: Path, *, interval: float = DEFAULT_INTERVAL) -> None:
        self.tls_dir = Path(tls_dir)
        self.interval = interval
        self.context: ssl.SSLContext | None = None
        self.fingerprint = ""
        self.reloads = 0  # successful loads after the first
        self.failures = 0
        self._signature: Signature = ()

    def load_sync(self) -> bool:
        """Loads the files if they changed; True when `context` was replaced."""
        sig = file_signature(self.tls_dir)
        if sig == self._signature:
            return False
        self._signature = sig
        if not sig:
            if self.context is None:
                log.warning("no %s/%s in %s: STARTTLS is off", CERT_FILE, KEY_FILE, self.tls_dir)
            else:
                log.error(
                    "%s/%s gone from %s: keeping the running certificate",
                    CERT_FILE,
                    KEY_FILE,
                    self.tls_dir,
                )
            return False
        try:
            context = build_context(self.tls_dir)
            fingerprint = certificate_fingerprint(self.tls_dir)
        except (OSError, ssl.SSLError, ValueError) as e:
            self.failures += 1
            what = "keeping the running certificate" if self.context else "STARTTLS is off"
            log.error("cannot load the certificate in %s (%s): %s", self.tls_dir, e, what)
            return False
        first = self.context is None
        self.context, self.fingerprint = context, fingerprint
        if first:
            log.info("TLS certificate loaded (sha256 %s)", fingerprint)
        else:
            self.reloads += 1
            log.info("TLS certificate reloaded for new sessions (sha256 %s)", fingerprint)
        return True

    async def watch(self, on_change: Callable[[ssl.SSLContext], None]) -> None:
        """Polls until cancelled; calls on_change with each new context."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.interval)
            try:
                changed = await loop.run_in_executor(None, self.load_sync)
            except Exception:
                log.exception("certificate reload failed")
                continue
            if changed and self.context is not None:
                on_change(self.context)
