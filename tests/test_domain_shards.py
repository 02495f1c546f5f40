"""Domain shards: a large install's domains.json split into ConfigMap-sized
gzip files named in domains-index.json, and the relay loading them."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pytest
from mrtest.objects import mailrelay, relay_domain

from mailrelay_api import shards
from mailrelay_api.load import Inventory
from mailrelay_api.render import DOMAINS_FILE, DOMAINS_INDEX_FILE, RenderCache, render_relay
from relay.config import load_config, read_domains_document
from relay.process.cli import render_to_dir


def relay() -> dict[str, Any]:
    return mailrelay()


def domain(i: int) -> dict[str, Any]:
    return relay_domain(f"d{i}")


def inventory(n: int) -> Inventory:
    return Inventory(relays=[relay()], domains=[domain(i) for i in range(n)])


@pytest.fixture
def small(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inline up to 2 KB of domains, then shards of about 4 KB."""
    monkeypatch.setattr(shards, "DOMAINS_INLINE_MAX", 2048)
    monkeypatch.setattr(shards, "DOMAIN_SHARD_RAW_BYTES", 4096)


def domain_shards(files: dict[str, bytes]) -> dict[str, list[str]]:
    return {
        name: [e["domain"] for e in json.loads(gzip.decompress(blob))]
        for name, blob in files.items()
        if name.startswith("domains-") and name.endswith(".json.gz")
    }


def test_small_installs_keep_domains_json(small: None) -> None:
    files = render_relay(relay(), inventory(3)).files
    assert DOMAINS_INDEX_FILE not in files and domain_shards(files) == {}
    assert [d["domain"] for d in json.loads(files[DOMAINS_FILE])["domains"]] == [
        "d0.example",
        "d1.example",
        "d2.example",
    ]


def test_large_installs_get_an_index_and_shards(small: None) -> None:
    files = render_relay(relay(), inventory(60)).files
    assert DOMAINS_FILE not in files
    index = json.loads(files[DOMAINS_INDEX_FILE])
    found = domain_shards(files)
    assert index["domainFiles"] == sorted(found)
    assert len(found) > 1 and all(n.endswith(f"-of-{len(found):04d}.json.gz") for n in found)
    everything = [d for names in found.values() for d in names]
    assert sorted(everything) == sorted(f"d{i}.example" for i in range(60))
    for names in found.values():
        assert names == sorted(names)
    for name, names in found.items():
        index_of = int(name.split("-")[1])
        assert all(shards.shard_of(d, len(found)) == index_of for d in names)


def test_the_relay_loads_sharded_domains(small: None, tmp_path: Path) -> None:
    render_to_dir(render_relay(relay(), inventory(60)), tmp_path)
    config = load_config(tmp_path)
    assert sorted(config.domains) == sorted(f"d{i}.example" for i in range(60))
    assert read_domains_document(tmp_path)["recipientFiles"] == []


def test_one_added_domain_changes_one_shard(small: None) -> None:
    cache = RenderCache()
    before = render_relay(relay(), inventory(60), cache).files
    after = render_relay(relay(), inventory(61), cache).files
    changed = [n for n in domain_shards(after) if before.get(n) != after[n]]
    assert len(changed) == 1
    assert after == render_relay(relay(), inventory(61)).files  # the cache changes nothing


def test_a_missing_shard_keeps_the_old_configuration(small: None, tmp_path: Path) -> None:
    """The index of one shard count next to the shards of another: an error
    (the relay keeps what it has), never half the domains."""
    render_to_dir(render_relay(relay(), inventory(60)), tmp_path)
    next(tmp_path.glob("domains-0000-of-*.json.gz")).unlink()
    with pytest.raises(ValueError, match="domains-0000"):
        load_config(tmp_path)


def test_render_to_dir_switches_layouts(small: None, tmp_path: Path) -> None:
    render_to_dir(render_relay(relay(), inventory(60)), tmp_path)
    render_to_dir(render_relay(relay(), inventory(3)), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [DOMAINS_FILE, "relay.json"]
    assert len(load_config(tmp_path).domains) == 3
    render_to_dir(render_relay(relay(), inventory(60)), tmp_path)
    assert not (tmp_path / DOMAINS_FILE).exists()
    assert len(load_config(tmp_path).domains) == 60


def test_domains_json_gz_of_an_older_operator_still_loads(tmp_path: Path) -> None:
    files = render_relay(relay(), inventory(3)).files
    (tmp_path / "relay.json").write_bytes(files["relay.json"])
    (tmp_path / (DOMAINS_FILE + ".gz")).write_bytes(gzip.compress(files[DOMAINS_FILE]))
    assert len(load_config(tmp_path).domains) == 3


@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_a_shard_encoded_in_chunks_is_the_one_json_gzip_d(
    small: None, monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    """Entries encoded ENTRY_CHUNK at a time and compressed as they come: the
    same bytes as one JSON of the shard's entries, gzip'd at once."""
    monkeypatch.setattr(shards, "ENTRY_CHUNK", chunk)
    files = render_relay(relay(), inventory(60)).files
    for name in domain_shards(files):
        text = gzip.decompress(files[name])
        assert json.dumps(json.loads(text), sort_keys=True, separators=(",", ":")).encode() == text
        assert files[name] == gzip.compress(text, compresslevel=6, mtime=0)


def test_gzip_chunks_is_gzip_compress_however_the_text_is_cut() -> None:
    text = b"".join(b"user%d@d%d.example\n" % (i * 7919 % 1000, i % 13) for i in range(20000))
    whole = gzip.compress(text, compresslevel=6, mtime=0)
    for cut in (1, 7, 4096, len(text)):
        assert shards.gzip_chunks(text[i : i + cut] for i in range(0, len(text), cut)) == whole
    assert shards.gzip_chunks([]) == gzip.compress(b"", compresslevel=6, mtime=0)
