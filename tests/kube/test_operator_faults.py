"""Operator faults against a real kube-apiserver: children deleted or
overwritten by another writer, and the API server restarted mid-reconcile.
In every case the operator converges again, without waiting for its
periodic resync (300 s): it watches its children."""

from __future__ import annotations

import json
from typing import Any

import pytest
from mrtest.controlplane import start_apiserver, stop_apiserver
from mrtest.kube import Kube, RunningOperator, apply_reconciled, reconciled, wait_for
from mrtest.objects import relay_and_domain

pytestmark = pytest.mark.kube
NS = "faults"
NAME = "sturdy"
# Well under the operator's 300 s resync: only the watches can explain it.
PROMPTLY = 30.0


def converged(kube: Kube) -> dict[str, Any] | None:
    return reconciled(kube, NAME, NS)


@pytest.fixture(scope="module")
def sturdy(kube: Kube, operator: RunningOperator) -> dict[str, Any]:
    return apply_reconciled(kube, operator, NS, relay_and_domain(NAME, NS, replicas=2))[NAME]


CHILDREN = [
    ("configmap", f"{NAME}-config"),
    ("service", f"{NAME}-pods"),
    ("service", f"{NAME}-mx-sturdy-example"),
    ("poddisruptionbudget", NAME),
    ("statefulset", NAME),
]


@pytest.mark.parametrize(("kind", "name"), CHILDREN)
def test_a_deleted_child_comes_back_promptly(
    kube: Kube, operator: RunningOperator, sturdy: dict[str, Any], kind: str, name: str
) -> None:
    old = kube.get(kind, name, NS)
    assert old is not None
    kube.kubectl("delete", kind, name, "-n", NS, "--wait=false")
    new = wait_for(
        f"{kind}/{name} back",
        lambda: (
            (o := kube.get(kind, name, NS)) and o["metadata"]["uid"] != old["metadata"]["uid"] and o
        ),
        timeout=PROMPTLY,
    )
    assert new["metadata"]["ownerReferences"][0]["uid"] == sturdy["metadata"]["uid"]
    operator.settle()
    assert converged(kube)


def test_a_conflicting_writer_is_overruled(
    kube: Kube, operator: RunningOperator, sturdy: dict[str, Any]
) -> None:
    # A merge patch (field manager kubectl-patch) of fields the operator owns.
    on_delete = {"type": "OnDelete", "rollingUpdate": None}
    kube.patch("statefulset", NAME, {"spec": {"updateStrategy": on_delete}}, NS)
    kube.patch("poddisruptionbudget", NAME, {"spec": {"maxUnavailable": 0}}, NS)
    kube.patch("service", f"{NAME}-pods", {"spec": {"publishNotReadyAddresses": False}}, NS)
    # Server-side apply by another manager, taking the field by force.
    cm = kube.get("configmap", f"{NAME}-config", NS)
    assert cm is not None
    kube.apply(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": f"{NAME}-config", "namespace": NS},
                "data": {"relay.json": "{}"},
            }
        ),
        "--force-conflicts",
        "--field-manager=intruder",
    )
    wait_for(
        "updateStrategy restored",
        lambda: (
            kube.get("statefulset", NAME, NS)["spec"]["updateStrategy"]["type"] == "RollingUpdate"
        ),  # type: ignore[index]
        timeout=PROMPTLY,
    )
    wait_for(
        "maxUnavailable restored",
        lambda: kube.get("poddisruptionbudget", NAME, NS)["spec"].get("maxUnavailable") == 1,  # type: ignore[index]
        timeout=PROMPTLY,
    )
    wait_for(
        "publishNotReadyAddresses restored",
        lambda: (
            kube.get("service", f"{NAME}-pods", NS)["spec"].get("publishNotReadyAddresses") is True
        ),  # type: ignore[index]
        timeout=PROMPTLY,
    )
    wait_for(
        "relay.json restored",
        lambda: (
            kube.get("configmap", f"{NAME}-config", NS)["data"]["relay.json"]
            == cm["data"]["relay.json"]
        ),  # type: ignore[index]
        timeout=PROMPTLY,
    )
    operator.settle()
    assert converged(kube)


def test_api_server_restarted_mid_reconcile(
    kube: Kube, operator: RunningOperator, sturdy: dict[str, Any]
) -> None:
    writes = operator.call(lambda: operator.reconciler.api.writes)
    passes = operator.call(lambda: operator.reconciler.passes)
    # A change, then the API server goes away while the operator works on it.
    kube.patch("mailrelay", NAME, {"spec": {"queue": {"lifetime": "3d"}}}, NS)
    argv = stop_apiserver(kube)
    try:
        wait_for(
            "the operator to try (and fail) meanwhile",
            lambda: operator.call(lambda: operator.reconciler.passes) > passes,
            timeout=PROMPTLY,
        )
    finally:
        start_apiserver(kube, argv)
    relay = wait_for("converged after the restart", lambda: converged(kube), timeout=120)
    assert relay["spec"]["queue"]["lifetime"] == "3d"
    config = kube.get("configmap", f"{NAME}-config", NS)
    assert config is not None
    assert json.loads(config["data"]["relay.json"])["policy"]["queue"]["lifetime"] == "3d"
    assert operator.call(lambda: operator.reconciler.api.writes) > writes
    # The watches came back too: a deleted child is restored as promptly as before.
    old = kube.get("poddisruptionbudget", NAME, NS)
    assert old is not None
    kube.kubectl("delete", "poddisruptionbudget", NAME, "-n", NS)
    wait_for(
        "the PDB back after the restart",
        lambda: (
            (o := kube.get("poddisruptionbudget", NAME, NS))
            and o["metadata"]["uid"] != old["metadata"]["uid"]
        ),
        timeout=60,
    )
    operator.settle()
