"""Fixtures of the ship tests: helm from hack/install-tools.sh, and the local
control plane (hack/kube-up.sh, CRDs installed) of the operator's tests."""

from __future__ import annotations

import pytest
from kube.conftest import kube  # the operator tests' control-plane fixture, reused
from ship.tools import tool

__all__ = ["helm", "kube"]


@pytest.fixture(scope="session")
def helm() -> str:
    return tool("helm")
