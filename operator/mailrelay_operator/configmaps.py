"""The ConfigMaps holding a relay's rendered configuration (pure builders).

`<relay>-config` holds relay.json and domains.json; each gzip recipient shard
goes into its own `<relay>-recipients-N` ConfigMap as binaryData, so every
ConfigMap stays well under the 1 MiB limit (render sizes shards at 512 KiB).
"""

from __future__ import annotations

import base64
import gzip
import re
from typing import Any

from mailrelay_api.render import DOMAINS_FILE, RELAY_FILE, Rendered
from mailrelay_operator import naming

# ConfigMaps hold at most 1 MiB (base64 counts 4/3 for binaryData).
DOMAINS_GZIP_OVER = 256 * 1024
_SHARD_FILE = re.compile(r"^recipients-(\d+)\.txt\.gz$")


def shard_index(file_name: str) -> int | None:
    m = _SHARD_FILE.match(file_name)
    return int(m.group(1)) if m else None


def config_config_map(relay: dict[str, Any], rendered: Rendered) -> dict[str, Any]:
    """relay.json and domains.json; a large domains.json (10,000 domains is about
    1.5 MB) goes in gzip'd as binaryData domains.json.gz, which the relay reads too."""
    domains = rendered.files[DOMAINS_FILE]
    cm: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": naming.config_map_name(relay),
            "namespace": naming.relay_namespace(relay),
            "labels": naming.labels(relay, "config"),
        },
        "data": {RELAY_FILE: rendered.files[RELAY_FILE].decode()},
    }
    if len(domains) <= DOMAINS_GZIP_OVER:
        cm["data"][DOMAINS_FILE] = domains.decode()
    else:
        packed = gzip.compress(domains, compresslevel=6, mtime=0)
        cm["binaryData"] = {DOMAINS_FILE + ".gz": base64.b64encode(packed).decode()}
    return cm


def recipient_config_maps(relay: dict[str, Any], rendered: Rendered) -> list[dict[str, Any]]:
    """One ConfigMap per recipient shard, named after the shard's index."""
    out = []
    for file_name in sorted(rendered.files):
        index = shard_index(file_name)
        if index is None:
            continue
        out.append(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {
                    "name": naming.recipients_config_map_name(relay, index),
                    "namespace": naming.relay_namespace(relay),
                    "labels": {
                        **naming.labels(relay, "recipients"),
                        naming.SHARD_LABEL: str(index),
                    },
                },
                "binaryData": {
                    file_name: base64.b64encode(rendered.files[file_name]).decode(),
                },
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
