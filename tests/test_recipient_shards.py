"""Recipient shards: spread by a stable hash, rendered incrementally with a
cache; loaded by the relay only as one whole set of one shard count, as the
index names them (a mix of two counts, the ConfigMaps written one at a time
and each refreshed by the kubelet on its own schedule, keeps the table the
relay has)."""

from __future__ import annotations

import copy
import gzip
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from mrtest.objects import mailrelay, relay_domain

from mailrelay_api import shards
from mailrelay_api.load import Inventory
from mailrelay_api.render import DOMAINS_FILE, RenderCache, Rendered, render_relay
from mailrelay_api.validate import with_defaults
from relay.config import IncompleteShardSet, load_config, load_config_waiting


def relay() -> dict[str, Any]:
    return mailrelay()


def domain(i: int, recipients: str = "listed") -> dict[str, Any]:
    return relay_domain(
        f"d{i}", next_hop="127.0.0.1", recipients=recipients, uid=f"dom-{i}", generation=1
    )


def recipient_list(
    i: int, addresses: list[str], generation: int = 1, name: str = "staff"
) -> dict[str, Any]:
    return with_defaults(
        {
            "apiVersion": "mailrelay.io/v1alpha1",
            "kind": "RecipientList",
            "metadata": {
                "name": f"d{i}-{name}",
                "namespace": "mail",
                "uid": f"list-{i}-{name}",
                "generation": generation,
            },
            "spec": {"domainRef": {"name": f"d{i}"}, "addresses": addresses},
        }
    )


def users(i: int, n: int) -> list[str]:
    return [f"user{j}@d{i}.example" for j in range(n)]


def inventory(domains: int = 4, per_list: int = 300) -> Inventory:
    return Inventory(
        relays=[relay()],
        domains=[domain(i) for i in range(domains)],
        recipient_lists=[recipient_list(i, users(i, per_list)) for i in range(domains)],
    )


def shard_files(rendered: Rendered) -> dict[str, list[str]]:
    return {
        name: gzip.decompress(blob).decode().splitlines()
        for name, blob in rendered.files.items()
        if name.startswith("recipients-")
    }


@pytest.fixture
def small_shards(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shards of 2 KB, so a few hundred addresses need several."""
    monkeypatch.setattr(shards, "SHARD_RAW_BYTES", 2048)


def test_small_installs_get_one_shard() -> None:
    rendered = render_relay(relay(), inventory(domains=2, per_list=3))
    files = shard_files(rendered)
    assert list(files) == ["recipients-0000-of-0001.txt.gz"]
    assert files["recipients-0000-of-0001.txt.gz"] == sorted(users(0, 3) + users(1, 3))
    assert rendered.recipients == 6


def test_no_listed_addresses_no_shards() -> None:
    rendered = render_relay(relay(), Inventory(relays=[relay()], domains=[domain(0)]))
    assert shard_files(rendered) == {}
    assert json.loads(rendered.files[DOMAINS_FILE])["recipientFiles"] == []


def test_addresses_spread_by_their_hash(small_shards: None) -> None:
    rendered = render_relay(relay(), inventory())
    files = shard_files(rendered)
    count = len(files)
    assert count == shards.shard_count(sum(len(a) + 1 for i in range(4) for a in users(i, 300)))
    assert count > 1 and count & (count - 1) == 0
    assert json.loads(rendered.files[DOMAINS_FILE])["recipientFiles"] == sorted(files)
    seen = []
    for name, lines in files.items():
        assert lines == sorted(set(lines))
        assert all(
            shards.RECIPIENT_SHARD.format(shards.shard_of(a, count), count) == name for a in lines
        )
        seen += lines
    assert sorted(seen) == sorted(a for i in range(4) for a in users(i, 300))
    assert rendered.recipients == 1200


def test_one_added_address_changes_one_shard(small_shards: None) -> None:
    inv = inventory()
    before = render_relay(relay(), inv)
    inv.recipient_lists[2] = recipient_list(2, [*users(2, 300), "late@d2.example"], generation=2)
    after = render_relay(relay(), inv)
    changed = sorted(n for n in after.files if after.files[n] != before.files.get(n))
    assert set(after.files) == set(before.files)
    count = len(shard_files(after))
    assert changed == [
        shards.RECIPIENT_SHARD.format(shards.shard_of("late@d2.example", count), count)
    ]
    assert after.recipients == before.recipients + 1


def test_the_files_do_not_depend_on_list_order(small_shards: None) -> None:
    inv = inventory()
    # One address in two lists of its domain, one upper-cased and one foreign.
    inv.recipient_lists.append(
        recipient_list(1, ["USER7@D1.example", "new@d1.example", "x@other.example"], name="more")
    )
    forward = render_relay(relay(), inv)
    inv.recipient_lists.reverse()
    backward = render_relay(relay(), inv)
    assert forward.files == backward.files
    assert forward.recipients == 1201
    counts = {v.name: v.recipients for v in forward.domains}
    assert counts["d1"] == 301
    more = next(v for v in forward.recipient_lists if v.name == "d1-more")
    assert (more.reason, more.addresses) == ("ForeignAddresses", 2)


def test_an_oversized_shard_doubles_the_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shards, "SHARD_MAX_BYTES", 600)
    rendered = render_relay(relay(), inventory())
    sizes = [len(b) for n, b in rendered.files.items() if n.startswith("recipients-")]
    assert len(sizes) > 1 and max(sizes) <= 600
    assert rendered.recipients == 1200


def test_the_cache_gives_the_same_files(small_shards: None) -> None:
    cache = RenderCache()
    inv = inventory()
    steps = [
        lambda: None,
        lambda: inv.recipient_lists.__setitem__(
            0, recipient_list(0, [*users(0, 300), "late@d0.example"], generation=2)
        ),
        lambda: inv.recipient_lists.__setitem__(1, recipient_list(1, users(1, 20), generation=2)),
        lambda: inv.domains.__setitem__(3, domain(3, recipients="any")),
        lambda: inv.recipient_lists.pop(2),
        # Past a power of two: every shard is split again.
        lambda: inv.recipient_lists.append(recipient_list(9, users(9, 2000), name="big")),
        lambda: inv.domains.append(domain(9)),
    ]
    counts = set()
    for step in steps:
        step()
        cached = render_relay(relay(), copy.deepcopy(inv), cache)
        counts.add(len(shard_files(cached)))
        fresh = render_relay(relay(), copy.deepcopy(inv))
        assert cached.files == fresh.files
        assert cached.recipients == fresh.recipients
        assert cached.domains == fresh.domains
        assert cached.recipient_lists == fresh.recipient_lists
    assert len(counts) > 1


def test_the_cache_gzips_only_changed_shards(
    small_shards: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    compressed: list[int] = []
    real = gzip.compress

    def counting(data: bytes, *args: Any, **kwargs: Any) -> bytes:
        compressed.append(len(data))
        return real(data, *args, **kwargs)

    monkeypatch.setattr(shards.gzip, "compress", counting)
    cache = RenderCache()
    inv = inventory()
    first = render_relay(relay(), inv, cache)
    assert len(compressed) == len(shard_files(first)) > 1
    compressed.clear()
    render_relay(relay(), inv, cache)
    assert compressed == []
    inv.recipient_lists[1] = recipient_list(1, [*users(1, 300), "late@d1.example"], generation=2)
    render_relay(relay(), inv, cache)
    assert len(compressed) == 1


def test_lists_without_identity_are_not_cached(small_shards: None) -> None:
    """Offline manifests have no uid: a changed list must never hit a stale entry."""
    cache = RenderCache()
    inv = inventory()
    for rl in inv.recipient_lists:
        del rl["metadata"]["uid"]
    render_relay(relay(), inv, cache)
    inv.recipient_lists[0]["spec"]["addresses"].append("late@d0.example")
    assert render_relay(relay(), inv, cache).recipients == 1201


def kubelet_view(root: Path, version: str, files: dict[str, bytes]) -> None:
    """What the kubelet does with a projected volume: a new version folder,
    `..data` swapped to it, the visible names symlinks through `..data`."""
    (root / version).mkdir()
    for name, data in files.items():
        (root / version / name).write_bytes(data)
        if not (root / name).is_symlink():
            (root / name).symlink_to(Path("..data") / name)
    for link in root.iterdir():
        if link.is_symlink() and not link.name.startswith("..") and link.name not in files:
            link.unlink()
    (root / "..data_tmp").symlink_to(version)
    os.replace(root / "..data_tmp", root / "..data")


def shard_names(rendered: Rendered) -> list[str]:
    return sorted(n for n in rendered.files if n.startswith("recipients-"))


def mixed(index_of: Rendered, shards_of: Rendered) -> dict[str, bytes]:
    """The index (and relay.json) of one render next to the shards of another."""
    files = {n: b for n, b in index_of.files.items() if not n.startswith("recipients-")}
    return {**files, **{n: shards_of.files[n] for n in shard_names(shards_of)}}


@pytest.fixture
def two_counts(small_shards: None) -> tuple[Rendered, Rendered]:
    """1,200 addresses, then 3,200 (the shard count doubles at least once)."""
    before = render_relay(relay(), inventory())
    inv = inventory()
    inv.recipient_lists.append(recipient_list(0, users(0, 2000), name="more"))
    after = render_relay(relay(), inv)
    assert len(shard_names(after)) > len(shard_names(before)) > 1
    return before, after


def test_shard_names_carry_their_count(two_counts: tuple[Rendered, Rendered]) -> None:
    for rendered in two_counts:
        names = shard_names(rendered)
        assert json.loads(rendered.files[DOMAINS_FILE])["recipientFiles"] == names
        assert all(n.endswith(f"-of-{len(names):04d}.txt.gz") for n in names)
        assert shards.shard_set_problem(names) is None


@pytest.mark.parametrize("grows", [True, False])
def test_a_mixed_set_keeps_the_old_table(
    two_counts: tuple[Rendered, Rendered], tmp_path: Path, grows: bool
) -> None:
    """Old index with new shards, then new index with old shards: neither
    loads (the relay keeps what it has); the whole new set does."""
    old, new = two_counts if grows else reversed(two_counts)
    kubelet_view(tmp_path, "..v1", old.files)
    assert len(load_config(tmp_path).recipients) == old.recipients
    for version, files in (("..v2", mixed(old, new)), ("..v3", mixed(new, old))):
        kubelet_view(tmp_path, version, files)
        with pytest.raises(
            IncompleteShardSet, match=r"recipients-0000-of-\d{4}\.txt\.gz is missing"
        ):
            load_config(tmp_path)
    kubelet_view(tmp_path, "..v4", new.files)
    config = load_config(tmp_path)
    assert len(config.recipients) == new.recipients
    assert all(a in config.recipients for a in users(0, 2000 if grows else 300))
    assert ("user1999@d0.example" in config.recipients) is grows


def test_shards_of_one_count_from_two_renders_load(small_shards: None, tmp_path: Path) -> None:
    """Same count, one list changed: each shard holds exactly the addresses
    that hash to it, so a lookup sees the old or the new answer, never a mix."""
    before = render_relay(relay(), inventory())
    inv = inventory()
    inv.recipient_lists[1] = recipient_list(1, [*users(1, 300), "late@d1.example"], generation=2)
    after = render_relay(relay(), inv)
    assert shard_names(before) == shard_names(after)
    kubelet_view(tmp_path, "..v1", mixed(before, after))
    config = load_config(tmp_path)
    assert "late@d1.example" in config.recipients and "user299@d3.example" in config.recipients


def test_an_older_operators_shard_names_still_load(small_shards: None, tmp_path: Path) -> None:
    """recipients-NNNN.txt.gz, no count: what an operator before this one wrote."""
    rendered = render_relay(relay(), inventory())
    legacy = {n: f"recipients-{i:04d}.txt.gz" for i, n in enumerate(shard_names(rendered))}
    files = {legacy.get(n, n): b for n, b in rendered.files.items()}
    doc = json.loads(files[DOMAINS_FILE])
    doc["recipientFiles"] = sorted(legacy.values())
    files[DOMAINS_FILE] = json.dumps(doc).encode()
    kubelet_view(tmp_path, "..v1", files)
    assert len(load_config(tmp_path).recipients) == 1200


@pytest.mark.parametrize(
    "names,problem",
    [
        ([], None),
        (["recipients-0000-of-0001.txt.gz"], None),
        (["recipients-0000.txt.gz", "recipients-0001.txt.gz"], None),
        (["domains-0000-of-0002.json.gz", "domains-0001-of-0002.json.gz"], None),
        (["recipients-0000-of-0002.txt.gz", "recipients-0001-of-0004.txt.gz"], "several counts"),
        (["recipients-0000-of-0002.txt.gz"], "not 0 to 2-1"),
        (["recipients-0000-of-0002.txt.gz", "recipients-0000.txt.gz"], "several counts"),
        (["relay.json"], "not a shard's name"),
    ],
)
def test_shard_set_problem(names: list[str], problem: str | None) -> None:
    found = shards.shard_set_problem(names)
    assert (found is None) if problem is None else (found is not None and problem in found)


def test_a_version_swapped_away_while_loading_is_incomplete(
    small_shards: None, tmp_path: Path
) -> None:
    """A load reads the one version folder `..data` named when it began; if
    the kubelet swaps and removes it meanwhile, the load waits for the next."""
    kubelet_view(tmp_path, "..v1", render_relay(relay(), inventory()).files)
    shutil.rmtree(tmp_path / "..v1")
    with pytest.raises(IncompleteShardSet, match="swapped while loading"):
        load_config(tmp_path)


def test_a_starting_relay_waits_for_the_rest_of_the_set(
    two_counts: tuple[Rendered, Rendered], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pod that starts while the count moves loads once the set is whole;
    with nothing more to wait for, it fails as before."""
    old, new = two_counts
    kubelet_view(tmp_path, "..v1", mixed(new, old))
    monkeypatch.setattr(time, "sleep", lambda _: kubelet_view(tmp_path, "..v2", new.files))
    assert len(load_config_waiting(tmp_path, wait=3600).recipients) == new.recipients
    kubelet_view(tmp_path, "..v3", mixed(old, new))
    with pytest.raises(IncompleteShardSet):
        load_config_waiting(tmp_path, wait=0)
