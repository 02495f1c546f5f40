"""bench/latency.py: the probe's bookkeeping (the benchmark itself is not run in CI),
against a real relay: every probe accepted is matched at the next hop."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from mrtest.relayproc import RelayProcess, write_manifests

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from latency import PROBE_DOMAIN, Probe, percentile


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) == 0.0


def test_probe_through_a_relay(tmp_path: Path) -> None:
    probe = Probe(rate=50)
    port = probe.start_sink()
    try:
        manifests = write_manifests(
            tmp_path / "manifests", next_hop=("127.0.0.1", port), domains={PROBE_DOMAIN: "any"}
        )
        with RelayProcess(manifests, tmp_path) as relay:
            probe.begin(relay.port, relay.host)
            deadline = time.monotonic() + 60
            while len(probe.latencies.accept_ms) < 5 and time.monotonic() < deadline:
                time.sleep(0.05)
            latencies = probe.end()
        assert latencies.errors == 0 and latencies.lost == 0
        assert len(latencies.forward_ms) == len(latencies.accept_ms) >= 5
        assert len(probe.sink.arrived) >= 5  # the next hop saw the probes' ids
    finally:
        probe.close()
