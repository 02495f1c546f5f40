"""The periodic resync replays the watch caches, on a real kube-apiserver: it
renders and applies every relay again, and lists nothing (with a million
recipients, a LIST of every RecipientList each resync would cost more than the
drift it finds). The API server's own request counters are the witness."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml
from mrtest.kube import Kube, RunningOperator, condition, wait_for
from mrtest.objects import relay_and_domain
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.kube
NS = "resync"
NAME = "replay"


def manifests() -> str:
    docs: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}},
        *relay_and_domain(NAME, NS, recipients="listed"),
        {
            "apiVersion": "mailrelay.io/v1alpha1",
            "kind": "RecipientList",
            "metadata": {"name": "replay-people", "namespace": NS},
            "spec": {
                "domainRef": {"name": "replay-example"},
                "addresses": [f"user{i}@replay.example" for i in range(50)],
            },
        },
    ]
    return yaml.safe_dump_all(docs)


def lists_served(kube: Kube) -> dict[str, float]:
    """LIST requests the API server has answered so far, per resource of ours."""
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(kube.kubectl("get", "--raw", "/metrics")):
        for s in family.samples:
            if s.name == "apiserver_request_total" and s.labels.get("verb") == "LIST":
                resource = s.labels.get("resource", "")
                counts[resource] = counts.get(resource, 0) + s.value
    return {r: counts.get(r, 0) for r in ("mailrelays", "relaydomains", "recipientlists")}


def test_resync_lists_nothing_and_renders_from_the_caches(
    kube: Kube, operator: RunningOperator
) -> None:
    kube.apply(manifests())
    wait_for(
        "replay Reconciled",
        lambda: condition(kube.get("mailrelay", NAME, NS), "Reconciled").get("status") == "True",
    )
    operator.settle()
    r = operator.reconciler
    key = (NS, NAME)
    rendered = operator.call(lambda: r.relays[key].rendered)
    assert rendered is not None and rendered.recipients == 50
    writes = operator.call(lambda: r.api.writes)
    before = lists_served(kube)
    assert before["recipientlists"] >= 1  # the operator's seed and kopf's watch began so

    operator.full_pass(resync=True)

    # Rendered again (a new render, from the cached inputs) and applied again.
    again = operator.call(lambda: r.relays[key].rendered)
    assert again is not rendered and again.recipients == 50
    assert again.config_hash == rendered.config_hash
    assert operator.call(lambda: r.api.writes) > writes
    assert lists_served(kube) == before
    config = kube.get("configmap", f"{NAME}-config", NS)
    assert config is not None
    domains = json.loads(config["data"]["domains.json"])["domains"]
    assert [d["domain"] for d in domains] == ["replay.example"]
