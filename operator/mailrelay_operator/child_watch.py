"""The operator's own metadata-only list+watch of its ConfigMaps.

A relay's ConfigMaps are large (domain and recipient shards, up to ~190 KB
each, 40 and more at 100,000 RelayDomains) and all applied at once after a
render: a watch of whole objects (kopf's) received each of them back whole,
parsed it and queued it, while what an event decides needs only the
metadata (EventRouter.child_event: the instance label, managedFields). This
watch asks the API server for PartialObjectMetadata (kubeapi.METADATA_ONLY),
so no ConfigMap's data ever reaches the operator.

Contract: as InputWatch's `run` (the same stream, batches, back-off, 410 and
health), over ConfigMaps with the operator's label; no seed: the first
listing is the start of the first watch, and what it lists reaches
child_event as not deleted (as kopf's listing did: nothing applied yet, so
nothing to apply again). A listing after a 410 does not tell what was
deleted meanwhile: the next resync applies every child again.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mailrelay_operator import naming
from mailrelay_operator.cluster import Key, key_of
from mailrelay_operator.input_watch import (
    WATCH_TIMEOUT_SECONDS,
    InputWatch,
    Scope,
    WatchEvent,
    event_parts,
)
from mailrelay_operator.kubeapi import KubeObject, WatchStream, resource_path

OWNED_SELECTOR = f"{naming.LABEL_MANAGED_BY}={naming.MANAGED_BY}"


class ChildWatch(InputWatch):
    @property
    def kinds(self) -> tuple[str, ...]:
        return ("ConfigMap",)

    def _path(self, kind: str, scope: Scope) -> str:
        return resource_path("v1", kind, scope)

    def _list_page(
        self, path: str, kind: str, limit: int, token: str | None
    ) -> tuple[dict[Key, Any], str, str | None]:
        items, version, token = self.api.list_page_sync(
            path, limit, token, OWNED_SELECTOR, metadata_only=True
        )
        objs = (child(item, kind) for item in items)
        return {key_of(obj): obj for obj in objs}, version, token

    def _open(self, path: str, version: str) -> WatchStream:
        return self.api.watch_sync(
            path, version, WATCH_TIMEOUT_SECONDS, OWNED_SELECTOR, metadata_only=True
        )

    def _trim_event(self, event: KubeObject, kind: str) -> WatchEvent:
        etype, obj, at = event_parts(event)
        return (etype, None if obj is None else child(obj, kind), at)

    def _deliver(self, kind: str, obj: Any, deleted: bool) -> None:
        self.events.child_event(obj, deleted)

    def _gone(self, kind: str, scope: Scope, listed: set[Key]) -> list[Any]:
        return []


def child(obj: Mapping[str, Any], kind: str, api_version: str = "v1") -> KubeObject:
    """What child_event reads of a child: its kind and metadata (of a
    PartialObjectMetadata, or of the whole object: not a big ConfigMap's data)."""
    return {"apiVersion": api_version, "kind": kind, "metadata": dict(obj.get("metadata") or {})}
