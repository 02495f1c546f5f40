"""The real cluster for tests/cluster/: images built from our Dockerfiles, a node
with a kubelet, the chart installed, examples/two-mx/ applied.

Two ways to get the cluster:
- this machine (default, as root): hack/cluster-up.sh starts a single node
  here; hack/build-images.sh builds both images with Debian's Docker engine and
  hack/cluster-load.sh puts them into the node's containerd; hack/cluster-down.sh
  stops everything at the end, pass or fail (the Docker engine too, when
  hack/docker-up.sh started it, and the empty netfilter tables the run added:
  a benchmark after the tests sees the machine as before);
- kind (MAILRELAY_CLUSTER=kind, hack/kind-e2e.sh): the current KUBECONFIG
  context; the script has built and loaded the images.

MAILRELAY_CLUSTER_KEEP=1 leaves this machine's node running after the tests.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from mrtest.cluster import HACK, MODE, REPO, TAG, Cluster


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Marks everything here `cluster`; it runs only when selected (-m cluster):
    it builds images and starts a node, so a plain `pytest` leaves it out."""
    here = Path(__file__).parent
    markexpr = str(config.getoption("markexpr") or "")
    selected = "cluster" in markexpr and "not cluster" not in markexpr
    skip = pytest.mark.skip(reason="the real cluster suite runs with -m cluster (hack/test.sh)")
    for item in items:
        if Path(str(item.fspath)).is_relative_to(here):
            item.add_marker(pytest.mark.cluster)
            item.add_marker(pytest.mark.timeout(1800))
            if not selected:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    env = dict(os.environ)
    if MODE == "kind":
        c = Cluster(env.get("KUBECONFIG", str(Path.home() / ".kube" / "config")), "kind", env)
        yield c
        return
    if MODE != "node":
        raise pytest.UsageError(f"MAILRELAY_CLUSTER={MODE!r}: expected node or kind")
    if os.geteuid() != 0:
        pytest.fail("tests/cluster needs root (containerd, kubelet, iptables): run as root")
    # One node per machine: a second run of this suite (another checkout) waits here
    # until the first has stopped its node.
    lock = open("/run/mailrelay-node.suite.lock", "w")  # noqa: SIM115 - held for the session
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        up = subprocess.run(
            ["bash", str(HACK / "cluster-up.sh")], capture_output=True, text=True, timeout=900,
            cwd=REPO, check=False,
        )  # fmt: skip
        if up.returncode != 0:
            pytest.fail(f"hack/cluster-up.sh failed:\n{up.stderr[-6000:]}")
        kubeconfig = up.stdout.strip().splitlines()[-1]
        env["KUBECONFIG"] = kubeconfig
        c = Cluster(kubeconfig, "node", env)
        c.build_and_load(TAG)
        yield c
    finally:
        if os.environ.get("MAILRELAY_CLUSTER_KEEP") != "1":
            down = subprocess.run(
                ["bash", str(HACK / "cluster-down.sh")], capture_output=True, text=True,
                timeout=600, cwd=REPO, check=False,
            )  # fmt: skip
            if down.returncode != 0:
                print(f"hack/cluster-down.sh failed:\n{down.stderr}")
        lock.close()
