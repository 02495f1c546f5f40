"""Where a large relay's domain claims are kept: ConfigMaps, not its status.

MailRelay status.domains lists every claim (mailrelay_api/claims.py), about
60 bytes a domain: 100,000 domains would be a 6 MB status, over what etcd
takes in one write (1.5 MiB by default), and no status at all would be
written. Over STATUS_CLAIMS_MAX claims, status.domains keeps only the claims
of gone holders (those waiting for releaseAfter) and every claim goes into
`<relay>-claims-N` ConfigMaps (gzip'd JSON, sharded by crc32 of the domain
like the domain shards). The operator reads them back when it starts, so
claims stay sticky across restarts at any size. The relay pods never mount them.
"""

from __future__ import annotations

import base64
import gzip
import json
from dataclasses import dataclass, field
from typing import Any

from mailrelay_api.claims import Claim
from mailrelay_api.shards import (
    DOMAIN_SHARD_RAW_BYTES,
    entries_json,
    gzip_chunks,
    same_objects,
    shard_count,
    shard_of,
)
from mailrelay_operator import naming
from mailrelay_operator.configmaps import binary
from mailrelay_operator.kubeapi import KubeApi, resource_path

STATUS_CLAIMS_MAX = 10_000  # about 600 KB of status
CLAIMS_FILE = "claims.json.gz"
CLAIM_BYTES = 64  # a claim as JSON, about, for the shard count


def status_claims(claims: list[Claim]) -> list[dict[str, str]]:
    """What status.domains gets: every claim, or over STATUS_CLAIMS_MAX the gone holders'."""
    if len(claims) <= STATUS_CLAIMS_MAX:
        return [c.to_status() for c in claims]
    return [c.to_status() for c in claims if c.gone_since]


@dataclass
class ClaimsCache:
    """Each claims shard's gzip and the claims it was made of (the reconciler
    keeps one per relay): the claims of unchanged domains are the same
    objects render after render (claims.award), so a render that changed one
    claim packs one shard again, not 100,000 claims."""

    shards: dict[tuple[int, int], tuple[list[Claim], bytes]] = field(default_factory=dict)


def claims_config_maps(
    relay: dict[str, Any],
    claims: list[Claim],
    cache: ClaimsCache | None = None,
    later: bool = False,
) -> list[dict[str, Any]]:
    """The claims ConfigMaps (none while status.domains holds every claim;
    later: their binaryData a configmaps.Base64, encoded at the apply)."""
    if len(claims) <= STATUS_CLAIMS_MAX:
        if cache is not None:
            cache.shards = {}
        return []
    count = shard_count(len(claims) * CLAIM_BYTES, DOMAIN_SHARD_RAW_BYTES)
    groups: list[list[Claim]] = [[] for _ in range(count)]
    for c in claims:
        groups[shard_of(c.domain, count)].append(c)
    previous = cache.shards if cache is not None else {}
    made: dict[tuple[int, int], tuple[list[Claim], bytes]] = {}
    for i, group in enumerate(groups):
        old = previous.get((count, i))
        made[(count, i)] = (
            group,
            old[1] if old is not None and same_objects(old[0], group) else _packed(group),
        )
    if cache is not None:
        cache.shards = made
    return [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": f"{naming.relay_name(relay)}-claims-{i}",
                "namespace": naming.relay_namespace(relay),
                "labels": {**naming.labels(relay, "claims"), naming.SHARD_LABEL: str(i)},
            },
            "binaryData": {CLAIMS_FILE: binary(made[(count, i)][1], later)},
        }
        for i in range(count)
    ]


def _packed(group: list[Claim]) -> bytes:
    """gzip'd JSON of the group's status entries, made ENTRY_CHUNK claims at a
    time (a shard of 25,000 claims as dicts was ~10 MB beside the render's)."""
    return gzip_chunks(entries_json(group, Claim.to_status))


def claims_in(config_maps: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The claims the ConfigMaps hold (status.domains entries)."""
    out: list[dict[str, str]] = []
    for cm in config_maps:
        blob = (cm.get("binaryData") or {}).get(CLAIMS_FILE)
        if blob:
            out.extend(json.loads(gzip.decompress(base64.b64decode(blob))))
    return out


def with_stored_claims(relay: dict[str, Any], stored: list[dict[str, str]]) -> dict[str, Any]:
    """The relay with status.domains completed from the ConfigMaps' claims
    (the status's own entries win: they are the newer, gone holders)."""
    status = dict(relay.get("status") or {})
    recorded = status.get("domains")
    own = recorded if isinstance(recorded, list) else []
    seen = {str(c.get("domain")) for c in own if isinstance(c, dict)}
    merged = own + [c for c in stored if c.get("domain") not in seen]
    return {**relay, "status": {**status, "domains": merged}}


async def load_claims(api: KubeApi, relay: dict[str, Any]) -> list[dict[str, str]]:
    """The claims in the relay's claims ConfigMaps (at start-up; [] when there are none)."""
    path = resource_path("v1", "ConfigMap", naming.relay_namespace(relay))
    return claims_in(await api.list_objects(path, naming.children_selector(relay, "claims")))
