"""Safe scale-down and rolling upgrades against a real kube-apiserver.

The test plays kubelet and the StatefulSet controller (tests/mrtest/pods.py):
each pod of the operator's StatefulSet is a `mailrelay relay` process on its
own 127.0.0.x address with the pod's folder as its volume. The next hop is
down while mail is queued, so only a handover can empty a leaving pod.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest
import yaml
from mrtest.kube import Kube, RunningOperator, condition, wait_for
from mrtest.objects import relay_and_domain
from mrtest.peers import AiosmtpdSink, swaks
from mrtest.pods import Kubelet, Pod
from mrtest.relayproc import free_port, next_loopback

pytestmark = pytest.mark.kube
NS = "scale"


def manifests(name: str, sink: tuple[str, int], replicas: int) -> str:
    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}
    relay = relay_and_domain(
        name,
        NS,
        replicas=replicas,
        next_hop=sink,
        recipients="any",
        scaleDown={"drainTimeout": "10m"},
    )
    return yaml.safe_dump_all([namespace, *relay])


def send(pod: Pod, domain: str, subject: str) -> None:
    result = swaks(
        pod.address,
        to=f"user@{domain}",
        local=next_loopback(),
        extra=["--header", f"Subject: {subject}"],
    )
    assert result.returncode == 0, result.output


def subjects(sink: AiosmtpdSink) -> list[str]:
    out = []
    for m in sink.messages:
        for line in m.data.decode(errors="replace").splitlines():
            if line.startswith("Subject: "):
                out.append(line[len("Subject: ") :])
    return sorted(out)


def replicas(kube: Kube, name: str) -> int:
    sts = kube.get("statefulset", name, NS)
    assert sts is not None
    return int(sts["spec"]["replicas"])


def scaling(kube: Kube, name: str) -> dict[str, Any]:
    return condition(kube.get("mailrelay", name, NS), "ScalingDown")


def start_relay(kube: Kube, operator: RunningOperator, name: str, sink: tuple[str, int]) -> None:
    kube.apply(manifests(name, sink, replicas=2))
    wait_for(
        f"{name} Reconciled",
        lambda: condition(kube.get("mailrelay", name, NS), "Reconciled").get("status") == "True",
    )
    operator.settle()


def test_scale_down_hands_the_queue_over_before_the_pod_goes(
    kube: Kube, operator: RunningOperator, tmp_path: Path
) -> None:
    name = "shrink"
    sink_address = (next_loopback(), 0)
    sink_address = (sink_address[0], free_port(sink_address[0]))  # down for now
    start_relay(kube, operator, name, sink_address)
    kubelet = Kubelet(kube, operator, NS, name)
    try:
        pod0, pod1 = kubelet.start(0, tmp_path), kubelet.start(1, tmp_path)
        kubelet.tell_operator()
        sent = [f"m{i}" for i in range(5)]
        for s in sent:
            send(pod1, f"{name}.example", s)
        wait_for("pod-1 deferred its mail", lambda: pod1.queue_state()["states"]["deferred"] == 5)

        kube.patch("mailrelay", name, {"spec": {"replicas": 1}}, NS)
        draining = wait_for(
            "ScalingDown Draining",
            lambda: (c := scaling(kube, name)).get("reason") == "Draining" and c,
        )
        assert draining["status"] == "True" and f"{name}-1" in draining["message"], draining
        # Observe, until it is over: the StatefulSet keeps 2 replicas as long as
        # pod-1 holds mail; its queue is empty before the StatefulSet shrinks.
        seen: list[tuple[int, int]] = []

        def shrunk() -> bool:
            held = pod1.queue_state()["messages"]
            count = replicas(kube, name)
            seen.append((count, held))
            return count == 1

        wait_for("the StatefulSet to shrink", shrunk, timeout=90)
        assert all(held == 0 for count, held in seen if count == 1), seen
        assert any(count == 2 for count, _ in seen), seen
        assert pod1.queue_state()["messages"] == 0
        assert pod0.queue_state()["messages"] == 5  # handed over, not lost
        done = wait_for(
            "ScalingDown Drained",
            lambda: (c := scaling(kube, name)).get("reason") == "Drained" and c,
        )
        assert done["status"] == "False", done
        # pod-1 said 421 to clients while draining.
        refused = swaks(pod1.address, to=f"x@{name}.example", local=next_loopback())
        assert refused.returncode != 0 and "421" in refused.output, refused.output
        assert "handed over to" in pod1.process.log()  # type: ignore[union-attr]
        assert "handover of" in pod0.process.log()  # type: ignore[union-attr]

        # The StatefulSet controller removes pod-1; the next hop comes up.
        pod1.stop()
        with AiosmtpdSink(*sink_address) as sink:
            sink.wait_for(5, timeout=60)
            wait_for("pod-0's queue empty", lambda: pod0.queue_state()["messages"] == 0)
            assert subjects(sink) == sent  # every message exactly once
    finally:
        kubelet.stop_all()


def test_rolling_upgrade_loses_nothing(
    kube: Kube, operator: RunningOperator, tmp_path: Path
) -> None:
    """Each pod restarts on its own volume (new image); a SIGKILLed one too."""
    name = "upgrade"
    host = next_loopback()
    sink_address = (host, free_port(host))
    start_relay(kube, operator, name, sink_address)
    kubelet = Kubelet(kube, operator, NS, name)
    try:
        pods = [kubelet.start(0, tmp_path), kubelet.start(1, tmp_path)]
        sent = []
        for i, pod in enumerate(pods):
            for j in range(3):
                sent.append(f"before-{i}-{j}")
                send(pod, f"{name}.example", sent[-1])
        wait_for(
            "mail deferred", lambda: all(p.queue_state()["states"]["deferred"] == 3 for p in pods)
        )

        old = kubelet.statefulset()["spec"]["template"]
        kube.patch("mailrelay", name, {"spec": {"image": "registry.test/mailrelay:v2"}}, NS)
        new = wait_for(
            "a new pod template",
            lambda: (t := kubelet.statefulset()["spec"]["template"]) != old and t,
        )
        assert new["spec"]["containers"][0]["image"] == "registry.test/mailrelay:v2"

        # RollingUpdate, highest ordinal first, one pod at a time (PDB maxUnavailable 1):
        # the other pod keeps taking mail meanwhile.
        for pod, other, how in (
            (pods[1], pods[0], signal.SIGTERM),
            (pods[0], pods[1], signal.SIGKILL),
        ):
            pod.stop(how)
            sent.append(f"during-{pod.ordinal}")
            send(other, f"{name}.example", sent[-1])
            kubelet.start(pod.ordinal, tmp_path)
            # Back on its volume: the queue is still there, nothing blocks the start.
            assert pod.queue_state()["messages"] >= 3
        with AiosmtpdSink(*sink_address) as sink:
            sink.wait_for(len(sent), timeout=60)
            wait_for("queues empty", lambda: all(p.queue_state()["messages"] == 0 for p in pods))
            assert subjects(sink) == sorted(sent)
    finally:
        kubelet.stop_all()
