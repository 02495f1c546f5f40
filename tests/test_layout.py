"""The tree reads as its data path (docs/architecture.md): these import rules keep it so.

- relay/smtpd and relay/delivery never import each other;
- relay/queue and the shared modules at relay/ top level import no stage;
- no stage imports "back up": nothing below relay/process imports it, and only
  relay/process imports relay/handover;
- relay/ imports nothing of the operator (but the `mailrelay operator` command
  that starts it), the operator nothing of relay/: both read mailrelay_api/,
  which imports neither;
- no import cycles between relay's packages;
- no module over 600 lines unless its header says why ("Long because"), no
  function over 80 lines but the declarative literals listed below.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("smtpd", "queue", "delivery", "handover", "process")


def imports_of(path: Path) -> set[str]:
    """Every module a file imports (lazy imports inside functions too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "operator":
        parts = parts[1:]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def package_of(module: str) -> str:
    """relay.smtpd.server -> "smtpd"; relay.config -> "shared"; else the top name."""
    parts = module.split(".")
    if parts[0] != "relay":
        return parts[0]
    if len(parts) > 1 and parts[1] in STAGES:
        return parts[1]
    return "shared"


def graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports."""
    files = [*ROOT.glob("relay/**/*.py"), *ROOT.glob("mailrelay_api/*.py")]
    files += ROOT.glob("operator/mailrelay_operator/*.py")
    known = {module_name(p) for p in files}
    return {
        module_name(p): {m for m in imports_of(p) if m in known and m != module_name(p)}
        for p in files
    }


# Which package may import which (besides itself, the shared modules and mailrelay_api).
ALLOWED = {
    "shared": set(),
    "queue": set(),
    "smtpd": {"queue"},
    "delivery": {"queue"},
    "handover": {"queue", "smtpd", "delivery"},
    "process": {"queue", "smtpd", "delivery", "handover"},
    "mailrelay_api": set(),
    "mailrelay_operator": set(),
}

# The one console script, `mailrelay`, starts the operator too (`mailrelay operator`).
ENTRY_POINT = ("relay.process.cli", "mailrelay_operator")


def test_packages_import_only_what_their_stage_may() -> None:
    wrong = []
    for module, deps in graph().items():
        own = package_of(module)
        for dep in deps:
            other = package_of(dep)
            if other == own or (other == "mailrelay_api" and own != "mailrelay_api"):
                continue
            if other == "shared" and own not in ("mailrelay_api", "mailrelay_operator"):
                continue
            if (module, other) == ENTRY_POINT:
                continue
            if other not in ALLOWED[own]:
                wrong.append(f"{module} imports {dep} ({own} -> {other})")
    assert wrong == []


def test_no_cycles_between_relay_packages() -> None:
    edges: dict[str, set[str]] = {}
    for module, deps in graph().items():
        if module.startswith("relay"):
            edges.setdefault(package_of(module), set()).update(
                package_of(d) for d in deps if d.startswith("relay")
            )
    for package, deps in edges.items():
        deps.discard(package)

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(
            d == goal or (d not in seen and reaches(d, goal, seen | {d}))
            for d in edges.get(start, ())
        )

    assert [p for p in edges if reaches(p, p, {p})] == []


# Declarative literals may run long (the one exception); nothing else.
LONG_FUNCTIONS = {("relay/process/cli.py", "build_parser")}  # argparse, option by option
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80


def sources() -> list[Path]:
    return [
        *ROOT.glob("relay/**/*.py"),
        *ROOT.glob("mailrelay_api/*.py"),
        *ROOT.glob("operator/mailrelay_operator/*.py"),
    ]


def test_long_modules_say_why() -> None:
    unexplained = []
    for path in sources():
        text = path.read_text()
        doc = ast.get_docstring(ast.parse(text)) or ""
        if text.count("\n") > MAX_MODULE_LINES and "Long because" not in doc:
            unexplained.append(str(path.relative_to(ROOT)))
    assert unexplained == []


def test_functions_stay_short() -> None:
    long = []
    for path in sources():
        rel = str(path.relative_to(ROOT))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > MAX_FUNCTION_LINES and (rel, node.name) not in LONG_FUNCTIONS:
                    long.append(f"{rel}:{node.name} ({lines} lines)")
    assert long == []
