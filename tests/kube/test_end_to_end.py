"""End to end with no kubelet: the operator's ConfigMaps run real relays.

The test plays kubelet: for each pod the StatefulSet asks for, it projects
the ConfigMaps into a folder (atomic-writer layout) and starts the pod's
command (`mailrelay relay --config-dir ...`) on a free 127.0.0.x port. Mail
sent with swaks reaches a sink; a RecipientList added later is accepted by
the same relay processes once the folder is re-projected, with no restart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from mailrelay_operator import naming
from mrtest.kube import Kube, RunningOperator, condition, project_config_maps, wait_for
from mrtest.objects import relay_and_domain
from mrtest.peers import AiosmtpdSink, swaks
from mrtest.relayproc import RelayProcess, next_loopback

pytestmark = pytest.mark.kube
NS = "e2e"


def manifests(sink: AiosmtpdSink) -> str:
    docs: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}},
        *relay_and_domain("edge", NS, label="e2e", replicas=2, next_hop=sink.address),
        {
            "apiVersion": "mailrelay.io/v1alpha1",
            "kind": "RecipientList",
            "metadata": {"name": "staff", "namespace": NS},
            "spec": {"domainRef": {"name": "e2e-example"}, "addresses": ["alice@e2e.example"]},
        },
    ]
    return yaml.safe_dump_all(docs)


def test_relays_run_on_the_rendered_config_maps(
    kube: Kube, operator: RunningOperator, tmp_path: Path
) -> None:
    with AiosmtpdSink(host=next_loopback()) as sink:
        kube.apply(manifests(sink))
        wait_for(
            "edge Reconciled",
            lambda: (
                condition(kube.get("mailrelay", "edge", NS), "Reconciled").get("status") == "True"
            ),
        )
        operator.settle()
        sts = kube.get("statefulset", "edge", NS)
        assert sts is not None
        container = sts["spec"]["template"]["spec"]["containers"][0]
        command = container["command"]
        assert command[:2] == ["mailrelay", "relay"]
        assert command[command.index("--config-dir") + 1] == naming.CONFIG_DIR

        relays: list[RelayProcess] = []
        try:
            for ordinal in range(sts["spec"]["replicas"]):
                pod = tmp_path / f"edge-{ordinal}"
                names = project_config_maps(kube, sts, pod / "config")
                assert "relay.json" in names and "domains.json" in names
                relays.append(
                    RelayProcess(
                        None, pod, command="relay", config_dir=pod / "config", workers=1
                    ).start()
                )
            for n, relay in enumerate(relays):
                ok = swaks(relay.address, to="alice@e2e.example", local=next_loopback())
                assert ok.returncode == 0, ok.output
                sink.wait_for(n + 1)
                refused = swaks(relay.address, to="bob@e2e.example", local=next_loopback())
                assert refused.returncode != 0 and "550" in refused.output, refused.output
            assert {m.recipients[0] for m in sink.messages} == {"alice@e2e.example"}

            # A new RecipientList: the operator updates the recipients ConfigMap,
            # the kubelet (us) refreshes the mounted folder, the relays reload.
            before = kube.get("configmap", "edge-recipients-0", NS)
            kube.apply(
                "apiVersion: mailrelay.io/v1alpha1\nkind: RecipientList\n"
                f"metadata: {{name: more, namespace: {NS}}}\n"
                "spec: {domainRef: {name: e2e-example}, addresses: [bob@e2e.example]}\n"
            )
            wait_for(
                "the recipients ConfigMap to change",
                lambda: (
                    (kube.get("configmap", "edge-recipients-0", NS) or {}).get("binaryData")
                    != (before or {}).get("binaryData")
                ),
            )
            pids = [r.proc.pid for r in relays if r.proc is not None]
            for ordinal, relay in enumerate(relays):
                project_config_maps(kube, sts, tmp_path / f"edge-{ordinal}" / "config")
                accepted = wait_for(
                    "bob accepted",
                    lambda relay=relay: (
                        swaks(relay.address, to="bob@e2e.example", local=next_loopback()).returncode
                        == 0
                    ),
                    timeout=30,
                )
                assert accepted
            sink.wait_for(len(relays) * 2)
            assert [r.proc.pid for r in relays if r.proc is not None] == pids
        finally:
            for relay in relays:
                relay.stop()
