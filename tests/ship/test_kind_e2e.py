"""hack/kind-e2e.sh cannot run here (no Docker engine), so everything it is
made of is checked: shellcheck, the chart values it sets, the manifests it
applies (hack/e2e-manifests.py) against the local kube-apiserver, the Service
name it forwards to, and the same mail sent with swaks through a real relay
running those manifests, with the next hop on loopback instead of a pod."""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from mrtest.kube import Kube
from mrtest.peers import AiosmtpdSink, swaks
from mrtest.relayproc import RelayProcess, next_loopback
from ship.tools import REPO, dry_run, helm_template, run

SCRIPT = REPO / "hack" / "kind-e2e.sh"
GENERATOR = REPO / "hack" / "e2e-manifests.py"


def generate(*args: str) -> list[dict[str, Any]]:
    result = run([sys.executable, str(GENERATOR), *args])
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def cluster_manifests() -> list[dict[str, Any]]:
    # The exact arguments the script passes.
    text = SCRIPT.read_text()
    assert '--next-hop "mail-sink.default.svc.cluster.local:2526"' in text
    assert '--mx-service ClusterIP --sink-image "$RELAY_IMAGE"' in text
    return generate(
        "--next-hop", "mail-sink.default.svc.cluster.local:2526",
        "--mx-service", "ClusterIP", "--sink-image", "mailrelay:e2e",
    )  # fmt: skip


def test_shellcheck() -> None:
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.fail("shellcheck is missing: run hack/setup.sh (Debian package shellcheck)")
    scripts = [SCRIPT, REPO / "hack" / "sync-chart-crds.sh"]
    result = run([shellcheck, *map(str, scripts)])
    assert result.returncode == 0, result.stdout


def test_chart_values_the_script_sets_are_valid() -> None:
    sets = re.findall(r"--set (\S+)", SCRIPT.read_text())
    assert sets, "the script installs the chart with --set values"
    args = []
    for s in sets:
        args += ["--set", s.replace('"$TAG"', "e2e")]
    result = helm_template(*args)
    assert result.returncode == 0, result.stderr
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    (deploy,) = [d for d in docs if d["kind"] == "Deployment"]
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "mailrelay-operator:e2e"
    env = {e["name"]: e.get("value") for e in container["env"]}
    # The relay pods will run the image the script built and loaded.
    assert env["MAILRELAY_RELAY_IMAGE"] == "mailrelay:e2e"


def test_the_mx_service_the_script_forwards_to() -> None:
    from mailrelay_operator import naming

    from mailrelay_api.validate import with_defaults

    (relay,) = [d for d in cluster_manifests() if d["kind"] == "MailRelay"]
    names = naming.mx_service_names(with_defaults(relay))
    assert names == ["quickstart-mx-quickstart-test"]
    assert f"svc/{names[0]} " in SCRIPT.read_text()
    assert relay["spec"]["mx"][0]["service"]["type"] == "ClusterIP"


def test_cluster_manifests_validate(tmp_path: Path) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump_all(cluster_manifests()))
    mailrelay = Path(sys.executable).parent / "mailrelay"
    result = run([str(mailrelay), "validate", "-f", str(path)])
    assert result.returncode == 0, result.stderr


@pytest.mark.kube
def test_cluster_manifests_server_side_dry_run(kube: Kube) -> None:
    docs = cluster_manifests()
    result = dry_run(kube, docs)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("(server dry run)") == len(docs)


def test_the_same_mail_through_a_local_relay(tmp_path: Path) -> None:
    """The script's run with the next hop on loopback: quickstart, swaks, delivered."""
    with AiosmtpdSink(next_loopback()) as sink:
        docs = generate("--next-hop", f"{sink.host}:{sink.port}")
        manifests = tmp_path / "manifests"
        manifests.mkdir()
        (manifests / "quickstart.yaml").write_text(yaml.safe_dump_all(docs))
        with RelayProcess(manifests, tmp_path / "relay") as relay:
            subject = "kind-e2e local"
            sent = swaks(
                relay.address,
                to="info@example.com",
                sender="sender@client.kind.test",
                helo="client.kind.test",
                extra=["--header", f"Subject: {subject}"],
            )
            assert sent.returncode == 0, sent.output
            (message,) = sink.wait_for(1, timeout=60)
            assert message.recipients == ["info@example.com"]
            assert f"Subject: {subject}".encode() in message.data
