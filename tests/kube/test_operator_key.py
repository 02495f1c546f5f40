"""The operator's own key on a real API server: created once by the operator
(with the RBAC it ships with), the same on every later start, so a restart
rolls no relay; Helm never renders it (tests/ship/test_chart.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from kube.conftest import service_account_kubeconfig
from mailrelay_operator import handover_secret as handover
from mailrelay_operator import operator_key
from mailrelay_operator.statefulset import PodOptions, statefulset
from mrtest.kube import Kube

from mailrelay_api.validate import with_defaults

pytestmark = pytest.mark.kube
WHERE = "mailrelay-system/mailrelay-operator-key"


def test_created_once_then_read_back(
    kube: Kube, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(service_account_kubeconfig(kube, tmp_path)))
    env = {operator_key.KEY_SECRET_ENV: WHERE}
    first = operator_key.load(env)  # creates it (first start)
    again = operator_key.load(env)  # reads it (a restart)
    assert first == again and len(first) >= operator_key.MIN_KEY_BYTES
    secret = kube.get("secret", "mailrelay-operator-key", "mailrelay-system")
    assert secret is not None and secret["metadata"]["labels"]

    # A restart changes no relay's pod template: the handover keys are the same.
    relay = with_defaults(
        {
            "apiVersion": "mailrelay.io/v1alpha1",
            "kind": "MailRelay",
            "metadata": {"name": "r", "namespace": "mail", "uid": "u-1"},
            "spec": {"hostname": "mx.example.net"},
        }
    )

    def template(key: bytes) -> object:
        opts = PodOptions(
            image="i", handover_hash=handover.key_hash(handover.relay_key(key, relay))
        )
        return statefulset(relay, opts)["spec"]["template"]

    assert template(first) == template(again)


def test_the_operator_reads_no_other_secret(
    kube: Kube, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kube.kubectl("create", "secret", "generic", "not-yours", "-n", "mailrelay-system",
                 "--from-literal=key=0123456789abcdef0123")  # fmt: skip
    monkeypatch.setenv("KUBECONFIG", str(service_account_kubeconfig(kube, tmp_path)))
    with pytest.raises(Exception, match=r"403|Forbidden"):
        operator_key.load({operator_key.KEY_SECRET_ENV: "mailrelay-system/not-yours"})
