"""One TLS session, logged as Postfix logs it and counted in
mailrelay_tls_sessions_total: by the SMTP server (from clients) and by
delivery (to next hops).

    Anonymous TLS connection established from unknown[127.0.0.1]: TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)
    Verified TLS connection established to mail.example.com[192.0.2.1]:25: TLSv1.3 with cipher ...

The metric's labels come from fixed sets, whatever the peer offers: the
protocol versions below and the cipher suites this OpenSSL knows.
"""  # noqa: E501

from __future__ import annotations

import functools
import logging
import ssl

from relay import logbuffer, metrics

PROTOCOLS = frozenset({"TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"})
OTHER = "other"


@functools.cache
def known_ciphers() -> frozenset[str]:
    """Every cipher suite name this OpenSSL can negotiate (a fixed set)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.set_ciphers("ALL:@SECLEVEL=0")
    return frozenset(c["name"] for c in ctx.get_ciphers())


def session(
    logger: logging.Logger,
    ssl_object: ssl.SSLObject | None,
    *,
    inbound: bool,
    peer: str,
    verified: bool,
) -> None:
    """Logs and counts an established session (nothing when it has no TLS)."""
    if ssl_object is None:
        return
    protocol = ssl_object.version() or OTHER
    cipher, _version, bits = ssl_object.cipher() or (OTHER, "", 0)
    if inbound:
        trust = "Trusted" if verified else "Anonymous"
        where = f"from {peer}"
    else:
        trust = "Verified" if verified else "Untrusted"
        where = f"to {peer}"
    logbuffer.info(
        logger,
        "%s TLS connection established %s: %s with cipher %s (%d/%d bits)",
        trust,
        where,
        protocol,
        cipher,
        bits,
        bits,
    )
    metrics.child(
        metrics.TLS,
        "in" if inbound else "out",
        protocol if protocol in PROTOCOLS else OTHER,
        cipher if cipher in known_ciphers() else OTHER,
        "yes" if verified else "no",
    ).inc()
