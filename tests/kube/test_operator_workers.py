"""A worker per relay, on a real kube-apiserver: one relay whose reconcile is
stuck (its leaving pod takes the drain request and never answers) holds up
no other relay's change; the operator's metrics show what was reconciled.

The stuck relay scales 2 -> 1: its reconcile asks pod 1 to drain before the
StatefulSet may shrink, and pod 1 is a socket that accepts and stays silent.
The PodClient's timeout is raised for the test, so that the reconcile stays
stuck until the test lets the pod go (not for the 5 s of production): the
outcome, not a race against that timeout, is what the test checks.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
import yaml
from mrtest.kube import (
    Kube,
    RunningOperator,
    apply_reconciled,
    condition,
    reconciled,
    wait_for,
)
from mrtest.objects import relay_and_domain
from mrtest.pods import SilentPod
from mrtest.relayproc import free_port, next_loopback
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.kube
NS = "parallel"
STUCK, PROMPT, CLASH = "stuck", "prompt", "clash"


def lifetime_in_config(kube: Kube, name: str) -> str | None:
    config = kube.get("configmap", f"{name}-config", NS)
    if config is None:
        return None
    return str(json.loads(config["data"]["relay.json"])["policy"]["queue"]["lifetime"])


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample on the metrics endpoint: (name, sorted labels) -> value."""
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def total(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], metric: str, /, **labels: str
) -> float:
    """The sum of name's samples that carry these labels."""
    return sum(
        v for (n, ls), v in samples.items() if n == metric and labels.items() <= dict(ls).items()
    )


@pytest.fixture(scope="module")
def metrics_url() -> Iterator[str]:
    """The operator's metrics endpoint, as `mailrelay operator` serves it
    ($MAILRELAY_OPERATOR_METRICS_LISTEN): the process's metrics, so counts are
    compared before and after."""
    from mailrelay_operator.main import serve_metrics

    host = next_loopback()
    port = free_port(host)
    server = serve_metrics(f"{host}:{port}")
    try:
        yield f"http://{host}:{port}/metrics"
    finally:
        server.shutdown()


@pytest.fixture
def relays(kube: Kube, operator: RunningOperator) -> dict[str, dict[str, Any]]:
    docs = relay_and_domain(STUCK, NS, replicas=2) + relay_and_domain(PROMPT, NS)
    return apply_reconciled(kube, operator, NS, docs)


@pytest.fixture
def silent_pod(operator: RunningOperator) -> Iterator[SilentPod]:
    """Pod 1 of the stuck relay, silent; the operator waits for it up to 10 minutes."""
    from mailrelay_operator.pods import PodAddress, PodClient, cluster_address

    pod = SilentPod()
    r = operator.reconciler
    saved = operator.call(lambda: (r.pod_address, r.pod_client))
    patient = PodClient(aiohttp.ClientTimeout(total=600))

    def address(relay: dict[str, Any], ordinal: int) -> PodAddress:
        if relay["metadata"]["name"] == STUCK and ordinal == 1:
            return PodAddress(control=pod.control, handover=f"{pod.host}:{pod.port}")
        return cluster_address(relay, ordinal)

    def use() -> None:
        r.pod_address, r.pod_client = address, patient

    operator.call(use)
    try:
        yield pod
    finally:
        pod.close()

        def restore() -> None:
            r.pod_address, r.pod_client = saved

        operator.call(restore)
        operator.settle()
        asyncio.run_coroutine_threadsafe(patient.close(), operator.loop).result(timeout=30)


def test_a_stuck_relay_holds_up_no_other(
    kube: Kube,
    operator: RunningOperator,
    relays: dict[str, dict[str, Any]],
    silent_pod: SilentPod,
    metrics_url: str,
) -> None:
    r = operator.reconciler
    stuck_key, prompt_key = (NS, STUCK), (NS, PROMPT)
    before = scrape(metrics_url)
    t0 = time.time()

    kube.patch("mailrelay", STUCK, {"spec": {"replicas": 1}}, NS)
    wait_for("the drain request at the silent pod", lambda: silent_pod.connections)
    stuck_task = operator.call(lambda: r.running.get(stuck_key))
    assert stuck_task is not None, "the stuck relay's reconcile is not running"

    kube.patch("mailrelay", PROMPT, {"spec": {"queue": {"lifetime": "3d"}}}, NS)
    wait_for("prompt's ConfigMap", lambda: lifetime_in_config(kube, PROMPT) == "3d", timeout=120)
    wait_for("prompt Reconciled at its new generation", lambda: reconciled(kube, PROMPT, NS), 120)
    wait_for("prompt's reconcile over", lambda: prompt_key not in operator.call(lambda: r.running))

    # Meanwhile the stuck relay's reconcile, the very same one, still waits for its pod.
    assert operator.call(lambda: r.running.get(stuck_key)) is stuck_task
    assert not operator.call(stuck_task.done)
    sts = kube.get("statefulset", STUCK, NS)
    assert sts is not None and sts["spec"]["replicas"] == 2  # not drained: not shrunk
    after = scrape(metrics_url)
    assert total(after, "mailrelay_operator_queue_depth") >= 1  # the stuck relay
    prompt_success = total(
        after, "mailrelay_operator_last_success_timestamp_seconds", namespace=NS, name=PROMPT
    )
    stuck_success = total(
        after, "mailrelay_operator_last_success_timestamp_seconds", namespace=NS, name=STUCK
    )
    assert prompt_success >= t0 > stuck_success > 0
    applied = "mailrelay_operator_reconciles_total"
    assert total(after, applied, result="applied") > total(before, applied, result="applied")
    count = "mailrelay_operator_reconcile_duration_seconds_count"
    assert total(after, count) > total(before, count)

    # The pod goes away: the drain request fails, the reconcile ends, and the
    # relay says which pod it could not reach (and keeps its replicas).
    silent_pod.close()
    wait_for("the stuck reconcile over", stuck_task.done, timeout=60)
    draining = wait_for(
        "ScalingDown names the unreachable pod",
        lambda: (
            (c := condition(kube.get("mailrelay", STUCK, NS), "ScalingDown"))
            and "unreachable" in c.get("message", "")
            and c
        ),
    )
    assert f"{STUCK}-1" in draining["message"], draining
    kube.patch(
        "mailrelay", STUCK, {"spec": {"replicas": 2}}, NS
    )  # called off: nothing left polling the pod
    wait_for(
        "the scale-down called off",
        lambda: condition(kube.get("mailrelay", STUCK, NS), "ScalingDown").get("status") == "False",
    )


def test_metrics_count_failed_reconciles(
    kube: Kube, operator: RunningOperator, metrics_url: str
) -> None:
    """A relay whose ConfigMap name is taken by an object not its own: the
    reconcile fails (Reconciled=False, ResourceExists) and counts as an error."""
    kube.apply(f"apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {NS}\n")
    kube.apply(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": f"{CLASH}-config", "namespace": NS},
                "data": {"mine": "yes"},
            }
        )
    )
    before = scrape(metrics_url)
    kube.apply(yaml.safe_dump_all(relay_and_domain(CLASH, NS)))
    refused = wait_for(
        "clash refused",
        lambda: (
            (c := condition(kube.get("mailrelay", CLASH, NS), "Reconciled"))
            and c.get("status") == "False"
            and c
        ),
    )
    assert refused["reason"] == "ResourceExists", refused
    errors = "mailrelay_operator_reconcile_errors_total"
    wait_for(
        "the error counted", lambda: total(scrape(metrics_url), errors) > total(before, errors)
    )
    after = scrape(metrics_url)
    failed = "mailrelay_operator_reconciles_total"
    assert total(after, failed, result="failed") > total(before, failed, result="failed")
    assert (
        total(after, "mailrelay_operator_last_success_timestamp_seconds", namespace=NS, name=CLASH)
        == 0
    )
    kube.kubectl("delete", "mailrelay", CLASH, "-n", NS)
    kube.kubectl("delete", "configmap", f"{CLASH}-config", "-n", NS)
    operator.settle()
