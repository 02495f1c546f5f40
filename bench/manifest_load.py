#!/usr/bin/env python3
"""How fast `mailrelay validate`/`render`/`run` read a big RecipientList.

Writes one RecipientList of N addresses (default 200,000) as YAML, then times
`load_manifests` (parse, schema check, defaults) with libyaml's CSafeLoader
and with PyYAML's pure-Python SafeLoader, and the warnings check on top.
Reports the best of --runs runs each; docs/benchmarks.md has a result.

    .venv/bin/python bench/manifest_load.py [--addresses 200000] [--runs 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mailrelay_api import load  # noqa: E402
from mailrelay_api.validate import manifest_warnings  # noqa: E402


def write_list(folder: Path, count: int) -> Path:
    domain = folder / "domain.yaml"
    domain.write_text(
        "apiVersion: mailrelay.io/v1alpha1\nkind: RelayDomain\n"
        "metadata: {name: example-com}\n"
        "spec: {domain: example.com, relayRef: {name: r}, nextHop: {host: 127.0.0.1}}\n"
    )
    lines = [
        "apiVersion: mailrelay.io/v1alpha1",
        "kind: RecipientList",
        "metadata: {name: staff}",
        "spec:",
        "  domainRef: {name: example-com}",
        "  addresses:",
        *(f"  - user-{i:07d}@example.com" for i in range(count)),
    ]
    path = folder / "list.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def best(runs: int, work: Callable[[], object]) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--addresses", type=int, default=200_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    if not yaml.__with_libyaml__:
        print("PyYAML has no libyaml here: nothing to compare", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        path = write_list(Path(tmp), args.addresses)
        size = path.stat().st_size / 2**20
        text = path.read_text()
        results, parse = {}, {}
        for name, loader in (("CSafeLoader", yaml.CSafeLoader), ("SafeLoader", yaml.SafeLoader)):
            load.YAML_LOADER = loader
            parse[name] = best(args.runs, lambda how=loader: list(yaml.load_all(text, Loader=how)))
            results[name] = best(args.runs, lambda: load.load_manifests([tmp]))
        inv = load.load_manifests([tmp])
        assert not inv.errors and len(inv.recipient_lists) == 1
        warn = best(
            args.runs, lambda: manifest_warnings(inv.relays, inv.domains, inv.recipient_lists)
        )
    print(f"{args.addresses} addresses, {size:.1f} MiB of YAML; best of {args.runs} runs")
    for what, times in (
        ("YAML parse", parse),
        ("load_manifests (parse, check, defaults)", results),
    ):
        fast, slow = times["CSafeLoader"], times["SafeLoader"]
        print(f"{what}: libyaml {fast:.2f} s, pure Python {slow:.2f} s: {slow / fast:.1f}x")
    print(f"manifest_warnings on top: {warn:.3f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
