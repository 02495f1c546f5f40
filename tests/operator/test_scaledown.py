"""The scale-down planner (mailrelay_operator.scaledown) with pods that answer
from a table: when the StatefulSet may shrink, what the status says."""

from __future__ import annotations

import datetime
import time
from typing import Any

from mailrelay_operator.cluster import trim
from mailrelay_operator.pods import PodAddress, PodError
from mailrelay_operator.scaledown import DrainMemory, PodReport, ScaleDown, decide
from mrtest.objects import mailrelay_manifest

KEY = "k" * 32


def relay(**scale_down: str) -> dict[str, Any]:
    # As the operator's indexes hold it: defaults applied (cluster.trim).
    scale = {"drainTimeout": "15m", **scale_down}
    return trim(
        mailrelay_manifest(spec={"hostname": "mx.example.net", "replicas": 1, "scaleDown": scale})
    )


def address(relay: dict[str, Any], ordinal: int) -> PodAddress:
    return PodAddress(control=f"http://pod{ordinal}", handover=f"pod{ordinal}:10026")


class Pods:
    """Answers /drain like relay.handover.control would, from a table of queue states."""

    def __init__(self, states: dict[int, dict[str, Any] | None]) -> None:
        self.states = states
        self.calls: list[tuple[int, list[str] | None]] = []

    async def drain(
        self, pod: PodAddress, key: str, peers: list[str] | None, ttl: float
    ) -> dict[str, Any]:
        ordinal = int(pod.control.removeprefix("http://pod"))
        self.calls.append((ordinal, peers))
        state = self.states.get(ordinal)
        if state is None:
            raise PodError("connection refused")
        return state


def state(messages: int = 0, settled: bool = True) -> dict[str, Any]:
    return {
        "messages": messages,
        "incoming": 0,
        "states": {"active": 0, "deferred": messages, "hold": 0},
        "draining": True,
        "settled": settled,
    }


async def test_waits_while_a_leaving_pod_holds_mail() -> None:
    pods = Pods({1: state(3)})
    mem = DrainMemory()
    plan = await ScaleDown(address, pods).plan(relay(), 2, 1, KEY, mem)  # type: ignore[arg-type]
    assert (plan.replicas, plan.poll) == (2, True)
    assert pods.calls == [(1, ["pod0:10026"])]  # drained towards the pod that stays
    assert mem.condition is not None and mem.condition.reason == "Draining"
    assert "edge-1: 3 messages waiting (3 deferred)" in mem.condition.message


async def test_shrinks_once_empty_and_settled() -> None:
    mem = DrainMemory()
    planner = ScaleDown(address, Pods({1: state(0, settled=False)}))  # type: ignore[arg-type]
    assert (await planner.plan(relay(), 2, 1, KEY, mem)).replicas == 2
    planner.client = Pods({1: state(0)})  # type: ignore[assignment]
    plan = await planner.plan(relay(), 2, 1, KEY, mem)
    assert (plan.replicas, plan.poll) == (1, False)
    assert mem.condition is not None
    assert (mem.condition.status, mem.condition.reason) == (False, "Drained")
    assert not mem.active and not mem.asked


async def test_an_unreachable_pod_is_waited_for() -> None:
    mem = DrainMemory()
    plan = await ScaleDown(address, Pods({})).plan(relay(), 3, 1, KEY, mem)  # type: ignore[arg-type]
    assert plan.replicas == 3
    assert mem.condition is not None and "edge-2: unreachable" in mem.condition.message


def started_long_ago(r: dict[str, Any]) -> dict[str, Any]:
    at = datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=1)
    r["status"]["conditions"] = [
        {
            "type": "ScalingDown",
            "status": "True",
            "reason": "Draining",
            "lastTransitionTime": at.strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
    ]
    return r


async def test_past_the_timeout_it_waits_or_proceeds() -> None:
    mem = DrainMemory()
    pods = Pods({1: state(2)})
    plan = await ScaleDown(address, pods).plan(started_long_ago(relay()), 2, 1, KEY, mem)  # type: ignore[arg-type]
    assert plan.replicas == 2
    assert mem.condition is not None
    assert (mem.condition.status, mem.condition.reason) == (True, "DrainTimedOut")
    proceed = started_long_ago(relay(onTimeout="Proceed"))
    plan = await ScaleDown(address, pods).plan(proceed, 2, 1, KEY, mem)  # type: ignore[arg-type]
    assert plan.replicas == 1
    assert mem.condition is not None
    assert (mem.condition.status, mem.condition.reason) == (False, "DrainTimedOut")
    assert "left on their retained volumes" in mem.condition.message


async def test_called_off_when_replicas_go_back_up() -> None:
    mem = DrainMemory()
    pods = Pods({1: state(2), 2: state(1)})
    planner = ScaleDown(address, pods)  # type: ignore[arg-type]
    await planner.plan(relay(), 3, 1, KEY, mem)
    assert mem.asked == {1, 2}
    pods.calls.clear()
    plan = await planner.plan(relay(), 3, 3, KEY, mem)
    assert plan.replicas == 3
    assert sorted(pods.calls) == [(1, None), (2, None)]  # both take mail again
    assert mem.condition is not None and mem.condition.reason == "Cancelled"
    assert not mem.active and not mem.asked


def test_the_decision_is_pure() -> None:
    waiting = [PodReport("edge-1", state(3)), PodReport("edge-2", None, "refused")]
    d = decide(relay(), 3, 1, waiting, now=0.0)
    assert (d.replicas, d.poll, d.finished) == (3, True, False)
    assert d.condition.message == (
        "3 -> 1 replicas; handing over to edge-0: "
        "edge-1: 3 messages waiting (3 deferred); edge-2: unreachable (refused)"
    )
    drained = [PodReport("edge-1", state(0)), PodReport("edge-2", state(0))]
    d = decide(relay(), 3, 0, drained, now=0.0)
    assert (d.replicas, d.poll, d.finished) == (0, False, True)
    assert d.condition.reason == "Drained"
    long_ago = started_long_ago(relay(onTimeout="Proceed"))
    d = decide(long_ago, 2, 1, [PodReport("edge-1", state(0, settled=False))], time.time())
    assert (d.replicas, d.finished, d.condition.reason) == (1, True, "DrainTimedOut")
    assert d.condition.message.endswith(
        "left on their retained volumes: edge-1: queue empty (settling)"
    )
