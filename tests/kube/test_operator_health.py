"""The operator's /healthz and /readyz against a real kube-apiserver: ready with
no MailRelay at all (`helm install --wait` on an empty cluster), unhealthy
once its reconcile loop is dead, and alive but not ready while RBAC refuses
it its inputs.

Each test runs an operator of its own, beside the session's, serving one
namespace nothing else uses, with its health endpoint on a loopback port.
"""

from __future__ import annotations

import asyncio
import contextlib
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kube.conftest import service_account_kubeconfig
from mailrelay_operator.apply import ChildApplier
from mailrelay_operator.cluster import ClusterView
from mailrelay_operator.events import EventRouter
from mailrelay_operator.health import Health, serve
from mailrelay_operator.input_watch import InputWatch
from mailrelay_operator.inputs import InputCache
from mailrelay_operator.kubeapi import KubeApi
from mailrelay_operator.workqueue import WorkQueue
from mrtest.kube import Kube, RunningOperator, until, wait_for
from mrtest.relayproc import free_port, next_loopback

pytestmark = pytest.mark.kube
NS = "lonely"

StartOperator = Callable[..., contextlib.AbstractContextManager[RunningOperator]]


def probe(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.fixture
def lone(kube: Kube, start_operator: StartOperator) -> Iterator[tuple[RunningOperator, str]]:
    kube.apply(f"apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {NS}\n")
    assert kube.list("mailrelays", NS) == []
    host = next_loopback()
    base = f"http://{host}:{free_port(host)}"
    with start_operator((NS,), f"{base}/healthz") as running:
        yield running, base


def test_ready_with_no_mailrelay(lone: tuple[RunningOperator, str]) -> None:
    operator, base = lone
    # Nothing marks a relay: no event reaches the loop, and it is ready anyway.
    answer = wait_for("/readyz 200", lambda: (a := probe(f"{base}/readyz"))[0] == 200 and a)
    assert answer == (200, "ok\n")
    assert probe(f"{base}/healthz") == (200, "ok\n")
    assert operator.call(lambda: dict(operator.reconciler.queue.dirty)) == {}
    assert operator.call(lambda: operator.reconciler.relays) == {}


def test_healthz_fails_once_the_reconcile_loop_is_dead(lone: tuple[RunningOperator, str]) -> None:
    operator, base = lone
    wait_for("/readyz 200", lambda: probe(f"{base}/readyz")[0] == 200)
    assert probe(f"{base}/healthz")[0] == 200

    # The loop dies (kopf, its watches and this health server live on).
    def kill() -> None:
        task = operator.reconciler.health.loop
        assert task is not None and not task.done()
        task.cancel()

    operator.call(kill)
    wait_for("the loop task to end", lambda: operator.call(operator.reconciler.health.loop.done))
    assert probe(f"{base}/healthz") == (503, "the reconcile loop has ended\n")
    assert probe(f"{base}/readyz")[0] == 503


def test_alive_and_not_ready_while_rbac_refuses_the_inputs(
    kube: Kube, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An account the operator's ClusterRole is not bound to yet: listing
    RelayDomains is forbidden (403); /readyz says so, /healthz stays 200.
    Once the binding exists, the watch's next try lists and it is ready."""
    ns, account = "unbound", "no-inputs"
    kube.apply(
        f"apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n---\n"
        f"apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: {account}\n"
        f"  namespace: {ns}\n"
    )
    monkeypatch.setenv("KUBECONFIG", str(service_account_kubeconfig(kube, tmp_path, (ns, account))))
    monkeypatch.setattr("mailrelay_operator.health.WATCH_FAILING_SECONDS", 0.0)  # at once
    host = next_loopback()
    base = f"http://{host}:{free_port(host)}"

    async def scenario() -> None:
        api = KubeApi()
        router = EventRouter(WorkQueue(), InputCache(), ChildApplier(api), ClusterView)
        health = Health(loop=asyncio.create_task(asyncio.sleep(3600)))
        health.end_pass()  # as if seeded, so only the watch decides
        watch = InputWatch(api, router, (ns,), health=health)
        runner = await serve(f"{base}/healthz", health)
        task = asyncio.create_task(watch.run())
        try:
            await until("a failure", lambda: bool(health.watch_failures))
            code, why = await asyncio.to_thread(probe, f"{base}/readyz")
            assert code == 503 and "RelayDomain in unbound failing for" in why
            assert "403" in why
            assert await asyncio.to_thread(probe, f"{base}/healthz") == (200, "ok\n")

            await asyncio.to_thread(
                kube.kubectl,
                "create",
                "clusterrolebinding",
                f"{ns}-{account}",
                "--clusterrole=mailrelay-operator",
                f"--serviceaccount={ns}:{account}",
            )
            await until(
                "the listings", lambda: len(watch.versions) == 2 and not health.watch_failures
            )
            assert await asyncio.to_thread(probe, f"{base}/readyz") == (200, "ok\n")
        finally:
            for t in (task, health.loop):
                assert t is not None
                t.cancel()
            await asyncio.gather(task, health.loop, return_exceptions=True)
            await runner.cleanup()
            await asyncio.to_thread(
                kube.kubectl,
                "delete",
                "clusterrolebinding",
                f"{ns}-{account}",
                "--ignore-not-found",
            )

    asyncio.run(scenario())
