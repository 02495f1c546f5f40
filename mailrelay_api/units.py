"""Units of the manifest's values, read the same way by the operator and the relay.

Durations are Postfix-style times (schema.DURATION_PATTERN): "10d", "4000s",
"1h30m"; Postfix also takes a bare number as seconds, and so do we.
"""

from __future__ import annotations

import re

_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION_PART = re.compile(r"([0-9]+)(ms|s|m|h|d|w)")


def parse_duration(text: str) -> float:
    """Postfix-style time ("10d", "4000s", "1h30m") in seconds."""
    text = str(text).strip()
    if text.isdigit():
        return float(text)  # Postfix: a bare number is seconds
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a duration: {text!r}")
    return sum(int(n) * _DURATION_UNITS[u] for n, u in parts)
