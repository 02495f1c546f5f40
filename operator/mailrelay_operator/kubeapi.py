"""A small Kubernetes REST client: server-side apply, status patches, deletes.

On urllib3 alone (a pool of connections, thread-safe): where the API server is
and how to authenticate comes from the pod's service account, else from
$KUBECONFIG (`Connection.load`). Not the official client: its generated
models and their imports are ~20 MiB of the operator's resident memory, and
requests here are JSON in, JSON out. Blocking calls run in threads so the
operator's event loop never waits on the network.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import ssl
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import urllib3
import yaml

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
    ("events.k8s.io/v1", "Event"): "events",
    **{(API_VERSION, k.kind): k.plural for k in KINDS.values()},
}

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
# A projected service-account token is rotated in its file: read again this often.
TOKEN_REREAD_SECONDS = 60.0
CONNECTIONS_PER_HOST = 16  # requests at once from the executor's threads


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


@dataclass
class Connection:
    """The API server's URL, a pool of connections to it, and the credentials."""

    server: str
    pool: urllib3.PoolManager
    token: str | None = None
    token_file: Path | None = None  # read again every TOKEN_REREAD_SECONDS
    basic: tuple[str, str] | None = None  # username, password
    _token_read: float = field(default=float("-inf"), repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def load(cls) -> Connection:
        """In a pod: the service account; elsewhere: $KUBECONFIG (or ~/.kube/config)."""
        host = os.environ.get("KUBERNETES_SERVICE_HOST")
        port = os.environ.get("KUBERNETES_SERVICE_PORT")
        if host and port and (SERVICE_ACCOUNT / "token").is_file():
            ca = SERVICE_ACCOUNT / "ca.crt"
            context = ssl.create_default_context(cafile=str(ca) if ca.is_file() else None)
            host = f"[{host}]" if ":" in host else host
            token = SERVICE_ACCOUNT / "token"
            return cls(f"https://{host}:{port}", _pool(context), token_file=token)
        return from_kubeconfig(os.environ.get("KUBECONFIG") or "~/.kube/config")

    def headers(self) -> dict[str, str]:
        if self.token_file is not None:
            with self._lock:
                if time.monotonic() - self._token_read >= TOKEN_REREAD_SECONDS:
                    self.token = self.token_file.read_text().strip()
                    self._token_read = time.monotonic()
        if self.token:
            return {"Authorization": f"Bearer {self.token}"}
        if self.basic:
            return urllib3.make_headers(basic_auth=":".join(self.basic))
        return {}


def _pool(context: ssl.SSLContext | None) -> urllib3.PoolManager:
    return urllib3.PoolManager(maxsize=CONNECTIONS_PER_HOST, ssl_context=context)


def from_kubeconfig(paths: str) -> Connection:
    """The current context of a kubeconfig (a list of files: the first value wins):
    the server, its CA, and a client certificate, a token or a username/password.
    Relative paths are relative to the file that names them."""
    current: str | None = None
    named: dict[str, dict[str, Any]] = {"contexts": {}, "clusters": {}, "users": {}}
    for raw in paths.split(os.pathsep):
        if not raw:
            continue
        path = Path(raw).expanduser()
        doc = yaml.safe_load(path.read_text()) or {}
        current = current or doc.get("current-context")
        for section, entries in named.items():
            inner = section[:-1]  # "contexts" -> "context"
            for item in doc.get(section) or []:
                entries.setdefault(item["name"], _resolved(item.get(inner) or {}, path.parent))
    if not current:
        raise KubeError(0, "NoKubeconfig", f"no current-context in {paths}")
    context = named["contexts"][current]
    cluster = named["clusters"][context["cluster"]]
    user = named["users"].get(context.get("user", ""), {})
    server = str(cluster["server"]).rstrip("/")
    tls = None
    if server.startswith("https:"):
        tls = _tls_context(cluster, user)
    token = user.get("token")
    token_file = Path(user["tokenFile"]) if user.get("tokenFile") else None
    plugin = next((k for k in ("exec", "auth-provider") if user.get(k)), None)
    certificate = user.get("client-certificate-data") or user.get("client-certificate")
    if plugin and not (token or token_file or certificate):
        # Cloud kubeconfigs (EKS, GKE, AKS) log in through a plugin; kopf's own
        # login cannot either. In the cluster the service account is used.
        why = f"user {context.get('user')!r} logs in with {plugin}, which the operator does not run"
        raise KubeError(0, "UnsupportedKubeconfig", f"{why}: give it a token or a certificate")
    basic = None
    if user.get("username"):
        basic = (str(user["username"]), str(user.get("password") or ""))
    return Connection(server, _pool(tls), token, token_file, basic)


_PATH_KEYS = ("certificate-authority", "client-certificate", "client-key", "tokenFile")


def _resolved(entry: dict[str, Any], base: Path) -> dict[str, Any]:
    return {k: str(base / v) if k in _PATH_KEYS and v else v for k, v in entry.items()}


def _tls_context(cluster: Mapping[str, Any], user: Mapping[str, Any]) -> ssl.SSLContext:
    ca_data = cluster.get("certificate-authority-data")
    context = ssl.create_default_context(
        cafile=cluster.get("certificate-authority"),
        cadata=base64.b64decode(ca_data).decode() if ca_data else None,
    )
    if cluster.get("insecure-skip-tls-verify"):
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    cert, key = user.get("client-certificate"), user.get("client-key")
    cert_data, key_data = user.get("client-certificate-data"), user.get("client-key-data")
    if cert_data and key_data:
        # ssl loads a client certificate from files only: a private file, gone after.
        with tempfile.NamedTemporaryFile("wb", suffix=".pem") as f:
            f.write(base64.b64decode(cert_data) + b"\n" + base64.b64decode(key_data))
            f.flush()
            context.load_cert_chain(f.name)
    elif cert and key:
        context.load_cert_chain(cert, key)
    return context


class KubeApi:
    def __init__(self, connection: Connection | None = None) -> None:
        self.connection = connection or Connection.load()
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
        accept: str = "application/json",
    ) -> Any:
        """The request, its response not read yet (urllib3's, preload_content off)."""
        conn = self.connection
        headers = {"Accept": accept, **conn.headers()}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = content_type or "application/json"
        url = conn.server + path + (f"?{urlencode(query)}" if query else "")
        try:
            return conn.pool.request(
                method,
                url,
                body=data,
                headers=headers,
                preload_content=False,
                redirect=False,
                timeout=urllib3.Timeout(connect=timeout[0], read=timeout[1]),
            )
        except urllib3.exceptions.SSLError as e:
            raise KubeError(0, "SSLError", str(e)) from None

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
        self,
        path: str,
        limit: int,
        token: str | None = None,
        label_selector: str = "",
        metadata_only: bool = False,
    ) -> tuple[list[KubeObject], str, str | None]:
        """One page of a listing: its items, the listing's resourceVersion, the
        continue token of the next page (None: the last one). An expired token
        is a KubeError 410. metadata_only: each item's metadata alone (_accept)."""
        query: list[tuple[str, Any]] = [("limit", limit)]
        if label_selector:
            query.append(("labelSelector", label_selector))
        if token:
            query.append(("continue", token))
        doc = _json_of(self._send("GET", path, query, accept=_accept(metadata_only, True)))
        meta = doc.get("metadata") or {}
        return (
            list(doc.get("items") or []),
            str(meta.get("resourceVersion") or ""),
            meta.get("continue") or None,
        )

    def watch_sync(
        self,
        path: str,
        version: str,
        timeout_seconds: int,
        label_selector: str = "",
        metadata_only: bool = False,
    ) -> WatchStream:
        """A watch from `version`, with bookmarks; the server ends it after
        timeout_seconds (the client gives up 30 s later on a silent stream)."""
        query: list[tuple[str, Any]] = [
            ("watch", "true"),
            ("resourceVersion", version),
            ("allowWatchBookmarks", "true"),
            ("timeoutSeconds", timeout_seconds),
        ]
        if label_selector:
            query.append(("labelSelector", label_selector))
        resp = self._send(
            "GET", path, query, timeout=(10, timeout_seconds + 30), accept=_accept(metadata_only)
        )
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

    def create_sync(self, obj: Mapping[str, Any]) -> KubeObject:
        """POSTs a new object; a KubeError 409 if one of its name exists."""
        self._count_write()
        return self._post_sync(obj)

    def create_event_sync(self, event: Mapping[str, Any]) -> None:
        """POSTs an events.k8s.io/v1 Event (not counted in `writes`: those are
        the children and statuses, which tests count)."""
        self._post_sync(event)

    def _post_sync(self, obj: Mapping[str, Any]) -> KubeObject:
        path = resource_path(obj["apiVersion"], obj["kind"], obj["metadata"]["namespace"])
        return _json_of(self._send("POST", path, [], dict(obj), "application/json"))

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


# Objects as PartialObjectMetadata (their metadata alone, managedFields included):
# the API server's own metadata-only form (client-go's metadata informers ask so);
# a listing's is PartialObjectMetadataList. Plain JSON after the comma: the whole
# object, if a server did not offer it (the readers take only the metadata).
METADATA_ONLY = "application/json;as=PartialObjectMetadata{};g=meta.k8s.io;v=v1, application/json"


def _accept(metadata_only: bool, of_list: bool = False) -> str:
    if not metadata_only:
        return "application/json"
    return METADATA_ONLY.format("List" if of_list else "")


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
