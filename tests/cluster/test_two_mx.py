"""The whole product as pods on a real cluster: the operator from our chart,
examples/two-mx/ as the user applies it, mail through the MX Services.

The tests run in file order and build on each other (one installation):
the chart, the example, mail and refusals, live edits (recipients, TLS),
then the disruptive ones (pod deleted, scale-down, rolling upgrade, uninstall).

The next hop of examples/two-mx/ is mail.example.com:25. Here it is a sink pod
(aiosmtpd's Debugging handler, from the relay image) behind a Service, and the
cluster DNS answers mail.example.com, example.com and example.org with that
Service's address, and the node's address with a PTR name (the example rejects
clients without one). Every other name gets no answer: nothing leaves the cluster.
"""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from mrtest.cluster import (
    HACK,
    MAIL_NS,
    OPERATOR_NS,
    REPO,
    TAG,
    Cluster,
    wait_until,
)
from mrtest.peers import swaks

RELAY = "edge"
SINK = "mail-sink"
SINK_PORT = 2526
CHART = REPO / "deploy" / "helm" / "mailrelay-operator"
EXAMPLE = REPO / "examples" / "two-mx"
TLS_SECRET = "mx-example-net-tls"
UPGRADE_TAG = f"{TAG}-upgrade"
SANS = "DNS:mx1.example.net,DNS:mx2.example.net"
# One Service per MX host of the example, named by the host.
MX_SERVICES = ("edge-mx1-example-net", "edge-mx2-example-net")


# ---- helpers ---------------------------------------------------------------------


def subject() -> str:
    return f"cluster-e2e {uuid.uuid4().hex[:12]}"


def relay_pods(c: Cluster) -> list[dict[str, Any]]:
    pods = c.get("-n", MAIL_NS, "pods", "-l", f"app.kubernetes.io/instance={RELAY}")["items"]
    return sorted(
        (p for p in pods if p["metadata"]["name"].startswith(f"{RELAY}-")),
        key=lambda p: p["metadata"]["name"],
    )


def sink_manifests(service_ip: str, image: str) -> str:
    labels = {"app.kubernetes.io/name": SINK}
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": SINK, "namespace": MAIL_NS, "labels": labels},
        "spec": {
            "securityContext": {"runAsNonRoot": True, "runAsUser": 10025},
            "terminationGracePeriodSeconds": 1,
            "containers": [
                {
                    "name": "sink",
                    "image": image,
                    "imagePullPolicy": "IfNotPresent",
                    "command": ["python", "-m", "aiosmtpd", "-n", "-c",
                                "aiosmtpd.handlers.Debugging", "-l", f"0.0.0.0:{SINK_PORT}"],
                    "ports": [{"name": "smtp", "containerPort": SINK_PORT}],
                    "readinessProbe": {"tcpSocket": {"port": SINK_PORT}, "periodSeconds": 1},
                }
            ],
        },
    }  # fmt: skip
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": SINK, "namespace": MAIL_NS, "labels": labels},
        "spec": {
            "clusterIP": service_ip,
            "selector": labels,
            "ports": [{"name": "smtp", "port": 25, "targetPort": SINK_PORT}],
        },
    }
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": [pod, service]})


def sink_up(c: Cluster) -> None:
    ip = c.get("-n", MAIL_NS, "service", SINK)["spec"]["clusterIP"]
    c.kubectl("apply", "-f", "-", input=sink_manifests(ip, f"mailrelay:{TAG}"))
    c.kubectl("-n", MAIL_NS, "wait", "--for=condition=Ready", f"pod/{SINK}", "--timeout=120s")


def sink_down(c: Cluster) -> None:
    c.kubectl("-n", MAIL_NS, "delete", "pod", SINK, "--grace-period=0", "--wait=true")


def sink_count(c: Cluster, subj: str) -> int:
    logs = c.kubectl("-n", MAIL_NS, "logs", f"pod/{SINK}").stdout
    return len(re.findall(rf"^Subject: {re.escape(subj)}\s*$", logs, re.M))


def flush_all(c: Cluster) -> None:
    for p in relay_pods(c):
        c.exec(p["metadata"]["name"], "mailrelay", "queue", "flush", check=False)


def delivered_once(
    c: Cluster, subjects: list[str], timeout: float = 120, flush: bool = False
) -> None:
    """Every subject at the sink exactly once. flush: `mailrelay queue flush` in
    every relay pod every 15 s meanwhile (a message whose attempt to the downed
    next hop ends after a flush is deferred again, for minBackoff)."""
    last_flush = 0.0

    def arrived() -> bool:
        nonlocal last_flush
        if all(sink_count(c, s) >= 1 for s in subjects):
            return True
        if flush and time.monotonic() - last_flush > 15:
            flush_all(c)
            last_flush = time.monotonic()
        return False

    try:
        wait_until(f"{len(subjects)} messages at the sink", arrived, timeout, every=2)
    except AssertionError as e:
        counts = {s: sink_count(c, s) for s in subjects}
        queues = {
            p["metadata"]["name"]: c.exec(p["metadata"]["name"], "mailrelay", "queue", "list",
                                          check=False).stdout
            for p in relay_pods(c)
        }  # fmt: skip
        raise AssertionError(f"{e}\ncounts at the sink: {counts}\nqueues: {queues}") from None
    time.sleep(5)  # a duplicate would come right after
    counts = {s: sink_count(c, s) for s in subjects}
    assert all(n == 1 for n in counts.values()), counts


def send(addr: tuple[str, int], to: str = "info@example.com", **kw: Any) -> tuple[str, Any]:
    subj = kw.pop("subj", None) or subject()
    extra = ["--header", f"Subject: {subj}", *kw.pop("extra", [])]
    result = swaks(addr, to=to, helo="client.node.test", extra=extra, **kw)
    return subj, result


def accepted(result: Any) -> bool:
    return result.returncode == 0 and any(r.startswith("250 ") for r in result.replies()[-3:])


def send_once_reachable(addr: tuple[str, int], timeout: float = 90) -> tuple[str, Any]:
    """send() to a Service whose endpoints just changed. A ready EndpointSlice does
    not mean kube-proxy has rewritten its rules yet: until it has, a connection to
    the ClusterIP can go to the old pod's address and time out. Only failures to
    connect are retried; any SMTP reply is returned as it is."""
    sent: list[tuple[str, Any]] = []

    def attempt() -> bool:
        sent.append(send(addr))
        return "Error connecting" not in sent[-1][1].output

    wait_until(f"{addr[0]}:{addr[1]} reachable", attempt, timeout, every=2)
    return sent[-1]


def queue_ids(c: Cluster, pod: str) -> list[str]:
    out = c.exec(pod, "mailrelay", "queue", "list", "-o", "json").stdout
    return [m["id"] for m in json.loads(out)]


def pvc_volume(c: Cluster, name: str) -> tuple[str, str]:
    pvc = c.get("-n", MAIL_NS, "pvc", name)
    return pvc["status"].get("phase", ""), pvc["spec"].get("volumeName", "")


def restarts(pod: dict[str, Any]) -> tuple[str, int]:
    statuses = pod["status"].get("containerStatuses", [])
    return pod["metadata"]["uid"], sum(s.get("restartCount", 0) for s in statuses)


def node_ip(c: Cluster) -> str:
    (node,) = c.get("nodes")["items"]
    return next(a["address"] for a in node["status"]["addresses"] if a["type"] == "InternalIP")


def client_ips(c: Cluster) -> list[str]:
    """Addresses the relays see this machine's mail come from: the node's (on
    this machine's node, and after kube-proxy's masquerade on kind), and this
    machine's own address towards the node (kind: its Docker network)."""
    node = node_ip(c)
    route = subprocess.run(
        ["ip", "-o", "route", "get", node], capture_output=True, text=True, check=True
    ).stdout
    src = re.search(r"\bsrc (\S+)", route)
    return sorted({node, src.group(1)} if src else {node})


def serving_cert_subject(c: Cluster, ip: str) -> str:
    out = subprocess.run(
        ["openssl", "s_client", "-starttls", "smtp", "-connect", f"{ip}:2525",
         "-servername", "mx1.example.net"],
        input="QUIT\n", capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    m = re.search(r"^subject=(.*)$", out.stdout, re.M)
    return m.group(1) if m else ""


def tls_secret_yaml(c: Cluster, cn: str) -> str:
    with tempfile.TemporaryDirectory() as d:
        key, crt = Path(d) / "tls.key", Path(d) / "tls.crt"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-subj", f"/CN={cn}", "-addext", f"subjectAltName={SANS}",
             "-keyout", str(key), "-out", str(crt)],
            check=True, capture_output=True,
        )  # fmt: skip
        return c.kubectl(
            "-n", MAIL_NS, "create", "secret", "tls", TLS_SECRET, f"--cert={crt}", f"--key={key}",
            "--dry-run=client", "-o", "yaml",
        ).stdout  # fmt: skip


# ---- the installation ---------------------------------------------------------------


@pytest.fixture(scope="module")
def installed(cluster: Cluster) -> Cluster:
    c = cluster
    # The chart, exactly as the README says, plus the images built here.
    c.helm(
        "upgrade", "--install", "mailrelay-operator", str(CHART),
        "--namespace", OPERATOR_NS, "--create-namespace",
        "--set", "image.repository=mailrelay-operator", "--set", f"image.tag={TAG}",
        "--set", "image.pullPolicy=IfNotPresent",
        "--set", "relayImage.repository=mailrelay", "--set", f"relayImage.tag={TAG}",
    )  # fmt: skip
    # Ready with no MailRelay in the cluster yet, as `helm install --wait` needs
    # (test_operator_ready_before_any_mailrelay); awaited here rather than with
    # --wait, so that a failure is that test's and the others still run.
    STATE["ready_alone"] = operator_ready_within(c, 90)
    c.kubectl("apply", "-f", str(EXAMPLE / "namespace.yaml"))
    # The next hop and the names the example needs, inside the cluster.
    api_ip = c.get("-n", "default", "service", "kubernetes")["spec"]["clusterIP"]
    sink_ip = re.sub(r"\.\d+$", ".25", api_ip)
    c.kubectl("apply", "-f", "-", input=sink_manifests(sink_ip, f"mailrelay:{TAG}"))
    cm = c.get("-n", "kube-system", "configmap", "coredns")
    corefile = cm["data"]["Corefile"]
    if "mailrelay-e2e" not in corefile:
        clients = "".join(f"        {ip} client.node.test\n" for ip in client_ips(c))
        block = (
            "    hosts {  # mailrelay-e2e\n"
            f"        {sink_ip} mail.example.com example.com example.org\n"
            f"{clients}"
            "        ttl 5\n"
            # Names it does not know, outside the cluster's zones, get no answer
            # (not passed on): no MX for example.com is an empty answer, not an error.
            "        fallthrough cluster.local in-addr.arpa ip6.arpa\n"
            "    }\n"
        )
        corefile = re.sub(r"^(\s*kubernetes )", block + r"\1", corefile, count=1, flags=re.M)
        patch = json.dumps({"data": {"Corefile": corefile}})
        c.kubectl("-n", "kube-system", "patch", "configmap", "coredns", "-p", patch)
    c.kubectl("apply", "-f", str(EXAMPLE))
    c.kubectl("-n", OPERATOR_NS, "rollout", "status", "deploy/mailrelay-operator", "--timeout=300s")
    return c


STATE: dict[str, Any] = {}


def operator_ready_within(c: Cluster, seconds: float) -> bool:
    def ready() -> bool:
        pods = c.get("-n", OPERATOR_NS, "pods", "-l", "app.kubernetes.io/name=mailrelay-operator")
        return bool(pods["items"]) and all(c.ready(p) for p in pods["items"])

    try:
        wait_until("operator Ready", ready, seconds, every=2)
    except AssertionError:
        return False
    return True


def dns_answers(c: Cluster, pod: str, name: str) -> bool:
    probe = (
        "import socket,sys\n"
        "try: print(socket.gethostbyname(sys.argv[1]))\n"
        "except OSError as e: print('no', e)\n"
    )
    out = c.exec(pod, "python", "-c", probe, name).stdout
    return bool(re.match(r"\d+\.\d+\.\d+\.\d+", out))


# ---- tests, in order ------------------------------------------------------------------------


def test_images_are_ours(cluster: Cluster) -> None:
    for image in (f"mailrelay:{TAG}", f"mailrelay-operator:{TAG}"):
        info = json.loads(cluster.run(["docker", "image", "inspect", image]).stdout)[0]
        assert info["Config"]["User"] == "10025:10025", image
        no_cc = cluster.run(
            ["docker", "run", "--rm", "--network=none", "--entrypoint", "sh", image, "-c",
             "command -v gcc || command -v cc || command -v x86_64-linux-gnu-gcc-12"],
            check=False,
        )  # fmt: skip
        assert no_cc.returncode != 0, f"{image} has a compiler: {no_cc.stdout}"
    relay = json.loads(cluster.run(["docker", "image", "inspect", f"mailrelay:{TAG}"]).stdout)[0]
    assert "MAILRELAY_QUEUE_DIR=/var/spool/mailrelay" in relay["Config"]["Env"]


def test_operator_ready_before_any_mailrelay(installed: Cluster) -> None:
    assert STATE["ready_alone"], "the operator pod was not Ready within 90 s of helm install"


def test_operator_pod_ready(installed: Cluster) -> None:
    pods = installed.get(
        "-n", OPERATOR_NS, "pods", "-l", "app.kubernetes.io/name=mailrelay-operator"
    )
    assert pods["items"], "no operator pod"
    assert all(installed.ready(p) for p in pods["items"])
    (container,) = pods["items"][0]["spec"]["containers"]
    assert container["image"].endswith(f"mailrelay-operator:{TAG}")


def test_relay_pods_ready_with_bound_claims(installed: Cluster) -> None:
    c = installed
    wait_until(
        "StatefulSet edge: 2 ready replicas",
        lambda: c.get("-n", MAIL_NS, "statefulset", RELAY)["status"].get("readyReplicas") == 2,
        360,
        every=3,
    )
    pods = relay_pods(c)
    assert [p["metadata"]["name"] for p in pods] == ["edge-0", "edge-1"]
    for p in pods:
        assert c.ready(p), p["status"]
        assert p["spec"]["containers"][0]["image"] == f"mailrelay:{TAG}"
        phase, volume = pvc_volume(c, f"queue-{p['metadata']['name']}")
        assert phase == "Bound" and volume, (phase, volume)
    # One node: the spread constraint is a preference (ScheduleAnyway), so both
    # replicas run, on that node, and the constraint is what the pods carry.
    (node,) = c.get("nodes")["items"]
    assert {p["spec"]["nodeName"] for p in pods} == {node["metadata"]["name"]}
    # The example leaves spec.spread at Preferred for zones and hosts.
    spread = {
        t["topologyKey"]: t["whenUnsatisfiable"]
        for t in pods[0]["spec"]["topologySpreadConstraints"]
    }
    assert spread == {
        "topology.kubernetes.io/zone": "ScheduleAnyway",
        "kubernetes.io/hostname": "ScheduleAnyway",
    }, spread
    # The cluster DNS answers the example's next hop (mail.example.com).
    wait_until(
        "mail.example.com in the cluster DNS",
        lambda: dns_answers(c, "edge-0", "mail.example.com"),
        90,
    )


def test_mail_through_every_mx_service_and_pod(installed: Cluster) -> None:
    c = installed
    targets: list[tuple[str, tuple[str, int]]] = []
    for name in MX_SERVICES:
        svc = c.get("-n", MAIL_NS, "service", name)
        (port,) = [p for p in svc["spec"]["ports"] if p["port"] == 25]
        targets.append((f"{name} ClusterIP", (svc["spec"]["clusterIP"], 25)))
        targets.append((f"{name} NodePort", (node_ip(c), int(port["nodePort"]))))
    for p in relay_pods(c):
        targets.append((f"{p['metadata']['name']} pod IP", (p["status"]["podIP"], 2525)))
    sent = []
    for what, addr in targets:
        subj, result = send_once_reachable(addr)
        assert accepted(result), f"{what} {addr}: {result.output}"
        sent.append(subj)
    delivered_once(c, sent)


def test_refusals_with_postfix_codes(installed: Cluster) -> None:
    c = installed
    svc = c.get("-n", MAIL_NS, "service", MX_SERVICES[0])
    addr = (svc["spec"]["clusterIP"], 25)
    _, unknown = send(addr, to="nobody@example.com")
    assert unknown.returncode != 0
    assert any(
        r.startswith("550 5.1.1 <nobody@example.com>: Recipient address rejected: User unknown "
                     "in relay recipient table") for r in unknown.replies()
    ), unknown.output  # fmt: skip
    _, elsewhere = send(addr, to="victim@elsewhere.test")
    assert any(
        r.startswith("554 5.7.1 <victim@elsewhere.test>: Relay access denied")
        for r in elsewhere.replies()
    ), elsewhere.output
    with tempfile.TemporaryDirectory() as d:
        exe = Path(d) / "invoice.exe"
        exe.write_bytes(b"MZ not really a program")
        _, attached = send(addr, to="joe@example.com", extra=["--attach", f"@{exe}"])
    assert any(r.startswith("550 5.7.1") and "invoice.exe" in r for r in attached.replies()), (
        attached.output
    )


def test_queue_list_in_a_pod(installed: Cluster) -> None:
    # As docs/operations.md says: no --queue-dir, the image sets MAILRELAY_QUEUE_DIR.
    out = installed.exec("edge-0", "mailrelay", "queue", "list")
    assert out.returncode == 0, out.stderr
    assert (
        json.loads(installed.exec("edge-0", "mailrelay", "queue", "list", "-o", "json").stdout)
        == []
    )


def test_recipient_list_edit_is_in_force_without_restart(installed: Cluster) -> None:
    # How fast is bench/operator_scale.py's job (tests never assert timings);
    # here: the edit reaches every pod, and no pod restarts for it.
    c = installed
    before = {p["metadata"]["name"]: restarts(p) for p in relay_pods(c)}
    ips = [p["status"]["podIP"] for p in relay_pods(c)]
    new = f"new-{uuid.uuid4().hex[:6]}@example.com"
    for ip in ips:
        _, r = send((ip, 2525), to=new, extra=["--quit-after", "RCPT"])
        assert r.returncode != 0, r.output
    rl = c.get("-n", MAIL_NS, "recipientlist", "example-com")
    patch = json.dumps({"spec": {"addresses": [*rl["spec"]["addresses"], new]}})
    start = time.monotonic()
    c.kubectl("-n", MAIL_NS, "patch", "recipientlist", "example-com", "--type=merge", "-p", patch)
    for ip in ips:
        wait_until(
            f"{new} accepted by {ip}",
            lambda ip=ip: (
                send((ip, 2525), to=new, extra=["--quit-after", "RCPT"])[1].returncode == 0
            ),
            120,
            every=0.5,
        )
    print(f"recipient list edit in force on every pod after {time.monotonic() - start:.1f}s")
    after = {p["metadata"]["name"]: restarts(p) for p in relay_pods(c)}
    assert after == before, "no restart"


def test_tls_secret_is_served_and_replaced_in_place(installed: Cluster) -> None:
    c = installed
    # No cert-manager: the documented way is a Secret of your own, named in
    # spec.tls.secretName with no issuerRef.
    c.kubectl("apply", "-f", "-", input=tls_secret_yaml(c, "first.mx.example.net"))
    patch = json.dumps([{"op": "remove", "path": "/spec/tls/issuerRef"}])
    c.kubectl("-n", MAIL_NS, "patch", "mailrelay", RELAY, "--type=json", "-p", patch)

    def serving(cn: str) -> bool:
        pods = relay_pods(c)
        return len(pods) == 2 and all(
            c.ready(p) and cn in serving_cert_subject(c, p["status"]["podIP"]) for p in pods
        )

    wait_until(
        "STARTTLS with the first certificate", lambda: serving("first.mx.example.net"), 420, every=5
    )
    c.kubectl("-n", MAIL_NS, "rollout", "status", f"statefulset/{RELAY}", "--timeout=300s")
    before = {p["metadata"]["name"]: restarts(p) for p in relay_pods(c)}
    c.kubectl("replace", "-f", "-", input=tls_secret_yaml(c, "second.mx.example.net"))
    start = time.monotonic()
    wait_until(
        "STARTTLS with the replaced certificate",
        lambda: serving("second.mx.example.net"),
        300,  # kubelet's Secret sync, on a loaded node; tests assert no timings
        every=2,
    )
    print(f"replaced certificate served after {time.monotonic() - start:.1f}s")
    assert {p["metadata"]["name"]: restarts(p) for p in relay_pods(c)} == before, "no restart"
    ip = relay_pods(c)[0]["status"]["podIP"]
    subj, r = send((ip, 2525), tls=True)
    assert accepted(r), r.output
    delivered_once(c, [subj])


def test_deleted_pod_comes_back_on_its_claim_and_delivers_once(installed: Cluster) -> None:
    c = installed
    sink_down(c)
    ip = c.pod_ip("edge-0")
    sent = []
    for _ in range(3):
        subj, r = send((ip, 2525))
        assert accepted(r), r.output
        sent.append(subj)
    wait_until(
        "3 messages deferred in edge-0", lambda: len(queue_ids(c, "edge-0")) == 3, 60, every=2
    )
    ids = sorted(queue_ids(c, "edge-0"))
    _, volume = pvc_volume(c, "queue-edge-0")
    uid = c.pod("edge-0")["metadata"]["uid"]
    c.kubectl("-n", MAIL_NS, "delete", "pod", "edge-0", "--wait=true", timeout=180)
    wait_until(
        "edge-0 back and Ready",
        lambda: (p := c.pod("edge-0"))["metadata"]["uid"] != uid and c.ready(p),
        300,
        every=3,
    )
    assert pvc_volume(c, "queue-edge-0") == ("Bound", volume)
    assert sorted(queue_ids(c, "edge-0")) == ids
    sink_up(c)
    c.exec("edge-0", "mailrelay", "queue", "flush")
    delivered_once(c, sent, flush=True)
    wait_until("edge-0's queue empty", lambda: queue_ids(c, "edge-0") == [], 60, every=2)


def test_scale_down_hands_the_queue_over(installed: Cluster) -> None:
    c = installed
    sink_down(c)
    ip = c.pod_ip("edge-1")
    sent = []
    for _ in range(2):
        subj, r = send((ip, 2525))
        assert accepted(r), r.output
        sent.append(subj)
    wait_until(
        "2 messages deferred in edge-1", lambda: len(queue_ids(c, "edge-1")) == 2, 60, every=2
    )
    _, volume = pvc_volume(c, "queue-edge-1")
    c.kubectl(
        "-n", MAIL_NS, "patch", "mailrelay", RELAY, "--type=merge", "-p", '{"spec":{"replicas":1}}'
    )
    wait_until(
        "edge scaled to 1 (edge-1 gone)",
        lambda: (
            [p["metadata"]["name"] for p in relay_pods(c)] == ["edge-0"]
            and c.get("-n", MAIL_NS, "statefulset", RELAY)["spec"]["replicas"] == 1
        ),
        600,
        every=5,
    )
    # whenScaled: Retain: the claim stays (with whatever the pod left on it).
    assert pvc_volume(c, "queue-edge-1") == ("Bound", volume)
    wait_until(
        "the handed-over mail in edge-0", lambda: len(queue_ids(c, "edge-0")) >= 2, 60, every=2
    )
    sink_up(c)
    c.exec("edge-0", "mailrelay", "queue", "flush")
    delivered_once(c, sent, flush=True)


def test_rolling_upgrade_to_a_rebuilt_image_loses_nothing(installed: Cluster) -> None:
    c = installed
    c.kubectl(
        "-n", MAIL_NS, "patch", "mailrelay", RELAY, "--type=merge", "-p", '{"spec":{"replicas":2}}'
    )
    wait_until(
        "2 ready replicas again",
        lambda: c.get("-n", MAIL_NS, "statefulset", RELAY)["status"].get("readyReplicas") == 2,
        420,
        every=3,
    )
    c.build_and_load(UPGRADE_TAG, revision=f"upgrade-{uuid.uuid4().hex[:8]}")
    sink_down(c)
    queued = []
    for p in relay_pods(c):
        subj, r = send((p["status"]["podIP"], 2525))
        assert accepted(r), r.output
        queued.append(subj)
    c.helm(
        "upgrade", "mailrelay-operator", str(CHART), "--namespace", OPERATOR_NS, "--reuse-values",
        "--set", f"image.tag={UPGRADE_TAG}", "--set", f"relayImage.tag={UPGRADE_TAG}",
        "--wait", "--timeout", "5m",
    )  # fmt: skip
    svc = c.get("-n", MAIL_NS, "service", MX_SERVICES[0])
    during = []

    def rolled() -> bool:
        # Mail keeps coming during the roll; what the relay accepted must arrive.
        subj, r = send((svc["spec"]["clusterIP"], 25))
        if accepted(r):
            during.append(subj)
        pods = relay_pods(c)
        return len(pods) == 2 and all(
            p["spec"]["containers"][0]["image"] == f"mailrelay:{UPGRADE_TAG}" and c.ready(p)
            for p in pods
        )

    wait_until("relay pods on the rebuilt image", rolled, 900, every=3)
    sink_up(c)
    flush_all(c)
    delivered_once(c, queued + during, timeout=240, flush=True)


def mx_endpoints(c: Cluster, service: str) -> list[str]:
    """The ready addresses behind a Service (its EndpointSlices)."""
    slices = c.get("-n", MAIL_NS, "endpointslices", "-l", f"kubernetes.io/service-name={service}")
    return sorted(
        a
        for s in slices["items"]
        for e in s.get("endpoints") or []
        if (e.get("conditions") or {}).get("ready")
        for a in e["addresses"]
    )


def test_an_mx_pinned_to_a_pod_follows_it_when_it_is_recreated(installed: Cluster) -> None:
    """spec.mx[].pods: an MX served by edge-1 only; edge-1 deleted, re-made by the
    StatefulSet controller without the operator's label, labelled again: the
    MX Service reaches the new pod."""
    c = installed
    relay = c.get("-n", MAIL_NS, "mailrelay", RELAY)
    mx = relay["spec"]["mx"]
    pinned = {"hostname": "mx3.example.net", "priority": 30, "pods": {"ordinals": [1]}}
    service = "edge-mx3-example-net"
    c.kubectl(
        "-n", MAIL_NS, "patch", "mailrelay", RELAY, "--type=merge",
        "-p", json.dumps({"spec": {"mx": [*mx, pinned]}}),
    )  # fmt: skip
    try:
        wait_until(
            "mx3 served by edge-1 alone",
            lambda: mx_endpoints(c, service) == [c.pod_ip("edge-1")],
            120,
            every=2,
        )
        uid = c.pod("edge-1")["metadata"]["uid"]
        c.kubectl("-n", MAIL_NS, "delete", "pod", "edge-1", "--wait=true", timeout=180)
        new = wait_until(
            "edge-1 re-made and Ready",
            lambda: (p := c.pod("edge-1"))["metadata"]["uid"] != uid and c.ready(p) and p,
            300,
            every=3,
        )
        wait_until(
            "mx3 served by the new edge-1",
            lambda: mx_endpoints(c, service) == [c.pod_ip("edge-1")],
            60,
            every=2,
        )
        assert any(k.startswith("mailrelay.io/mx-") for k in new["metadata"]["labels"]), new
        svc = c.get("-n", MAIL_NS, "service", service)
        subj, r = send_once_reachable((svc["spec"]["clusterIP"], 25), timeout=150)
        assert accepted(r), r.output
        delivered_once(c, [subj], flush=True)
    finally:
        c.kubectl(
            "-n", MAIL_NS, "patch", "mailrelay", RELAY, "--type=merge",
            "-p", json.dumps({"spec": {"mx": mx}}),
        )  # fmt: skip


def test_helm_uninstall_keeps_crds_and_users_resources(installed: Cluster) -> None:
    c = installed
    c.helm("uninstall", "mailrelay-operator", "--namespace", OPERATOR_NS, "--wait")
    crds = {i["metadata"]["name"] for i in c.get("crd")["items"]}
    assert {
        "mailrelays.mailrelay.io",
        "relaydomains.mailrelay.io",
        "recipientlists.mailrelay.io",
    } <= crds
    assert c.get("-n", MAIL_NS, "mailrelay", RELAY)["metadata"]["name"] == RELAY
    assert len(c.get("-n", MAIL_NS, "relaydomains")["items"]) == 2
    assert c.get("-n", MAIL_NS, "recipientlist", "example-com")
    # The relays keep running without the operator.
    assert all(c.ready(p) for p in relay_pods(c))
    assert HACK.exists()
