"""A small authoritative DNS server for the tests, on 127.0.0.1 (UDP and TCP).

It answers from a plain dict of records, so a test states its zones in a few
lines; names can be made slow (answer after a delay), silent (never answer:
a timeout for the client) or failing (SERVFAIL). The relay's own resolver
(relay.dns.Resolver) is pointed at it through `nameservers`, exactly as
production code is pointed at a real resolver.

    records = {
        "2.0.0.127.bl.test": [("A", "127.0.0.2"), ("TXT", '"listed"')],
        "*.wild.test": [("A", "127.0.0.2")],
    }
    with DnsServer(records, silent={"slow.test"}) as server:
        server.nameserver  # "127.0.0.1:PORT"
"""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections.abc import Iterable
from types import TracebackType

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

Records = dict[str, list[tuple[str, str]]]  # name -> [(rdtype, rdata text)]
DEFAULT_TTL = 300
NEGATIVE_TTL = 300


def _norm(name: str) -> str:
    return name.lower().rstrip(".")


class DnsServer:
    """Serves `records` until stop(); thread-based, so it works with any event loop."""

    def __init__(
        self,
        records: Records | None = None,
        *,
        ttl: int = DEFAULT_TTL,
        silent: Iterable[str] = (),
        slow: dict[str, float] | None = None,
        servfail: Iterable[str] = (),
        host: str = "127.0.0.1",
    ) -> None:
        self.records: Records = {_norm(k): list(v) for k, v in (records or {}).items()}
        self.ttl = ttl
        self.silent = {_norm(n) for n in silent}
        self.slow = {_norm(k): v for k, v in (slow or {}).items()}
        self.servfail = {_norm(n) for n in servfail}
        self.host = host
        self.queries: list[tuple[str, str]] = []  # (name, rdtype) as received
        self._lock = threading.Lock()
        self._servers: list[socketserver.BaseServer] = []
        self._threads: list[threading.Thread] = []
        self.port = 0

    # --- what the tests change while it runs -----------------------------------
    def add(self, name: str, rdtype: str, text: str) -> None:
        with self._lock:
            self.records.setdefault(_norm(name), []).append((rdtype.upper(), text))

    def remove(self, name: str) -> None:
        with self._lock:
            self.records.pop(_norm(name), None)

    def count(self, name: str, rdtype: str | None = None) -> int:
        """How many queries for name (and rdtype) arrived."""
        n = _norm(name)
        with self._lock:
            return sum(1 for q, t in self.queries if q == n and (rdtype is None or t == rdtype))

    @property
    def nameserver(self) -> str:
        return f"{self.host}:{self.port}"

    # --- answering --------------------------------------------------------------
    def _lookup(self, name: str) -> list[tuple[str, str]] | None:
        """The records of name (exact, else the closest '*.' wildcard); None if no such name."""
        if name in self.records:
            return self.records[name]
        labels = name.split(".")
        for i in range(1, len(labels)):
            wild = "*." + ".".join(labels[i:])
            if wild in self.records:
                return self.records[wild]
        # A name with records below it exists (empty non-terminal): NODATA, not NXDOMAIN.
        if any(k.endswith("." + name) for k in self.records):
            return []
        return None

    def answer(self, wire: bytes) -> bytes | None:
        """The response to one query, or None to stay silent."""
        try:
            query = dns.message.from_wire(wire)
        except Exception:
            return None
        if not query.question:
            return None
        q = query.question[0]
        name = _norm(q.name.to_text())
        rdtype = dns.rdatatype.to_text(q.rdtype)
        with self._lock:
            self.queries.append((name, rdtype))
            delay = self.slow.get(name, 0.0)
            silent = name in self.silent
            fail = name in self.servfail
            found = self._lookup(name)
            found = list(found) if found is not None else None
        if silent:
            return None
        if delay:
            time.sleep(delay)
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if fail:
            response.set_rcode(dns.rcode.SERVFAIL)
            return response.to_wire()
        if found is None:
            response.set_rcode(dns.rcode.NXDOMAIN)
            self._add_soa(response, name)
            return response.to_wire()
        texts = [t for rt, t in found if rt.upper() == rdtype]
        cnames = [t for rt, t in found if rt.upper() == "CNAME"]
        if texts:
            response.answer.append(
                dns.rrset.from_text(q.name, self.ttl, dns.rdataclass.IN, rdtype, *texts)
            )
        elif cnames and rdtype != "CNAME":
            response.answer.append(
                dns.rrset.from_text(q.name, self.ttl, dns.rdataclass.IN, "CNAME", cnames[0])
            )
            target = _norm(cnames[0])
            with self._lock:
                more = list(self._lookup(target) or [])
            texts = [t for rt, t in more if rt.upper() == rdtype]
            if texts:
                response.answer.append(
                    dns.rrset.from_text(target + ".", self.ttl, "IN", rdtype, *texts)
                )
        else:
            self._add_soa(response, name)
        return response.to_wire()

    def _add_soa(self, response: dns.message.Message, name: str) -> None:
        zone = ".".join(name.split(".")[-2:]) + "."
        response.authority.append(
            dns.rrset.from_text(
                zone,
                NEGATIVE_TTL,
                "IN",
                "SOA",
                f"ns.{zone} hostmaster.{zone} 1 3600 600 86400 {NEGATIVE_TTL}",
            )
        )

    # --- lifecycle --------------------------------------------------------------
    def start(self) -> DnsServer:
        owner = self

        class Udp(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                data, sock = self.request
                reply = owner.answer(data)
                if reply is not None:
                    sock.sendto(reply, self.client_address)

        class Tcp(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                while True:
                    head = self.rfile.read(2)
                    if len(head) < 2:
                        return
                    data = self.rfile.read(int.from_bytes(head, "big"))
                    reply = owner.answer(data)
                    if reply is None:
                        return
                    self.wfile.write(len(reply).to_bytes(2, "big") + reply)

        class UdpServer(socketserver.ThreadingUDPServer):
            daemon_threads = True

        class TcpServer(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        for _attempt in range(20):  # the UDP port must also be free for TCP
            udp = UdpServer((self.host, 0), Udp)
            port = udp.server_address[1]
            try:
                tcp = TcpServer((self.host, port), Tcp)
            except OSError:
                udp.server_close()
                continue
            break
        else:
            raise RuntimeError("no free port for the test DNS server")
        self.port = port
        self._servers = [udp, tcp]
        for srv in self._servers:
            t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05})
            t.daemon = True
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        for srv in self._servers:
            srv.shutdown()
            srv.server_close()
        self._servers = []
        self._threads = []

    def __enter__(self) -> DnsServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def query_once(nameserver: str, name: str, rdtype: str = "A", timeout: float = 2.0) -> bytes:
    """A raw UDP query, for checking the server itself."""
    host, _, port = nameserver.partition(":")
    msg = dns.message.make_query(name, rdtype)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(msg.to_wire(), (host, int(port)))
        data, _ = s.recvfrom(65535)
    return data
