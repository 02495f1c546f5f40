"""bench/hoststate.py: the host's state around a benchmark run (no timings asserted)."""

from __future__ import annotations

from pathlib import Path

from mrtest.benchscripts import load_bench


def test_a_run_reads_its_folders_and_the_host(tmp_path: Path) -> None:
    hoststate = load_bench("hoststate")
    queue = tmp_path / "queue" / "active"
    queue.mkdir(parents=True)
    for i in range(300):  # a folder past one block keeps its size when emptied
        (queue / f"message-{i:04}-with-a-long-name").touch()
    for path in queue.iterdir():
        path.unlink()
    (tmp_path / "relay.log").write_bytes(b"x" * (2 << 20))
    before = hoststate.snapshot(tmp_path)
    with hoststate.ReferenceDuring() as reference:
        hoststate.reference_ms(rounds=1)
    host = hoststate.delta(before, hoststate.snapshot(tmp_path))
    assert host["before"]["folders"]["queue/active/"] > 4096
    assert host["before"]["folders"]["./relay.log"] == 2 << 20
    assert set(host["before"]["tcp"]) == {"estab", "time_wait", "close_wait", "listen"}
    assert 0 <= host["steal_pct"] <= 100 and "dirty" in host["before"]["mem"]
    assert reference.median_ms() >= 0
    assert "TIME-WAIT" in hoststate.brief(host) and hoststate.brief({}) == ""


def test_settle_zero_does_not_wait() -> None:
    assert load_bench("hoststate").settle(0) == 0.0


def test_every_settling_benchmark_takes_settle() -> None:
    """main() of each sets hoststate.SETTLE_SECONDS from --settle (the policy
    benchmark once read it without offering it)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    for script in ("relay_vs_postfix", "policy_vs_postfix", "milter_vs_postfix"):
        path = root / "bench" / f"{script}.py"
        assert "SETTLE_SECONDS = args.settle" in path.read_text(), script
        out = subprocess.run(
            [sys.executable, str(path), "--help"], capture_output=True, text=True, check=True
        ).stdout
        assert "--settle" in out, script
