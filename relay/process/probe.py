"""`mailrelay probe`: the relay pod's SMTP health check (kubelet exec probe).

Waits for the whole banner before talking (the postscreen greet test punishes
clients that speak early), says EHLO and QUIT, and never gets as far as MAIL
or RCPT, so none of the relay's checks fire. Exit 0 = healthy.
Liveness only needs any SMTP greeting; readiness needs 220 and a 250 to EHLO.
"""

from __future__ import annotations

import socket
import time


class ProbeFailed(Exception):
    pass


def _read_reply(sock: socket.socket, deadline: float) -> list[str]:
    lines: list[str] = []
    buf = b""
    while True:
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        chunk = sock.recv(4096)
        if not chunk:
            raise ProbeFailed("connection closed")
        buf += chunk
        while b"\n" in buf:
            raw, buf = buf.split(b"\n", 1)
            line = raw.decode("ascii", "replace").rstrip("\r")
            lines.append(line)
            if len(line) < 4 or line[3] != "-":
                return lines


def probe(host: str, port: int, timeout: float, liveness: bool = False) -> str:
    """Returns the greeting code; raises ProbeFailed or OSError when unhealthy."""
    deadline = time.monotonic() + timeout
    with socket.create_connection((host, port), timeout=timeout) as sock:
        greeting = _read_reply(sock, deadline)
        code = greeting[-1][:3]
        if not code.isdigit():
            raise ProbeFailed(f"not SMTP: {greeting[-1]!r}")
        if liveness:
            sock.sendall(b"QUIT\r\n")
            return code
        if code != "220":
            raise ProbeFailed(f"greeting {greeting[-1]!r}")
        sock.sendall(b"EHLO probe.localhost\r\n")
        ehlo = _read_reply(sock, deadline)
        if not ehlo[-1].startswith("250"):
            raise ProbeFailed(f"EHLO answered {ehlo[-1]!r}")
        sock.sendall(b"QUIT\r\n")
        return code


def run_probe(address: str, timeout: float, liveness: bool) -> int:
    host, _, port = address.rpartition(":")
    try:
        probe(host.strip("[]") or "127.0.0.1", int(port), timeout, liveness)
    except (OSError, ProbeFailed) as e:
        print(f"probe {address}: {e}")
        return 1
    return 0
