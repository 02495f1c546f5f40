"""This process's id without a getpid() system call each time.

Per-message code asks for it (log lines, metric values in multiprocess mode,
queue ids); it changes only at fork, where the child renews it.
"""

from __future__ import annotations

import os

_pid = os.getpid()


def _renew() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_renew)


def current() -> int:
    """os.getpid(), as of the last fork."""
    return _pid
