"""Schema, defaults, validation messages and rendering of the example manifests."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import yaml
from mrtest.objects import mailrelay_manifest, relay_domain

from mailrelay_api.load import YAML_LOADER, load_manifests
from mailrelay_api.render import render_relay
from mailrelay_api.validate import (
    FOREIGN_SHOWN,
    manifest_warnings,
    validate_object,
    with_defaults,
)

ROOT = Path(__file__).resolve().parents[1]


def relay(**spec: object) -> dict:
    return mailrelay_manifest(spec={"hostname": "mx1.example.net", **spec})


def test_bad_fields_are_named() -> None:
    errors = validate_object(relay(limits={"messageSize": "big"}, bogus=1, hostname="x"))
    text = "\n".join(map(str, errors))
    assert "spec.limits.messageSize: must be of type integer" in text
    assert "spec: unknown field" in text and "bogus" in text
    assert "spec.hostname" in text


def test_semantic_cidr_and_rule_checks() -> None:
    bad = relay(network={"mynetworks": ["300.1.2.3/8"]})
    assert any(e.field == "spec.network.mynetworks[0]" for e in validate_object(bad))
    sel = relay(allowedDomains={"namespaces": {"from": "Selector"}})
    assert any("selector is required" in e.message for e in validate_object(sel))


def test_crds_are_up_to_date() -> None:
    rc = subprocess.run([sys.executable, "-m", "mailrelay_api.crdgen", "--check"])
    assert rc.returncode == 0


def test_quickstart_renders() -> None:
    inv = load_manifests([ROOT / "examples" / "quickstart"])
    assert not inv.errors
    rendered = render_relay(inv.relays[0], inv)
    domains = json.loads(rendered.files["domains.json"])
    assert [d["domain"] for d in domains["domains"]] == ["example.com", "example.org"]
    shard = rendered.files[domains["recipientFiles"][0]]
    assert b"joe@example.com" in gzip.decompress(shard)
    policy = json.loads(rendered.files["relay.json"])["policy"]
    assert policy["queue"]["lifetime"] == "10d"  # defaults applied from the schema


def test_conflict_older_wins() -> None:
    inv = load_manifests([])
    r = with_defaults(relay())
    inv.relays.append(r)
    for name, ts in (("newer", "2026-02-01T00:00:00Z"), ("older", "2026-01-01T00:00:00Z")):
        inv.domains.append(
            relay_domain(name, domain="Example.COM", next_hop="h", creationTimestamp=ts)
        )
    verdicts = {v.name: v for v in render_relay(r, inv).domains}
    assert verdicts["older"].accepted
    assert not verdicts["newer"].accepted and verdicts["newer"].reason == "Conflict"


def test_operator_folder_never_shadows_stdlib() -> None:
    out = subprocess.run(
        [sys.executable, "-c", "import operator; print(operator.__file__)"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert str(ROOT / "operator") not in out


def write_lists(folder: Path, addresses: list[str], codes: list[str] | None = None) -> Path:
    """The quickstart with its own RecipientList (second document of lists.yaml)."""
    folder.mkdir()
    for f in (ROOT / "examples" / "quickstart").iterdir():
        if f.name != "example-com.yaml":
            (folder / f.name).write_text(f.read_text())
    rd, _ = (ROOT / "examples" / "quickstart" / "example-com.yaml").read_text().split("---")
    rl = {
        "apiVersion": "mailrelay.io/v1alpha1",
        "kind": "RecipientList",
        "metadata": {"name": "staff", "namespace": "default"},
        "spec": {"domainRef": {"name": "example-com"}, "addresses": addresses},
    }
    (folder / "lists.yaml").write_text(rd + "---\n" + json.dumps(rl))
    if codes is not None:
        mr = yaml.safe_load((folder / "mailrelay.yaml").read_text())
        site = {"zone": "bl.example.org", "returnCodes": codes}
        mr["spec"]["postscreen"]["dnsbl"] = {"sites": [site]}
        (folder / "mailrelay.yaml").write_text(yaml.safe_dump(mr))
    return folder


def warnings_of(folder: Path) -> list[str]:
    inv = load_manifests([folder])
    assert inv.errors == []
    return [str(w) for w in manifest_warnings(inv.relays, inv.domains, inv.recipient_lists)]


def test_addresses_outside_the_domain_are_warnings_with_file_document_and_field(
    tmp_path: Path,
) -> None:
    foreign = [f"u{i}@example.org" for i in range(7)]
    folder = write_lists(tmp_path / "m", ["joe@example.com", *foreign, "Ann@EXAMPLE.com"])
    lists = folder / "lists.yaml"
    assert warnings_of(folder) == [
        *(
            f"{lists}#2: RecipientList default/staff: spec.addresses[{i + 1}]: "
            f"'u{i}@example.org' is not in example.com: the relay ignores it"
            for i in range(FOREIGN_SHOWN)
        ),
        f"{lists}#2: RecipientList default/staff: spec.addresses: "
        "2 more address(es) not in example.com: the relay ignores them",
    ]
    # The render ignores exactly those, and the list's status says so.
    inv = load_manifests([folder])
    [verdict] = render_relay(inv.relays[0], inv).recipient_lists
    assert (verdict.reason, verdict.addresses) == ("ForeignAddresses", 2)
    assert verdict.message == "7 address(es) not in example.com ignored"


def test_a_recipient_list_over_1_mib_is_advised_to_split(tmp_path: Path) -> None:
    addresses = [f"user-{i:06d}@example.com" for i in range(50_000)]  # 1.2 MiB as JSON
    folder = write_lists(tmp_path / "m", addresses)
    [warning] = warnings_of(folder)
    assert warning.startswith(f"{folder / 'lists.yaml'}#2: RecipientList default/staff: ")
    assert "spec.addresses: 1.2 MiB of addresses, over 1 MiB" in warning
    assert "split it into several RecipientLists with the same domainRef" in warning
    # The operator writes the same advice into the list's Accepted condition.
    inv = load_manifests([folder])
    [verdict] = render_relay(inv.relays[0], inv).recipient_lists
    assert verdict.accepted and "1.2 MiB of addresses, over 1 MiB" in verdict.message
    small = write_lists(tmp_path / "small", addresses[:40_000])  # 0.9 MiB
    assert warnings_of(small) == []


def test_a_reply_filter_range_running_backwards_is_a_warning(tmp_path: Path) -> None:
    folder = write_lists(tmp_path / "m", ["joe@example.com"], ["127.0.0.2", "127.0.[4..3].2"])
    assert warnings_of(folder) == [
        f"{folder / 'mailrelay.yaml'}: MailRelay default/quickstart: "
        "spec.postscreen.dnsbl.sites[0].returnCodes[1]: '127.0.[4..3].2' has a range a..b "
        "with a > b: it matches nothing and the relay ignores this filter"
    ]


def test_port_and_return_code_ranges_are_errors() -> None:
    milter = {"name": "m", "address": "inet:127.0.0.1:65536"}
    errors = validate_object(with_defaults(relay(contentFilters={"milters": [milter]})))
    assert [(e.field, e.message) for e in errors] == [
        (
            "spec.contentFilters.milters[0].address",
            "'inet:127.0.0.1:65536': the port of an inet: address must be 1..65535",
        )
    ]
    ns = validate_object(with_defaults(relay(dns={"nameservers": ["192.0.2.1:0"]})))
    assert [e.field for e in ns] == ["spec.dns.nameservers[0]"]
    site = {"zone": "bl.example.org", "returnCodes": ["127.0.0.256"]}
    codes = validate_object(with_defaults(relay(postscreen={"dnsbl": {"sites": [site]}})))
    assert [e.field for e in codes] == ["spec.postscreen.dnsbl.sites[0].returnCodes[0]"]


def test_yaml_is_read_with_libyaml() -> None:
    # PyPI's PyYAML wheels carry libyaml (hack/setup.sh installs one): the C
    # loader reads a 200,000-address RecipientList about 10x faster.
    assert yaml.__with_libyaml__
    assert YAML_LOADER is yaml.CSafeLoader


def test_a_bad_address_among_many_is_named() -> None:
    rl = {
        "apiVersion": "mailrelay.io/v1alpha1",
        "kind": "RecipientList",
        "metadata": {"name": "staff", "namespace": "mail"},
        "spec": {
            "domainRef": {"name": "example-com"},
            "addresses": [f"u{i}@example.com" for i in range(1000)] + ["not an address"],
        },
    }
    [error] = validate_object(rl)
    assert error.field == "spec.addresses[1000]"
    assert "'not an address' is not valid: expected a plain address" in error.message
    rl["spec"]["addresses"] = ["a@example.com", 7]
    assert [e.field for e in validate_object(rl)] == ["spec.addresses[1]"]


def test_a_list_for_a_domain_that_is_not_listed_is_a_warning(tmp_path: Path) -> None:
    folder = write_lists(tmp_path / "m", ["joe@example.com", "ann@example.org"])
    lists = folder / "lists.yaml"
    lists.write_text(lists.read_text().replace("recipients: listed", "recipients: any"))
    note = (
        "RelayDomain example-com has recipients: any: the relay uses no RecipientList for it "
        "(only for recipients: listed)"
    )
    assert warnings_of(folder) == [
        f"{lists}#2: RecipientList default/staff: spec.addresses: {note}"
    ]
    inv = load_manifests([folder])
    [verdict] = render_relay(inv.relays[0], inv).recipient_lists
    assert (verdict.reason, verdict.message) == ("Accepted", note)
