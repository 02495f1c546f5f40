"""bench/policy_vs_postfix.py's mailrelay side stays a valid MailRelay (the
benchmark is not run in CI; a schema change must not silently break it), and
it is the policy the benchmark claims: every check on, nothing skipped."""

from __future__ import annotations

from pathlib import Path

import yaml
from mrtest.benchscripts import load_bench, validate


class FakeSink:
    port = 2526


def test_manifests_validate_and_check_everything(tmp_path: Path) -> None:
    bench = load_bench("policy_vs_postfix")
    relay = bench.PolicyMailrelay(tmp_path / "mr", FakeSink(), 2, content_filter=True)
    text = relay._manifests()
    validate(text, tmp_path)

    spec = next(d for d in yaml.safe_load_all(text) if d["kind"] == "MailRelay")["spec"]
    assert spec["network"]["mynetworks"] == [bench.MYNETWORKS]
    assert bench.CLIENT_IP not in bench.MYNETWORKS
    assert spec["postscreen"]["greet"]["action"] == "enforce"
    assert len(spec["postscreen"]["dnsbl"]["sites"]) == 2
    assert len(spec["restrictions"]["rblClients"]) == 2
    assert spec["restrictions"]["spf"] == {"enabled": True, "skipAddresses": []}
    assert spec["contentFilters"]["rejectAttachmentExtensions"]
