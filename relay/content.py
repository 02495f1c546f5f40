"""Content checks at end of DATA: the attachment filter.

INTERFACE STUB (accepts everything) — the spam-filtering work replaces the
body. Called with the spooled message file (headers and body as received,
CRLF line ends); parsing runs in an executor, never on the event loop.
"""

from __future__ import annotations

from pathlib import Path

from relay.config import RelayConfig
from relay.session import Reply


async def check_message(path: Path, config: RelayConfig) -> Reply | None:
    """None to accept, or a 550 5.7.1 Reply naming the rejected attachment."""
    return None
