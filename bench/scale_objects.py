"""What the operator benchmarks create: N RelayDomains of one relay, a
RecipientList of LIST_SIZE addresses per domain, and a process's memory.

Shared by bench/operator_scale.py (applied to an API server) and
bench/operator_memory.py (built offline); imports nothing of the operator,
so it adds nothing to the memory the offline benchmark measures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

NS = "bench"
LIST_SIZE = 1000  # addresses per RecipientList


def domain(i: int) -> dict[str, Any]:
    return {
        "apiVersion": "mailrelay.io/v1alpha1",
        "kind": "RelayDomain",
        "metadata": {"name": f"d{i:05d}", "namespace": NS},
        "spec": {
            "domain": f"d{i:05d}.bench.example",
            "relayRef": {"name": "edge"},
            "nextHop": {"host": "127.0.0.1", "port": 2526},
        },
    }


def recipient_list(i: int, extra: list[str] = ()) -> dict[str, Any]:  # type: ignore[assignment]
    """Domain i's list: LIST_SIZE addresses, then `extra`."""
    return {
        "apiVersion": "mailrelay.io/v1alpha1",
        "kind": "RecipientList",
        "metadata": {"name": f"d{i:05d}-staff", "namespace": NS},
        "spec": {
            "domainRef": {"name": f"d{i:05d}"},
            "addresses": [f"user{j:04d}@d{i:05d}.bench.example" for j in range(LIST_SIZE)]
            + list(extra),
        },
    }


def proc_status_mib(pid: int | str, field: str) -> float:
    """A /proc/<pid>/status size field (VmHWM: peak RSS, VmRSS) in MiB; 0 if absent."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0
