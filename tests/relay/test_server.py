"""relay.process helpers: listen addresses, and seeing a ConfigMap update."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from relay.process.listeners import parse_listen
from relay.process.watch import SourceWatcher, config_hash, config_signature


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:25", ("127.0.0.1", 25)),
        (":2525", ("0.0.0.0", 2525)),
        ("[::1]:25", ("::1", 25)),
    ],
)
def test_parse_listen(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen(text) == expected


def test_parse_listen_refuses_garbage() -> None:
    with pytest.raises(ValueError):
        parse_listen("localhost")


def configmap_version(root: Path, name: str, files: dict[str, str]) -> None:
    """What the kubelet does: a new timestamped folder, then `..data` swapped
    to it with one rename; the visible files are symlinks through `..data`."""
    version = root / name
    version.mkdir()
    for fname, text in files.items():
        (version / fname).write_text(text)
        link = root / fname
        if not link.is_symlink():
            link.symlink_to(Path("..data") / fname)
    tmp = root / "..data_tmp"
    tmp.symlink_to(name)
    os.replace(tmp, root / "..data")


def test_configmap_symlink_swap_is_seen(tmp_path: Path) -> None:
    configmap_version(tmp_path, "..2026_01", {"relay.json": "{}", "domains.json": "[1]"})
    sig, digest = config_signature(tmp_path), config_hash(tmp_path)
    assert config_signature(tmp_path) == sig  # nothing changed, nothing seen

    configmap_version(tmp_path, "..2026_02", {"relay.json": "{}", "domains.json": "[1, 2]"})
    assert config_signature(tmp_path) != sig
    assert config_hash(tmp_path) != digest

    # A resync that rewrites the same content: seen by stat, not a reload.
    sig2, digest2 = config_signature(tmp_path), config_hash(tmp_path)
    configmap_version(tmp_path, "..2026_03", {"relay.json": "{}", "domains.json": "[1, 2]"})
    assert config_signature(tmp_path) != sig2
    assert config_hash(tmp_path) == digest2


def test_source_watcher(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("a: 1\n")
    watcher = SourceWatcher([tmp_path])
    assert not watcher.changed()
    (tmp_path / "b.yaml").write_text("b: 1\n")
    assert watcher.changed()
    assert not watcher.changed()
