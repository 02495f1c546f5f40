"""The operator's metadata-only watch of its ConfigMaps (child_watch.py) on a
real kube-apiserver, with the operator's RBAC: the API server sends each one's
metadata alone (no data), only those with the operator's label, creates,
updates and deletes; without a version to watch from, it lists again."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import yaml
from kube.conftest import service_account_kubeconfig
from mailrelay_operator import naming
from mailrelay_operator.apply import ChildApplier
from mailrelay_operator.child_watch import ChildWatch
from mailrelay_operator.cluster import ClusterView
from mailrelay_operator.events import EventRouter
from mailrelay_operator.input_watch import WatchEvent
from mailrelay_operator.inputs import InputCache
from mailrelay_operator.kubeapi import KubeApi, KubeObject
from mailrelay_operator.workqueue import WorkQueue
from mrtest.kube import Kube, until

pytestmark = pytest.mark.kube
NS = "childwatch"
SHARD = "x" * 200_000  # a shard's size: never sent to the watch


def config_map(name: str, owned: bool = True, value: str = SHARD) -> dict[str, Any]:
    labels = {naming.LABEL_INSTANCE: "edge"}
    if owned:
        labels[naming.LABEL_MANAGED_BY] = naming.MANAGED_BY
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": NS, "labels": labels},
        "data": {"shard": value},
    }


class Recording(ChildWatch):
    """Keeps the raw objects the API server sent, and what reached child_event."""

    raw: list[KubeObject]
    got: list[tuple[str, bool, KubeObject]]

    def _trim_event(self, event: KubeObject, kind: str) -> WatchEvent:
        self.raw.append(event.get("object") or {})
        return super()._trim_event(event, kind)

    def _deliver(self, kind: str, obj: Any, deleted: bool) -> None:
        self.got.append((obj["metadata"]["name"], deleted, obj))


def test_child_watch_gets_metadata_only(
    kube: Kube, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kube.apply(yaml.safe_dump({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}))
    kube.apply(yaml.safe_dump_all([config_map("listed"), config_map("foreign", owned=False)]))
    monkeypatch.setenv("KUBECONFIG", str(service_account_kubeconfig(kube, tmp_path)))

    async def apply(*docs: dict[str, Any]) -> None:
        await asyncio.to_thread(kube.apply, yaml.safe_dump_all(list(docs)))

    async def scenario() -> None:
        api = KubeApi()
        router = EventRouter(WorkQueue(), InputCache(), ChildApplier(api), ClusterView)
        watch = Recording(api, router, (NS,))
        watch.raw, watch.got = [], []
        task = asyncio.create_task(watch.run())
        try:
            # The first listing: ours only, not deleted.
            await until("listed", lambda: watch.lists_done == 1)
            assert [(n, d) for n, d, _ in watch.got] == [("listed", False)]
            # Created, updated, deleted: metadata only, with managedFields.
            await apply(config_map("second"))
            await until("second", lambda: any(n == "second" for n, _, _ in watch.got))
            await apply(config_map("second", value="changed"))
            await until("second updated", lambda: len(watch.got) == 3)
            await asyncio.to_thread(kube.kubectl, "delete", "configmap", "second", "-n", NS)
            await until("second deleted", lambda: watch.got[-1][:2] == ("second", True))
            assert all(n != "foreign" for n, _, _ in watch.got)
            events = [o for o in watch.raw if o.get("metadata", {}).get("name") == "second"]
            assert events and all(o.get("kind") == "PartialObjectMetadata" for o in events)
            assert all("data" not in o for o in events)
            for _, _, obj in watch.got:
                assert set(obj) == {"apiVersion", "kind", "metadata"}
                assert obj["kind"] == "ConfigMap" and obj["metadata"]["managedFields"]
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

        # No version (as after a 410, which input_watch's test provokes): listed
        # again, then watched from that listing's version.
        watch.versions.pop(("ConfigMap", NS))
        task = asyncio.create_task(watch.run())
        try:
            await until("a new listing", lambda: watch.lists_done == 2)
            await apply(config_map("third"))
            await until("third", lambda: watch.got[-1][:2] == ("third", False))
            assert watch.lists_done == 2
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(scenario())
