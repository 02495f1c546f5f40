"""Fault injection for the edge tests: a relay that is SIGKILLed and
restarted on its own queue while a client keeps sending, and the tally of
what was acknowledged against what arrived at the next hop.

    run = KillRun(relay, sink, messages=300, kills=5, seed=1)
    report = run.run()   # -> KillReport(acknowledged, delivered, lost, duplicates, kills)
"""

from __future__ import annotations

import contextlib
import random
import re
import signal
import smtplib
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mrtest.peers import AiosmtpdSink
from mrtest.relayproc import RelayProcess, wait_until


class RestartableRelay(RelayProcess):
    """A RelayProcess that can be killed and started again on the same port,
    config and queue (its log keeps growing: readiness counts the starts)."""

    starts = 0

    def start(self, timeout: float = 30.0) -> RestartableRelay:
        self.starts += 1
        super().start(timeout)
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        wanted = self.starts * self.worker_count

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"relay exited with {self.proc.returncode}:\n{self.log()}")
            return self.log().count("ready: listening on") >= wanted

        wait_until(ready, timeout, f"relay start #{self.starts}")

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


@dataclass
class KillReport:
    messages: int
    kills: int = 0
    acknowledged: set[str] = field(default_factory=set)  # Message-Ids that got 250
    attempts: int = 0  # DATA transactions tried (retries included)
    delivered: Counter[str] = field(default_factory=Counter)

    @property
    def lost(self) -> set[str]:
        return {m for m in self.acknowledged if self.delivered[m] == 0}

    # (Message-Id, relay queue id) of every delivery, to tell the two kinds
    # of duplicate apart.
    deliveries: list[tuple[str, str]] = field(default_factory=list)

    @property
    def duplicates(self) -> int:
        return sum(n - 1 for n in self.delivered.values() if n > 1)

    @property
    def resent_by_client(self) -> int:
        """Copies queued twice: the relay stored the message, died before the
        client read its 250, and the client sent it again (inherent in SMTP)."""
        ids: dict[str, set[str]] = {}
        for mid, qid in self.deliveries:
            ids.setdefault(mid, set()).add(qid)
        return sum(len(q) - 1 for q in ids.values())

    @property
    def redelivered(self) -> int:
        """One queued copy delivered twice: the relay died after the next hop's
        250 and before it removed the message (at-least-once delivery)."""
        return self.duplicates - self.resent_by_client

    def summary(self) -> str:
        return (
            f"messages={self.messages} kills={self.kills} attempts={self.attempts} "
            f"acknowledged={len(self.acknowledged)} delivered={len(self.delivered)} "
            f"lost={len(self.lost)} duplicates={self.duplicates} "
            f"(resent_by_client={self.resent_by_client} redelivered={self.redelivered})"
        )


_QUEUE_ID = re.compile(rb"\(mailrelay\) with E?SMTPS? id ([0-9A-Z]+)")


def queue_id_of(data: bytes) -> str:
    """The relay's queue id, from its Received header."""
    found = _QUEUE_ID.search(data.split(b"\r\n\r\n", 1)[0])
    return found.group(1).decode() if found else ""


def message_id_of(data: bytes) -> str:
    for line in data.split(b"\r\n"):
        if line.lower().startswith(b"message-id:"):
            return line.split(b":", 1)[1].strip().decode()
    return ""


class KillRun:
    """A sender thread sends `messages` messages one after the other (and
    retries each until it gets a 250, as an MTA would); the main thread
    SIGKILLs the relay `kills` times at random moments and restarts it."""

    def __init__(
        self,
        relay: RestartableRelay,
        sink: AiosmtpdSink,
        *,
        messages: int,
        kills: int,
        seed: int,
        to: str = "x@example.org",
        client: str | None = None,
    ) -> None:
        self.relay = relay
        self.sink = sink
        self.report = KillReport(messages)
        self.kills = kills
        self.rng = random.Random(seed)
        self.to = to
        self.client = client
        self.sent = 0
        self._done = threading.Event()

    def _send_one(self, n: int) -> None:
        mid = f"<m{n}.{self.rng.random():.9f}@client.test>"
        body = (
            f"From: a@client.test\r\nTo: {self.to}\r\nMessage-Id: {mid}\r\n"
            f"Subject: message {n}\r\n\r\n" + f"line {n}\r\n" * self.rng.randint(1, 200)
        )
        while True:
            self.report.attempts += 1
            try:
                with smtplib.SMTP(
                    *self.relay.address,
                    local_hostname="client.test",
                    timeout=10,
                    source_address=(self.client, 0) if self.client else None,
                ) as smtp:
                    smtp.sendmail("a@client.test", [self.to], body.encode())
                self.report.acknowledged.add(mid)
                return
            except (OSError, smtplib.SMTPException):
                time.sleep(0.05)  # the relay is down or restarting: retry

    def _sender(self) -> None:
        try:
            for n in range(self.report.messages):
                self._send_one(n)
                self.sent = n + 1
        finally:
            self._done.set()

    def run(self, drain_timeout: float = 120.0) -> KillReport:
        thread = threading.Thread(target=self._sender, daemon=True)
        thread.start()
        total = self.report.messages
        # Kill points spread over the run, at random message counts.
        points = sorted(self.rng.sample(range(1, max(total, self.kills + 1)), self.kills))
        for point in points:
            while self.sent < point and not self._done.is_set():
                time.sleep(0.005)
            time.sleep(self.rng.uniform(0, 0.05))  # anywhere inside a message
            self.relay.kill()
            self.report.kills += 1
            time.sleep(self.rng.uniform(0, 0.2))
            self.relay.start()
        thread.join()
        # Everything acknowledged must arrive, from the queue on disk.
        wait_until(
            lambda: self._tally() >= self.report.acknowledged,
            drain_timeout,
            "every acknowledged message at the next hop",
        )
        time.sleep(0.5)  # late duplicates, if any, are counted too
        self._tally()
        return self.report

    def _tally(self) -> set[str]:
        messages = list(self.sink.messages)
        self.report.deliveries = [(message_id_of(m.data), queue_id_of(m.data)) for m in messages]
        self.report.delivered = Counter(mid for mid, _ in self.report.deliveries)
        return set(self.report.delivered)


def connectable(address: tuple[str, int]) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        try:
            s.connect(address)
            return True
        except OSError:
            return False


@contextlib.contextmanager
def small_tmpfs(folder: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` ("2m") on `folder` (we run as root in CI), for a disk
    that fills up; the test is skipped where mounting is not allowed, rather
    than faking ENOSPC."""
    folder.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
        capture_output=True,
        check=False,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)
