"""The relay's listening sockets: addresses from the command line, binding them.

A supervisor reserves each port without listening (port 0 picks one); its
workers listen on it with SO_REUSEPORT, and the kernel spreads connections.
"""

from __future__ import annotations

import dataclasses
import socket
from dataclasses import dataclass

from relay.process.options import ProcessOptions

LISTEN_BACKLOG = 1024

Address = tuple[str, int]


def parse_listen(text: str) -> Address:
    """'host:port', '[v6]:port' or ':port' -> (host, port)."""
    if text.startswith("["):
        host, _, port = text[1:].partition("]:")
    else:
        host, _, port = text.rpartition(":")
    if not port.isdigit():
        raise ValueError(f"not HOST:PORT: {text!r}")
    return host or "0.0.0.0", int(port)


def bind_socket(host: str, port: int, *, reuse_port: bool, listen: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    if listen:
        sock.listen(LISTEN_BACKLOG)
    sock.setblocking(False)
    return sock


class ListenError(Exception):
    """An address could not be bound (in use, not ours to take)."""


@dataclass(frozen=True)
class Sockets:
    smtp: socket.socket
    proxy: socket.socket | None = None  # every connection starts with a PROXY header
    handover: socket.socket | None = None  # relay.handover.transfer

    def close(self) -> None:
        for sock in (self.smtp, self.proxy, self.handover):
            if sock is not None:
                sock.close()


@dataclass(frozen=True)
class Addresses:
    smtp: Address
    proxy: Address | None = None
    handover: Address | None = None

    @classmethod
    def of(cls, options: ProcessOptions) -> Addresses:
        """Parsed from the options; ValueError names the bad one."""
        return cls(
            parse_listen(options.listen),
            parse_listen(options.proxy_listen) if options.proxy_listen else None,
            parse_listen(options.handover_listen) if options.handover_listen else None,
        )

    def bind(self, *, reuse_port: bool, listen: bool) -> Sockets:
        """Binds every address; ListenError names the one that failed (the others are closed)."""
        bound: list[socket.socket | None] = []
        try:
            for address in (self.smtp, self.proxy, self.handover):
                if address is None:
                    bound.append(None)
                    continue
                try:
                    bound.append(bind_socket(*address, reuse_port=reuse_port, listen=listen))
                except OSError as e:
                    raise ListenError(f"cannot listen on {address[0]}:{address[1]}: {e}") from e
        except ListenError:
            for sock in bound:
                if sock is not None:
                    sock.close()
            raise
        smtp, proxy, handover = bound
        assert smtp is not None
        return Sockets(smtp, proxy, handover)

    def with_ports_of(self, sockets: Sockets) -> Addresses:
        """The same addresses with the ports actually bound (port 0 picks one)."""

        def port_of(address: Address | None, sock: socket.socket | None) -> Address | None:
            if address is None or sock is None:
                return address
            return (address[0], sock.getsockname()[1])

        smtp = port_of(self.smtp, sockets.smtp)
        assert smtp is not None
        return dataclasses.replace(
            self,
            smtp=smtp,
            proxy=port_of(self.proxy, sockets.proxy),
            handover=port_of(self.handover, sockets.handover),
        )
