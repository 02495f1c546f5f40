"""The operator's memory at scale, offline: no API server, one process.

Builds what the operator holds for N RelayDomains and M recipients
(RecipientLists of 1,000 addresses) the way it gets there: listing pages of
JSON parsed and trimmed in executor threads (input_watch.relist), the
statuses it writes coming back as watch events parsed in threads, a first
render with the relay's RenderCache in a thread, then one added recipient
and its render. Prints VmHWM (peak RSS) and VmRSS after each phase, from
/proc/self/status, and each render's time. Not a run against an API
server: no HTTP, no kopf, no kubernetes client; compare its figures with
each other, not with bench/operator_scale.py's.

    .venv/bin/python bench/operator_memory.py --domains 100000 --recipients 1000000
    .venv/bin/python bench/operator_memory.py --no-settle   # glibc's defaults
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "operator")]

from mailrelay_operator.cluster import ClusterView  # noqa: E402
from mailrelay_operator.input_watch import LIST_PAGE  # noqa: E402
from mailrelay_operator.inputs import InputCache, store, trim_all  # noqa: E402
from mailrelay_operator.status_writer import STATUS_WRITE_CONCURRENCY  # noqa: E402

from mailrelay_api import allocator  # noqa: E402
from mailrelay_api.render import RenderCache, RenderSettings, render_relay  # noqa: E402
from mailrelay_api.validate import with_defaults  # noqa: E402

sys.path.insert(0, str(REPO / "bench"))  # bench/ is not a package
import scale_objects  # noqa: E402
from scale_objects import LIST_SIZE, NS, proc_status_mib  # noqa: E402

# asyncio's default executor on 2 cores: min(32, cpu + 4) threads.
EXECUTOR_THREADS = min(32, (os.cpu_count() or 1) + 4)


def report(phase: str) -> None:
    print(
        f"{phase:<34} VmHWM {proc_status_mib('self', 'VmHWM'):7.1f} MiB"
        f"  VmRSS {proc_status_mib('self', 'VmRSS'):7.1f} MiB",
        flush=True,
    )


def metadata(name: str, i: int) -> dict[str, Any]:
    """As an API server lists it, managedFields included (trim drops them)."""
    return {
        "name": name,
        "namespace": NS,
        "uid": f"{i:08x}-0000-4000-8000-{i:012x}",
        "resourceVersion": str(1000 + i),
        "generation": 1,
        "creationTimestamp": "2026-12-02T12:00:00Z",
        "managedFields": [
            {
                "manager": "kubectl",
                "operation": "Apply",
                "apiVersion": "mailrelay.io/v1alpha1",
                "time": "2026-12-02T12:00:00Z",
                "fieldsType": "FieldsV1",
                "fieldsV1": {"f:spec": {"f:domain": {}, "f:relayRef": {"f:name": {}}}},
            }
        ],
    }


def domain(i: int, status: dict[str, Any] | None = None) -> dict[str, Any]:
    """scale_objects.domain as an API server lists it (with `status`, as it comes back)."""
    obj = scale_objects.domain(i)
    obj["metadata"] = metadata(obj["metadata"]["name"], i)
    if status is not None:
        obj["status"] = status
    return obj


def recipient_list(i: int, extra: int = 0) -> dict[str, Any]:
    """scale_objects.recipient_list as listed; `extra` more addresses, a new generation."""
    more = [f"user{j:04d}@d{i:05d}.bench.example" for j in range(LIST_SIZE, LIST_SIZE + extra)]
    obj = scale_objects.recipient_list(i, more)
    obj["metadata"] = metadata(obj["metadata"]["name"], i) | {"generation": 1 + extra}
    return obj


def accepted(i: int) -> dict[str, Any]:
    """The status the operator writes (status.domain_status's shape)."""
    return {
        "observedGeneration": 1,
        "conditions": [
            {
                "type": "Accepted",
                "status": "True",
                "reason": "Accepted",
                "message": "relayed by MailRelay bench/edge",
                "lastTransitionTime": "2026-12-02T12:00:05Z",
                "observedGeneration": 1,
            }
        ],
        "recipients": LIST_SIZE if i < 1000 else 0,
    }


def parse_page(text: bytes, kind: str) -> dict[Any, Any]:
    """input_watch._list_page's work in its thread: a page's JSON, trimmed."""
    return trim_all(json.loads(text)["items"], kind)


def write_status(i: int) -> int:
    """kubeapi.patch_status_sync's work in an executor thread: the patch sent,
    the whole object the API server answers parsed (and dropped)."""
    body = json.dumps({"status": accepted(i)}).encode()
    answer = json.dumps(domain(i, accepted(i))).encode()
    return len(body) + len(json.loads(answer)["metadata"]["name"])


def listed(pool: concurrent.futures.Executor, inputs: InputCache, kind: str, objs: Any) -> None:
    page_size = LIST_PAGE[kind]
    page: list[dict[str, Any]] = []
    pending = []

    def flush() -> None:
        text = json.dumps({"items": page}).encode()
        pending.append(pool.submit(parse_page, text, kind))

    for obj in objs:
        page.append(obj)
        if len(page) == page_size:
            flush()
            page = []
        if len(pending) >= EXECUTOR_THREADS:
            for key_obj in pending.pop(0).result().values():
                store(inputs.of_kind(kind), key_obj, False)
    if page:
        flush()
    for fut in pending:
        for key_obj in fut.result().values():
            store(inputs.of_kind(kind), key_obj, False)


def render(
    pool: concurrent.futures.Executor, relay: dict[str, Any], view: ClusterView, cache: RenderCache
) -> Any:
    settings = RenderSettings(cluster="cluster.local")
    started = time.perf_counter()
    out = pool.submit(render_relay, relay, view.inventory(), cache, settings, None).result()
    print(f"{'':<34} rendered in {time.perf_counter() - started:.2f} s", flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--domains", type=int, default=100_000)
    parser.add_argument("--recipients", type=int, default=1_000_000)
    parser.add_argument("--no-settle", action="store_true", help="glibc's defaults (no mallopt)")
    parser.add_argument("--no-arena-max", action="store_true", help="glibc's arenas (8 a core)")
    parser.add_argument("--no-trim", action="store_true", help="no malloc_trim after bursts")
    args = parser.parse_args()
    lists = args.recipients // LIST_SIZE
    if not args.no_settle:
        settle = (
            allocator.settle_allocator if args.no_arena_max else allocator.settle_operator_allocator
        )
        print("allocator settled:", settle())
    trim_seconds: list[float] = []

    def trim() -> None:
        if not args.no_trim:
            started = time.perf_counter()
            allocator.trim_heap()
            trim_seconds.append(time.perf_counter() - started)

    report("start")

    pool = concurrent.futures.ThreadPoolExecutor(EXECUTOR_THREADS)
    inputs = InputCache()
    listed(pool, inputs, "RelayDomain", (domain(i) for i in range(args.domains)))
    listed(pool, inputs, "RecipientList", (recipient_list(i) for i in range(lists)))
    trim()
    report("listed")

    relay = with_defaults(
        {
            "apiVersion": "mailrelay.io/v1alpha1",
            "kind": "MailRelay",
            "metadata": {"name": "edge", "namespace": NS, "uid": "relay-uid", "generation": 1},
            "spec": {"hostname": "mx.bench.example", "replicas": 2},
        }
    )
    view = ClusterView(relays={(NS, "edge"): relay}, domains=inputs.domains, lists=inputs.lists)
    cache = RenderCache()
    rendered = render(pool, relay, view, cache)
    trim()
    report("first render")

    writes: list[concurrent.futures.Future[int]] = []
    for i in range(args.domains):  # STATUS_WRITE_CONCURRENCY at a time, as status_writer
        writes.append(pool.submit(write_status, i))
        if len(writes) >= STATUS_WRITE_CONCURRENCY:
            writes.pop(0).result()
    concurrent.futures.wait(writes)
    trim()
    report("statuses written")

    # The statuses written come back as watch events (a JSON line each, parsed
    # in the watch thread, stored on the loop).
    listed(pool, inputs, "RelayDomain", (domain(i, accepted(i)) for i in range(args.domains)))
    trim()
    report("statuses back")

    listed(pool, inputs, "RecipientList", [recipient_list(0, extra=1)])
    rendered = None  # as the reconciler: the last render goes before the next
    rendered = render(pool, relay, view, cache)
    trim()
    report("+1 recipient rendered")
    if trim_seconds:
        print("malloc_trim(0) took", ", ".join(f"{t * 1000:.0f} ms" for t in trim_seconds))
    files = len(rendered.files)
    print(f"{len(rendered.domains)} domains, {rendered.recipients} recipients, {files} files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
