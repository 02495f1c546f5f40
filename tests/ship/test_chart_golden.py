"""The chart's output, as golden files: what `helm template` (and Argo CD)
renders, without the generated CRDs (tests/test_manifests.py owns those).

UPDATE_GOLDEN=1 pytest tests/ship/test_chart_golden.py rewrites them; review the diff.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from ship.tools import helm_template

GOLDEN = Path(__file__).parent / "golden"
CASES = {
    "chart-default.yaml": ("--set", "crds.install=false"),
    "chart-existing-key.yaml": (
        "--set", "crds.install=false",
        "--set", "operatorKey.existingSecret=mailrelay-key",
        "--set", "watchNamespaces={mail}",
        "--set", "clusterCIDRs={10.96.0.0/12,10.244.0.0/16}",
        "--set", "networkPolicy.metricsNamespace=monitoring",
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CASES))
def test_chart_output_matches_golden(name: str) -> None:
    result = helm_template(*CASES[name])
    assert result.returncode == 0, result.stderr
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN") == "1" or not path.exists():
        path.parent.mkdir(exist_ok=True)
        path.write_text(result.stdout)
    assert result.stdout == path.read_text(), (
        f"{path} differs; rerun with UPDATE_GOLDEN=1 and review"
    )
