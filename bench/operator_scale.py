#!/usr/bin/env python3
"""The operator at scale against the local control plane (hack/kube-up.sh).

Creates one MailRelay, N RelayDomains and M recipients spread over
RecipientLists (1,000 addresses each, on the first domains), with
`mailrelay operator` running as its own process. Reports:
- time from the last object applied to Reconciled=True with every domain
  and recipient counted (target <= 60 s);
- objects the operator wrote (its write requests in the --verbose log: applies, status
  patches, deletes) and its peak memory (VmHWM);
- one added recipient: time until the recipients ConfigMap of its shard
  holds it (target <= 5 s), and until the MailRelay status counts it (the
  operator writes it after the ConfigMaps);
- the relay with that configuration: memory of the loaded recipient table
  (target <= 100 MB) and the time of one lookup.

    .venv/bin/python bench/operator_scale.py [--domains 10000] [--recipients 1000000]

Results: bench/results/<time>-operator/results.json and summary.md.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import gzip
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "operator")]

from mailrelay_operator.kubeapi import KubeApi, resource_path  # noqa: E402
from mailrelay_operator.naming import LABEL_COMPONENT  # noqa: E402

sys.path.insert(0, str(REPO / "bench"))
from relay_vs_postfix import commit_measured  # noqa: E402  (bench/ is not a package)
from scale_objects import (  # noqa: E402
    LIST_SIZE,
    NS,
    domain,
    proc_status_mib,
    recipient_list,
)

ASSETS = Path(os.environ.get("KUBEBUILDER_ASSETS") or REPO / ".tools" / "bin")


def kubectl(kubeconfig: Path, *args: str) -> str:
    cmd = [str(ASSETS / "kubectl"), "--kubeconfig", str(kubeconfig), *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=300).stdout


def relay_status(api: KubeApi) -> dict[str, Any]:
    obj = api.get_sync(resource_path("mailrelay.io/v1alpha1", "MailRelay", NS, "edge")) or {}
    return dict(obj.get("status") or {})


def reconciled(st: dict[str, Any], domains: int, recipients: int) -> bool:
    conds = {c["type"]: c for c in st.get("conditions") or []}
    return (
        conds.get("Reconciled", {}).get("status") == "True"
        and st.get("acceptedDomains") == domains  # status.domains lists the holders
        and st.get("recipients") == recipients
    )


def configured(api: KubeApi) -> tuple[int, int]:
    """Domains and recipients in the relay's ConfigMaps now (what the pods would load)."""
    with tempfile.TemporaryDirectory() as folder:
        write_config(api, Path(folder))
        from relay.config import read_domains_document

        try:
            doc = read_domains_document(Path(folder))
            recipients = 0
            for name in doc["recipientFiles"]:
                recipients += gzip.decompress((Path(folder) / name).read_bytes()).count(b"\n")
            return len(doc["domains"]), recipients
        except (OSError, ValueError, KeyError):
            return 0, 0


def write_config(api: KubeApi, folder: Path) -> list[dict[str, Any]]:
    """The relay's ConfigMaps as files in `folder`, as the kubelet writes them."""
    cms = api.list_objects_sync(
        resource_path("v1", "ConfigMap", NS), "app.kubernetes.io/instance=edge"
    )
    for cm in cms:
        for k, v in (cm.get("data") or {}).items():
            (folder / k).write_text(v)
        for k, v in (cm.get("binaryData") or {}).items():
            (folder / k).write_bytes(base64.b64decode(v))
    return cms


def wait_reconciled(
    api: KubeApi,
    results: dict[str, Any],
    applied: float,
    domains: int,
    recipients: int,
    operator: subprocess.Popen[bytes],
    log: Path,
) -> None:
    """Until the MailRelay says Reconciled with every domain and recipient
    counted (at most 600 s); on the way, when the ConfigMaps first hold them all."""
    results["config_after_last_apply_seconds"] = None
    results["reconcile_after_last_apply_seconds"] = None
    next_look = 0.0
    while time.monotonic() - applied < 600:
        assert operator.poll() is None, log.read_text()[-3000:]
        st = relay_status(api)
        if reconciled(st, domains, recipients):
            results["reconcile_after_last_apply_seconds"] = round(time.monotonic() - applied, 1)
            break
        now = time.monotonic()
        if results["config_after_last_apply_seconds"] is None and now >= next_look:
            if configured(api) == (domains, recipients):
                results["config_after_last_apply_seconds"] = round(now - applied, 1)
            next_look = time.monotonic() + 2.0
        time.sleep(0.5)
    else:
        warnings = [ln for ln in log.read_text(errors="replace").splitlines() if "WARNING" in ln]
        results["reconcile_error"] = warnings[-1][-2000:] if warnings else "timed out"
    if results["config_after_last_apply_seconds"] is None and configured(api) == (
        domains,
        recipients,
    ):
        results["config_after_last_apply_seconds"] = results["reconcile_after_last_apply_seconds"]


def all_domain_statuses(api: KubeApi) -> bool:
    items, _ = api.list_all_sync(resource_path("mailrelay.io/v1alpha1", "RelayDomain", NS))
    return all((i.get("status") or {}).get("conditions") for i in items)


def last_writes(log: Path) -> int:
    """Write requests so far, from urllib3's debug line per request (the operator's
    own `writes so far` line comes once per status batch, which can run for a while)."""
    return len(re.findall(r'"(?:PATCH|POST|PUT|DELETE) /', log.read_text(errors="replace")))


RELAY_PROBE = """
import json, resource, sys, time, tracemalloc
from pathlib import Path
from relay.config import load_config, read_domains_document, read_recipients
t = time.perf_counter()
config = load_config(Path(sys.argv[1]))
config_load = time.perf_counter() - t
domains = len(config.domains)
del config
t = time.perf_counter()
names = read_domains_document(Path(sys.argv[1]))["recipientFiles"]
table = read_recipients(Path(sys.argv[1]), names)
load = time.perf_counter() - t
del table
tracemalloc.start()
table = read_recipients(Path(sys.argv[1]), names)
current, peak = tracemalloc.get_traced_memory()
tracemalloc.stop()
probe = [f"user{j % 1000:04d}@d{j % 997:05d}.bench.example" for j in range(200000)]
misses = [f"nobody{j}@d{j % 997:05d}.bench.example" for j in range(200000)]
t = time.perf_counter()
hits = sum(1 for a in probe if a in table)
lookup = (time.perf_counter() - t) / len(probe)
t = time.perf_counter()
false_hits = sum(1 for a in misses if a in table)
miss = (time.perf_counter() - t) / len(misses)
print(json.dumps({"domains": domains, "config_load_s": config_load,
                  "addresses": len(table), "table_mb": current / 2**20,
                  "load_peak_mb": peak / 2**20, "load_s": load,
                  "lookup_us": lookup * 1e6, "miss_lookup_us": miss * 1e6,
                  "hits": hits, "false_hits": false_hits,
                  "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def shard_with(api: KubeApi, address: str) -> str | None:
    """The recipients ConfigMap that should hold `address` (shards.shard_of)."""
    from mailrelay_api.shards import shard_of

    cms = api.list_objects_sync(
        resource_path("v1", "ConfigMap", NS), "app.kubernetes.io/component=recipients"
    )
    return f"edge-recipients-{shard_of(address, len(cms))}" if cms else None


def config_map_holds(api: KubeApi, name: str, address: str) -> bool:
    cm = api.get_sync(resource_path("v1", "ConfigMap", NS, name)) or {}
    for blob in (cm.get("binaryData") or {}).values():
        if address.encode() + b"\n" in gzip.decompress(base64.b64decode(blob)):
            return True
    return False


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--domains", type=int, default=10000)
    ap.add_argument("--recipients", type=int, default=1000000)
    ap.add_argument("--parallel", type=int, default=16, help="client threads creating objects")
    args = ap.parse_args()
    lists = args.recipients // LIST_SIZE
    assert lists <= args.domains, "one RecipientList of 1,000 addresses per domain at most"
    work = Path(tempfile.mkdtemp(prefix="mailrelay-bench-operator-"))
    kubeconfig = work / "kubeconfig"
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "KUBEBUILDER_ASSETS": str(ASSETS)}
    results: dict[str, Any] = {
        "domains": args.domains,
        "recipients": lists * LIST_SIZE,
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "commit": commit_measured(),
        "machine": f"{os.cpu_count()} cores, {os.uname().release}",
        "load_average_at_start": " ".join(f"{x:.1f}" for x in os.getloadavg()),
    }
    operator = None
    out_dir = Path()
    try:
        subprocess.run(
            ["bash", str(REPO / "hack/kube-up.sh")],
            env=env,
            check=True,
            capture_output=True,
            timeout=240,
        )
        kubectl(kubeconfig, "apply", "--server-side", "-f", str(REPO / "deploy/crds"))
        kubectl(kubeconfig, "wait", "--for=condition=Established", "crd", "--all")
        kubectl(kubeconfig, "create", "namespace", NS)
        os.environ["KUBECONFIG"] = str(kubeconfig)
        api = KubeApi()
        log = work / "operator.log"
        with log.open("w") as out:
            operator = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "relay.process.cli",
                    "operator",
                    "--verbose",
                    "--liveness",
                    "",
                ],
                env={**env, "MAILRELAY_OPERATOR_RESYNC_SECONDS": "3600"},
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=REPO,
            )
        relay = {
            "apiVersion": "mailrelay.io/v1alpha1",
            "kind": "MailRelay",
            "metadata": {"name": "edge", "namespace": NS},
            "spec": {"hostname": "mx.bench.example", "replicas": 2},
        }
        objects = [relay] + [domain(i) for i in range(args.domains)]
        objects += [recipient_list(i) for i in range(lists)]
        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
            list(pool.map(api.apply_sync, objects))
        applied = time.monotonic()
        results["apply_seconds"] = round(applied - started, 1)
        print(f"applied {len(objects)} objects in {applied - started:.1f}s", flush=True)
        wait_reconciled(api, results, applied, args.domains, lists * LIST_SIZE, operator, log)
        results["operator_peak_mb_at_reconciled"] = round(proc_status_mib(operator.pid, "VmHWM"), 1)
        progress(results, "reconcile_after_last_apply_seconds", "operator_peak_mb_at_reconciled")

        # One more recipient, while RelayDomain statuses may still be written:
        # until its shard's ConfigMap holds it, and until the status counts it.
        late = "late@d00000.bench.example"
        shard = shard_with(api, late)
        t = time.monotonic()
        api.apply_sync(recipient_list(0, [late]))
        while shard is not None and not config_map_holds(api, shard, late):
            time.sleep(0.05)
        results["one_recipient_config_map_seconds"] = round(time.monotonic() - t, 2)
        results["one_recipient_seconds"] = None
        while time.monotonic() - t < 300:
            if relay_status(api).get("recipients") == lists * LIST_SIZE + 1:
                results["one_recipient_seconds"] = round(time.monotonic() - t, 2)
                break
            time.sleep(0.1)
        progress(results, "one_recipient_config_map_seconds", "one_recipient_seconds")

        results["all_statuses_after_last_apply_seconds"] = None
        poll = max(1.0, args.domains / 10000)  # a listing of every RelayDomain each time
        while time.monotonic() - applied < 1800:
            if all_domain_statuses(api):
                results["all_statuses_after_last_apply_seconds"] = round(
                    time.monotonic() - applied, 1
                )
                break
            time.sleep(poll)
        # Wait until the operator's write requests stop.
        counts = [last_writes(log)]
        while len(counts) < 4 or len(set(counts[-4:])) > 1:
            time.sleep(1)
            counts.append(last_writes(log))
        results["operator_writes"] = counts[-1]
        print(
            f"reconciled {results['reconcile_after_last_apply_seconds']}s after the last "
            f"apply; {results['operator_writes']} writes",
            flush=True,
        )

        results["operator_peak_mb"] = round(proc_status_mib(operator.pid, "VmHWM"), 1)

        # The relay's view of that configuration.
        config = work / "config"
        config.mkdir()
        cms = write_config(api, config)
        results["config_maps"] = len(cms)
        results["domain_shards"] = sum(
            1 for cm in cms if cm["metadata"]["labels"].get(LABEL_COMPONENT) == "domains"
        )
        results["recipient_shards"] = sum(
            1 for cm in cms if cm["metadata"]["labels"].get(LABEL_COMPONENT) == "recipients"
        )
        results["largest_config_map_kb"] = round(
            max(len(json.dumps(cm.get("data") or cm.get("binaryData"))) for cm in cms) / 1024, 1
        )
        probe = subprocess.run(
            [sys.executable, "-c", RELAY_PROBE, str(config)],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        )
        results["relay"] = json.loads(probe.stdout)
    except BaseException as e:
        results["error"] = f"{type(e).__name__}: {e}"[-3000:]
        raise
    finally:
        if operator is not None:
            results.setdefault("operator_peak_mb", round(proc_status_mib(operator.pid, "VmHWM"), 1))
            operator.terminate()
            operator.wait(30)
        subprocess.run(
            ["bash", str(REPO / "hack/kube-down.sh")],
            env=env,
            capture_output=True,
            timeout=120,
            check=False,
        )
        out_dir = REPO / "bench" / "results" / (time.strftime("%Y%m%d-%H%M%S") + "-operator")
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        print(f"results: {out_dir}", flush=True)
    write_summary(out_dir, results)
    return 0


def progress(results: dict[str, Any], *keys: str) -> None:
    """Figures as they are measured (a run cut short still shows them)."""
    print(", ".join(f"{k} {results[k]}" for k in keys), flush=True)


def write_summary(out_dir: Path, results: dict[str, Any]) -> None:
    relay_r = results["relay"]
    facts = (
        f"Operator benchmark {results['started']} ({results['commit']}, {results['machine']}, "
        f"load average at start {results['load_average_at_start']}); one MailRelay, "
        f"{results['config_maps']} ConfigMaps ({results['domain_shards']} domain shards, "
        f"{results['recipient_shards']} recipient shards), the relay loads "
        f"{relay_r['domains']} domains in {relay_r['config_load_s']:.1f} s.\n\n"
    )
    summary = facts + (
        f"| domains | recipients | Reconciled after last apply | all statuses | writes "
        f"| operator peak | +1 recipient in its ConfigMap | +1 in status | relay table "
        f"| lookup (hit / miss) |\n"
        f"|---|---|---|---|---|---|---|---|---|---|\n"
        f"| {results['domains']} | {results['recipients']} "
        f"| {results['reconcile_after_last_apply_seconds']} s "
        f"(ConfigMaps complete: {results['config_after_last_apply_seconds']} s) "
        f"| {results['all_statuses_after_last_apply_seconds']} s | {results['operator_writes']} "
        f"| {results['operator_peak_mb']} MiB = {results['operator_peak_mb'] * 2**20 / 1e6:.1f} MB "
        f"| {results['one_recipient_config_map_seconds']} s "
        f"| {results['one_recipient_seconds']} s "
        f"| {relay_r['table_mb']:.1f} MiB | {relay_r['lookup_us']:.2f} / "
        f"{relay_r['miss_lookup_us']:.2f} µs |\n"
    )
    (out_dir / "summary.md").write_text(summary)
    print(json.dumps(results, indent=2))
    print(summary)


if __name__ == "__main__":
    sys.exit(main())
