"""The ConfigMaps holding a relay's rendered configuration (pure builders).

`<relay>-config` holds relay.json and domains.json (or, for a large install,
domains-index.json); each gzip recipient shard goes into its own
`<relay>-recipients-N` ConfigMap and each domain shard into its own
`<relay>-domains-N`, as binaryData, so every ConfigMap stays well under the
1 MiB limit (render sizes shards at 512 KiB). The pods mount them all
through fixed optional slots (statefulset.config_volume). A shard's file
name carries the shard count, its ConfigMap's name does not: when the count
moves, `<relay>-recipients-3` holds recipients-0003-of-0064.txt.gz in place
of recipients-0003-of-0032.txt.gz, and a pod that sees it next to the old
index finds the file the index names missing (and keeps its config).
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any, cast

from mailrelay_api.render import DOMAINS_FILE, DOMAINS_INDEX_FILE, RELAY_FILE, Rendered
from mailrelay_api.shards import parse_shard_name
from mailrelay_operator import naming


class Base64:
    """A binaryData value encoded when it is applied (`encoded`), not when the
    children are built: a relay's shards are ~11 MB of base64 text at 100,000
    RelayDomains, which the files they come from (the render's, kept) hold
    anyway; encoded one child at a time, at most one shard's text is alive."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def text(self) -> str:
        return base64.b64encode(self.data).decode()


def binary(data: bytes, later: bool) -> str | Base64:
    return Base64(data) if later else base64.b64encode(data).decode()


def encoded(child: dict[str, Any]) -> dict[str, Any]:
    """The child with its binaryData encoded (itself when nothing is deferred)."""
    values = child.get("binaryData")
    if not values or not any(isinstance(v, Base64) for v in values.values()):
        return child
    text = {k: cast(Base64, v).text() if isinstance(v, Base64) else v for k, v in values.items()}
    return {**child, "binaryData": text}


def _index_of(kind: str, file_name: str) -> int | None:
    parsed = parse_shard_name(file_name)
    return parsed.index if parsed is not None and parsed.kind == kind else None


def shard_index(file_name: str) -> int | None:
    """A recipient shard's index (recipients-0003-of-0008.txt.gz: 3)."""
    return _index_of("recipients", file_name)


def domain_shard_index(file_name: str) -> int | None:
    """A domain shard's index (domains-0003-of-0008.json.gz: 3)."""
    return _index_of("domains", file_name)


def config_config_map(relay: dict[str, Any], rendered: Rendered) -> dict[str, Any]:
    """relay.json and domains.json, or domains-index.json (small: it names the shards)."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": naming.config_map_name(relay),
            "namespace": naming.relay_namespace(relay),
            "labels": naming.labels(relay, "config"),
        },
        "data": {
            name: rendered.files[name].decode()
            for name in (RELAY_FILE, DOMAINS_FILE, DOMAINS_INDEX_FILE)
            if name in rendered.files
        },
    }


def recipient_config_maps(
    relay: dict[str, Any], rendered: Rendered, later: bool = False
) -> list[dict[str, Any]]:
    """One ConfigMap per recipient shard, named after the shard's index
    (later: its binaryData a Base64, encoded at its apply)."""
    return _shard_config_maps(
        relay, rendered, "recipients", shard_index, naming.recipients_config_map_name, later
    )


def domain_config_maps(
    relay: dict[str, Any], rendered: Rendered, later: bool = False
) -> list[dict[str, Any]]:
    """One ConfigMap per domain shard, named after the shard's index."""
    return _shard_config_maps(
        relay, rendered, "domains", domain_shard_index, naming.domains_config_map_name, later
    )


def _shard_config_maps(
    relay: dict[str, Any],
    rendered: Rendered,
    component: str,
    index_of: Callable[[str], int | None],
    name_of: Callable[[dict[str, Any], int], str],
    later: bool,
) -> list[dict[str, Any]]:
    out = []
    for file_name in sorted(rendered.files):
        index = index_of(file_name)
        if index is None:
            continue
        out.append(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {
                    "name": name_of(relay, index),
                    "namespace": naming.relay_namespace(relay),
                    "labels": {
                        **naming.labels(relay, component),
                        naming.SHARD_LABEL: str(index),
                    },
                },
                "binaryData": {file_name: binary(rendered.files[file_name], later)},
            }
        )
    return out


def config_files(config_maps: list[dict[str, Any]]) -> dict[str, bytes]:
    """What the kubelet would write into the pod's config folder (tests play kubelet)."""
    files: dict[str, bytes] = {}
    for cm in config_maps:
        for key, text in (cm.get("data") or {}).items():
            files[key] = str(text).encode()
        for key, b64 in (cm.get("binaryData") or {}).items():
            files[key] = base64.b64decode(b64)
    return files
