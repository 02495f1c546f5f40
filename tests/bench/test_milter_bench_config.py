"""bench/milter_vs_postfix.py puts the same milter in front of both relays: the
mailrelay side stays a valid MailRelay with it in contentFilters.milters, the
Postfix side has it in smtpd_milters, both with tempfail as default action
(the benchmark is not run in CI; a schema change must not silently break it)."""

from __future__ import annotations

from pathlib import Path

import yaml
from mrtest.benchscripts import load_bench, validate

MILTER = "inet:127.0.0.1:11332"


class FakeSink:
    port = 2526


def test_both_sides_use_the_milter(tmp_path: Path) -> None:
    load_bench("milter_vs_postfix")  # imports, with its rspamd from the tests' helpers
    base = load_bench("relay_vs_postfix")
    relay = base.Mailrelay(tmp_path / "mr", FakeSink(), 2, False, milter=MILTER)
    text = relay._manifests()
    validate(text, tmp_path)
    spec = next(d for d in yaml.safe_load_all(text) if d["kind"] == "MailRelay")["spec"]
    assert spec["contentFilters"] == {
        "rejectAttachmentExtensions": [],
        "milters": [{"name": "milter", "address": MILTER, "defaultAction": "tempfail"}],
    }
    main_cf = base.Postfix(tmp_path / "pf", FakeSink(), milter=MILTER)._main_cf()
    assert f"smtpd_milters = {MILTER}\nmilter_default_action = tempfail\n" in main_cf
    assert "mime_header_checks" not in main_cf
