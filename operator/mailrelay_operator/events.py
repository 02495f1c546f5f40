"""What a watch event changes: the input cache, the work queue, and what is known of children.

Contract: kopf's handlers (handlers.py) and the input watch (input_watch.py)
call these in the event loop's thread; they never wait and never call the
API. A MailRelay, RelayDomain or RecipientList event marks for a fresh
render the relay it refers to now and the one it referred to before, and
only when its spec changed (its generation): our own status writes come back
as events too. An event of a child (found by its instance label) marks the
owning relay for a look without a render: a StatefulSet's ready replicas or
a Service's address changed, or the child must be applied again
(ChildApplier.child_event).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from mailrelay_operator import certificate, naming, status
from mailrelay_operator.apply import ChildApplier, digest
from mailrelay_operator.cluster import (
    ClusterView,
    Key,
    domain_key_of_list,
    key_of,
    relay_key_of_domain,
)
from mailrelay_operator.inputs import InputCache
from mailrelay_operator.kubeapi import KubeObject
from mailrelay_operator.records import Cached
from mailrelay_operator.workqueue import WorkQueue

log = logging.getLogger("mailrelay.operator")

ObjectRef = tuple[str, Key]  # (kind, (namespace, name))


class Replicas(NamedTuple):
    """A relay StatefulSet's status.replicas and status.readyReplicas."""

    replicas: int = 0
    ready: int = 0


def _identity(obj: Mapping[str, Any]) -> tuple[str, int]:
    """Which object, which spec: our own status writes change neither."""
    return (str(obj["metadata"].get("uid")), int(obj["metadata"].get("generation") or 0))


def owner_key(body: KubeObject) -> Key | None:
    """The relay a child belongs to, by its instance label."""
    meta = body.get("metadata") or {}
    instance = (meta.get("labels") or {}).get(naming.LABEL_INSTANCE)
    if not instance:
        return None
    return (str(meta.get("namespace") or "default"), str(instance))


@dataclass
class EventRouter:
    queue: WorkQueue
    inputs: InputCache
    applier: ChildApplier
    view: Callable[[], ClusterView]
    # MailRelays and Namespaces -> (uid, generation) or (digest of labels, 0)
    seen: dict[ObjectRef, tuple[str, int]] = field(default_factory=dict)
    replicas: dict[Key, Replicas] = field(default_factory=dict)
    service_ready: dict[tuple[str, str], bool] = field(default_factory=dict)  # (ns, Service)
    # relay -> MX hostname -> the name of its Service now: a Service made
    # under an older naming keeps its name (and load-balancer IP).
    mx_services: dict[Key, dict[str, str]] = field(default_factory=dict)
    # relay -> its StatefulSet's generation and status (rollout.py reads them)
    statefulsets: dict[Key, KubeObject] = field(default_factory=dict)
    # relay -> its Certificate's Ready: (ready, message) (certificate.certificate_ready)
    certificates: dict[Key, tuple[bool, str]] = field(default_factory=dict)
    # relay pod -> (uid, node, digest of its MX labels) at its last event
    pods: dict[ObjectRef, tuple[str, str, str]] = field(default_factory=dict)

    def forget(self, relay: Key) -> None:
        self.replicas.pop(relay, None)
        # mx_services stays: it follows the Services themselves (one may
        # exist before its MailRelay, left by an older operator).

    def _changed(self, kind: str, body: KubeObject, deleted: bool) -> bool:
        """Spec changes bump generation; our own status writes do not."""
        ref = (kind, key_of(body))
        if deleted:
            self.seen.pop(ref, None)
            return True
        now = _identity(body)
        if self.seen.get(ref) == now:
            return False
        self.seen[ref] = now
        return True

    def relay_event(self, body: KubeObject, deleted: bool) -> None:
        if self._changed("MailRelay", body, deleted):
            self.queue.mark(key_of(body))
            self.queue.mark_sweep()

    def input_event(self, kind: str, body: Cached, deleted: bool) -> None:
        """A RelayDomain or RecipientList event (input_watch.py), trimmed."""
        if kind == "RelayDomain":
            self.domain_event(body, deleted)
        else:
            self.list_event(body, deleted)

    def domain_event(self, body: Cached, deleted: bool) -> None:
        old = self.inputs.domains.get(key_of(body))
        before = relay_key_of_domain(old) if old else None
        self._input_event("RelayDomain", body, old, before, relay_key_of_domain(body), deleted)

    def list_event(self, body: Cached, deleted: bool) -> None:
        old = self.inputs.lists.get(key_of(body))
        before = self._relay_of_list(old) if old else None
        self._input_event("RecipientList", body, old, before, self._relay_of_list(body), deleted)

    def _relay_of_list(self, rl: Cached) -> Key | None:
        dom = self.inputs.domains.get(domain_key_of_list(rl))
        return relay_key_of_domain(dom) if dom else None

    def _input_event(
        self,
        kind: str,
        body: Cached,
        old: Cached | None,
        before: Key | None,
        relay: Key | None,
        deleted: bool,
    ) -> None:
        """Stored; when its spec changed (the cached object, not a copy of
        (uid, generation) per object, tells: 100,000 RelayDomains), the relay
        it referred to and the one it refers to now are marked."""
        self.inputs.store(kind, body, deleted)
        if not deleted and old is not None and _identity(old) == _identity(body):
            return
        self.queue.mark(before)
        self.queue.mark(None if deleted else relay)
        self.queue.mark_sweep()

    def namespace_event(self, name: str, labels: dict[str, str]) -> None:
        """New labels may change which RelayDomains a relay's selector allows."""
        ref = ("Namespace", ("", name))
        now = (digest(labels), 0)
        if self.seen.get(ref) == now:
            return
        first = ref not in self.seen
        self.seen[ref] = now
        if not first:
            for relay in self.view().relays_with_selector():
                self.queue.mark(relay)

    def statefulset_event(self, body: KubeObject, deleted: bool) -> None:
        key = owner_key(body)
        if key is None:
            return
        again = self.applier.child_event(body, deleted)
        st = body.get("status") or {}
        now = (
            Replicas()
            if deleted
            else Replicas(int(st.get("replicas") or 0), int(st.get("readyReplicas") or 0))
        )
        state: KubeObject = {
            "metadata": {"generation": body["metadata"].get("generation")},
            "status": dict(st),
        }
        rolled = deleted or self.statefulsets.get(key) != state
        if deleted:
            self.statefulsets.pop(key, None)
        else:
            self.statefulsets[key] = state
        if again or deleted or rolled or self.replicas.get(key, Replicas()) != now:
            self.replicas[key] = now
            self.queue.mark(key, render=False)

    def service_event(self, body: KubeObject, deleted: bool) -> None:
        key = owner_key(body)
        if key is None:
            return
        self._mx_service(key, body, deleted)
        again = self.applier.child_event(body, deleted)
        service = (key[0], str(body["metadata"]["name"]))
        ready = not deleted and status.service_has_address(body)
        if again or deleted or self.service_ready.get(service) != ready:
            self.service_ready[service] = ready
            self.queue.mark(key, render=False)

    def _mx_service(self, key: Key, body: KubeObject, deleted: bool) -> None:
        meta = body.get("metadata") or {}
        host = (meta.get("annotations") or {}).get(naming.MX_HOSTNAME_ANNOTATION)
        if not host or (meta.get("labels") or {}).get(naming.LABEL_COMPONENT) != "mx":
            return
        names = self.mx_services.setdefault(key, {})
        if deleted:
            if names.get(host.lower()) == meta.get("name"):
                names.pop(host.lower())
        else:
            names.setdefault(host.lower(), str(meta["name"]))

    def certificate_event(self, body: KubeObject, deleted: bool) -> None:
        """Issued or not: TLS=True only once cert-manager says Ready."""
        key = owner_key(body)
        if key is None:
            return
        again = self.applier.child_event(body, deleted)
        now = certificate.certificate_ready(None if deleted else body)
        if again or self.certificates.get(key) != now:
            self.certificates[key] = now
            self.queue.mark(key, render=False)

    def certificate_kind_event(self) -> None:
        """cert-manager installed (or removed) since we looked: look again now,
        not at the next resync, for every relay that wants a Certificate."""
        self.applier.cert_manager = None
        for key, relay in self.view().relays.items():
            if certificate.wants_certificate(relay):
                self.queue.mark(key, render=False)

    def pod_event(self, body: KubeObject, deleted: bool) -> None:
        """A relay pod made (the StatefulSet controller re-creates a deleted one
        under its name, without the labels the operator set), bound to a node
        (its zone is known now), or its MX labels changed by someone: the relay
        is looked at, so its pods carry their spec.mx[].pods labels (mx_pods.py)
        before they are ready, not after the next resync. Status updates of the
        pod (most of its events) change none of these."""
        key = owner_key(body)
        if key is None:
            return
        ref = ("Pod", key_of(body))
        if deleted:
            self.pods.pop(ref, None)
            return
        meta = body["metadata"]
        labels = meta.get("labels") or {}
        mx = {k: v for k, v in labels.items() if k.startswith(naming.MX_PODS_LABEL_PREFIX)}
        node = str((body.get("spec") or {}).get("nodeName") or "")
        now = (str(meta.get("uid")), node, digest(mx))
        if self.pods.get(ref) != now:
            self.pods[ref] = now
            self.queue.mark(key, render=False)

    def child_event(self, body: KubeObject, deleted: bool) -> None:
        """A ConfigMap or PDB (only its metadata): deleted or changed by another writer."""
        key = owner_key(body)
        if key is not None and body.get("kind") and self.applier.child_event(body, deleted):
            self.queue.mark(key, render=False)
