"""Runs the README's 5-minute tour literally: the shell blocks of README.md, in order.

Blocks are marked in the README with `<!-- tour: ... -->` comments: `background NAME`
starts a long-running command, `step` runs one to completion (`expect-fail` when the
command reports a refusal, as swaks does for a rejected recipient). The test runs in
a copy of the tracked files, sharing this checkout's .venv, so the commands are the
user's, not a copy of them.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARK = re.compile(
    r"<!-- tour: (?P<kind>background|step)(?P<args>[^>]*)-->\s*```sh\n(?P<body>.*?)```", re.S
)


@dataclass
class Block:
    kind: str
    args: list[str]
    body: str


def tour_blocks() -> list[Block]:
    text = (ROOT / "README.md").read_text()
    return [Block(m["kind"], m["args"].split(), m["body"]) for m in MARK.finditer(text)]


# Where each background block listens: the relay, example.com's next hop, example.org's
# refusing primary, the DNS server (TCP as well as UDP) and sender.test's MX host.
LISTENS = {
    "relay": ("127.0.0.1", 2525),
    "sink": ("127.0.0.1", 2526),
    "primary": ("127.0.0.1", 2527),
    "dns": ("127.0.0.1", 5300),
    "sender-mx": ("127.0.0.3", 25),
}


def port_open(address: tuple[str, int]) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(address) == 0


def wait_for(predicate: object, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for name in files:
        src = ROOT / name
        if src.is_file():
            dst = tmp_path / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")
    yield tmp_path


def test_readme_tour(workdir: Path) -> None:
    blocks = tour_blocks()
    started = [b.args[0] for b in blocks if b.kind == "background"]
    assert started == list(LISTENS), "the tour lost a block"
    for address in LISTENS.values():
        assert not port_open(address), f"{address} is busy; the tour needs it"
    env = {**os.environ, "PATH": f"{workdir / '.venv' / 'bin'}:{os.environ['PATH']}"}
    background: dict[str, subprocess.Popen[str]] = {}
    outputs: list[str] = []
    try:
        for block in blocks:
            if block.kind == "background":
                name = block.args[0]
                log = open(workdir / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
                background[name] = subprocess.Popen(
                    ["bash", "-c", block.body],
                    cwd=workdir,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    text=True,
                    start_new_session=True,
                )
                address = LISTENS[name]
                wait_for(
                    lambda a=address, n=name: port_open(a) or background[n].poll() is not None,
                    f"{name} on {address}",
                    timeout=180,
                )
                assert background[name].poll() is None, (workdir / f"{name}.log").read_text()
                continue
            run = subprocess.run(
                ["bash", "-c", block.body],
                cwd=workdir,
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            out = run.stdout + run.stderr
            outputs.append(out)
            if "expect-fail" in block.args:
                assert run.returncode != 0, out
            else:
                assert run.returncode == 0, out

        sent, _flush, unknown, elsewhere, exe, for_bob = outputs
        queued = re.search(r"<-\s+250 2\.0\.0 Ok: queued as (\w+)", sent)
        assert queued, sent
        listed = [line for line in sent.splitlines() if line.startswith(queued[1])]
        assert listed and "deferred" in listed[0], sent  # `mailrelay queue list` shows it
        assert "550 5.1.1 <nobody@example.com>: Recipient address rejected" in unknown
        assert "554 5.7.1 <victim@elsewhere.test>: Relay access denied" in elsewhere
        assert "550 5.7.1" in exe and "invoice.exe" in exe
        sink_log = workdir / "sink.log"
        wait_for(lambda: "hello from the tour" in sink_log.read_text(), "delivery to the sink")
        wait_for(
            lambda: (
                '"queue_id"'
                not in subprocess.run(
                    [".venv/bin/mailrelay", "queue", "list", "-o", "json"],
                    cwd=workdir,
                    env=env,
                    capture_output=True,
                    text=True,
                ).stdout
            ),
            "an empty queue",
        )
        # The bounce: accepted by the relay, refused by example.org's primary, the report
        # delivered by MX to sender.test's own server.
        assert re.search(r"<-\s+250 2\.0\.0 Ok: queued as \w+", for_bob), for_bob
        mx_log = workdir / "sender-mx.log"
        wait_for(
            lambda: "Subject: Undelivered Mail Returned to Sender" in mx_log.read_text(),
            "the non-delivery report at sender.test's MX",
        )
        report = mx_log.read_text()
        assert "alice@sender.test" in report and "bob@example.org" in report, report
        assert "550 5.1.1 Recipient address rejected: User unknown" in report, report
        assert "Subject: for bob" in report, report
        relay_log = workdir / "relay.log"
        wait_for(
            lambda: (
                "delivery status notification to <alice@sender.test> sent "
                "(relay=mx.sender.test[127.0.0.3]:25" in relay_log.read_text()
            ),
            "the relay's log line for the report",
        )
    finally:
        for proc in background.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
