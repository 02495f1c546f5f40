"""kubeapi's connection from a kubeconfig (no API server: what it would send)."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
import yaml
from mailrelay_operator.kubeapi import Connection, KubeError, from_kubeconfig


def write(path: Path, doc: dict[str, object]) -> Path:
    path.write_text(yaml.safe_dump(doc))
    return path


def config(context: str, server: str, user: dict[str, object]) -> dict[str, object]:
    return {
        "current-context": context,
        "contexts": [{"name": context, "context": {"cluster": context, "user": context}}],
        "clusters": [{"name": context, "cluster": {"server": server}}],
        "users": [{"name": context, "user": user}],
    }


def test_the_first_file_s_current_context_and_entries_win(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "token").write_text("from-a-file\n")
    first = write(
        tmp_path / "a" / "config", config("one", "http://127.0.0.1:1/", {"tokenFile": "token"})
    )
    second = write(tmp_path / "second", config("two", "http://127.0.0.2:2", {"token": "t2"}))
    conn = from_kubeconfig(f"{first}:{second}")
    assert conn.server == "http://127.0.0.1:1"
    # A relative tokenFile is relative to the kubeconfig that names it.
    assert conn.headers() == {"Authorization": "Bearer from-a-file"}
    conn = from_kubeconfig(f"{second}:{first}")
    assert conn.server == "http://127.0.0.2:2"
    assert conn.headers() == {"Authorization": "Bearer t2"}


def test_username_and_password(tmp_path: Path) -> None:
    path = write(
        tmp_path / "c", config("c", "http://127.0.0.1:1", {"username": "u", "password": "p"})
    )
    want = "Basic " + base64.b64encode(b"u:p").decode()
    assert from_kubeconfig(str(path)).headers() == {"authorization": want}


def test_insecure_https_and_no_context(tmp_path: Path) -> None:
    doc = config("c", "https://127.0.0.1:6443", {})
    doc["clusters"] = [
        {
            "name": "c",
            "cluster": {"server": "https://127.0.0.1:6443", "insecure-skip-tls-verify": True},
        }
    ]
    conn = from_kubeconfig(str(write(tmp_path / "c", doc)))
    assert isinstance(conn, Connection) and conn.headers() == {}
    with pytest.raises(KubeError):
        from_kubeconfig(str(write(tmp_path / "empty", {"clusters": []})))


def test_a_login_plugin_is_refused_by_name(tmp_path: Path) -> None:
    plugin = {"exec": {"apiVersion": "client.authentication.k8s.io/v1", "command": "aws"}}
    path = write(tmp_path / "c", config("eks", "https://127.0.0.1:6443", plugin))
    with pytest.raises(KubeError, match="logs in with exec"):
        from_kubeconfig(str(path))
