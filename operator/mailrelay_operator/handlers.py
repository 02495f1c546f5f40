"""Kopf handlers: thin. They index objects and hand events to events.py; reconciler.py works.

No @kopf.on.create/update handlers: those keep a diff-base annotation with a
copy of the spec, which a large RecipientList overflows (256 KiB). Indexes and
event handlers store nothing on the objects, and need no finalizer.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import kopf

from mailrelay_api.schema import GROUP
from mailrelay_operator import certificate, health, naming, operator_key
from mailrelay_operator import settings as settings_env
from mailrelay_operator.child_watch import OWNED_SELECTOR, child
from mailrelay_operator.cluster import ClusterView, Key, key_of, trim
from mailrelay_operator.events import EventRouter
from mailrelay_operator.input_watch import WATCH_TIMEOUT_SECONDS
from mailrelay_operator.kubeapi import KubeApi, KubeObject
from mailrelay_operator.reconciler import Reconciler

OWNED = {naming.LABEL_MANAGED_BY: naming.MANAGED_BY}
# ConfigMaps are not kopf's: child_watch.py watches their metadata alone.
CHILD_PLURALS = (
    "services",
    "statefulsets",
    "poddisruptionbudgets",
    "networkpolicies",
    "certificates",
)
log = logging.getLogger("mailrelay.operator")
# The reconcilers started in this process, with their loops: tests and the
# benchmark look inside (writes, passes) and poke them (resync).
RUNNING: list[tuple[Reconciler, asyncio.AbstractEventLoop]] = []
# The namespaces served (empty: all); main.run sets it before kopf starts.
NAMESPACES: list[str] = []
# Where /healthz (this URL) and /readyz are served (health.py); main.run sets it.
HEALTH_ENDPOINT: list[str] = []


def configure(settings: kopf.OperatorSettings) -> None:
    # Watch streams that hang silently were kopf's most reported problem:
    # explicit timeouts make every stream reconnect (crate-operator's values).
    settings.watching.server_timeout = WATCH_TIMEOUT_SECONDS
    settings.watching.client_timeout = WATCH_TIMEOUT_SECONDS + 10
    settings.watching.connect_timeout = 30
    # Nothing of ours needs a finalizer or a diff-base; if kopf ever adds one,
    # it carries our name rather than kopf.zalando.org.
    settings.persistence.finalizer = naming.FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
        prefix=naming.ANNOTATION_PREFIX
    )
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=naming.ANNOTATION_PREFIX, key="last-handled-configuration"
    )
    # Kubernetes Events are k8s_events.py's alone (documented reasons, the
    # condition's message). kopf would post its own for a handler's failure:
    # another Event of the same failure, with raw exception text. Its log lines
    # go to the operator's log instead. Off, not a higher level: kopf.event()
    # ignores the level.
    settings.posting.enabled = False
    # Children are watched (a deleted or overwritten one is applied again at
    # once); the API server sends only ours, not every ConfigMap. Secrets are not
    # watched: the operator may write them, never read them (a deleted handover
    # Secret comes back at the next resync).
    for plural in (*CHILD_PLURALS, "pods"):
        settings.watching.label_selectors[plural] = OWNED_SELECTOR


# --- indexes: MailRelays and Namespace labels (few objects) -----------------------------
# RelayDomains and RecipientLists are many: they live in the reconciler's own
# cache (inputs.py), which its own list+watch keeps current (input_watch.py),
# not kopf.
@kopf.index(GROUP, "mailrelays", id="relays_idx")
def relays_idx(body: kopf.Body, **_: Any) -> dict[Key, KubeObject]:
    obj = trim(body)
    return {key_of(obj): obj}


@kopf.index("", "v1", "namespaces", id="namespaces_idx")
def namespaces_idx(name: str, labels: kopf.Labels, **_: Any) -> dict[str, dict[str, str]]:
    return {name: dict(labels)}


def _view(memo: kopf.Memo) -> ClusterView:
    reconciler: Reconciler = memo["reconciler"]
    view = ClusterView.from_indexes(
        memo["indexes"]["relays_idx"], {}, {}, memo["indexes"]["namespaces_idx"]
    )
    # The input cache as it is now, for the whole pass (statuses are queued
    # with the objects the render saw), without a copy of it (inputs.Snapshot).
    inputs = reconciler.inputs
    view.domains, view.lists = inputs.snapshot("RelayDomain"), inputs.snapshot("RecipientList")
    return view


def _events(memo: kopf.Memo) -> EventRouter:
    reconciler: Reconciler = memo["reconciler"]
    return reconciler.events


# --- lifecycle -----------------------------------------------------------------------
@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """The pod's service account, else $KUBECONFIG as it is now (not at import time)."""
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


@kopf.on.startup()
async def start(settings: kopf.OperatorSettings, memo: kopf.Memo, **kwargs: Any) -> None:
    configure(settings)
    memo["indexes"] = {k: kwargs[k] for k in ("relays_idx", "namespaces_idx")}
    # Served before the listing below, and once: kopf retries this handler while
    # the listing fails (API server down, RBAC), and the probes should say so,
    # alive and not ready, instead of finding no server and restarting the pod.
    state: health.Health = memo.setdefault("health_state", health.Health())
    if HEALTH_ENDPOINT and memo.get("health") is None:
        memo["health"] = await health.serve(HEALTH_ENDPOINT[0], state)
    reconciler = Reconciler(
        api=KubeApi(),
        # Reads (or on first start creates) its Secret: a blocking call, once.
        operator_key=await asyncio.to_thread(operator_key.load),
        view=lambda: _view(memo),
        image=os.environ.get(naming.RELAY_IMAGE_ENV) or naming.DEFAULT_RELAY_IMAGE,
        resync_seconds=float(
            os.environ.get(settings_env.RESYNC_SECONDS_ENV) or settings_env.RESYNC_SECONDS_DEFAULT
        ),
        workers=int(os.environ.get(settings_env.WORKERS_ENV) or settings_env.WORKERS_DEFAULT),
        namespaces=tuple(NAMESPACES),
        health=state,
    )
    # The complete picture before the first pass; run() then watches from it.
    await reconciler.seed()
    memo["reconciler"] = reconciler
    memo["task"] = asyncio.create_task(reconciler.run(), name="mailrelay-reconciler")
    state.loop = memo["task"]
    RUNNING.append((reconciler, asyncio.get_running_loop()))


@kopf.on.cleanup()
async def stop(memo: kopf.Memo, **_: Any) -> None:
    task = memo.get("task")
    if task is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    if memo.get("health") is not None:
        await memo["health"].cleanup()


# --- events: mark what changed --------------------------------------------------------
def _deleted(event: kopf.RawEvent) -> bool:
    return event.get("type") == "DELETED"


# Async on purpose: kopf runs sync handlers in threads, and marking wakes an
# asyncio.Event that only the loop's own thread may touch.
@kopf.on.event(GROUP, "mailrelays")
async def relay_event(event: kopf.RawEvent, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    _events(memo).relay_event(dict(body), _deleted(event))


@kopf.on.event("", "v1", "namespaces")
async def namespace_event(name: str, labels: kopf.Labels, memo: kopf.Memo, **_: Any) -> None:
    _events(memo).namespace_event(name, dict(labels))


@kopf.on.event("apps", "v1", "statefulsets", labels=OWNED)
async def statefulset_event(
    event: kopf.RawEvent, body: kopf.Body, memo: kopf.Memo, **_: Any
) -> None:
    _events(memo).statefulset_event(dict(body), _deleted(event))


@kopf.on.event("", "v1", "services", labels=OWNED)
async def service_event(event: kopf.RawEvent, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    _events(memo).service_event(dict(body), _deleted(event))


# The relay pods (ours by their template's label; the API server sends no
# other pod): spec.mx[].pods labels follow re-created and rescheduled pods.
@kopf.on.event("", "v1", "pods", labels=OWNED)
async def pod_event(event: kopf.RawEvent, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    _events(memo).pod_event(_pod(body), _deleted(event))


# A deleted or foreign-edited PDB or NetworkPolicy comes back at once
# (StatefulSets and Services: the handlers above do the same; ConfigMaps:
# child_watch.py, which reads their metadata alone, not their shards).
@kopf.on.event("policy", "v1", "poddisruptionbudgets", labels=OWNED)
async def pdb_event(event: kopf.RawEvent, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    _events(memo).child_event(child(body, "PodDisruptionBudget", "policy/v1"), _deleted(event))


@kopf.on.event(certificate.CERT_MANAGER_GROUP, "v1", "certificates", labels=OWNED)
async def certificate_event(
    event: kopf.RawEvent, body: kopf.Body, memo: kopf.Memo, **_: Any
) -> None:
    _events(memo).certificate_event(dict(body), _deleted(event))


@kopf.on.event(
    "apiextensions.k8s.io",
    "v1",
    "customresourcedefinitions",
    field="metadata.name",
    value=certificate.CERTIFICATE_CRD,
)
async def certificate_crd_event(memo: kopf.Memo, **_: Any) -> None:
    _events(memo).certificate_kind_event()


@kopf.on.event("networking.k8s.io", "v1", "networkpolicies", labels=OWNED)
async def network_policy_event(
    event: kopf.RawEvent, body: kopf.Body, memo: kopf.Memo, **_: Any
) -> None:
    _events(memo).child_event(child(body, "NetworkPolicy", "networking.k8s.io/v1"), _deleted(event))


def _pod(body: kopf.Body) -> KubeObject:
    """Only what pod_event reads (not the pod's status)."""
    return {
        "metadata": dict(body.get("metadata") or {}),
        "spec": {"nodeName": body.get("spec", {}).get("nodeName")},
    }
