"""The relay's log, as a log pipeline and a person with grep read it: the
level and the component on every line, one line per rejection (SIZE at MAIL
too), the Message-ID of each accepted message, TLS sessions both ways;
`spec.logging.format: json` switching a running relay to one JSON object a
line, and `--log-format` / `--log-level` on the command line winning over it.
A real relay (`mailrelay run`), swaks and a raw client, an aiosmtpd next hop
offering STARTTLS."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

from mrtest.peers import AiosmtpdSink, RawClient, swaks
from mrtest.relayproc import (
    RelayProcess,
    make_certificate,
    next_loopback,
    wait_until,
    write_manifests,
)

from relay.process.tlsreload import build_context

DOMAINS: dict[str, list[str] | str] = {"example.com": ["info@example.com"]}
# 2026-12-02 04:00:00,123 info mailrelay/smtpd[1234]: message
TEXT_LINE = re.compile(
    r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (debug|info|warning|error|critical) "
    r"mailrelay/([a-z_]+)\[\d+\]: (.*)"
)


def manifests_with(folder: Path, sink: AiosmtpdSink, logging: dict[str, str]) -> Path:
    spec: dict[str, Any] = {"limits": {"messageSize": 1_000_000}, "logging": logging}
    return write_manifests(folder, next_hop=sink.address, domains=DOMAINS, spec=spec)


def next_hop_tls(manifests: Path) -> None:
    path = manifests / "relay.yaml"
    path.write_text(path.read_text().replace("tls: none", "tls: encrypt"))


async def size_too_big(relay: RelayProcess) -> str:
    async with RawClient(*relay.address, local="127.0.0.31") as c:
        await c.greet()
        return await c.command("MAIL FROM:<big@sender.test> SIZE=99999999")


def test_text_lines_carry_level_component_and_each_event(tmp_path: Path) -> None:
    tls_dir = make_certificate(tmp_path / "tls")
    with AiosmtpdSink(next_loopback(), tls_context=build_context(tls_dir)) as sink:
        manifests = manifests_with(tmp_path / "m", sink, {"format": "text", "level": "info"})
        next_hop_tls(manifests)
        with RelayProcess(manifests, tmp_path / "relay", tls_dir=tls_dir, workers=1) as relay:
            ok = swaks(
                relay.address,
                to="info@example.com",
                local="127.0.0.30",
                tls=True,
                extra=["--header", "Message-Id: <hello.1@sender.test>"],
            )
            assert ok.returncode == 0, ok.output
            assert asyncio.run(size_too_big(relay)).startswith("552 5.3.4")
            unknown = swaks(relay.address, to="nobody@example.com", local="127.0.0.32")
            assert unknown.returncode != 0
            sink.wait_for(1)
            relay.wait_for_log(r"to=<info@example\.com>, relay=.*status=sent")
            assert relay.stop() == 0
    lines = relay.log().splitlines()
    parsed = [TEXT_LINE.fullmatch(line) for line in lines]
    assert all(parsed), [line for line, m in zip(lines, parsed, strict=True) if not m]
    by_text = {m.group(3): (m.group(1), m.group(2)) for m in parsed if m}

    for pattern, component in EXPECTED_LINES:
        found = [v for text, v in by_text.items() if re.search(pattern, text)]
        assert found == [("info", component)], (pattern, found)


# What the events of test_text_lines_carry_level_component_and_each_event log,
# one line each: (the message, its component).
EXPECTED_LINES = [
    (r"^\w+: message-id=<hello\.1@sender\.test>$", "smtpd"),
    (
        r"^NOQUEUE: reject: MAIL from unknown\[127\.0\.0\.31\]: 552 5\.3\.4 Message size "
        r"exceeds fixed limit; from=<big@sender\.test> proto=ESMTP helo=<client\.test>$",
        "smtpd",
    ),
    (r"^NOQUEUE: reject: RCPT from unknown\[127\.0\.0\.32\]: 550 5\.1\.1 <nobody@", "smtpd"),
    (
        r"^Anonymous TLS connection established from unknown\[127\.0\.0\.30\]: TLSv1\.[23] "
        r"with cipher \S+ \(\d+/\d+ bits\)$",
        "smtpd",
    ),
    (r"^Untrusted TLS connection established to [\d.]+\[[\d.]+\]:\d+: TLSv1\.[23] ", "delivery"),
    (r"to=<info@example\.com>, relay=.*status=sent", "delivery"),
]


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_spec_logging_switches_a_running_relay_to_json_and_back(tmp_path: Path) -> None:
    with AiosmtpdSink(next_loopback()) as sink:
        manifests = manifests_with(tmp_path / "m", sink, {"format": "json", "level": "info"})
        with RelayProcess(manifests, tmp_path / "relay", workers=2) as relay:
            ok = swaks(relay.address, to="info@example.com", local="127.0.0.33")
            assert ok.returncode == 0, ok.output
            relay.wait_for_log(r'"message": "\w+: message-id=<[^"]+>"')
            relay.wait_for_log(r'"message": "\w+: to=<info@example\.com>, .*status=sent')
            docs = json_lines(relay.log())
            # Every line but the few before the configuration was read.
            assert len(docs) >= len(relay.log().splitlines()) - 3
            accepted = next(d for d in docs if "(queue active)" in d["message"])
            assert accepted["level"] == "info" and accepted["component"] == "smtpd"
            assert re.fullmatch(r"[0-9A-Z]+", accepted["queue_id"])
            sent = next(d for d in docs if "status=sent" in d["message"])
            assert sent["component"] == "delivery" and sent["queue_id"] == accepted["queue_id"]
            # Back to text, and only warnings: the next message logs nothing at info.
            manifests_with(tmp_path / "m", sink, {"format": "text", "level": "warning"})
            relay.wait_for_log('"message": "configuration reloaded', count=2)
            before = len(relay.log().splitlines())
            ok = swaks(relay.address, to="info@example.com", local="127.0.0.33")
            assert ok.returncode == 0, ok.output
            sink.wait_for(2)
            unknown = swaks(relay.address, to="nobody@example.com", local="127.0.0.33")
            assert unknown.returncode != 0
            assert relay.stop() == 0
    after = relay.log().splitlines()[before:]
    assert not any("message-id=" in line or "reject:" in line for line in after), after
    assert all(TEXT_LINE.fullmatch(line) for line in after), after


def test_command_line_wins_over_spec_logging(tmp_path: Path) -> None:
    with AiosmtpdSink(next_loopback()) as sink:
        manifests = manifests_with(tmp_path / "m", sink, {"format": "json", "level": "warning"})
        args = ["--log-format", "text", "--log-level", "info"]
        with RelayProcess(manifests, tmp_path / "relay", workers=1, args=args) as relay:
            ok = swaks(relay.address, to="info@example.com", local="127.0.0.34")
            assert ok.returncode == 0, ok.output
            line = relay.wait_for_log(r"message-id=")[0]
            assert TEXT_LINE.fullmatch(line), line
            wait_until(lambda: sink.messages, 10, "the message at the sink")
            assert relay.stop() == 0
    assert not json_lines(relay.log())
