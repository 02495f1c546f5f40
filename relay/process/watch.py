"""Seeing configuration change: the rendered config folder and the manifests of `run -f`.

A ConfigMap mount swaps a `..data` symlink, so changes are seen by stat()
(config_signature, cheap, every poll) and confirmed by a content hash
(config_hash) before anything is reloaded.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any


def _stat_signature(paths: list[Path]) -> tuple[Any, ...]:
    """What changes when any file under these paths changes (stat follows symlinks)."""
    sig: list[Any] = []
    for root in paths:
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for f in files:
            try:
                st = f.stat()
            except OSError:
                continue
            sig.append((str(f), st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(sig)


def config_signature(config_dir: Path) -> tuple[Any, ...]:
    """stat() of the rendered files (not dotfiles: `..data`, temp files)."""
    sig: list[Any] = []
    try:
        names = sorted(os.listdir(config_dir))
    except OSError:
        return ()
    for name in names:
        if name.startswith("."):
            continue
        try:
            st = os.stat(config_dir / name)
        except OSError:
            continue
        sig.append((name, st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(sig)


def config_hash(config_dir: Path) -> str:
    h = hashlib.sha256()
    for name in sorted(os.listdir(config_dir)):
        if name.startswith("."):
            continue
        path = config_dir / name
        if path.is_file():
            h.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


class SourceWatcher:
    """Polls manifest files/folders (`mailrelay run -f`) for changes."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths
        self._sig = _stat_signature(paths)

    def changed(self) -> bool:
        sig = _stat_signature(self.paths)
        if sig == self._sig:
            return False
        self._sig = sig
        return True
