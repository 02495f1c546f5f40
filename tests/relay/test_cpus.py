"""relay.process.cpus: --workers auto = the CPUs this process may use."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

from relay.process import cpus, options
from relay.process.cli import workers_arg
from relay.process.options import ProcessOptions


def fake_cgroup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, proc_cgroup: str) -> Path:
    real_read_text = Path.read_text

    def read_text(self: Path, *args: object, **kwargs: object) -> str:
        if str(self) == "/proc/self/cgroup":
            return proc_cgroup
        return real_read_text(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "read_text", read_text)
    return tmp_path


def test_cgroup_v2_quota(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = fake_cgroup(tmp_path, monkeypatch, "0::/kubepods/pod1/c1\n")
    folder = root / "kubepods" / "pod1" / "c1"
    folder.mkdir(parents=True)
    (folder / "cpu.max").write_text("150000 100000\n")
    assert cpus.cgroup_quota(root) == 1.5
    assert cpus.available_cpus(root) == min(2, len(os.sched_getaffinity(0)))
    (folder / "cpu.max").write_text("max 100000\n")
    assert cpus.cgroup_quota(root) is None


def test_cgroup_v1_quota(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = fake_cgroup(tmp_path, monkeypatch, "4:memory:/x\n3:cpu,cpuacct:/pod/c\n0::/\n")
    folder = root / "cpu,cpuacct" / "pod" / "c"
    folder.mkdir(parents=True)
    (folder / "cpu.cfs_quota_us").write_text("50000\n")
    (folder / "cpu.cfs_period_us").write_text("100000\n")
    assert cpus.cgroup_quota(root) == 0.5
    assert cpus.available_cpus(root) == 1  # rounded up, never 0
    (folder / "cpu.cfs_quota_us").write_text("-1\n")
    assert cpus.cgroup_quota(root) is None


def test_affinity_and_the_pods_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = fake_cgroup(tmp_path, monkeypatch, "0::/\n")  # no quota files at all
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert cpus.available_cpus(root) == 4
    monkeypatch.setenv(cpus.CPU_LIMIT_ENV, "2.5")
    assert cpus.available_cpus(root) == 3
    monkeypatch.setenv(cpus.CPU_LIMIT_ENV, "junk")
    assert cpus.available_cpus(root) == 4


def test_workers_argument() -> None:
    assert workers_arg("auto") is None  # ProcessOptions counts the CPUs
    assert workers_arg("2") == 2
    for bad in ("0", "-1", "many"):
        with pytest.raises(argparse.ArgumentTypeError):
            workers_arg(bad)


def test_auto_is_the_default_worker_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(options, "available_cpus", lambda: 3)
    auto = ProcessOptions(config_dir=Path("c"), listen="127.0.0.1:0", queue_dir=Path("q"))
    assert auto.worker_count() == 3
    assert ProcessOptions(Path("c"), "127.0.0.1:0", Path("q"), workers=1).worker_count() == 1
