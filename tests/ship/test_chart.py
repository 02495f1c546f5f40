"""The operator's Helm chart: lint, template, values schema, CRDs, RBAC, alerts,
and a server-side dry-run of what it renders against a real kube-apiserver."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from mrtest.kube import Kube
from prometheus_client.metrics import MetricWrapperBase
from ship.tools import (
    CHART,
    REPO,
    by_kind,
    dry_run,
    ensure_namespaces,
    helm_template,
    render_chart,
    run,
    tool,
)

from relay import metrics

EVERYTHING_ON = (
    "--set", "metrics.serviceMonitor.enabled=true",
    "--set", "metrics.prometheusRule.enabled=true",
    "--set", "grafanaDashboard.enabled=true",
)  # fmt: skip
# Kinds of the Prometheus operator: not installed on the test apiserver, so
# they are checked by rendering only.
MONITORING_GROUP = "monitoring.coreos.com/"


def test_helm_lint(helm: str) -> None:
    for args in ([], list(EVERYTHING_ON), ["--set", "watchNamespaces={mail,customer-a}"]):
        result = run([helm, "lint", "--strict", str(CHART), *args])
        assert result.returncode == 0, result.stdout + result.stderr


def test_default_render() -> None:
    docs = render_chart()
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(
        ["ClusterRole"] * 2
        + ["ClusterRoleBinding"] * 2
        + ["CustomResourceDefinition"] * 3
        + ["Deployment", "NetworkPolicy", "Role", "RoleBinding", "Service", "ServiceAccount"]
    )
    # No Secret: the operator creates its own key (operator-key.yaml).
    assert not by_kind(docs, "Secret")
    (deploy,) = by_kind(docs, "Deployment")
    assert deploy["spec"]["replicas"] == 1
    assert deploy["spec"]["strategy"] == {"type": "Recreate"}
    pod = deploy["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["mailrelay", "operator"]
    assert "--standalone" in container["args"]
    assert not any(a.startswith("--namespace") for a in container["args"])
    assert container["image"] == "ghcr.io/mailrelay/mailrelay-operator:0.1.0"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["MAILRELAY_RELAY_IMAGE"] == "ghcr.io/mailrelay/mailrelay:0.1.0"
    assert pod["securityContext"]["runAsUser"] == 10025 and pod["securityContext"]["runAsNonRoot"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}


def test_operator_args_match_the_cli() -> None:
    # The Deployment's command line must parse with the real `mailrelay` parser.
    from relay.process.cli import build_parser

    docs = render_chart("--set", "watchNamespaces={mail,customer-a}", "--set", "logLevel=debug")
    (container,) = by_kind(docs, "Deployment")[0]["spec"]["template"]["spec"]["containers"]
    args = build_parser().parse_args(container["command"][1:] + container["args"])
    assert args.command == "operator"
    assert args.namespace == ["mail", "customer-a"]
    assert args.standalone and args.verbose
    assert args.liveness == "http://0.0.0.0:8080/healthz"


def test_probes_resync_value_and_notes(helm: str) -> None:
    """readinessProbe on /readyz and livenessProbe on /healthz, at the port
    --liveness serves; resyncSeconds and reconcileWorkers reach the operator;
    NOTES.txt says how to check the operator and what it serves."""
    import urllib.parse

    from mailrelay_operator import settings

    values = ("--set", "resyncSeconds=60", "--set", "reconcileWorkers=2")
    (deploy,) = by_kind(render_chart(*values), "Deployment")
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    (liveness,) = [a.split("=", 1)[1] for a in container["args"] if a.startswith("--liveness=")]
    assert urllib.parse.urlsplit(liveness).port == ports["health"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env[settings.RESYNC_SECONDS_ENV] == "60"
    assert env[settings.WORKERS_ENV] == "2"
    # The chart's defaults are the operator's own (run without the chart).
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    assert float(defaults["resyncSeconds"]) == settings.RESYNC_SECONDS_DEFAULT
    assert defaults["reconcileWorkers"] == settings.WORKERS_DEFAULT
    notes = run(
        [helm, "install", "mailrelay-operator", str(CHART), "--dry-run=client",
         "--namespace", "mailrelay-system", *values],
        env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "KUBECONFIG": "/nonexistent"},
    )  # fmt: skip
    assert notes.returncode == 0, notes.stderr
    text = notes.stdout[notes.stdout.index("NOTES:") :]
    assert "rollout status deployment/mailrelay-operator" in text
    assert "/readyz" in text and "every 60 s" in text and "2 relays at a time" in text


def test_image_digest_and_tag() -> None:
    digest = "sha256:" + "a" * 64
    docs = render_chart("--set", f"image.digest={digest}", "--set", "relayImage.tag=1.2.3")
    (container,) = by_kind(docs, "Deployment")[0]["spec"]["template"]["spec"]["containers"]
    assert container["image"] == f"ghcr.io/mailrelay/mailrelay-operator@{digest}"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["MAILRELAY_RELAY_IMAGE"] == "ghcr.io/mailrelay/mailrelay:1.2.3"


@pytest.mark.parametrize(
    ("setting", "complaint"),
    [
        ("logLevel=verbose", "/logLevel"),
        ("watchNamespaces[0]=Not_A_Namespace", "/watchNamespaces/0"),
        ("image.digest=sha256:1234", "/image/digest"),
        ("image.pullPolicy=Sometimes", "/image/pullPolicy"),
        ("crds.install=maybe", "/crds/install"),
        ("replicaCount=2", "'replicaCount' not allowed"),
        ("metrics.port=80", "/metrics/port"),
        ("metrics.serviceMonitor.interval=often", "/metrics/serviceMonitor/interval"),
        (
            "metrics.prometheusRule.oldestMessage.seconds=10",
            "/metrics/prometheusRule/oldestMessage",
        ),
        ("metrics.prometheusRule.rejectsSpiking.factor=1", "/rejectsSpiking/factor"),
        ("metrics.prometheusRule.queueVolume.freeRatio=1", "/queueVolume/freeRatio"),
        ("metrics.prometheusRule.dsnsDropped.for=soon", "/dsnsDropped/for"),
        ("serviceAccount.name=Bad Name", "/serviceAccount/name"),
    ],
)
def test_values_schema_rejects_bad_values(setting: str, complaint: str) -> None:
    result = helm_template("--set", setting)
    assert result.returncode != 0, f"{setting} was accepted"
    assert "values don't meet the specifications of the schema" in result.stderr
    assert complaint in result.stderr, result.stderr


def test_service_account_name_required_without_create() -> None:
    result = helm_template("--set", "serviceAccount.create=false")
    assert result.returncode != 0
    assert "serviceAccount.name is required" in result.stderr


def test_chart_crds_are_deploy_crds() -> None:
    check = run(["bash", str(REPO / "hack" / "sync-chart-crds.sh"), "--check"])
    assert check.returncode == 0, check.stderr
    rendered = {
        d["metadata"]["name"]: d for d in by_kind(render_chart(), "CustomResourceDefinition")
    }
    for path in sorted((REPO / "deploy" / "crds").glob("*.yaml")):
        source = yaml.safe_load(path.read_text())
        got = rendered.pop(source["metadata"]["name"])
        # Same CRD, plus Helm's labels and the keep policy.
        assert got["spec"] == source["spec"]
        assert got["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
        assert got["metadata"]["labels"].items() >= source["metadata"]["labels"].items()
    assert rendered == {}


def test_crds_switches() -> None:
    assert by_kind(render_chart("--set", "crds.install=false"), "CustomResourceDefinition") == []
    crds = by_kind(render_chart("--set", "crds.keep=false"), "CustomResourceDefinition")
    assert crds and all("annotations" not in c["metadata"] for c in crds)


def rules_of(role: dict[str, Any]) -> set[tuple[str, str, str]]:
    """(group, resource, verb), with "resource/name" where a rule names its objects."""
    return {
        (group, f"{resource}/{name}" if name else resource, verb)
        for rule in role["rules"]
        for group in rule.get("apiGroups", [""])
        for resource in rule["resources"]
        for name in rule.get("resourceNames") or [""]
        for verb in rule["verbs"]
    }


def roles(docs: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    return set().union(*(rules_of(r) for r in docs if r["kind"] in ("ClusterRole", "Role")))


def test_helm_template_is_the_same_every_time() -> None:
    """What Argo CD runs: a random value in it (a key) is never in sync."""
    for args in ([], list(EVERYTHING_ON), ["--set", "operatorKey.existingSecret=mine"]):
        first, second = helm_template(*args), helm_template(*args)
        assert first.returncode == 0, first.stderr
        assert first.stdout == second.stdout


def test_operator_key_from_an_existing_secret() -> None:
    docs = render_chart("--set", "operatorKey.existingSecret=mine")
    assert not by_kind(docs, "Role"), "no Secret access when the key is given"
    (deploy,) = by_kind(docs, "Deployment")
    pod = deploy["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert "MAILRELAY_OPERATOR_KEY_SECRET" not in env
    assert env["MAILRELAY_OPERATOR_KEY_FILE"] == "/etc/mailrelay-operator/key/key"
    assert {"name": "key", "secret": {"secretName": "mine", "defaultMode": 0o400}} in pod["volumes"]


def test_rbac_is_least_privilege() -> None:
    docs = render_chart()
    granted = roles(docs)
    assert not any("*" in triple for triple in granted), "no wildcards"
    assert not any(res == "pods/exec" for _, res, _ in granted)
    # Secrets: write-only (the relays' handover Secrets), never read, except
    # the operator's own key, by its name.
    assert {verb for _, res, verb in granted if res == "secrets"} <= {"create", "patch"}
    assert {(res, verb) for _, res, verb in granted if res.startswith("secrets/")} == {
        ("secrets/mailrelay-mailrelay-operator-key", "get")  # <fullname>-key
    }
    # The spec is the user's: the operator writes status only.
    for kind in ("mailrelays", "relaydomains", "recipientlists"):
        assert not {("mailrelay.io", kind, v) for v in ("patch", "update")} & granted


def test_rbac_is_the_operators_own_rbac() -> None:
    """The chart grants exactly what deploy/rbac/ grants (the operator's kube
    tests run it with a token of that account), no more and no less."""
    wanted: set[tuple[str, str, str]] = set()
    for f in sorted((REPO / "deploy" / "rbac").glob("*.yaml")):
        for doc in yaml.safe_load_all(f.read_text()):
            if doc and doc.get("kind") in ("ClusterRole", "Role"):
                wanted |= rules_of(doc)
    assert wanted, "deploy/rbac/ has the operator's ClusterRole"
    # The key's name follows the release (<fullname>-key): deploy/rbac/ names
    # the key of a release called mailrelay-operator.
    granted = roles(render_chart(release="mailrelay-operator"))
    assert granted == wanted, (
        f"only in the chart: {sorted(granted - wanted)}; only in deploy/rbac: "
        f"{sorted(wanted - granted)}"
    )


def test_watch_namespaces_bind_per_namespace() -> None:
    docs = render_chart("--set", "watchNamespaces={mail,customer-a}")
    bindings = [b for b in by_kind(docs, "RoleBinding") if b["roleRef"]["kind"] == "ClusterRole"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["customer-a", "mail"]
    # Only the cluster-scoped reads stay cluster-wide.
    (crb,) = by_kind(docs, "ClusterRoleBinding")
    assert crb["roleRef"]["name"].endswith("-cluster")


def test_monitoring_objects() -> None:
    docs = render_chart(*EVERYTHING_ON)
    (sm,) = by_kind(docs, "ServiceMonitor")
    (pm,) = by_kind(docs, "PodMonitor")
    (svc,) = by_kind(docs, "Service")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert pm["spec"]["namespaceSelector"] == {"any": True}
    # The PodMonitor selects relay pods by the labels the operator gives them.
    from mailrelay_operator import naming

    pod_labels = {
        **naming.pod_selector({"metadata": {"name": "edge"}}),
        naming.LABEL_MANAGED_BY: naming.MANAGED_BY,
    }
    assert pm["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    (dash,) = by_kind(docs, "ConfigMap")
    assert dash["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dash["data"]["mailrelay.json"])["uid"] == "mailrelay"


def exported_metric_names() -> set[str]:
    names: set[str] = set()
    for value in vars(metrics).values():
        if not isinstance(value, MetricWrapperBase):
            continue
        for family in value.describe():
            for sample in ("", "_total", "_bucket", "_sum", "_count", "_created"):
                names.add(family.name + sample)
    return names


def test_alerts_and_dashboard_use_real_metric_names() -> None:
    docs = render_chart(*EVERYTHING_ON)
    (rule,) = by_kind(docs, "PrometheusRule")
    alerts = {r["alert"]: r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]}
    assert {
        "MailRelayQueueGrowing",
        "MailRelayOldestMessageTooOld",
        "MailRelayRejectsSpiking",
        "MailRelayNotReady",
        "MailRelayDnsblNotObeyed",
        "MailRelayConfigReloadFailing",
        "MailRelayConfigIncomplete",
        "MailRelayQueueVolumeFilling",
        "MailRelayDsnsDropped",
    } <= alerts.keys()
    (dash,) = by_kind(docs, "ConfigMap")
    text = " ".join(alerts.values()) + dash["data"]["mailrelay.json"]
    used = set(re.findall(r"\bmailrelay_[a-z_]+", text))
    unknown = used - exported_metric_names()
    assert not unknown, f"not exported by relay/metrics.py: {unknown}"
    # The PodMonitor's job label is what MailRelayDown watches.
    (pm,) = by_kind(docs, "PodMonitor")
    job = f"{pm['metadata']['namespace']}/{pm['metadata']['name']}"
    assert f'up{{job="{job}"}}' in alerts["MailRelayDown"]


def test_dashboard_file_is_valid_json() -> None:
    dash = json.loads((CHART / "files" / "dashboards" / "mailrelay.json").read_text())
    assert dash["panels"] and all(p["targets"] for p in dash["panels"])


# --- against the local kube-apiserver ----------------------------------------------
def applicable(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if not str(d.get("apiVersion", "")).startswith(MONITORING_GROUP)]


@pytest.mark.kube
@pytest.mark.parametrize(
    "args",
    [
        (),
        (*EVERYTHING_ON, "--set", "watchNamespaces={mail,customer-a}", "--set", "logLevel=debug"),
        ("--set", "crds.install=false", "--set", "serviceAccount.create=false",
         "--set", "serviceAccount.name=existing"),
    ],
    ids=["defaults", "everything", "no-crds"],
)  # fmt: skip
def test_server_side_dry_run(kube: Kube, args: tuple[str, ...]) -> None:
    ensure_namespaces(kube, "mailrelay-system", "mail", "customer-a")
    docs = applicable(render_chart(*args))
    result = dry_run(kube, docs)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("(server dry run)") == len(docs), result.stdout


@pytest.mark.kube
def test_rbac_grants_what_the_operator_needs_and_no_more(kube: Kube) -> None:
    # Applied for real (RBAC objects only) under a release name of its own.
    ensure_namespaces(kube, "rbac-test", "mail", "customer-a", "elsewhere")
    docs = render_chart(
        "--set", "watchNamespaces={mail,customer-a}", release="rbac", namespace="rbac-test"
    )
    wanted = ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "RoleBinding")
    objs = [d for d in docs if d["kind"] in wanted]
    kube.kubectl("apply", "--server-side", "--field-manager=ship-tests", "-f", "-",
                 stdin=yaml.safe_dump_all(objs))  # fmt: skip
    sa = "system:serviceaccount:rbac-test:rbac-mailrelay-operator"

    def can(verb: str, resource: str, namespace: str | None) -> bool:
        # A SubjectAccessReview, so kinds whose CRDs are absent (cert-manager) count too.
        name, _, group = resource.partition(".")
        name, _, sub = name.partition("/")
        review = {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SubjectAccessReview",
            "spec": {
                "user": sa,
                "groups": ["system:serviceaccounts", "system:serviceaccounts:rbac-test"],
                "resourceAttributes": {
                    "verb": verb, "group": group, "resource": name, "subresource": sub,
                    **({"namespace": namespace} if namespace else {}),
                },
            },
        }  # fmt: skip
        out = kube.kubectl("create", "-o", "json", "-f", "-", stdin=json.dumps(review))
        return bool(json.loads(out)["status"].get("allowed"))

    assert can("list", "customresourcedefinitions.apiextensions.k8s.io", None)
    assert can("watch", "namespaces", None)
    for ns in ("mail", "customer-a"):
        assert can("watch", "mailrelays.mailrelay.io", ns)
        assert not can("patch", "mailrelays.mailrelay.io", ns)
        assert can("patch", "relaydomains/status.mailrelay.io", ns)
        assert can("create", "statefulsets.apps", ns)
        assert can("watch", "pods", ns)  # spec.mx[].pods labels follow the pods
        assert not can("delete", "pods", ns)
        assert can("create", "certificates.cert-manager.io", ns)
        assert can("create", "events.events.k8s.io", ns)
        assert not can("create", "events", ns)  # core/v1: kopf's, turned off
        assert not can("get", "secrets", ns)
    assert not can("list", "mailrelays.mailrelay.io", "elsewhere")
    assert not can("create", "configmaps", "elsewhere")
    assert not can("delete", "namespaces", None)


def test_tool_is_reported_missing_clearly(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import ship.tools

    monkeypatch.setattr(ship.tools, "ASSETS", tmp_path)
    with pytest.raises(pytest.fail.Exception, match=r"run hack/install-tools\.sh"):
        tool("helm")


def test_operator_serves_the_metrics_the_chart_scrapes() -> None:
    import urllib.request

    from mailrelay_operator.main import METRICS_LISTEN_ENV, serve_metrics
    from mrtest.relayproc import free_port, next_loopback

    (deploy,) = by_kind(render_chart(), "Deployment")
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert env[METRICS_LISTEN_ENV] == f"0.0.0.0:{ports['metrics']}"
    host = next_loopback()
    port = free_port(host)
    serve_metrics(f"{host}:{port}")  # a daemon thread, as in the operator pod
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as reply:
        assert b"process_resident_memory_bytes" in reply.read()
