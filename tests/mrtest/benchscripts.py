"""The benchmark scripts (bench/*.py, not a package) as modules, for tests
that check them or reuse their setups (the Postfix instance, say)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parents[2] / "bench"


def load_bench(name: str) -> ModuleType:
    """bench/<name>.py, imported once under its own name."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def validate(manifests: str, folder: Path) -> None:
    """`mailrelay validate` accepts a benchmark's manifests (written into folder)."""
    path = folder / "relay.yaml"
    path.write_text(manifests)
    done = subprocess.run(
        [sys.executable, "-m", "relay.process.cli", "validate", "-f", str(path), "-o", "json"],
        capture_output=True,
        text=True,
        cwd=BENCH.parent,
    )
    assert done.returncode == 0, done.stdout + done.stderr
