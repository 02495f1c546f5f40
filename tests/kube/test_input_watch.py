"""The operator's own list+watch of RelayDomains and RecipientLists
(input_watch.py) on a real kube-apiserver, with the operator's RBAC: it
follows creates, updates and deletes; a watch from a compacted-away version
(410 Gone) lists again, which also drops what was deleted while nobody watched."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import yaml
from kube.conftest import service_account_kubeconfig
from mailrelay_operator.apply import ChildApplier
from mailrelay_operator.cluster import ClusterView
from mailrelay_operator.events import EventRouter
from mailrelay_operator.input_watch import InputWatch
from mailrelay_operator.inputs import InputCache
from mailrelay_operator.kubeapi import KubeApi
from mailrelay_operator.workqueue import WorkQueue
from mrtest.kube import Kube, until

pytestmark = pytest.mark.kube
NS = "inwatch"
RELAY = ("inwatch", "edge")


def domain(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "mailrelay.io/v1alpha1",
        "kind": "RelayDomain",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "domain": f"{name}.example",
            "relayRef": {"name": "edge"},
            "nextHop": {"host": "mail.example.net"},
            "recipients": "listed",
        },
    }


def recipients(name: str, domain_name: str, addresses: list[str]) -> dict[str, Any]:
    return {
        "apiVersion": "mailrelay.io/v1alpha1",
        "kind": "RecipientList",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"domainRef": {"name": domain_name}, "addresses": addresses},
    }


def test_watch_follows_changes_and_relists_after_expiry(
    kube: Kube, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kube.apply(yaml.safe_dump({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}))
    kube.apply(
        yaml.safe_dump_all(
            [domain("first"), recipients("staff", "first", ["a@first.example"]), domain("gone")]
        )
    )
    monkeypatch.setenv("KUBECONFIG", str(service_account_kubeconfig(kube, tmp_path)))

    async def apply(*docs: dict[str, Any]) -> None:
        await asyncio.to_thread(kube.apply, yaml.safe_dump_all(list(docs)))

    async def delete(kind: str, name: str) -> None:
        await asyncio.to_thread(kube.kubectl, "delete", kind, name, "-n", NS, "--wait=false")

    async def scenario() -> None:
        api = KubeApi()
        inputs, queue = InputCache(), WorkQueue()
        router = EventRouter(queue, inputs, ChildApplier(api), ClusterView)
        watch = InputWatch(api, router, (NS,))
        await watch.seed()
        assert set(inputs.domains) == {(NS, "first"), (NS, "gone")}
        assert set(inputs.lists) == {(NS, "staff")}
        assert queue.take()[0] == {RELAY: True}  # the relay renders what was listed

        task = asyncio.create_task(watch.run())
        try:
            # Created, updated, deleted: each reaches the cache and marks the relay.
            await apply(domain("second"))
            await until("second cached", lambda: (NS, "second") in inputs.domains)
            await apply(recipients("staff", "first", ["a@first.example", "b@first.example"]))
            staff = (NS, "staff")
            await until("staff updated", lambda: len(inputs.lists[staff]["spec"]["addresses"]) == 2)
            assert list(inputs.lists[staff]["spec"]["addresses"])[1] == "b@first.example"
            await delete("relaydomain", "first")
            await until("first dropped", lambda: (NS, "first") not in inputs.domains)
            assert queue.take()[0] == {RELAY: True}
            assert watch.lists_done == 2  # no listing beyond the seed's
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

        # Nobody watches: a deletion and a creation are missed.
        await delete("relaydomain", "gone")
        await apply(domain("third"))
        # The next watch starts from a version compacted away long ago: 410 Gone.
        watch.versions[("RelayDomain", NS)] = "1"
        task = asyncio.create_task(watch.run())
        try:
            await until("a new listing", lambda: watch.lists_done == 3)
            assert set(inputs.domains) == {(NS, "second"), (NS, "third")}
            # Watching again from that listing's version.
            await apply(domain("fourth"))
            await until("fourth cached", lambda: (NS, "fourth") in inputs.domains)
            assert watch.lists_done == 3
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(scenario())
