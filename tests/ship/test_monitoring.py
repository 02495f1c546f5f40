"""Monitoring that tells the truth: every metric a panel of the Grafana
dashboard or an alert of the PrometheusRule reads is produced by a real relay
and read back from its /metrics.

One `mailrelay run` with two workers (so /metrics is the workers' sum, as in
a pod), the test DNS server, a next hop offering STARTTLS, and real clients
(swaks) on 127.0.0.x; the events: mail delivered, bounced (a DSN back to a
relay domain), deferred then expired (a DSN that expires too: dropped), held,
refused (DNSBL, unknown recipient), a DNSBL answering error codes, SPF, TLS in
and out, a configuration whose shards are not all there (scraped then), one
refused, then one loaded. A second relay runs the
content checks: greylisting, DKIM and DMARC, a milter. Then every selector of
every expression (label matchers included) must match a sample of one scrape
or the other.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import smtplib
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from mrtest.authmail import dkim_sign, make_key, message
from mrtest.dnsserver import DnsServer
from mrtest.peers import AiosmtpdSink, swaks
from mrtest.relayproc import (
    RelayProcess,
    make_certificate,
    next_loopback,
    wait_until,
    write_manifests,
)
from mrtest.spamzones import RECORDS
from mrtest.testmilter import ScriptedMilter
from prometheus_client.parser import text_string_to_metric_families
from ship.tools import CHART, by_kind, render_chart

from relay.process.tlsreload import build_context

EVERYTHING_ON = (
    "--set", "metrics.serviceMonitor.enabled=true",
    "--set", "metrics.prometheusRule.enabled=true",
    "--set", "grafanaDashboard.enabled=true",
)  # fmt: skip
# What the alerts read that is not ours: kube-state-metrics and Prometheus itself.
EXTERNAL = {"kube_statefulset_status_replicas_ready", "kube_statefulset_replicas"}
EXTERNAL |= {"kube_statefulset_labels", "up"}
# Labels Prometheus adds to every series it scrapes (not the relay's).
TARGET_LABELS = {"namespace", "pod", "job", "instance"}

# A metric name, with its label matchers if any (names of functions, followed
# by "(", and the words below are not metrics).
SELECTOR = re.compile(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)(?![\w:])\s*(\{[^}]*\})?(?!\s*\()")
MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
KEYWORDS = {"and", "or", "unless", "offset", "bool"}


@dataclass(frozen=True)
class Selector:
    metric: str
    matchers: tuple[tuple[str, str, str], ...]  # (label, op, value)
    where: str

    def matches(self, labels: dict[str, str]) -> bool:
        for label, op, value in self.matchers:
            if label in TARGET_LABELS:
                continue
            have = labels.get(label, "")
            ok = {
                "=": have == value,
                "!=": have != value,
                "=~": re.fullmatch(value, have) is not None,
                "!~": re.fullmatch(value, have) is None,
            }[op]
            if not ok:
                return False
        return True


def selectors_in(expr: str, where: str) -> list[Selector]:
    """The series selectors of a PromQL expression."""
    found = []
    for name, braces in SELECTOR.findall(GROUPING.sub(" ", expr)):
        if name not in KEYWORDS:
            found.append(Selector(name, tuple(MATCHER.findall(braces)), where))
    return found


def chart_expressions() -> dict[str, str]:
    """Every PromQL expression of the chart: alert name or panel title -> expr."""
    docs = render_chart(*EVERYTHING_ON)
    (rule,) = by_kind(docs, "PrometheusRule")
    exprs = {
        f"alert {r['alert']}": str(r["expr"]) for g in rule["spec"]["groups"] for r in g["rules"]
    }
    (dash,) = [d for d in by_kind(docs, "ConfigMap") if "mailrelay.json" in d.get("data", {})]
    dashboard = json.loads(dash["data"]["mailrelay.json"])
    for panel in dashboard["panels"]:
        for t in panel["targets"]:
            exprs[f"panel {panel['title']!r} {t['refId']}"] = t["expr"]
    assert dashboard == json.loads((CHART / "files/dashboards/mailrelay.json").read_text())
    return exprs


def test_expressions_parse_into_known_selectors() -> None:
    """The parser finds the selectors it should (a check of the check)."""
    sels = selectors_in(
        'sum by (ns) (increase(mailrelay_dsn_total{result="dropped", reason=~"a|b"}[1h])) > 3',
        "x",
    )
    assert [(s.metric, s.matchers) for s in sels] == [
        ("mailrelay_dsn_total", (("result", "=", "dropped"), ("reason", "=~", "a|b")))
    ]
    everything = [s for w, e in chart_expressions().items() for s in selectors_in(e, w)]
    names = {s.metric for s in everything}
    assert "mailrelay_delivery_seconds_bucket" in names
    assert names - EXTERNAL, "no relay metric found: the parser is broken"
    unknown = {n for n in names if not n.startswith("mailrelay_")} - EXTERNAL
    assert not unknown, f"neither ours nor known external metrics: {unknown}"


# --- the relay and its events --------------------------------------------------------


Samples = list[tuple[str, dict[str, str], float]]


@dataclass
class Scenario:
    relay: RelayProcess
    sink: AiosmtpdSink
    manifests: Path
    while_incomplete: Samples  # a scrape while the newest shard set was not all there


def set_next_hop_tls(manifests: Path, domain: str, tls: str) -> None:
    path = manifests / "relay.yaml"
    docs = list(yaml.safe_load_all(path.read_text()))
    for d in docs:
        if d["kind"] == "RelayDomain" and d["spec"]["domain"] == domain:
            d["spec"]["nextHop"]["tls"] = tls
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))


def write_scenario_manifests(
    folder: Path,
    sink: AiosmtpdSink,
    nameserver: str,
    extra: list[str] = (),  # type: ignore[assignment]
) -> Path:
    down = ("127.0.0.1", 9)  # nothing listens there (discard)
    spec = {
        "postscreen": {
            "greet": {"action": "ignore", "wait": "1s"},  # the DNSBL answers' time
            "dnsbl": {
                "action": "enforce",
                "sites": [{"zone": "bl.test", "returnCodes": ["127.0.0.2"]}],
            },
        },
        "restrictions": {"spf": {"enabled": True, "skipAddresses": []}},
        "dns": {"nameservers": [nameserver], "timeout": "500ms"},
        "queue": {"lifetime": "6s", "minBackoff": "1s", "maxBackoff": "1s"},
        "bounces": {"lifetime": "3s"},
    }
    # Made beside the folder the relay watches, then moved in at once.
    staging = folder.parent / f".{folder.name}-staging"
    recipients = [f"{u}@example.com" for u in ("info", "alice", "bounce", *extra)]
    good = write_manifests(
        staging / "good", next_hop=sink.address, domains={"example.com": recipients}, spec=spec
    )
    set_next_hop_tls(good, "example.com", "encrypt")
    down_docs = write_manifests(
        staging / "down", next_hop=down, domains={"down.test": "any", "held.test": "any"}
    )
    docs = list(yaml.safe_load_all((down_docs / "relay.yaml").read_text()))
    text = (good / "relay.yaml").read_text() + "---\n"
    text += yaml.safe_dump_all([d for d in docs if d["kind"] != "MailRelay"], sort_keys=False)
    folder.mkdir(parents=True, exist_ok=True)
    (staging / "relay.yaml").write_text(text)
    (staging / "relay.yaml").replace(folder / "relay.yaml")
    return folder


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    workdir = tmp_path_factory.mktemp("monitoring")
    tls_dir = make_certificate(workdir / "tls")
    sink_tls = build_context(tls_dir)

    def rcpt_reply(address: str) -> str | None:
        return "550 5.1.1 no such user here" if address.startswith("bounce@") else None

    with (
        DnsServer(RECORDS) as dns,
        AiosmtpdSink(next_loopback(), rcpt_reply=rcpt_reply, tls_context=sink_tls) as sink,
    ):
        manifests = write_scenario_manifests(workdir / "manifests", sink, dns.nameserver)
        with RelayProcess(manifests, workdir, workers=2, tls_dir=tls_dir, metrics=True) as relay:
            while_incomplete = produce_events(relay, sink, manifests, dns.nameserver)
            yield Scenario(relay, sink, manifests, while_incomplete)


def queue_cli(relay: RelayProcess, *args: str) -> str:
    cmd = [sys.executable, "-m", "relay.process.cli", "queue", *args]
    cmd += ["--queue-dir", str(relay.queue_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def send(
    relay: RelayProcess,
    to: str,
    *,
    sender: str = "joe@pass.test",
    local: str = "127.0.0.20",
    helo: str = "helo-pass.test",
    tls: bool = False,
) -> int:
    """swaks from a client SPF passes (127.0.0.20, helo-pass.test, pass.test)."""
    r = swaks(relay.address, to=to, sender=sender, local=local, helo=helo, tls=tls)
    return r.returncode


def name_missing_shards(config_dir: Path) -> None:
    """What a pod sees when the operator has moved to two recipient shards and
    the kubelet has not brought them: an index naming files not there."""
    index = config_dir / "domains.json"
    doc = json.loads(index.read_text())
    doc["recipientFiles"] = [f"recipients-{i:04d}-of-0002.txt.gz" for i in range(2)]
    staged = config_dir.parent / ".domains.json"
    staged.write_text(json.dumps(doc))
    staged.replace(index)  # at once: a half-written file would be an error, not this


def produce_events(relay: RelayProcess, sink: AiosmtpdSink, manifests: Path, ns: str) -> Samples:
    """The events; returns a scrape taken while a shard set was incomplete."""
    # Held first (it must be held before its lifetime runs out): waits for a person.
    assert send(relay, "dave@held.test") == 0
    queue_cli(relay, "hold", "--domain", "held.test")
    # Delivered over TLS both ways, SPF pass for HELO and MAIL FROM.
    assert send(relay, "info@example.com", tls=True) == 0
    # Bounced by the next hop: the DSN goes back to alice@example.com, a relay domain.
    assert send(relay, "bounce@example.com", sender="alice@example.com") == 0
    # Deferred (next hop down), expired, its DSN deferred and expired too: dropped.
    assert send(relay, "carol@down.test", sender="bob@down.test") == 0
    # Refused: a client bl.test lists (postscreen), an unknown recipient.
    assert send(relay, "info@example.com", local="127.0.0.10") != 0
    assert send(relay, "nobody@example.com") != 0
    # bl.test answers 127.255.255.254 for this client: not obeyed, counted.
    send(relay, "info@example.com", local="127.0.0.12")
    relay.wait_for_log(r"DNSBL bl\.test not obeyed")
    # A configuration whose shards are not all there: both workers keep theirs
    # and say so (MailRelayConfigIncomplete, once it lasts).
    name_missing_shards(relay.config_dir)
    relay.wait_for_log("configuration not reloaded yet", count=2)
    wait_until(
        lambda: value_of(relay, "mailrelay_config_incomplete") == 1, 30, "the incomplete gauge"
    )
    while_incomplete = scrape(relay)
    # A configuration the workers refuse (both keep theirs), then a new good one.
    (relay.config_dir / "relay.json").write_text("{ not json")
    relay.wait_for_log("configuration not reloaded, keeping", count=2)
    write_scenario_manifests(manifests, sink, ns, extra=["new"])
    relay.wait_for_log("configuration reloaded", count=2)
    relay.wait_for_log(r"delivery status notification to <alice@example\.com> sent")
    relay.wait_for_log(r"delivery status notification to <bob@down\.test> dropped", timeout=60)
    queue_cli(relay, "flush")  # a scan now: the queue gauges
    # The flush only asks for the scan: wait until its figures are published.
    wait_until(
        lambda: value_of(relay, "mailrelay_queue_messages", state="hold") == 1,
        60,
        "the queue scan's gauges (the held message)",
    )
    return while_incomplete


# --- the second relay: greylisting, authentication, a milter --------------------------

GREYLIST_DELAY = 1.0


@contextlib.contextmanager
def milter_in_thread() -> Iterator[str]:
    """A scripted milter (continue to everything) on an event loop of its own;
    its address."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    milter = ScriptedMilter()
    try:
        yield asyncio.run_coroutine_threadsafe(milter.start(), loop).result(10)
    finally:
        asyncio.run_coroutine_threadsafe(milter.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def content_spec(nameserver: str, milter: str) -> dict[str, Any]:
    return {
        "restrictions": {"greylist": {"enabled": True, "delay": f"{GREYLIST_DELAY:g}s"}},
        "dns": {"nameservers": [nameserver], "timeout": "1s"},
        "contentFilters": {
            "authentication": {
                "dkim": {"enabled": True},
                "dmarc": {"enabled": True, "enforce": "none"},
            },
            "milters": [{"name": "scripted", "address": milter}],
        },
    }


def submit(relay: RelayProcess, msg: bytes, local: str) -> None:
    """One message from local, with the envelope of the greylisted triplet."""
    with smtplib.SMTP(*relay.address, source_address=(local, 0), timeout=60) as c:
        c.sendmail("alice@signer.test", ["info@example.com"], msg)


def produce_content_events(relay: RelayProcess, local: str, msg: bytes, unsigned: bytes) -> None:
    # Greylisted (new), then retried after the delay (passed); later ones: known.
    with pytest.raises(smtplib.SMTPRecipientsRefused):
        submit(relay, unsigned, local)
    time.sleep(GREYLIST_DELAY + 0.2)
    submit(relay, msg, local)  # dkim=pass, dmarc=pass; the milter sees it all
    submit(relay, unsigned, local)  # dkim=none, dmarc=fail (p=reject, enforce: none)


@pytest.fixture(scope="module")
def content(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProcess]:
    workdir = tmp_path_factory.mktemp("content")
    key = make_key(workdir / "keys", "signer")
    records = dict(RECORDS)
    records["sel._domainkey.signer.test"] = [("TXT", key.record)]
    records["_dmarc.signer.test"] = [("TXT", '"v=DMARC1; p=reject"')]
    msg = dkim_sign(message("alice@signer.test"), key, "signer.test")
    unsigned = message("alice@signer.test", "not signed\r\n")
    with DnsServer(records) as dns, milter_in_thread() as milter:
        manifests = write_manifests(
            workdir / "manifests",
            next_hop=("127.0.0.1", 9),  # nothing listens there: the mail waits
            domains={"example.com": "any"},
            spec=content_spec(dns.nameserver, milter),
        )
        with RelayProcess(manifests, workdir, workers=2, metrics=True) as relay:
            produce_content_events(relay, next_loopback(), msg, unsigned)
            yield relay


def scrape(relay: RelayProcess) -> Samples:
    text = urllib.request.urlopen(relay.metrics_url, timeout=10).read().decode()
    return [
        (s.name, dict(s.labels), s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


def test_every_panel_and_alert_reads_a_metric_the_relays_produced(
    scenario: Scenario, content: RelayProcess
) -> None:
    wanted = [
        s
        for where, expr in chart_expressions().items()
        for s in selectors_in(expr, where)
        if s.metric not in EXTERNAL
    ]

    def missing() -> list[str]:
        samples = scrape(scenario.relay) + scrape(content)
        return [
            f"{s.where}: {s.metric}{dict((m[0], m[2]) for m in s.matchers)}"
            for s in wanted
            if not any(
                name == s.metric and s.matches(labels) and (value > 0 or is_gauge(name))
                for name, labels, value in samples
            )
        ]

    try:
        wait_until(lambda: not missing(), 30, "every selector fed")
    except AssertionError:
        raise AssertionError("not produced:\n" + "\n".join(missing())) from None


def test_the_incomplete_shard_set_alert_reads_the_relay_waiting(scenario: Scenario) -> None:
    """While the newest shard set was not all there, every selector of
    MailRelayConfigIncomplete matched a non-zero sample: it fires once that
    lasts `for` (a gauge at 0 would pass the check above, never the alert)."""
    expr = chart_expressions()["alert MailRelayConfigIncomplete"]
    for s in selectors_in(expr, "MailRelayConfigIncomplete"):
        assert any(
            name == s.metric and s.matches(labels) and value > 0
            for name, labels, value in scenario.while_incomplete
        ), s


def is_gauge(name: str) -> bool:
    return not name.endswith(("_total", "_bucket", "_count", "_sum"))


def value_of(relay: RelayProcess, name: str, **labels: str) -> float:
    return sum(v for n, lab, v in scrape(relay) if n == name and labels.items() <= lab.items())


def test_units_and_labels(scenario: Scenario) -> None:
    relay = scenario.relay
    assert value_of(relay, "mailrelay_delivered_total", domain="example.com") >= 2
    assert value_of(relay, "mailrelay_bounced_total", domain="example.com") == 1
    assert value_of(relay, "mailrelay_deferred_total", domain="down.test") >= 1
    assert value_of(relay, "mailrelay_expired_total") >= 1
    assert value_of(relay, "mailrelay_dsn_total", result="sent", reason="relay_domain") == 1
    assert value_of(relay, "mailrelay_dsn_total", result="dropped", reason="expired") == 1
    assert value_of(relay, "mailrelay_delivery_seconds_count", domain="example.com") >= 2
    assert value_of(relay, "mailrelay_queue_messages", state="hold") == 1
    assert value_of(relay, "mailrelay_queue_bytes", state="hold") > 100
    assert value_of(relay, "mailrelay_dnsbl_hits_total", zone="bl.test") >= 1
    assert value_of(relay, "mailrelay_dnsbl_errors_total", zone="bl.test") >= 1
    assert value_of(relay, "mailrelay_spf_results_total", identity="mailfrom", result="pass") >= 1
    assert value_of(relay, "mailrelay_spf_results_total", identity="helo", result="pass") >= 1
    assert value_of(relay, "mailrelay_tls_sessions_total", direction="in", verified="no") == 1
    assert value_of(relay, "mailrelay_tls_sessions_total", direction="out", verified="no") >= 1
    assert value_of(relay, "mailrelay_config_reloads_total", result="error") == 2
    # (>= : the good render may be seen between its relay.json and domains.json)
    assert value_of(relay, "mailrelay_config_reloads_total", result="incomplete") >= 2
    assert value_of(relay, "mailrelay_config_incomplete") == 0  # a whole set loaded since
    # Held mail is not "waiting for a next hop": with only it left, the age is 0.
    assert value_of(relay, "mailrelay_queue_oldest_age_seconds") == 0
    # build_info: one series (the workers' max), the version installed.
    (info,) = [lab for n, lab, _ in scrape(relay) if n == "mailrelay_build_info"]
    assert info["version"] and info["python"].count(".") == 2
    # Every label value comes from a fixed set or the configuration.
    tls = {
        (lab["protocol"], lab["cipher"])
        for n, lab, _ in scrape(relay)
        if n.startswith("mailrelay_tls")
    }
    assert {p for p, _ in tls} <= {"TLSv1.2", "TLSv1.3"} and "other" not in {c for _, c in tls}
    domains = {lab.get("domain") for n, lab, _ in scrape(relay) if "domain" in lab}
    assert domains <= {"example.com", "down.test", "held.test", "other"}


def test_content_checks_counted(content: RelayProcess) -> None:
    def counted() -> bool:
        return value_of(content, "mailrelay_dmarc_policy_total", action="none") == 1

    wait_until(counted, 30, "the DMARC fail counted")
    assert value_of(content, "mailrelay_greylist_total", result="new") == 1
    assert value_of(content, "mailrelay_greylist_total", result="passed") == 1
    assert value_of(content, "mailrelay_greylist_total", result="known") == 1
    assert value_of(content, "mailrelay_authentication_results_total", method="dkim") == 2
    assert value_of(content, "mailrelay_authentication_results_total", result="pass") >= 2
    assert value_of(content, "mailrelay_authentication_results_total", method="dmarc") == 2
    assert value_of(content, "mailrelay_milter_verdicts_total", milter="scripted") > 0
    assert value_of(content, "mailrelay_milter_verdicts_total", verdict="error") == 0
    assert value_of(content, "mailrelay_milter_seconds_count", milter="scripted") > 0
