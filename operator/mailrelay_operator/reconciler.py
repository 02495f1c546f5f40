"""One reconcile path for every MailRelay, driven by a queue of dirty relays.

Kopf handlers (handlers.py) only hand their events to `events` (events.py),
which updates the caches and marks the relays touched in `queue`
(workqueue.py). This loop takes the marks and, per dirty relay, renders it
with the same renderer as `mailrelay render`, applies its children
(apply.py: server-side apply, skipped for children unchanged since the last
apply, and pruning), holds the StatefulSet's replicas while a scale-down
drains (scaledown.py), and writes the relay's status; the statuses of its
RelayDomains and RecipientLists go to the status writer (status_writer.py).
A status write that changes a condition posts a Kubernetes Event (k8s_events.py).
Each of those objects owns its state; this module wires them together and
keeps what it remembers per relay in RelayMemory.

A periodic resync forgets what was applied and written, so drift is repaired.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mailrelay_api.allocator import trim_heap
from mailrelay_api.claims import Claim, next_release
from mailrelay_api.render import RenderCache, Rendered, RenderSettings, render_relay
from mailrelay_api.spec import relay_spec
from mailrelay_api.validate import relay_warnings, validate_object
from mailrelay_operator import (
    certificate,
    claims_store,
    handover_secret,
    metrics,
    mx_pods,
    naming,
    operator_key,
    pods,
    scaledown,
    status,
)
from mailrelay_operator.adoption import ForeignObject
from mailrelay_operator.apply import ApplyOutcome, ChildApplier, Recreate
from mailrelay_operator.child_watch import ChildWatch
from mailrelay_operator.children import desired_children
from mailrelay_operator.cluster import ClusterView, Key, key_of
from mailrelay_operator.events import EventRouter, Replicas
from mailrelay_operator.health import Health
from mailrelay_operator.input_watch import InputWatch
from mailrelay_operator.inputs import InputCache
from mailrelay_operator.k8s_events import EventRecorder
from mailrelay_operator.kubeapi import (
    KubeApi,
    KubeError,
    KubeObject,
    object_path,
    resource_path,
)
from mailrelay_operator.rollout import PROGRESS_DEADLINE_SECONDS, ProgressClock, rollout
from mailrelay_operator.settings import (
    RESYNC_SECONDS_DEFAULT,
    WORKERS_DEFAULT,
    NetworkSettings,
)
from mailrelay_operator.status_writer import StatusWriter
from mailrelay_operator.workqueue import WorkQueue

log = logging.getLogger("mailrelay.operator")
SWEEP_INTERVAL_SECONDS = 5.0
# The heap is trimmed after renders of at least this many domains + recipients.
# A smaller one frees a MB or so (the first render of 100,000 domains and
# 1,000,000 recipients added ~70 MB: docs/benchmarks.md), which the next render
# reuses; malloc_trim walks every arena, in a thread: not after each small edit.
TRIM_AFTER_RENDER_OBJECTS = 10_000


@dataclass
class RelayMemory:
    """What the reconciler remembers about one relay between passes."""

    uid: str = ""
    generation: int = -1
    rendered: Rendered | None = None
    # Unchanged RecipientLists and recipient shards from the last render: one
    # added address re-renders one shard, not a million addresses.
    render_cache: RenderCache = field(default_factory=RenderCache)
    recreate: Recreate = field(default_factory=Recreate)
    failures: int = 0  # passes in a row that could not apply everything
    handover_key: str | None = None  # the key of the relay's handover Secret
    drain: scaledown.DrainMemory = field(default_factory=scaledown.DrainMemory)
    # The domain claims of the last render (what status.domains gets): the
    # next render starts from these, not from a status the watch may not
    # have brought back yet.
    claims: list[Claim] | None = None
    claims_cache: claims_store.ClaimsCache = field(default_factory=claims_store.ClaimsCache)
    progress: ProgressClock = field(default_factory=ProgressClock)  # of the rollout
    applied_replicas: int | None = None  # the StatefulSet replicas we last applied
    # object uid -> (generation, status, verdict) of the statuses last handed
    # to the status writer: an object with the same spec and status and an
    # unchanged verdict is not looked at again (100,000 RelayDomains, a pass
    # each event). The status is the cached object's own (equal ones shared).
    statuses_queued: dict[str, tuple[object, ...]] = field(default_factory=dict)


@dataclass
class Reconciler:
    api: KubeApi
    view: Callable[[], ClusterView]
    image: str = naming.DEFAULT_RELAY_IMAGE
    resync_seconds: float = RESYNC_SECONDS_DEFAULT
    debounce_seconds: float = 0.2
    retry_seconds: float = 2.0

    namespaces: tuple[str, ...] = ()  # served namespaces; empty = all
    # Where the relay pods are (tests map them to 127.0.0.x processes).
    pod_address: pods.PodAddresser = pods.cluster_address
    pod_client: pods.PodClient = field(default_factory=pods.PodClient)
    drain_poll_seconds: float = scaledown.POLL_SECONDS
    # Relay handover keys derive from it (operator_key.py: the one Secret it reads).
    operator_key: bytes = field(default_factory=operator_key.load)
    network: NetworkSettings = field(default_factory=NetworkSettings.from_env)

    workers: int = WORKERS_DEFAULT  # relays reconciled at once
    health: Health = field(default_factory=Health)  # what /healthz and /readyz read

    relays: dict[Key, RelayMemory] = field(default_factory=dict)
    running: dict[Key, asyncio.Task[None]] = field(default_factory=dict)
    slots: asyncio.Semaphore = field(init=False)
    passes: int = 0
    last_sweep: float = float("-inf")  # loop time of the last orphan sweep
    started: bool = False
    busy: bool = False
    # The parts, each owning its state (built in __post_init__ from the above).
    queue: WorkQueue = field(init=False)
    inputs: InputCache = field(init=False)
    applier: ChildApplier = field(init=False)
    statuses: StatusWriter = field(init=False)
    recorder: EventRecorder = field(init=False)  # Kubernetes Events of transitions
    events: EventRouter = field(init=False)
    watch: InputWatch = field(init=False)
    child_watch: ChildWatch = field(init=False)  # our ConfigMaps, their metadata

    def __post_init__(self) -> None:
        self.slots = asyncio.Semaphore(self.workers)
        self.queue = WorkQueue(self.retry_seconds)
        self.inputs = InputCache()
        self.applier = ChildApplier(self.api)
        self.recorder = EventRecorder(self.api)
        self.statuses = StatusWriter(
            self.api, self.retry_seconds, self.inputs.current, self.recorder.status_written
        )
        self.events = EventRouter(self.queue, self.inputs, self.applier, self.view)
        self.watch = InputWatch(self.api, self.events, self.namespaces, health=self.health)
        self.child_watch = ChildWatch(self.api, self.events, self.namespaces, health=self.health)

    # --- for tests and benchmarks (call in the loop's thread) --------------------------
    @property
    def idle(self) -> bool:
        return (
            not self.busy
            and not self.running
            and self.queue.empty
            and self.statuses.idle
            and self.recorder.idle
        )

    def resync_now(self) -> None:
        """A full pass now."""
        self.resync()
        self.queue.wakeup.set()

    def mark_all(self, render: bool = True) -> None:
        """Every known relay dirty, caches kept."""
        for key in self.view().relays:
            self.queue.mark(key, render)

    # --- the loop ---------------------------------------------------------------------
    async def run(self) -> None:
        writer = asyncio.create_task(self.statuses.run(), name="mailrelay-status-writer")
        watch = asyncio.create_task(self.watch.run(), name="mailrelay-input-watch")
        children = asyncio.create_task(self.child_watch.run(), name="mailrelay-child-watch")
        recorder = asyncio.create_task(self.recorder.run(), name="mailrelay-k8s-events")
        try:
            await self._run()
        finally:
            tasks = [writer, watch, children, recorder, *self.running.values()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.pod_client.close()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_resync = loop.time() + self.resync_seconds
        # A first pass at once, over whatever seed() marked (maybe nothing):
        # ready means seeded and looping, not that some MailRelay exists.
        await self.process()
        while True:
            # A steady stream of events must not postpone the resync forever.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self.queue.wakeup.wait(), max(0.0, next_resync - loop.time())
                )
            if loop.time() >= next_resync:
                next_resync = loop.time() + self.resync_seconds
                if self.started:
                    # From the watch caches: re-listing a million recipients
                    # every few minutes would cost more than the drift it finds.
                    self.resync()
            self.queue.wakeup.clear()
            await asyncio.sleep(self.debounce_seconds)
            await self.process()

    async def seed(self) -> None:
        """Lists RelayDomains and RecipientLists into the input cache, and the
        relays' MX Services (their names are kept: see EventRouter.mx_services).

        Once, at start-up, before the first pass: the complete picture. Later
        the watches keep it current (run() starts ours; a resync replays the
        cache, it lists nothing).
        """
        await self.watch.seed()
        selector = f"{naming.LABEL_MANAGED_BY}={naming.MANAGED_BY},{naming.LABEL_COMPONENT}=mx"
        for namespace in self.namespaces or (None,):
            path = resource_path("v1", "Service", namespace)
            for svc in await self.api.list_objects(path, selector):
                self.events.service_event({"apiVersion": "v1", "kind": "Service", **svc}, False)

    def resync(self) -> None:
        """Forget what was applied and written: the next pass checks everything again."""
        self.applier.resync()
        self.statuses.resync()
        for key, mem in self.relays.items():
            mem.statuses_queued = {}
            self.queue.mark(key)
        self.queue.mark_sweep()

    async def process(self) -> None:
        """One pass over whatever is dirty now: each relay's reconcile starts
        in its own task (at most `workers` run at once), so a slow relay (pods
        that do not answer a drain) holds up no other."""
        self.started = self.busy = True
        self.health.begin_pass()
        try:
            await self._process()
        finally:
            self.busy = False
            self.passes += 1
            self.health.end_pass()

    async def _process(self) -> None:
        view = self.view()
        dirty, sweep = self.queue.take()
        for key, render in sorted(dirty.items()):
            if key in self.running:
                # One reconcile per relay at a time: this mark waits for it.
                self.queue.dirty[key] = self.queue.dirty.get(key, False) or render
                continue
            self.running[key] = asyncio.create_task(
                self._reconcile_one(key, render, view), name=f"mailrelay-{key[0]}-{key[1]}"
            )
        self._count_depth()
        if sweep:
            # A sweep looks at every RelayDomain and RecipientList: while
            # thousands arrive, one every SWEEP_INTERVAL_SECONDS, not one a pass.
            now = asyncio.get_running_loop().time()
            wait = self.last_sweep + SWEEP_INTERVAL_SECONDS - now
            if wait > 0:
                self.queue.sweep_later(wait)
                return
            self.last_sweep = now
            try:
                self.sweep_orphans(view)
            except Exception:
                log.exception("writing statuses of unattached objects failed; retrying")
                self.queue.sweep_later()

    async def _reconcile_one(self, key: Key, render: bool, view: ClusterView) -> None:
        started = time.monotonic()
        try:
            async with self.slots:
                applied = await self.reconcile_relay(key, render, view)
            metrics.RECONCILES.labels("applied" if applied else "failed").inc()
            if applied:
                metrics.LAST_SUCCESS.labels(*key).set(time.time())
            else:
                metrics.ERRORS.inc()
        except Exception:
            log.exception("reconciling MailRelay %s/%s failed; retrying", *key)
            metrics.RECONCILES.labels("error").inc()
            metrics.ERRORS.inc()
            failures = 0
            if key in self.relays:
                self.relays[key].failures += 1
                failures = self.relays[key].failures
            self.queue.mark_later(key, failures, render=True)
        finally:
            metrics.DURATION.observe(time.monotonic() - started)
            self.running.pop(key, None)
            self._count_depth()
            if key in self.queue.dirty:
                self.queue.wakeup.set()  # a mark that waited for this reconcile

    def _count_depth(self) -> None:
        """The queue-depth metric: relays marked or being reconciled."""
        metrics.QUEUE_DEPTH.set(len(self.queue.dirty.keys() | self.running.keys()))

    # --- one relay --------------------------------------------------------------------
    async def reconcile_relay(self, key: Key, render: bool, view: ClusterView) -> bool:
        """One relay's pass; whether every child was applied."""
        relay = view.relays.get(key)
        if relay is None:
            self._forget(key)
            return True
        invalid = validate_object(relay)
        if invalid:
            # The API server's CEL rules should have refused it; an object stored
            # before a rule existed was not checked. The running config stays.
            problems = [f"{e.field}: {e.message}" for e in invalid]
            log.warning("MailRelay %s/%s: invalid spec: %s", *key, "; ".join(problems))
            await self.statuses.write(relay, status.invalid_spec_status(relay, problems))
            return False
        mem = self._memory(key, relay)
        rendered = await self._render(key, relay, mem, render, view)
        obs = status.RelayObservation(config_hash=rendered.config_hash)
        obs.warnings = [f"{w.field}: {w.message}" for w in relay_warnings(relay)]
        if certificate.wants_certificate(relay):
            await self.applier.find_cert_manager()
            obs.cert_manager_missing = self.applier.cert_manager is False
        if mem.handover_key is None:
            mem.handover_key = handover_secret.relay_key(self.operator_key, relay)
        children = desired_children(
            relay,
            rendered,
            self.image,
            self.applier.cert_manager is not False,
            mem.handover_key,
            self.network,
            self.events.mx_services.get(key),
            mem.claims_cache,
            encode_later=True,
        )
        await self._apply(key, relay, mem, children, obs)
        if obs.applied:
            try:
                await mx_pods.label_mx_pods(self.api, relay)
            except KubeError as e:
                log.warning("MailRelay %s/%s: labelling pods for spec.mx[].pods: %s", *key, e)
                self.queue.mark_later(key, mem.failures)
        self._observe(key, relay, mem, rendered, obs)

        # The relay's own status now; its domains' and lists' (thousands, maybe)
        # go to the status writer, so the next change is not kept waiting.
        await self.statuses.write(relay, status.relay_status(relay, obs))
        self._queue_statuses(key, mem, rendered, view)
        log.info("reconciled MailRelay %s/%s; %d writes so far", key[0], key[1], self.api.writes)
        return obs.applied

    def _queue_statuses(
        self, key: Key, mem: RelayMemory, rendered: Rendered, view: ClusterView
    ) -> None:
        """The statuses of the relay's RelayDomains and RecipientLists, to the
        status writer: those whose object or verdict changed since the last pass."""
        queued = mem.statuses_queued
        fresh: dict[str, tuple[object, ...]] = {}
        # Most are equal (generation 1, the same shared status, Accepted with
        # no message): each (generation, status, verdict) held once, not a
        # tuple per object (~6 MB at 100,000 RelayDomains).
        # Keyed by the status's identity: equal statuses in the cache are one
        # dict (cluster.shared), and a dict is no key.
        seen: dict[tuple[object, ...], tuple[object, ...]] = {}

        def changed(kind: str, obj: Mapping[str, Any], verdict: tuple[object, ...]) -> bool:
            # By uid (the cached object's own string, no new key), which also
            # tells a re-created object of the same name from the old one.
            meta = obj["metadata"]
            uid = str(meta.get("uid") or f"{kind}/{meta['namespace']}/{meta['name']}")
            gen, st = meta.get("generation"), obj.get("status")
            which = (gen, id(st), verdict)
            now = seen.get(which)
            if now is None:
                now = seen[which] = (gen, st, verdict)
            fresh[uid] = now
            return queued.get(uid) != now

        for v in rendered.domains:
            dom = view.domains.get((v.namespace, v.name))
            if dom is None:
                continue
            if changed("RelayDomain", dom, (v.accepted, v.reason, v.message, v.recipients)):
                self.statuses.queue(dom, status.domain_status(dom, v))
        for lv in rendered.recipient_lists:
            rl = view.lists.get((lv.namespace, lv.name))
            if rl is None or view.relay_of_list(rl) != key:
                continue
            if changed("RecipientList", rl, (lv.accepted, lv.reason, lv.message, lv.addresses)):
                self.statuses.queue(rl, status.list_status(rl, lv))
        mem.statuses_queued = fresh

    def _memory(self, key: Key, relay: KubeObject) -> RelayMemory:
        """The relay's memory; a fresh one for a new object of the same name."""
        mem = self.relays.setdefault(key, RelayMemory())
        uid = str(relay["metadata"].get("uid"))
        if mem.uid != uid:
            self.relays[key] = mem = RelayMemory(uid=uid)
        return mem

    async def _render(
        self, key: Key, relay: KubeObject, mem: RelayMemory, render: bool, view: ClusterView
    ) -> Rendered:
        """The last render, or a new one if asked, never done, or the relay changed."""
        gen = status.generation(relay)
        if not render and mem.rendered is not None and mem.generation == gen:
            return mem.rendered
        inventory = view.inventory()
        started = time.monotonic()
        # The last render's claims as they are (a list by domain, no dict of
        # 100,000 alive through the render); None: the relay's status.domains.
        claims: list[Claim] | None = mem.claims
        if claims is None:
            # First render: a large relay's claims are in ConfigMaps (claims_store).
            stored = await claims_store.load_claims(self.api, relay)
            if stored:
                relay = claims_store.with_stored_claims(relay, stored)
        settings = RenderSettings(cluster=self.network.cluster)
        # The new render starts from mem.claims, not from the last render's
        # verdicts and files: let those go first, not beside the new ones
        # (~9 MB at 100,000 RelayDomains). A failed render leaves None: the
        # next pass renders again.
        mem.rendered = None
        rendered = await asyncio.to_thread(
            render_relay, relay, inventory, mem.render_cache, settings, claims
        )
        # What a large render's temporaries (and the watch pages since) freed,
        # back to the system; a millisecond or so, in a thread all the same.
        if rendered.recipients + len(rendered.domains) >= TRIM_AFTER_RENDER_OBJECTS:
            await asyncio.to_thread(trim_heap)
        mem.rendered, mem.generation, mem.claims = rendered, gen, rendered.claims
        release = next_release(rendered.claims, relay_spec(relay).allowed_domains.release_after)
        if release is not None:
            # A gone holder's claim lapses then: render again to hand the domain on.
            wait = (release - datetime.datetime.now(datetime.UTC)).total_seconds()
            self.queue.mark_after(max(wait, 0.0) + 1.0, key, render=True)
        log.info(
            "rendered MailRelay %s/%s: %d domains, %d recipients, %d files in %.2fs",
            key[0],
            key[1],
            len(rendered.domains),
            rendered.recipients,
            len(rendered.files),
            time.monotonic() - started,
        )
        return rendered

    async def _apply(
        self,
        key: Key,
        relay: KubeObject,
        mem: RelayMemory,
        children: list[KubeObject],
        obs: status.RelayObservation,
    ) -> None:
        """Applies and prunes the children; a failure is reported in obs and retried."""

        async def hold(sts: KubeObject, changed: bool) -> KubeObject:
            if not (mem.drain.active or changed):
                return sts
            return await self._hold_replicas(key, relay, mem, sts)

        try:
            outcome: ApplyOutcome = await self.applier.apply(
                key, children, mem.recreate, mem.generation, hold
            )
            obs.cert_manager_missing = obs.cert_manager_missing or outcome.cert_manager_missing
            if outcome.again:
                self.queue.mark_later(key, mem.failures)
            await self.applier.prune(key, relay, children)
            mem.failures = 0
        except (KubeError, ForeignObject) as e:
            obs.applied, obs.apply_error = False, str(e)
            obs.foreign = isinstance(e, ForeignObject)
            log.warning("MailRelay %s/%s: %s", key[0], key[1], e)
            mem.failures += 1
            self.queue.mark_later(key, mem.failures)

    async def _hold_replicas(
        self, key: Key, relay: KubeObject, mem: RelayMemory, sts: KubeObject
    ) -> KubeObject:
        """The StatefulSet to apply: fewer replicas only once the leaving pods are drained."""
        found = await self.api.get(object_path(sts))
        current = pods_in_place(found, mem.applied_replicas)
        want = int(sts["spec"]["replicas"])
        assert mem.handover_key is not None
        planner = scaledown.ScaleDown(self.pod_address, self.pod_client, self.drain_poll_seconds)
        plan = await planner.plan(relay, current, want, mem.handover_key, mem.drain)
        if plan.poll:
            self.queue.mark_after(self.drain_poll_seconds, key)
        mem.applied_replicas = plan.replicas
        if plan.replicas == want:
            return sts
        return {**sts, "spec": {**sts["spec"], "replicas": plan.replicas}}

    def _observe(
        self,
        key: Key,
        relay: KubeObject,
        mem: RelayMemory,
        rendered: Rendered,
        obs: status.RelayObservation,
    ) -> None:
        """Fills in what the status reports beyond the apply: pods, drains, MX records."""
        recreated = mem.recreate.recreated
        if recreated and recreated[0] == mem.generation:
            obs.recreated = recreated[1]
        obs.recreating = mem.recreate.recreating
        obs.scale_down = mem.drain.condition
        obs.replicas, obs.ready_replicas = self.events.replicas.get(key, Replicas())
        want = relay_spec(relay).replicas
        obs.rollout = rollout(self.events.statefulsets.get(key), want)
        at = time.monotonic()
        obs.stuck = mem.progress.stuck(obs.rollout, at)
        if not obs.rollout.done and mem.progress.since == at:
            # No event may come (a crash-looping pod): look again at the deadline.
            self.queue.mark_after(PROGRESS_DEADLINE_SECONDS + 1.0, key)
        obs.certificate = self.events.certificates.get(key)
        accepted = sorted(v.domain for v in rendered.domains if v.accepted)
        obs.domains, obs.recipients = len(accepted), rendered.recipients
        obs.claims = claims_store.status_claims(rendered.claims)
        entries = naming.mx_entries(relay)
        mx = [(e.priority, e.hostname) for e in entries]
        ready_hosts = {
            e.hostname
            for e, name in zip(entries, naming.mx_service_names(relay), strict=True)
            if self.events.service_ready.get((key[0], name))
        }
        obs.mx_records = status.mx_records(accepted, mx, ready_hosts)

    def _forget(self, key: Key) -> None:
        self.relays.pop(key, None)
        self.applier.forget(key)
        self.events.forget(key)

    # --- statuses of what no relay renders ----------------------------------------------
    def sweep_orphans(self, view: ClusterView) -> None:
        """Statuses of RelayDomains and RecipientLists no existing relay renders."""
        for dom in view.orphan_domains():
            ref = dom["spec"]["relayRef"]
            ns = ref.get("namespace") or key_of(dom)[0]
            msg = f"no MailRelay {ns}/{ref['name']}"
            self.statuses.queue(dom, status.domain_status(dom, None, msg))
        for rl, reason, message in view.orphan_lists():
            self.statuses.queue(rl, status.list_status(rl, None, reason, message))


def pods_in_place(found: KubeObject | None, applied: int | None) -> int | None:
    """How many relay pods a scale-down starts from: what we applied, not what
    another writer raised spec.replicas to, and no more pods than exist
    (status.replicas, once the controller reported). None: no StatefulSet."""
    if found is None or found["metadata"].get("deletionTimestamp"):
        return None
    current = int((found.get("spec") or {}).get("replicas") or 0)
    if applied is not None:
        current = min(current, applied)
    st = found.get("status") or {}
    # status.replicas counts the pods the controller made, once it has looked
    # (the API server writes a 0 at creation, before any controller has).
    if st.get("observedGeneration") and st.get("replicas") is not None:
        current = min(current, int(st["replicas"]))
    return current
