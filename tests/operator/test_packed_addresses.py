"""A cached RecipientList's addresses, packed and compressed (cluster.PackedAddresses)."""

from __future__ import annotations

from mailrelay_operator.cluster import PackedAddresses, trim


def test_packed_addresses_iterate_as_listed() -> None:
    addresses = [f"User{i}@x.example" for i in range(1000)] + ["ünï@x.example"]
    packed = PackedAddresses.pack(addresses)
    assert isinstance(packed, PackedAddresses)
    assert len(packed) == len(addresses) and list(packed) == addresses
    assert len(packed._blob) < len("\n".join(addresses)) // 4  # compressed
    assert list(PackedAddresses.pack([])) == []


def test_what_cannot_be_packed_stays_as_it_is() -> None:
    assert PackedAddresses.pack(["a\nb@x.example"]) == ["a\nb@x.example"]
    assert PackedAddresses.pack([1, "a@x.example"]) == [1, "a@x.example"]


def test_trim_packs_a_recipient_lists_addresses() -> None:
    body = {
        "apiVersion": "mailrelay.io/v1alpha1",
        "kind": "RecipientList",
        "metadata": {"name": "staff", "namespace": "mail"},
        "spec": {"domainRef": {"name": "x"}, "addresses": ["a@x.example", "b@x.example"]},
    }
    addresses = trim(body)["spec"]["addresses"]
    assert isinstance(addresses, PackedAddresses) and list(addresses) == body["spec"]["addresses"]
