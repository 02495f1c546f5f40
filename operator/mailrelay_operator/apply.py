"""Server-side apply of a relay's children: only what changed, and pruning what is no longer wanted.

Contract: ChildApplier owns what it applied. Per child path, `applied` holds
the digest of the desired object last applied (an unchanged child is not
sent again) and `owned` the digest of the fields our field manager owned
after that apply; per relay, `pruned` holds the prunable children it last
found wanted. `resync` forgets applied digests, prunes and the cert-manager
check, so the next pass applies everything again (an unchanged object
writes nothing) and repairs drift. `child_event` reads a child's watch
event: a deleted child, or one whose fields another field manager took,
must be applied again.

A change of an immutable StatefulSet field is applied Zalando style: the
StatefulSet is deleted with propagation Orphan (its pods keep running and
serving) and created again once gone; the new one adopts the pods.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from mailrelay_operator import adoption, certificate, naming
from mailrelay_operator.cluster import Key, key_of
from mailrelay_operator.configmaps import encoded
from mailrelay_operator.kubeapi import KubeApi, KubeError, KubeObject, object_path, resource_path

log = logging.getLogger("mailrelay.operator")

ChildRef = tuple[str, str, str]  # (apiVersion, kind, name)
# Kinds the operator deletes when a relay no longer wants them: (apiVersion, kind, component).
PRUNABLE = (
    ("v1", "ConfigMap", "recipients"),
    ("v1", "ConfigMap", "domains"),
    ("v1", "ConfigMap", "claims"),
    ("v1", "Service", "mx"),
    (certificate.CERT_MANAGER_API, "Certificate", "tls"),
    # When the operator's settings turn relay NetworkPolicies off.
    ("networking.k8s.io/v1", "NetworkPolicy", "relay"),
)
RECREATING = (
    "an immutable StatefulSet field changed (volumeClaimTemplates, selector or "
    "serviceName): recreating it with orphan deletion, pods keep running; "
    "existing queue volumes keep their old size"
)
RECREATED = RECREATING.replace("recreating", "recreated")

# The StatefulSet to apply, given the desired one and whether it differs from the
# last one applied (the reconciler holds its replicas while a scale-down drains).
HoldReplicas = Callable[[KubeObject, bool], Awaitable[KubeObject]]


def digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def owned_fields(obj: KubeObject) -> str:
    """Digest of the fields the operator's field manager owns (server-side apply)."""
    mine = [
        m.get("fieldsV1")
        for m in (obj.get("metadata") or {}).get("managedFields") or []
        if m.get("manager") == naming.FIELD_MANAGER and m.get("subresource") != "status"
    ]
    return digest(mine)


def is_immutable_field_error(err: KubeError) -> bool:
    """The API server's answer to a change of volumeClaimTemplates/selector/serviceName."""
    return err.status == 422 and "Forbidden" in err.message and "statefulset spec" in err.message


@dataclass
class Recreate:
    """A relay's StatefulSet recreation: while it lasts, and after it."""

    recreating: str = ""  # why, while the old StatefulSet is being orphan-deleted
    recreated: tuple[int, str] | None = None  # (relay generation, message) once done


@dataclass
class ApplyOutcome:
    again: bool = False  # something is under way: look again later
    cert_manager_missing: bool = False  # the Certificate CRD went away meanwhile


@dataclass
class ChildApplier:
    api: KubeApi
    applied: dict[str, str] = field(default_factory=dict)  # child path -> digest applied
    # child path -> digest of the fields our field manager owned after our last apply:
    # when an event shows another set, someone else took or removed some of them.
    owned: dict[str, str] = field(default_factory=dict)
    pruned: dict[Key, set[ChildRef]] = field(default_factory=dict)  # relay -> wanted then
    cert_manager: bool | None = None  # cert-manager's Certificate kind served; None: not asked

    def resync(self) -> None:
        self.applied.clear()
        self.pruned.clear()
        self.cert_manager = None

    def forget(self, relay: Key) -> None:
        """Drops what is remembered of a deleted relay's children."""
        self.pruned.pop(relay, None)
        prefix_ns = f"/namespaces/{relay[0]}/"
        for path in [p for p in (*self.applied, *self.owned) if prefix_ns in p]:
            name = path.rsplit("/", 1)[1]
            if name == relay[1] or name.startswith(relay[1] + "-"):
                self.applied.pop(path, None)
                self.owned.pop(path, None)

    async def find_cert_manager(self) -> None:
        if self.cert_manager is None:
            found = await self.api.get(f"/apis/{certificate.CERT_MANAGER_API}")
            names = {r.get("kind") for r in (found or {}).get("resources", [])}
            self.cert_manager = "Certificate" in names

    def child_event(self, body: KubeObject, deleted: bool) -> bool:
        """Whether a child's watch event means it must be applied again.

        Our own writes are recognised by managedFields."""
        path = object_path(body)
        if deleted:
            log.info("%s %s/%s deleted: applying it again", body["kind"], *key_of(body))
            self.applied.pop(path, None)
            return True
        if path not in self.owned or owned_fields(body) == self.owned[path]:
            return False
        if self.applied.pop(path, None) is None:
            return False
        others = sorted(
            {
                str(m.get("manager"))
                for m in body["metadata"].get("managedFields") or []
                if m.get("manager") != naming.FIELD_MANAGER and m.get("subresource") != "status"
            }
        )
        log.info(
            "%s %s/%s changed by another writer (%s): applying ours again",
            body["kind"],
            *key_of(body),
            ", ".join(others) or "a field of ours was removed",
        )
        return True

    async def apply(
        self,
        key: Key,
        children: list[KubeObject],
        recreate: Recreate,
        generation: int,
        hold: HoldReplicas,
    ) -> ApplyOutcome:
        """Applies the children that changed since their last apply, in order
        (each encoded here, configmaps.encoded: one shard's text alive at a time)."""
        out = ApplyOutcome()
        for unencoded in children:
            child = encoded(unencoded)
            path = object_path(child)
            if child["kind"] == "StatefulSet":
                child = await hold(child, self.applied.get(path) != digest(child))
            want = digest(child)
            if self.applied.get(path) == want:
                continue
            # Secrets are never read (RBAC): the handover Secret goes unchecked.
            if path not in self.owned and child["kind"] != "Secret":
                await self._refuse_foreign(path, child)
            if child["kind"] == "StatefulSet":
                if not await self._apply_statefulset(key, child, recreate, generation):
                    out.again = True
                    continue
            else:
                try:
                    self._owns(await self.api.apply(child))
                except KubeError as e:
                    if child["kind"] == "Certificate" and e.status == 404:
                        # The CRD went away between the check and the apply.
                        self.cert_manager = False
                        out.cert_manager_missing = out.again = True
                        continue
                    raise
            self.applied[path] = want
        return out

    async def _refuse_foreign(self, path: str, child: KubeObject) -> None:
        """Before our first apply of a child: an object of that name that is
        not the relay's is refused (apply would adopt it, and delete it with
        the MailRelay)."""
        existing = await self.api.get(path)
        if existing is not None and not adoption.is_ours(existing, child):
            raise adoption.ForeignObject(adoption.refusal({"kind": child["kind"], **existing}))

    def _owns(self, applied: KubeObject) -> None:
        """Remembers which fields the apply left us owning (see child_event)."""
        if applied.get("metadata"):
            self.owned[object_path(applied)] = owned_fields(applied)

    async def _apply_statefulset(
        self, key: Key, sts: KubeObject, recreate: Recreate, generation: int
    ) -> bool:
        """Applies the StatefulSet; orphan-deletes and recreates it on an immutable change.

        Returns True once the desired StatefulSet is in place.
        """
        path = object_path(sts)
        if recreate.recreating:
            if await self.api.get(path) is not None:
                # Still held by the orphan finalizer until the garbage collector
                # has released the pods; look again shortly.
                return False
            self._owns(await self.api.apply(sts))
            recreate.recreated = (generation, RECREATED)
            recreate.recreating = ""
            log.info("MailRelay %s/%s: StatefulSet recreated", *key)
            return True
        try:
            self._owns(await self.api.apply(sts))
            return True
        except KubeError as e:
            if not is_immutable_field_error(e):
                raise
        await self.api.delete(path, propagation="Orphan")
        recreate.recreating = RECREATING
        log.info("MailRelay %s/%s: %s", key[0], key[1], recreate.recreating)
        return False

    async def prune(self, key: Key, relay: KubeObject, children: list[KubeObject]) -> None:
        """Deletes recipient shards, MX Services and Certificates the relay no longer wants."""
        wanted = {(c["apiVersion"], c["kind"], c["metadata"]["name"]) for c in children}
        prunable = {w for w in wanted if any(w[:2] == p[:2] for p in PRUNABLE)}
        if self.pruned.get(key) == prunable:
            return
        ns = naming.relay_namespace(relay)
        for api_version, kind, component in PRUNABLE:
            if kind == "Certificate" and not self.cert_manager:
                continue
            found = await self.api.list_objects(
                resource_path(api_version, kind, ns), naming.children_selector(relay, component)
            )
            for obj in found:
                name = obj["metadata"]["name"]
                if (api_version, kind, name) not in wanted:
                    await self.api.delete(resource_path(api_version, kind, ns, name))
                    self.applied.pop(resource_path(api_version, kind, ns, name), None)
        self.pruned[key] = prunable
