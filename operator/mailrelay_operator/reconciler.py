"""One reconcile path for every MailRelay, driven by a queue of dirty relays.

Kopf handlers (handlers.py) only record what changed and mark the relays it
touches; this loop renders each dirty relay with the same renderer as
`mailrelay render`, applies its children with server-side apply (skipping
children whose desired state has not changed since the last apply), and
writes MailRelay, RelayDomain and RecipientList statuses only when they differ.
A periodic resync forgets those caches, so drift is repaired.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mailrelay_api.render import RenderCache, Rendered, render_relay
from mailrelay_api.schema import API_VERSION
from mailrelay_operator import certificate, handover, naming, pods, scaledown, status
from mailrelay_operator.children import desired_children
from mailrelay_operator.cluster import ClusterView, Key, key_of, trim
from mailrelay_operator.kubeapi import KubeApi, KubeError, object_path, resource_path

log = logging.getLogger("mailrelay.operator")

STATUS_WRITE_CONCURRENCY = 16
MAX_RETRY_SECONDS = 300.0
# Kinds the operator deletes when a relay no longer wants them: (apiVersion, kind, component).
PRUNABLE = (
    ("v1", "ConfigMap", "recipients"),
    ("v1", "Service", "mx"),
    (certificate.CERT_MANAGER_API, "Certificate", "tls"),
)


def is_immutable_field_error(err: KubeError) -> bool:
    """The API server's answer to a change of volumeClaimTemplates/selector/serviceName."""
    return err.status == 422 and "Forbidden" in err.message and "statefulset spec" in err.message


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


@dataclass
class RelayMemory:
    """What the reconciler remembers about one relay between passes."""

    uid: str = ""
    generation: int = -1
    rendered: Rendered | None = None
    # Unchanged RecipientLists and recipient shards from the last render: one
    # added address re-renders one shard, not a million addresses.
    render_cache: RenderCache = field(default_factory=RenderCache)
    child_names: set[tuple[str, str, str]] | None = None  # (apiVersion, kind, name) applied
    recreating: str = ""
    recreated: tuple[int, str] | None = None  # (generation, message)
    replicas: int = 0
    ready_replicas: int = 0
    failures: int = 0  # passes in a row that could not apply everything
    handover_key: str | None = None  # the key of the relay's handover Secret
    drain: scaledown.DrainMemory = field(default_factory=scaledown.DrainMemory)


@dataclass
class Reconciler:
    api: KubeApi
    view: Callable[[], ClusterView]
    image: str = naming.DEFAULT_RELAY_IMAGE
    resync_seconds: float = 300.0
    debounce_seconds: float = 0.2
    retry_seconds: float = 2.0

    namespaces: tuple[str, ...] = ()  # served namespaces; empty = all
    # Where the relay pods are (tests map them to 127.0.0.x processes).
    pod_address: pods.PodAddresser = pods.cluster_address
    pod_client: pods.PodClient = field(default_factory=pods.PodClient)
    drain_poll_seconds: float = scaledown.POLL_SECONDS
    # Relay handover keys derive from it (the operator never reads Secrets).
    operator_key: bytes = field(default_factory=handover.load_operator_key)

    # RelayDomains and RecipientLists (trimmed, defaulted): listed by seed(),
    # kept current by the event handlers.
    domains: dict[Key, dict[str, Any]] = field(default_factory=dict)
    lists: dict[Key, dict[str, Any]] = field(default_factory=dict)
    dirty: dict[Key, bool] = field(default_factory=dict)  # relay -> needs a fresh render
    sweep: bool = False
    relays: dict[Key, RelayMemory] = field(default_factory=dict)
    applied: dict[str, str] = field(default_factory=dict)  # child path -> digest applied
    # child path -> digest of the fields our field manager owned after our last apply:
    # when an event shows another set, someone else took or removed some of them.
    owned: dict[str, str] = field(default_factory=dict)
    written: dict[str, str] = field(default_factory=dict)  # object uid -> status written
    seen: dict[tuple[str, Key], tuple[str, int]] = field(default_factory=dict)
    refs: dict[tuple[str, Key], Key | None] = field(default_factory=dict)  # last relay referred
    service_ready: dict[tuple[str, str], bool] = field(default_factory=dict)
    cert_manager: bool | None = None
    passes: int = 0
    started: bool = False
    busy: bool = False
    pending_status: dict[str, tuple[dict[str, Any], dict[str, Any]]] = field(default_factory=dict)
    status_in_flight: int = 0
    _wakeup: asyncio.Event | None = None
    _status_wakeup: asyncio.Event | None = None

    # --- marking, called from kopf handlers (cheap, synchronous) ----------------------
    @property
    def wakeup(self) -> asyncio.Event:
        if self._wakeup is None:
            self._wakeup = asyncio.Event()
        return self._wakeup

    @property
    def status_wakeup(self) -> asyncio.Event:
        if self._status_wakeup is None:
            self._status_wakeup = asyncio.Event()
        return self._status_wakeup

    def mark(self, key: Key | None, render: bool = True) -> None:
        if key is None:
            return
        self.dirty[key] = self.dirty.get(key, False) or render
        self.wakeup.set()

    def mark_sweep(self) -> None:
        self.sweep = True
        self.wakeup.set()

    def mark_later(self, key: Key, render: bool = False) -> None:
        """Looks again after a while; longer after each failed pass (up to 5 minutes)."""
        failures = self.relays[key].failures if key in self.relays else 0
        delay = min(self.retry_seconds * 2 ** min(failures, 8), MAX_RETRY_SECONDS)
        asyncio.get_running_loop().call_later(delay, self.mark, key, render)

    def _changed(self, kind: str, body: dict[str, Any], deleted: bool) -> bool:
        """Spec changes bump generation; our own status writes do not."""
        key = (kind, key_of(body))
        if deleted:
            self.seen.pop(key, None)
            return True
        now = (str(body["metadata"].get("uid")), int(body["metadata"].get("generation") or 0))
        if self.seen.get(key) == now:
            return False
        self.seen[key] = now
        return True

    def relay_event(self, body: dict[str, Any], deleted: bool) -> None:
        if self._changed("MailRelay", body, deleted):
            self.mark(key_of(body))
            self.mark_sweep()

    def domain_event(self, body: dict[str, Any], relay: Key, deleted: bool) -> None:
        _store(self.domains, body, deleted)
        if not self._changed("RelayDomain", body, deleted):
            return
        ref = ("RelayDomain", key_of(body))
        self.mark(self.refs.get(ref))
        self.refs[ref] = None if deleted else relay
        self.mark(relay)
        self.mark_sweep()

    def list_event(self, body: dict[str, Any], relay: Key | None, deleted: bool) -> None:
        _store(self.lists, body, deleted)
        if not self._changed("RecipientList", body, deleted):
            return
        ref = ("RecipientList", key_of(body))
        self.mark(self.refs.get(ref))
        self.refs[ref] = None if deleted else relay
        self.mark(relay)
        self.mark_sweep()

    def namespace_event(
        self, name: str, labels: dict[str, str], view: Callable[[], ClusterView]
    ) -> None:
        key = ("Namespace", ("", name))
        now = (digest(labels), 0)
        if self.seen.get(key) == now:
            return
        first = key not in self.seen
        self.seen[key] = now
        if not first:
            for relay in view().relays_with_selector():
                self.mark(relay)

    def statefulset_event(self, body: dict[str, Any], deleted: bool) -> None:
        key = self._owner_key(body)
        if key is None:
            return
        if not deleted:
            self.child_event(body, deleted)
        mem = self.relays.setdefault(key, RelayMemory())
        st = body.get("status") or {}
        replicas, ready = int(st.get("replicas") or 0), int(st.get("readyReplicas") or 0)
        if deleted:
            self.applied.pop(object_path(body), None)
            replicas = ready = 0
        if deleted or (mem.replicas, mem.ready_replicas) != (replicas, ready):
            mem.replicas, mem.ready_replicas = replicas, ready
            self.mark(key, render=False)

    def child_event(self, body: dict[str, Any], deleted: bool) -> None:
        """A child deleted, or changed by another field manager: apply it again now
        (not at the next resync). Our own writes are recognised by managedFields."""
        key = self._owner_key(body)
        if key is None or not body.get("kind"):
            return
        meta = body.get("metadata") or {}
        path = object_path(body)
        if deleted:
            log.info("%s %s/%s deleted: applying it again", body["kind"], *key_of(body))
            self.applied.pop(path, None)
            self.mark(key, render=False)
            return
        if path not in self.owned or owned_fields(body) == self.owned[path]:
            return
        if self.applied.pop(path, None) is not None:
            others = sorted(
                {
                    str(m.get("manager"))
                    for m in meta.get("managedFields") or []
                    if m.get("manager") != naming.FIELD_MANAGER and m.get("subresource") != "status"
                }
            )
            log.info(
                "%s %s/%s changed by another writer (%s): applying ours again",
                body["kind"],
                *key_of(body),
                ", ".join(others) or "a field of ours was removed",
            )
            self.mark(key, render=False)

    def service_event(self, body: dict[str, Any], deleted: bool) -> None:
        key = self._owner_key(body)
        if key is None:
            return
        if not deleted:
            self.child_event(body, deleted)
        skey = (key[0], str(body["metadata"]["name"]))
        ready = not deleted and status.service_has_address(body)
        if deleted:
            self.applied.pop(object_path(body), None)
        if deleted or self.service_ready.get(skey) != ready:
            self.service_ready[skey] = ready
            self.mark(key, render=False)

    @staticmethod
    def _owner_key(body: dict[str, Any]) -> Key | None:
        meta = body.get("metadata") or {}
        instance = (meta.get("labels") or {}).get(naming.LABEL_INSTANCE)
        if not instance:
            return None
        return (str(meta.get("namespace") or "default"), str(instance))

    # --- the loop ---------------------------------------------------------------------
    async def run(self) -> None:
        writer = asyncio.create_task(self.write_statuses(), name="mailrelay-status-writer")
        try:
            await self._run()
        finally:
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
            await self.pod_client.close()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_resync = loop.time() + self.resync_seconds
        while True:
            # A steady stream of events must not postpone the resync forever.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wakeup.wait(), max(0.0, next_resync - loop.time()))
            if loop.time() >= next_resync:
                next_resync = loop.time() + self.resync_seconds
                if self.started:
                    self.resync()
                    try:
                        await self.seed()
                    except Exception:
                        log.exception("listing RelayDomains and RecipientLists failed")
            self.wakeup.clear()
            await asyncio.sleep(self.debounce_seconds)
            await self.process()

    async def seed(self) -> None:
        """Lists RelayDomains and RecipientLists into the caches.

        At start-up (before kopf watches) this is the complete picture; later
        (each resync) it also drops objects whose deletion was missed.
        """
        scopes: tuple[str | None, ...] = self.namespaces or (None,)
        for kind, cache in (("RelayDomain", self.domains), ("RecipientList", self.lists)):
            for namespace in scopes:
                items, version = await self.api.list_all(
                    resource_path(API_VERSION, kind, namespace)
                )
                fresh = await asyncio.to_thread(_trim_all, items, kind)
                _merge_listing(cache, fresh, version, namespace)

    def resync(self) -> None:
        """Forget what was applied and written: the next pass checks everything again."""
        self.applied.clear()
        self.written.clear()
        self.cert_manager = None
        for key, mem in self.relays.items():
            mem.child_names = None
            self.dirty[key] = True
        self.sweep = True

    def resync_now(self) -> None:
        """A full pass now (for tests and benchmarks; call in the loop's thread)."""
        self.resync()
        self.wakeup.set()

    def mark_all(self, render: bool = True) -> None:
        """Every known relay dirty, caches kept (call in the loop's thread)."""
        for key in self.view().relays:
            self.mark(key, render)

    @property
    def idle(self) -> bool:
        return not (
            self.busy
            or self.dirty
            or self.sweep
            or self.wakeup.is_set()
            or self.pending_status
            or self.status_in_flight
        )

    async def process(self) -> None:
        """One pass over whatever is dirty now."""
        self.started = self.busy = True
        try:
            await self._process()
        finally:
            self.busy = False
            self.passes += 1

    async def _process(self) -> None:
        view = self.view()
        dirty, self.dirty = self.dirty, {}
        sweep, self.sweep = self.sweep, False
        for key, render in sorted(dirty.items()):
            try:
                await self.reconcile_relay(key, render, view)
            except Exception:
                log.exception("reconciling MailRelay %s/%s failed; retrying", *key)
                if key in self.relays:
                    self.relays[key].failures += 1
                self.mark_later(key, render=True)
        if sweep:
            try:
                await self.sweep_orphans(view)
            except Exception:
                log.exception("writing statuses of unattached objects failed; retrying")
                asyncio.get_running_loop().call_later(self.retry_seconds, self.mark_sweep)

    # --- one relay --------------------------------------------------------------------
    async def reconcile_relay(self, key: Key, render: bool, view: ClusterView) -> None:
        relay = view.relays.get(key)
        if relay is None:
            self._forget(key)
            return
        mem = self.relays.setdefault(key, RelayMemory())
        uid, gen = str(relay["metadata"].get("uid")), status.generation(relay)
        if mem.uid != uid:
            self.relays[key] = mem = RelayMemory(
                uid=uid, replicas=mem.replicas, ready_replicas=mem.ready_replicas
            )
        if render or mem.rendered is None or mem.generation != gen:
            inventory = view.inventory()
            started = time.monotonic()
            mem.rendered = await asyncio.to_thread(render_relay, relay, inventory, mem.render_cache)
            mem.generation = gen
            log.info(
                "rendered MailRelay %s/%s: %d domains, %d recipients, %d files in %.2fs",
                key[0],
                key[1],
                len(mem.rendered.domains),
                mem.rendered.recipients,
                len(mem.rendered.files),
                time.monotonic() - started,
            )
        rendered = mem.rendered
        assert rendered is not None

        obs = status.RelayObservation(config_hash=rendered.config_hash)
        if certificate.wants_certificate(relay):
            await self._check_cert_manager()
            obs.cert_manager_missing = self.cert_manager is False
        if mem.handover_key is None:
            mem.handover_key = handover.relay_key(self.operator_key, relay)
        children = desired_children(
            relay, rendered, self.image, self.cert_manager is not False, mem.handover_key
        )
        try:
            await self._apply_children(key, mem, children, obs, relay)
            await self._prune(relay, mem, children)
            mem.failures = 0
        except KubeError as e:
            obs.applied, obs.apply_error = False, str(e)
            log.warning("MailRelay %s/%s: %s", key[0], key[1], e)
            mem.failures += 1
            self.mark_later(key)
        if mem.recreated and mem.recreated[0] == gen:
            obs.recreated = mem.recreated[1]
        obs.recreating = mem.recreating
        obs.scale_down = mem.drain.condition
        obs.replicas, obs.ready_replicas = mem.replicas, mem.ready_replicas
        accepted = sorted(v.domain for v in rendered.domains if v.accepted)
        obs.domains, obs.recipients = len(accepted), rendered.recipients
        mx = [(e.priority, e.hostname) for e in naming.mx_entries(relay)]
        ready_hosts = {
            e.hostname
            for e, name in zip(
                naming.mx_entries(relay), naming.mx_service_names(relay), strict=True
            )
            if self.service_ready.get((key[0], name))
        }
        obs.mx_records = status.mx_records(accepted, mx, ready_hosts)

        # The relay's own status now; its domains' and lists' (thousands, maybe)
        # go to the status writer, so the next change is not kept waiting.
        await self._write_status(relay, status.relay_status(relay, obs))
        for v in rendered.domains:
            dom = view.domains.get((v.namespace, v.name))
            if dom is not None:
                self.queue_status(dom, status.domain_status(dom, v))
        for lv in rendered.recipient_lists:
            rl = view.lists.get((lv.namespace, lv.name))
            if rl is not None and view.relay_of_list(rl) == key:
                self.queue_status(rl, status.list_status(rl, lv))
        log.info("reconciled MailRelay %s/%s; %d writes so far", key[0], key[1], self.api.writes)

    async def _check_cert_manager(self) -> None:
        if self.cert_manager is None:
            found = await self.api.get(f"/apis/{certificate.CERT_MANAGER_API}")
            names = {r.get("kind") for r in (found or {}).get("resources", [])}
            self.cert_manager = "Certificate" in names

    async def _apply_children(
        self,
        key: Key,
        mem: RelayMemory,
        children: list[dict[str, Any]],
        obs: status.RelayObservation,
        relay: dict[str, Any],
    ) -> None:
        for child in children:
            path = object_path(child)
            if child["kind"] == "StatefulSet" and (
                mem.drain.active or self.applied.get(path) != digest(child)
            ):
                child = await self._scale_down(key, relay, mem, child)
            want = digest(child)
            if self.applied.get(path) == want:
                continue
            if child["kind"] == "StatefulSet":
                if not await self._apply_statefulset(key, mem, child):
                    continue
            else:
                try:
                    self._owns(await self.api.apply(child))
                except KubeError as e:
                    if child["kind"] == "Certificate" and e.status == 404:
                        # The CRD went away between the check and the apply.
                        self.cert_manager = False
                        obs.cert_manager_missing = True
                        self.mark_later(key, render=False)
                        continue
                    raise
            self.applied[path] = want

    def _owns(self, applied: dict[str, Any]) -> None:
        """Remembers which fields the apply left us owning (see child_event)."""
        if applied.get("metadata"):
            self.owned[object_path(applied)] = owned_fields(applied)

    async def _scale_down(
        self, key: Key, relay: dict[str, Any], mem: RelayMemory, sts: dict[str, Any]
    ) -> dict[str, Any]:
        """The StatefulSet to apply: fewer replicas only once the leaving pods are drained."""
        found = await self.api.get(object_path(sts))
        current = None
        if found is not None and not found["metadata"].get("deletionTimestamp"):
            current = int((found.get("spec") or {}).get("replicas") or 0)
        want = int(sts["spec"]["replicas"])
        assert mem.handover_key is not None
        planner = scaledown.ScaleDown(self.pod_address, self.pod_client, self.drain_poll_seconds)
        plan = await planner.plan(relay, current, want, mem.handover_key, mem.drain)
        if plan.poll:
            asyncio.get_running_loop().call_later(self.drain_poll_seconds, self.mark, key, False)
        if plan.replicas == want:
            return sts
        held = {**sts, "spec": {**sts["spec"], "replicas": plan.replicas}}
        return held

    async def _apply_statefulset(self, key: Key, mem: RelayMemory, sts: dict[str, Any]) -> bool:
        """Applies the StatefulSet; orphan-deletes and recreates it on an immutable change.

        Returns True once the desired StatefulSet is in place.
        """
        path = object_path(sts)
        if mem.recreating:
            current = await self.api.get(path)
            if current is not None:
                # Still held by the orphan finalizer until the garbage collector
                # has released the pods; look again shortly.
                self.mark_later(key, render=False)
                return False
            self._owns(await self.api.apply(sts))
            mem.recreated = (mem.generation, mem.recreating.replace("recreating", "recreated"))
            mem.recreating = ""
            log.info("MailRelay %s/%s: StatefulSet recreated", *key)
            return True
        try:
            self._owns(await self.api.apply(sts))
            return True
        except KubeError as e:
            if not is_immutable_field_error(e):
                raise
        # Zalando style: delete with propagation Orphan (the pods keep running and
        # serving), then create the new StatefulSet, which adopts them.
        await self.api.delete(path, propagation="Orphan")
        mem.recreating = (
            "an immutable StatefulSet field changed (volumeClaimTemplates, selector or "
            "serviceName): recreating it with orphan deletion, pods keep running; "
            "existing queue volumes keep their old size"
        )
        log.info("MailRelay %s/%s: %s", key[0], key[1], mem.recreating)
        self.mark_later(key, render=False)
        return False

    async def _prune(
        self, relay: dict[str, Any], mem: RelayMemory, children: list[dict[str, Any]]
    ) -> None:
        """Deletes recipient shards, MX Services and Certificates the relay no longer wants."""
        wanted = {(c["apiVersion"], c["kind"], c["metadata"]["name"]) for c in children}
        prunable = {w for w in wanted if any(w[:2] == p[:2] for p in PRUNABLE)}
        if mem.child_names is not None and mem.child_names == prunable:
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
        mem.child_names = prunable

    def _forget(self, key: Key) -> None:
        self.relays.pop(key, None)
        prefix_ns = f"/namespaces/{key[0]}/"
        for path in [p for p in (*self.applied, *self.owned) if prefix_ns in p]:
            name = path.rsplit("/", 1)[1]
            if name == key[1] or name.startswith(key[1] + "-"):
                self.applied.pop(path, None)
                self.owned.pop(path, None)

    # --- statuses ---------------------------------------------------------------------
    async def _write_status(self, obj: dict[str, Any], new: dict[str, Any]) -> None:
        uid = str(obj["metadata"].get("uid"))
        want = digest(status.without_times(new))
        if want == self.written.get(uid):
            return
        if status.without_times(obj.get("status")) == status.without_times(new):
            self.written[uid] = want
            return
        path = resource_path(
            obj["apiVersion"], obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"]
        )
        try:
            await self.api.patch_status(path, new)
        except KubeError as e:
            if e.status == 404:  # deleted meanwhile
                return
            raise
        self.written[uid] = want

    async def _gather_limited(self, coros: list[Any]) -> None:
        sem = asyncio.Semaphore(STATUS_WRITE_CONCURRENCY)

        async def one(c: Any) -> None:
            async with sem:
                await c

        results = await asyncio.gather(*(one(c) for c in coros), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise errors[0]

    async def sweep_orphans(self, view: ClusterView) -> None:
        """Statuses of RelayDomains and RecipientLists no existing relay renders."""
        for dom in view.orphan_domains():
            ref = dom["spec"]["relayRef"]
            ns = ref.get("namespace") or key_of(dom)[0]
            msg = f"no MailRelay {ns}/{ref['name']}"
            self.queue_status(dom, status.domain_status(dom, None, msg))
        for rl, reason, message in view.orphan_lists():
            self.queue_status(rl, status.list_status(rl, None, reason, message))

    # --- the status writer ------------------------------------------------------------
    def queue_status(self, obj: dict[str, Any], new: dict[str, Any]) -> None:
        """Queues a status write unless it is already there; the newest one per object wins."""
        uid = str(obj["metadata"].get("uid"))
        want = digest(status.without_times(new))
        if want == self.written.get(uid):
            self.pending_status.pop(uid, None)
            return
        if status.without_times(obj.get("status")) == status.without_times(new):
            self.written[uid] = want
            self.pending_status.pop(uid, None)
            return
        self.pending_status[uid] = (obj, new)
        self.status_wakeup.set()

    async def write_statuses(self) -> None:
        """Drains the status queue, STATUS_WRITE_CONCURRENCY writes at a time."""
        while True:
            await self.status_wakeup.wait()
            self.status_wakeup.clear()
            while self.pending_status:
                batch = list(self.pending_status.values())
                self.pending_status.clear()
                self.status_in_flight = len(batch)
                try:
                    await self._gather_limited([self._write_status(o, st) for o, st in batch])
                    log.info("statuses: %d checked; %d writes so far", len(batch), self.api.writes)
                except Exception:
                    log.exception("writing statuses failed; retrying")
                    for o, st in batch:
                        self.pending_status.setdefault(str(o["metadata"].get("uid")), (o, st))
                    await asyncio.sleep(self.retry_seconds)
                finally:
                    self.status_in_flight = 0


def owned_fields(obj: dict[str, Any]) -> str:
    """Digest of the fields the operator's field manager owns (server-side apply)."""
    mine = [
        m.get("fieldsV1")
        for m in (obj.get("metadata") or {}).get("managedFields") or []
        if m.get("manager") == naming.FIELD_MANAGER and m.get("subresource") != "status"
    ]
    return digest(mine)


def _store(cache: dict[Key, dict[str, Any]], obj: dict[str, Any], deleted: bool) -> None:
    if deleted:
        cache.pop(key_of(obj), None)
    else:
        cache[key_of(obj)] = _same_spec_kept(cache.get(key_of(obj)), obj)


def _same_spec_kept(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """`new`, holding the spec of `old` when it is the same generation of the same object.

    A status write sends every RecipientList back with a fresh copy of its
    addresses; the render cache holds the old strings, so keeping them saves
    a second copy of every address (about 70 MB for 1,000,000).
    """
    if old is not None:
        o, n = old["metadata"], new["metadata"]
        same = (o.get("uid"), o.get("generation")) == (n.get("uid"), n.get("generation"))
        if same and n.get("uid") and n.get("generation") is not None:
            new["spec"] = old["spec"]
    return new


def _trim_all(items: list[dict[str, Any]], kind: str) -> dict[Key, dict[str, Any]]:
    out = {}
    for item in items:
        item.setdefault("apiVersion", API_VERSION)
        item.setdefault("kind", kind)
        obj = trim(item)
        out[key_of(obj)] = obj
    return out


def _version(obj: dict[str, Any]) -> int | None:
    try:
        return int(obj["metadata"].get("resourceVersion") or "")
    except ValueError:
        return None


def _merge_listing(
    cache: dict[Key, dict[str, Any]],
    fresh: dict[Key, dict[str, Any]],
    list_version: str,
    namespace: str | None,
) -> None:
    """Merges a listing into a cache that events may have updated meanwhile.

    resourceVersions are etcd revisions in practice: a cached object newer than
    the listing stays; one the listing no longer has and that is not newer
    than the listing was deleted.
    """
    try:
        listed_at: int | None = int(list_version)
    except ValueError:
        listed_at = None
    for key, obj in fresh.items():
        old = cache.get(key)
        old_v, new_v = (_version(old) if old else None), _version(obj)
        if old is None or old_v is None or new_v is None or old_v <= new_v:
            cache[key] = _same_spec_kept(old, obj)
    for key in [k for k in cache if k not in fresh and (namespace is None or k[0] == namespace)]:
        v = _version(cache[key])
        if listed_at is None or v is None or v <= listed_at:
            del cache[key]
