"""The relay's compact recipient table, read from rendered shards."""

from __future__ import annotations

import gzip
import random
from pathlib import Path

from relay.config import load_config
from relay.recipient_table import RecipientTable

from .conftest import make_config


def write_shards(folder: Path, addresses: list[str], shards: int) -> list[Path]:
    paths = []
    for i in range(shards):
        path = folder / f"recipients-{i:04d}.txt.gz"
        path.write_bytes(gzip.compress("".join(a + "\n" for a in addresses[i::shards]).encode()))
        paths.append(path)
    return paths


def test_exact_case_insensitive_membership(tmp_path: Path) -> None:
    addresses = [f"user{i}@d{i % 7}.example" for i in range(5000)]
    addresses += ["jörg@example.de", "@wildcard.example", "Mixed.Case@Example.COM"]
    table = RecipientTable.from_shards(write_shards(tmp_path, addresses, 3))
    assert len(table) == len(addresses)
    assert all(a in table for a in addresses)
    assert "USER17@D3.EXAMPLE" in table
    assert "JÖRG@example.de" in table
    assert "mixed.case@example.com" in table
    assert "@wildcard.example" in table
    for miss in ("user5000@d0.example", "user1@d2.example", "jorg@example.de", "", "user1"):
        assert miss not in table
    assert 42 not in table


def test_duplicates_and_blank_lines_count_once(tmp_path: Path) -> None:
    path = tmp_path / "r.txt.gz"
    path.write_bytes(gzip.compress(b"a@x.example\n\n  A@X.example \nb@x.example\n"))
    table = RecipientTable.from_shards([path])
    assert len(table) == 2 and "a@x.example" in table and "b@x.example" in table


def test_no_false_positives_among_random_misses() -> None:
    rng = random.Random(4)
    present = [f"{rng.getrandbits(48):x}@example.com" for _ in range(20000)]
    table = RecipientTable(present)
    assert all(a in table for a in present)
    members = set(present)
    misses = [f"{rng.getrandbits(48):x}@example.com" for _ in range(20000)]
    assert not [a for a in misses if a not in members and a in table]


def test_tables_are_keyed_per_instance() -> None:
    """Two tables with the same addresses hold different hashes (fresh keys)."""
    one, two = RecipientTable(["a@x.example"]), RecipientTable(["a@x.example"])
    assert one._buckets != two._buckets
    assert "a@x.example" in one and "a@x.example" in two


def test_load_config_holds_a_compact_table(tmp_path: Path) -> None:
    config = make_config(tmp_path, domains={"example.com": ["Info@Example.com", "joe@example.com"]})
    assert isinstance(config.recipients, RecipientTable)
    assert len(config.recipients) == 2
    assert "info@example.com" in config.recipients
    assert "nobody@example.com" not in config.recipients
    again = load_config(tmp_path / "cfg-config")
    assert again.recipients is not config.recipients and "joe@example.com" in again.recipients
