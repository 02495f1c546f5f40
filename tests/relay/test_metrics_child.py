"""relay.metrics.child: labels() once per label values, the same series after."""

from __future__ import annotations

import ast
from pathlib import Path

from prometheus_client import REGISTRY

from relay import metrics


def test_child_is_the_labelled_series_kept() -> None:
    domain = "child-test.example"
    first = metrics.child(metrics.DELIVERED, domain)
    assert metrics.child(metrics.DELIVERED, domain) is first
    assert first is metrics.DELIVERED.labels(domain)
    assert metrics.child(metrics.BOUNCED, domain) is not first  # per metric too
    before = REGISTRY.get_sample_value("mailrelay_delivered_total", {"domain": domain}) or 0.0
    first.inc()
    metrics.child(metrics.DELIVERED, domain).inc()
    assert REGISTRY.get_sample_value("mailrelay_delivered_total", {"domain": domain}) == before + 2


def test_no_stage_binds_labels_its_own_way() -> None:
    """metrics.child is the one cache of labelled series: no module-level
    children, no functools caches around labels()."""
    root = Path(__file__).resolve().parents[2] / "relay"
    own_ways = []
    for path in root.rglob("*.py"):
        tree = ast.parse(path.read_text())
        at_import = [n for n in tree.body if isinstance(n, ast.Assign | ast.AnnAssign)]
        cached = [
            n
            for n in ast.walk(tree)
            if isinstance(n, ast.FunctionDef)
            and any("functools" in ast.unparse(d) for d in n.decorator_list)
        ]
        for node in [*at_import, *cached]:
            if ".labels(" in ast.unparse(node):
                own_ways.append(f"{path.relative_to(root.parent)}:{node.lineno}")
    assert own_ways == []


# Modules that count per connection, command or message: they bind labels
# through metrics.child only. A label value taken from the client would be
# the exception (a cache keyed on it grows without bound): it keeps
# .labels() and is listed here as "path:METRIC" with the reason.
HOT_PATHS = ("smtpd", "delivery", "tlslog.py")
LABELS_ALLOWED: frozenset[str] = frozenset()


def test_hot_paths_bind_labels_through_child() -> None:
    root = Path(__file__).resolve().parents[2] / "relay"
    direct = []
    for part in HOT_PATHS:
        paths = [root / part] if part.endswith(".py") else sorted((root / part).rglob("*.py"))
        for path in paths:
            for node in ast.walk(ast.parse(path.read_text())):
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "labels"
                ):
                    metric = ast.unparse(node.func.value).rsplit(".", 1)[-1]
                    where = f"{path.relative_to(root.parent)}:{metric}"
                    if where not in LABELS_ALLOWED:
                        direct.append(f"{where} (line {node.lineno})")
    assert direct == []
