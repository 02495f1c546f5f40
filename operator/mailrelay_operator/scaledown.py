"""Safe scale-down: the StatefulSet shrinks only once the leaving pods' queues are empty.

When spec.replicas goes below what the StatefulSet has, the reconciler keeps
the StatefulSet's replicas where they are and, on every pass (every
POLL_SECONDS while it lasts), asks each leaving pod (ordinals want..current-1)
to drain towards the pods that stay (relay.handover.control POST /drain, a lease
renewed on each pass). The leaving pods stop taking mail, deliver what they
can and hand the rest over (relay.handover.drain). Once every leaving pod reports an
empty queue after the drain settled, the StatefulSet gets the new replicas
and the StatefulSet controller removes the pods, whose volumes are empty.

The MailRelay's status says what is going on: condition ScalingDown
True/Draining (and what each leaving pod still holds), then False/Drained.
Past spec.scaleDown.drainTimeout: True/DrainTimedOut and the pods stay
(onTimeout: Wait), or they go anyway and the condition says what they left
on their retained volumes (onTimeout: Proceed). The drain's start is the
condition's lastTransitionTime, so an operator restart does not reset it.
A scale-down called off (replicas back up) ends the drains it started.
"""

from __future__ import annotations

import datetime
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from mailrelay_api.spec import relay_spec
from mailrelay_api.units import parse_duration
from mailrelay_operator import naming
from mailrelay_operator.pods import PodAddresser, PodClient, PodError
from mailrelay_operator.status import Condition, ConditionType, ScalingDownReason

log = logging.getLogger("mailrelay.operator")

CONDITION = ConditionType.SCALING_DOWN
POLL_SECONDS = 2.0


@dataclass
class DrainMemory:
    """What the reconciler remembers of a relay's scale-down between passes."""

    asked: set[int] = field(default_factory=set)  # ordinals told to drain
    active: bool = False  # a scale-down is waiting for queues
    condition: Condition | None = None  # the last ScalingDown condition


@dataclass
class Plan:
    replicas: int  # what the StatefulSet gets now
    poll: bool  # look again in POLL_SECONDS


@dataclass(frozen=True)
class PodReport:
    """What a leaving pod answered to its drain order (relay.handover.control's /queue)."""

    name: str
    state: dict[str, Any] | None  # None: it did not answer
    error: str = ""

    @property
    def held(self) -> int:
        state = self.state or {}
        return int(state.get("messages") or 0) + int(state.get("incoming") or 0)

    @property
    def drained(self) -> bool:
        return self.state is not None and self.held == 0 and bool(self.state.get("settled"))

    def describe(self) -> str:
        if self.state is None:
            return f"{self.name}: unreachable ({self.error})"
        if self.held == 0:
            return f"{self.name}: queue empty" + (
                "" if self.state.get("settled") else " (settling)"
            )
        states = self.state.get("states") or {}
        parts = [f"{states[s]} {s}" for s in ("active", "deferred", "hold") if states.get(s)]
        return f"{self.name}: {self.held} messages waiting ({', '.join(parts) or 'being received'})"


@dataclass(frozen=True)
class Decision:
    replicas: int  # what the StatefulSet gets now
    poll: bool  # look again in POLL_SECONDS
    condition: Condition
    finished: bool  # the scale-down is over: the leaving pods go


def _since(relay: dict[str, Any]) -> float | None:
    """When the current drain began: the ScalingDown=True condition's transition time."""
    for c in (relay.get("status") or {}).get("conditions") or []:
        if c.get("type") == CONDITION and c.get("status") == "True":
            try:
                at = datetime.datetime.strptime(c["lastTransitionTime"], "%Y-%m-%dT%H:%M:%SZ")
            except (KeyError, ValueError):
                return None
            return at.replace(tzinfo=datetime.UTC).timestamp()
    return None


def decide(
    relay: dict[str, Any], current: int, want: int, reports: list[PodReport], now: float
) -> Decision:
    """Whether the StatefulSet may shrink from current to want replicas, given what
    the leaving pods (ordinals want..current-1) reported (pure)."""
    lines = "; ".join(r.describe() for r in reports)
    leaving = ", ".join(r.name for r in reports)
    target = f"{current} -> {want} replicas"
    if all(r.drained for r in reports):
        return Decision(
            want,
            poll=False,
            condition=Condition(
                CONDITION,
                False,
                ScalingDownReason.DRAINED,
                f"{target}: {leaving} drained (queue empty); the StatefulSet has {want} replicas",
            ),
            finished=True,
        )
    spec = relay_spec(relay).scale_down
    timeout = parse_duration(spec.drain_timeout)
    waited = now - (_since(relay) or now)
    where = (
        f"handing over to {', '.join(naming.pod_name(relay, o) for o in range(want))}"
        if want
        else "no pod stays to take mail: delivering only"
    )
    if waited < timeout:
        message = f"{target}; {where}: {lines}"
        return Decision(
            current, True, Condition(CONDITION, True, ScalingDownReason.DRAINING, message), False
        )
    if spec.on_timeout == "Proceed":
        message = (
            f"{target}: drainTimeout ({spec.drain_timeout}) passed, removed "
            f"anyway (onTimeout: Proceed); left on their retained volumes: {lines}"
        )
        return Decision(
            want,
            False,
            Condition(CONDITION, False, ScalingDownReason.DRAIN_TIMED_OUT, message),
            True,
        )
    message = (
        f"{target} waits past drainTimeout ({spec.drain_timeout}), "
        f"onTimeout: Wait; {where}: {lines}"
    )
    return Decision(
        current, True, Condition(CONDITION, True, ScalingDownReason.DRAIN_TIMED_OUT, message), False
    )


@dataclass
class ScaleDown:
    """Asks the leaving pods to drain (observation), then applies `decide`."""

    addresser: PodAddresser
    client: PodClient
    poll_seconds: float = POLL_SECONDS

    async def plan(
        self,
        relay: dict[str, Any],
        current: int | None,
        want: int,
        key: str,
        mem: DrainMemory,
    ) -> Plan:
        if current is None or want >= current:
            await self._call_off(relay, want, key, mem)
            return Plan(want, poll=False)
        if not mem.active:
            log.info(
                "MailRelay %s/%s: scaling down from %d to %d: draining pods %s",
                naming.relay_namespace(relay),
                naming.relay_name(relay),
                current,
                want,
                ", ".join(naming.pod_name(relay, o) for o in range(want, current)),
            )
        mem.active = True
        # Pods no longer leaving (the target went up again meanwhile) take mail again.
        await self._undrain(relay, key, mem, [o for o in mem.asked if o < want])
        reports = await self._drain(relay, current, want, key, mem)
        decision = decide(relay, current, want, reports, time.time())
        mem.condition = decision.condition
        if decision.finished:
            mem.active, mem.asked = False, set()
            level = (
                logging.INFO
                if decision.condition.reason == ScalingDownReason.DRAINED
                else logging.WARNING
            )
            log.log(level, "MailRelay %s: %s", naming.relay_name(relay), decision.condition.message)
        return Plan(decision.replicas, decision.poll)

    async def _drain(
        self, relay: dict[str, Any], current: int, want: int, key: str, mem: DrainMemory
    ) -> list[PodReport]:
        """Asks (again: the drain is a lease) each leaving pod to drain towards the staying ones."""
        peers = [self.addresser(relay, o).handover for o in range(want)]
        ttl = max(60.0, 10 * self.poll_seconds)
        reports = []
        for ordinal in range(want, current):
            name = naming.pod_name(relay, ordinal)
            try:
                state = await self.client.drain(self.addresser(relay, ordinal), key, peers, ttl)
            except PodError as e:
                reports.append(PodReport(name, None, str(e)))
                continue
            mem.asked.add(ordinal)
            reports.append(PodReport(name, state))
        return reports

    async def _call_off(self, relay: dict[str, Any], want: int, key: str, mem: DrainMemory) -> None:
        if mem.active:
            mem.condition = Condition(
                CONDITION,
                False,
                ScalingDownReason.CANCELLED,
                f"spec.replicas is {want} again: drains ended",
            )
            log.info("MailRelay %s: scale-down called off", naming.relay_name(relay))
        mem.active = False
        await self._undrain(relay, key, mem, [o for o in mem.asked if o < want])
        mem.asked = set()

    async def _undrain(
        self, relay: dict[str, Any], key: str, mem: DrainMemory, ordinals: list[int]
    ) -> None:
        for ordinal in ordinals:
            try:
                await self.client.drain(self.addresser(relay, ordinal), key, None, 0)
            except PodError as e:
                # Its drain lease runs out by itself.
                log.info("ending the drain of %s: %s", naming.pod_name(relay, ordinal), e)
            mem.asked.discard(ordinal)
