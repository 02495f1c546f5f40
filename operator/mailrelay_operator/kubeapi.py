"""A small Kubernetes REST client: server-side apply, status patches, deletes.

Built on the official client's ApiClient (auth, kubeconfig or in-cluster,
token refresh); its blocking calls run in threads so the operator's event loop
never waits on the network.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from kubernetes import client as k8s_client
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException

from mailrelay_api.schema import API_VERSION, KINDS
from mailrelay_operator.certificate import CERT_MANAGER_API
from mailrelay_operator.naming import FIELD_MANAGER

# A Kubernetes object as the API server's JSON (what every builder returns).
KubeObject = dict[str, Any]

# apiVersion, kind -> plural; only the kinds the operator touches.
PLURALS: dict[tuple[str, str], str] = {
    ("v1", "ConfigMap"): "configmaps",
    ("v1", "Service"): "services",
    ("v1", "Secret"): "secrets",
    ("v1", "Pod"): "pods",
    ("apps/v1", "StatefulSet"): "statefulsets",
    ("policy/v1", "PodDisruptionBudget"): "poddisruptionbudgets",
    ("networking.k8s.io/v1", "NetworkPolicy"): "networkpolicies",
    (CERT_MANAGER_API, "Certificate"): "certificates",
    **{(API_VERSION, k.kind): k.plural for k in KINDS.values()},
}


@dataclass
class KubeError(Exception):
    status: int
    reason: str
    message: str

    def __str__(self) -> str:
        return f"{self.status} {self.reason}: {self.message}"


def resource_path(
    api_version: str, kind: str, namespace: str | None, name: str | None = None
) -> str:
    """The REST path of a kind (in a namespace; namespace None: across all of them)."""
    base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    where = f"/namespaces/{namespace}" if namespace is not None else ""
    path = f"{base}{where}/{PLURALS[(api_version, kind)]}"
    return f"{path}/{name}" if name else path


def object_path(obj: Mapping[str, Any]) -> str:
    meta = obj["metadata"]
    return resource_path(obj["apiVersion"], obj["kind"], meta["namespace"], meta["name"])


def load_api_client() -> k8s_client.ApiClient:
    """In a pod: the service account; elsewhere: $KUBECONFIG."""
    cfg = k8s_client.Configuration()
    try:
        k8s_config.load_incluster_config(client_configuration=cfg)
    except k8s_config.ConfigException:
        # $KUBECONFIG as it is now: the client reads its default at import time.
        k8s_config.load_kube_config(
            config_file=os.environ.get("KUBECONFIG") or None, client_configuration=cfg
        )
    cfg.connection_pool_maxsize = 16
    return k8s_client.ApiClient(cfg)


class KubeApi:
    def __init__(self, api_client: k8s_client.ApiClient | None = None) -> None:
        self.api = api_client or load_api_client()
        self.writes = 0  # apply/patch/delete requests sent (for tests and benchmarks)
        self._writes_lock = threading.Lock()  # the calls run in several threads

    def _count_write(self) -> None:
        with self._writes_lock:
            self.writes += 1

    def _send(
        self,
        method: str,
        path: str,
        query: list[tuple[str, Any]] | None = None,
        body: Any = None,
        content_type: str | None = None,
        timeout: tuple[float, float] = (10, 60),
    ) -> Any:
        """The request, its response not read yet (urllib3's, preload_content off)."""
        headers = {"Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        request = self.api.param_serialize(
            method,
            path,
            query_params=query or [],
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        try:
            return self.api.call_api(*request, _request_timeout=timeout).response
        except ApiException as e:
            raise KubeError(int(e.status or 0), str(e.reason or ""), str(e.body or "")) from None

    # --- blocking calls -------------------------------------------------------------
    def get_sync(self, path: str) -> KubeObject | None:
        try:
            return _json_of(self._send("GET", path))
        except KubeError as e:
            if e.status == 404:
                return None
            raise

    def list_objects_sync(self, path: str, label_selector: str = "") -> list[KubeObject]:
        query = [("labelSelector", label_selector)] if label_selector else []
        return list(_json_of(self._send("GET", path, query)).get("items") or [])

    def list_all_sync(self, path: str, page: int = 500) -> tuple[list[KubeObject], str]:
        """Every object, paginated; with the listing's resourceVersion."""
        items: list[KubeObject] = []
        version, token = "", None
        while True:
            got, at, token = self.list_page_sync(path, page, token)
            items.extend(got)
            version = version or at
            if not token:
                return items, version

    def list_page_sync(
        self, path: str, limit: int, token: str | None = None
    ) -> tuple[list[KubeObject], str, str | None]:
        """One page of a listing: its items, the listing's resourceVersion, the
        continue token of the next page (None: the last one). An expired token
        is a KubeError 410."""
        query: list[tuple[str, Any]] = [("limit", limit)]
        if token:
            query.append(("continue", token))
        doc = _json_of(self._send("GET", path, query))
        meta = doc.get("metadata") or {}
        return (
            list(doc.get("items") or []),
            str(meta.get("resourceVersion") or ""),
            meta.get("continue") or None,
        )

    def watch_sync(self, path: str, version: str, timeout_seconds: int) -> WatchStream:
        """A watch from `version`, with bookmarks; the server ends it after
        timeout_seconds (the client gives up 30 s later on a silent stream)."""
        query: list[tuple[str, Any]] = [
            ("watch", "true"),
            ("resourceVersion", version),
            ("allowWatchBookmarks", "true"),
            ("timeoutSeconds", timeout_seconds),
        ]
        resp = self._send("GET", path, query, timeout=(10, timeout_seconds + 30))
        if not 200 <= int(resp.status) <= 299:
            _json_of(resp)  # raises the API server's error
        return WatchStream(resp)

    def apply_sync(self, obj: Mapping[str, Any]) -> KubeObject:
        """Server-side apply under the operator's one field manager, taking conflicts."""
        self._count_write()
        return _json_of(
            self._send(
                "PATCH",
                object_path(obj),
                [("fieldManager", FIELD_MANAGER), ("force", "true")],
                dict(obj),
                "application/apply-patch+yaml",
            )
        )

    def patch_labels_sync(self, path: str, labels: Mapping[str, str | None]) -> KubeObject:
        """Merge-patch of metadata.labels (None removes one), under our field manager."""
        self._count_write()
        return _json_of(
            self._send(
                "PATCH",
                path,
                [("fieldManager", FIELD_MANAGER)],
                {"metadata": {"labels": dict(labels)}},
                "application/merge-patch+json",
            )
        )

    def patch_status_sync(self, path: str, status: dict[str, Any]) -> KubeObject:
        """Merge-patch of /status: conditions is written whole (merge replaces lists).
        Under our field manager, so `kubectl get --show-managed-fields` says who wrote it."""
        self._count_write()
        return _json_of(
            self._send(
                "PATCH",
                path + "/status",
                [("fieldManager", FIELD_MANAGER)],
                {"status": status},
                "application/merge-patch+json",
            )
        )

    def create_event_sync(self, event: Mapping[str, Any]) -> None:
        """POSTs an events.k8s.io/v1 Event (not counted in `writes`: those are
        the children and statuses, which tests count)."""
        path = f"/apis/events.k8s.io/v1/namespaces/{event['metadata']['namespace']}/events"
        _json_of(self._send("POST", path, [], dict(event), "application/json"))

    def delete_sync(self, path: str, propagation: str = "Background") -> None:
        self._count_write()
        try:
            _json_of(
                self._send(
                    "DELETE",
                    path,
                    [],
                    {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": propagation},
                    "application/json",
                )
            )
        except KubeError as e:
            if e.status != 404:
                raise

    # --- the same, off the event loop ---------------------------------------------
    async def get(self, path: str) -> KubeObject | None:
        return await asyncio.to_thread(self.get_sync, path)

    async def list_objects(self, path: str, label_selector: str = "") -> list[KubeObject]:
        return await asyncio.to_thread(self.list_objects_sync, path, label_selector)

    async def list_all(self, path: str) -> tuple[list[KubeObject], str]:
        return await asyncio.to_thread(self.list_all_sync, path)

    async def list_page(
        self, path: str, limit: int, token: str | None = None
    ) -> tuple[list[KubeObject], str, str | None]:
        return await asyncio.to_thread(self.list_page_sync, path, limit, token)

    async def apply(self, obj: Mapping[str, Any]) -> KubeObject:
        return await asyncio.to_thread(self.apply_sync, obj)

    async def patch_labels(self, path: str, labels: Mapping[str, str | None]) -> KubeObject:
        return await asyncio.to_thread(self.patch_labels_sync, path, labels)

    async def patch_status(self, path: str, status: dict[str, Any]) -> KubeObject:
        return await asyncio.to_thread(self.patch_status_sync, path, status)

    async def create_event(self, event: Mapping[str, Any]) -> None:
        await asyncio.to_thread(self.create_event_sync, event)

    async def delete(self, path: str, propagation: str = "Background") -> None:
        await asyncio.to_thread(self.delete_sync, path, propagation)


def _json_of(resp: Any) -> KubeObject:
    """A response's JSON, read whole (the connection goes back to the pool)."""
    try:
        data = resp.data
    finally:
        resp.release_conn()
    _raise_unless_ok(resp, data)
    return json.loads(data) if data else {}


def _raise_unless_ok(resp: Any, data: bytes | None) -> None:
    """A KubeError with the API server's reason and message for a non-2xx response."""
    if 200 <= int(resp.status) <= 299:
        return
    try:
        detail = json.loads(data or b"{}")
    except ValueError:
        detail = {}
    raise KubeError(
        int(resp.status),
        str(detail.get("reason") or resp.reason or ""),
        str(detail.get("message") or (data or b"").decode(errors="replace")),
    )


class WatchStream:
    """A watch response, read as one JSON event a line, in a thread; `close`
    from any thread ends a read that waits (the socket is shut down)."""

    def __init__(self, resp: Any) -> None:
        self._resp = resp
        self.closed = False

    def lines(self) -> Iterator[list[bytes]]:
        """The event lines as they arrive (blocking), those of one read
        together; ends with the stream, or quietly once closed."""
        rest = b""
        try:
            for chunk in self._resp.stream(None, decode_content=True):
                lines = (rest + chunk).split(b"\n")
                rest = lines.pop()
                if lines:
                    yield [ln for ln in lines if ln.strip()]
        except Exception:
            if not self.closed:
                raise
            return
        if rest.strip() and not self.closed:
            yield [rest]

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(Exception):
            self._resp.shutdown()
        with contextlib.suppress(Exception):
            self._resp.close()
