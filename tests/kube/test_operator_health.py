"""The operator's /healthz and /readyz against a real kube-apiserver: ready with
no MailRelay at all (`helm install --wait` on an empty cluster), and unhealthy
once its reconcile loop is dead.

Each test runs an operator of its own, beside the session's, serving one
namespace nothing else uses, with its health endpoint on a loopback port.
"""

from __future__ import annotations

import contextlib
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator

import pytest
from mrtest.kube import Kube, RunningOperator, wait_for
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
