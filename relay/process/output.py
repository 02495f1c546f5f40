"""What the commands print: a table for people, JSON or YAML for scripts (-o)."""

from __future__ import annotations

import json
from typing import Any

import yaml


def emit(data: Any, output: str, table: str | None = None) -> None:
    """Prints data for scripts (-o json|yaml) or a table for people."""
    if output == "json":
        print(json.dumps(data, indent=2, sort_keys=True, default=str))
    elif output == "yaml":
        print(yaml.safe_dump(data, sort_keys=False, default_flow_style=False), end="")
    else:
        print(table if table is not None else yaml.safe_dump(data, sort_keys=False), end="")


def format_table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [headers] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() + "\n" for r in cells
    )
