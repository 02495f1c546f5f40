"""The pod's control port (--metrics-listen, 9125): metrics, queue state, drain.

- GET /metrics: Prometheus metrics (all workers summed in multiprocess mode).
- GET /queue: the queue's state as JSON, for the operator's scale-down:
  {"messages": 3, "states": {"active": 0, "deferred": 3, "hold": 0},
   "incoming": 0, "draining": true, "drainingSeconds": 12.5, "settled": true,
   "peers": ["edge-0...:10026"]}
- POST /drain: starts, renews or ends a drain (relay.handover.drain), as
  mailrelay_api.drain_protocol says: a JSON body signed with the relay's
  handover secret, refused when stale. Without a secret, drains are off (403).

Runs on its own threads, away from the event loops; reads only cheap
things (a folder scan, a small file).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from mailrelay_api.drain_protocol import SIGNATURE_HEADER, DrainRequest, verify
from relay.handover import drain
from relay.queue.format import INCOMING, QUEUE_STATES, is_queue_id

log = logging.getLogger("mailrelay.control")

MAX_BODY = 64 * 1024
MAX_TTL = 3600.0


def queue_state(queue_dir: Path, now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    states = dict.fromkeys(QUEUE_STATES, 0)
    for state in QUEUE_STATES:
        try:
            with os.scandir(queue_dir / state) as it:
                states[state] = sum(1 for e in it if is_queue_id(e.name))
        except FileNotFoundError:
            continue
    try:
        incoming = sum(1 for e in os.scandir(queue_dir / INCOMING) if not e.name.startswith("."))
    except FileNotFoundError:
        incoming = 0
    order = drain.read_order_sync(queue_dir, now)
    draining_for = max(0.0, now - order.since) if order else 0.0
    return {
        "messages": sum(states.values()),
        "states": states,
        "incoming": incoming,
        "draining": order is not None,
        "drainingSeconds": round(draining_for, 1),
        "settled": order is not None and draining_for >= drain.SETTLE_SECONDS,
        "peers": order.peers if order else [],
    }


class ControlServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        *,
        registry: Any,
        queue_dir: Path,
        secret: bytes | None,
    ) -> None:
        self.registry = registry
        self.queue_dir = Path(queue_dir)
        self.secret = secret
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: ControlServer

    def log_message(self, format: str, *args: Any) -> None:
        pass  # scraped every few seconds: no access log

    def _send(self, code: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, code: int, doc: dict[str, Any]) -> None:
        self._send(code, json.dumps(doc).encode() + b"\n")

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

            self._send(200, generate_latest(self.server.registry), CONTENT_TYPE_LATEST)
        elif path == "/queue":
            self._json(200, queue_state(self.server.queue_dir))
        else:
            self._json(404, {"error": "not found"})

    def do_POST(self) -> None:
        if self.path.split("?", 1)[0] != "/drain":
            self._json(404, {"error": "not found"})
            return
        secret = self.server.secret
        if secret is None:
            self._json(403, {"error": "no handover secret: drains are off"})
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 < length <= MAX_BODY:
            self._json(400, {"error": "bad Content-Length"})
            return
        body = self.rfile.read(length)
        if not verify(secret, body, self.headers.get(SIGNATURE_HEADER) or ""):
            log.warning("drain request from %s: bad signature", self.client_address[0])
            self._json(401, {"error": "bad signature"})
            return
        try:
            request = DrainRequest.decode(body)
        except (ValueError, KeyError, TypeError) as e:
            self._json(400, {"error": f"bad request: {e}"})
            return
        now = time.time()
        if not request.fresh(now):
            self._json(401, {"error": "request too old or from the future"})
            return
        peers = list(request.peers) if request.peers is not None else None
        ttl = min(request.ttl, MAX_TTL)
        before = drain.read_order_sync(self.server.queue_dir, now)
        drain.write_order_sync(self.server.queue_dir, peers, ttl, now)
        if (before is None) != (peers is None):
            log.info(
                "drain %s by %s",
                "requested" if peers is not None else "ended",
                self.client_address[0],
            )
        self._json(200, queue_state(self.server.queue_dir, now))


def serve(
    host: str, port: int, *, registry: Any, queue_dir: Path, secret: bytes | None
) -> ControlServer:
    server = ControlServer((host, port), registry=registry, queue_dir=queue_dir, secret=secret)
    threading.Thread(target=server.serve_forever, name="control", daemon=True).start()
    return server
