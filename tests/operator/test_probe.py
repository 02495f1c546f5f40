"""`mailrelay probe` against a real relay with the postscreen greet test on:
the probe waits out the pause, so it passes without tripping PREGREET."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from mrtest.peers import AiosmtpdSink
from mrtest.relayproc import RelayProcess, next_loopback, write_manifests


def probe(address: tuple[str, int], *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "relay.process.cli",
            "probe",
            "--address",
            f"{address[0]}:{address[1]}",
            "--timeout",
            "10",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_probe_passes_the_greet_pause_without_pregreet(tmp_path: Path) -> None:
    with AiosmtpdSink(host=next_loopback()) as sink:
        manifests = write_manifests(
            tmp_path / "m",
            next_hop=sink.address,
            domains={"example.com": "any"},
            spec={"postscreen": {"greet": {"action": "enforce", "wait": "1s"}}},
        )
        with RelayProcess(manifests, tmp_path / "relay") as relay:
            ready = probe(relay.address)
            assert ready.returncode == 0, ready.stdout + relay.log()
            alive = probe(relay.address, "--liveness")
            assert alive.returncode == 0, alive.stdout
            assert "PREGREET" not in relay.log()


def test_probe_fails_when_nothing_listens() -> None:
    host = next_loopback()
    result = probe((host, 9))
    assert result.returncode == 1 and "probe" in result.stdout
