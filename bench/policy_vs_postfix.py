#!/usr/bin/env python3
"""The seed's full spam policy on both sides: Postfix + postscreen + policyd-spf
versus mailrelay, smtp-source -> relay -> smtp-sink, one local DNS server.

Both relays run the same checks against the same DNS server (the tests'
dnspython server, mrtest.dnsserver, serving the zones below on 127.0.0.1:53
in its own process, so its CPU is measured apart):
  - postscreen: two DNSBLs with weights (bl.bench.test=127.0.0.[2..11]*2,
    bl2.bench.test*1, threshold 2), greet action enforce with the 6 s wait,
    DNSBL action enforce. The warm-up puts the client in each side's
    postscreen cache, and the DNS TTLs (1 h) outlast the benchmark, so every
    measured connection is a cached pass (PASS OLD): the figures measure work,
    not the greet wait. The logs are checked: a PASS NEW during a measured run
    is reported.
  - RCPT restrictions in the seed order: reject_unauth_pipelining,
    reject_non_fqdn_recipient, reject_unknown_recipient_domain,
    permit_mynetworks (mynetworks does not hold the client), reject_unauth_destination,
    reject_unknown_reverse_client_hostname, reject_rbl_client x2, SPF (Postfix:
    check_policy_service with Debian's postfix-policyd-spf-python, spf-engine;
    mailrelay: its own SPF stage), both with skip_addresses emptied so the
    127.0.0.1 client is checked; the recipient must be listed.
  - content: Postfix mime_header_checks rejecting attachment extensions (the
    seed's regexp), mailrelay's attachment filter (--no-content-filter: neither).

The client is smtp-source on 127.0.0.1 (it cannot bind another source
address), which has a PTR record (client.bench.test, forward-confirmed), an
SPF pass for its HELO name, and sends from sender@source.bench.test (SPF pass)
to rcpt@example.com (MX record, listed recipient).

Postfix's DNS: Postfix and policyd-spf use the system resolver. They are
started in their own mount namespace (unshare --mount) in which
/etc/resolv.conf says `nameserver 127.0.0.1` and /etc/hosts is empty (so the
client's name comes from the PTR record, not from /etc/hosts' "localhost");
the rest of the machine is untouched. The DNS server therefore listens on
port 53. mailrelay is pointed at the same 127.0.0.1:53 via spec.dns.

Per system: warm-up (postscreen passes on every worker), a policy sanity
probe with swaks (SPF fail -> 550 5.7.23, unlisted recipient -> 550 5.1.1,
on both), then 5 interleaved runs of 5,000 x 5 KB over 20 sessions; medians.
CPU and memory of each relay's process tree (Postfix: master and all its
daemons, policyd-spf included); the DNS server's CPU and query count per
message reported apart. Needs root; installs postfix-policyd-spf-python with
apt-get if missing.

    .venv/bin/python bench/policy_vs_postfix.py [--messages 5000] [--runs 5]

Results: bench/results/<time>-policy/results.json and summary.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hoststate  # bench/ is not a package: found through sys.path
from relay_vs_postfix import (
    HOST,
    POSTFIX,
    ROOT,
    SMTP_SOURCE,
    Mailrelay,
    Postfix,
    Run,
    Sink,
    drive,
    free_port,
    tree_cpu_seconds,
    wait_until,
)

RESULTS = ROOT / "bench" / "results"
DNS_PORT = 53  # the system resolver (Postfix, policyd-spf) cannot use another port
DNS_TTL = 3600  # positive and negative: nothing expires during a benchmark
POLICYD_SPF = "/usr/bin/policyd-spf"
DNSMASQ = "/usr/sbin/dnsmasq"
SWAKS = shutil.which("swaks") or "/usr/bin/swaks"
APT_PACKAGES = {"postfix": POSTFIX, "postfix-policyd-spf-python": POLICYD_SPF}

CLIENT_IP = "127.0.0.1"
HELO = "client.bench.test"
SENDER = "sender@source.bench.test"
RECIPIENT = "rcpt@example.com"
MYNETWORKS = "127.0.0.2/32"  # trusted, and not the benchmark client
DNSBL_SITES = (("bl.bench.test", "127.0.0.[2..11]", 2), ("bl2.bench.test", "", 1))
DNSBL_THRESHOLD = 2
REJECT_EXTENSIONS = ("bat", "com", "exe", "jar", "pif", "scr", "swf")

# name -> [(type, rdata)], served by mrtest.dnsserver.DnsServer.answer.
ZONES: dict[str, list[tuple[str, str]]] = {
    # the client: PTR and the forward record Postfix verifies it with
    "1.0.0.127.in-addr.arpa": [("PTR", f"{HELO}.")],
    HELO: [("A", CLIENT_IP), ("TXT", '"v=spf1 ip4:127.0.0.1 -all"')],
    # the sender's domain: SPF pass for the client
    "source.bench.test": [("TXT", '"v=spf1 ip4:127.0.0.0/24 -all"'), ("MX", f"10 {HELO}.")],
    # for the sanity probe: SPF fail
    "spf-fail.bench.test": [("TXT", '"v=spf1 -all"')],
    # the recipient domain
    "example.com": [("MX", "10 mx.example.com.")],
    "mx.example.com": [("A", "127.0.0.1")],
    # the DNSBLs list their RFC 5782 test entry and other addresses, never the client
    "2.0.0.127.bl.bench.test": [("A", "127.0.0.2"), ("TXT", '"test entry"')],
    "10.0.0.127.bl.bench.test": [("A", "127.0.0.4"), ("TXT", '"listed"')],
    "2.0.0.127.bl2.bench.test": [("A", "127.0.0.2")],
    "13.0.0.127.bl2.bench.test": [("A", "127.0.0.3")],
}


# -- setup --------------------------------------------------------------------------


def ensure_packages(caching_resolver: bool) -> None:
    """Installs the Debian packages the Postfix side needs (only if missing)."""
    wanted = dict(APT_PACKAGES, **({"dnsmasq-base": DNSMASQ} if caching_resolver else {}))
    missing = [pkg for pkg, path in wanted.items() if not os.path.exists(path)]
    if not missing:
        return
    print(f"setup: apt-get install {' '.join(missing)}", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(
        ["debconf-set-selections"],
        input="postfix postfix/main_mailer_type select No configuration\n",
        text=True,
        check=True,
    )
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )


# -- the DNS server, in its own process -------------------------------------------------


def serve_dns(port: int, count_file: Path) -> None:
    """Serves ZONES on HOST:port (UDP, one thread; TCP, a thread per connection)
    until killed; writes the number of queries answered so far to count_file."""
    sys.path.insert(0, str(ROOT / "tests"))
    from mrtest import dnsserver

    dnsserver.NEGATIVE_TTL = DNS_TTL  # NXDOMAIN (unlisted client) cached as long
    server = dnsserver.DnsServer(ZONES, ttl=DNS_TTL)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind((HOST, port))
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind((HOST, port))
    tcp.listen(64)
    tally: Counter[str] = Counter()

    def count() -> None:
        while True:
            with server._lock:  # the server appends every query it sees; keep a tally
                tally.update(f"{name} {rdtype}" for name, rdtype in server.queries)
                server.queries.clear()
            tmp = count_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(tally))
            tmp.replace(count_file)
            time.sleep(0.2)

    def tcp_client(conn: socket.socket) -> None:
        with conn, conn.makefile("rwb") as f:
            while len(head := f.read(2)) == 2:
                reply = server.answer(f.read(int.from_bytes(head, "big")))
                if reply is None:
                    return
                f.write(len(reply).to_bytes(2, "big") + reply)
                f.flush()

    def tcp_loop() -> None:
        while True:
            conn, _ = tcp.accept()
            threading.Thread(target=tcp_client, args=(conn,), daemon=True).start()

    threading.Thread(target=count, daemon=True).start()
    threading.Thread(target=tcp_loop, daemon=True).start()
    print(f"dns: serving on {HOST}:{port}", flush=True)
    while True:
        data, addr = udp.recvfrom(65535)
        reply = server.answer(data)
        if reply is not None:
            udp.sendto(reply, addr)


class BenchDns:
    """The DNS server subprocess: start(), queries(), cpu_seconds(), stop().

    With `caching`, dnsmasq listens on 127.0.0.1:53 instead, caching by TTL in
    front of the dnspython server (on a free port): how a production Postfix
    would be set up (a local caching resolver), so each DNS round trip costs
    what it would there rather than a Python server's CPU."""

    def __init__(self, workdir: Path, caching: bool = False) -> None:
        self.caching = caching
        self.port = free_udp_tcp_port() if caching else DNS_PORT  # the dnspython server
        self.count_file = workdir / "dns-queries"
        self.log = workdir / "dns.log"
        self.workdir = workdir
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> BenchDns:
        argv = [sys.executable, __file__, "--serve-dns", str(self.port), str(self.count_file)]
        self._spawn(argv, self.log)
        self._wait_answering(self.port, "the DNS server")
        if self.caching:
            argv = [DNSMASQ, "--keep-in-foreground", "--no-resolv", "--no-hosts", "--no-poll"]
            argv += [f"--listen-address={HOST}", "--bind-interfaces", f"--port={DNS_PORT}"]
            argv += [f"--server={HOST}#{self.port}", "--cache-size=10000", "--pid-file="]
            argv += ["--cache-rr=TXT,MX"]  # dnsmasq caches only address-like types by default
            argv += [f"--log-facility={self.workdir / 'dnsmasq.log'}", "--user=nobody"]
            self._spawn(argv, self.workdir / "dnsmasq.out")
            self._wait_answering(DNS_PORT, "dnsmasq")
        return self

    def _spawn(self, argv: list[str], log_path: Path) -> None:
        with log_path.open("wb") as log:
            self.procs.append(
                subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            )

    def _wait_answering(self, port: int, what: str) -> None:
        sys.path.insert(0, str(ROOT / "tests"))
        from mrtest.dnsserver import query_once

        proc = self.procs[-1]

        def answers() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited: {self.workdir}")
            try:
                query_once(f"{HOST}:{port}", HELO, "A", timeout=0.5)
            except OSError:
                return False
            return self.count_file.exists()

        wait_until(answers, 20, what)

    def queries(self) -> Counter[str]:
        """Queries the dnspython server answered so far, by "name type"."""
        time.sleep(0.3)  # the tally is written every 0.2 s
        with contextlib.suppress(OSError, ValueError):
            return Counter(json.loads(self.count_file.read_text()))
        return Counter()

    def cpu_seconds(self) -> float:
        return sum(tree_cpu_seconds(p.pid) for p in self.procs)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        self.procs = []


def free_udp_tcp_port() -> int:
    """A port free for both UDP and TCP on HOST."""
    for _attempt in range(50):
        port = free_port()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.bind((HOST, port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port for the DNS server")


# -- Postfix with postscreen and policyd-spf -------------------------------------------


POLICY_MAIN_CF = """\
compatibility_level = 3.6
myhostname = relay.perf.test
mydestination = localhost
inet_interfaces = loopback-only
inet_protocols = ipv4
# trusted networks: NOT the benchmark client (127.0.0.1), which gets every check
mynetworks = {mynetworks}
alias_maps =
local_recipient_maps =
relay_domains = example.com
relay_recipient_maps = inline:{{ {recipient}=OK }}
transport_maps = inline:{{ example.com=smtp:[127.0.0.1]:{sink_port} }}
# the seed's policy
postscreen_access_list = permit_mynetworks
postscreen_dnsbl_sites = {dnsbl_sites}
postscreen_dnsbl_threshold = {dnsbl_threshold}
postscreen_dnsbl_action = enforce
postscreen_greet_action = enforce
smtpd_relay_restrictions =
smtpd_recipient_restrictions =
    reject_unauth_pipelining,
    reject_non_fqdn_recipient,
    reject_unknown_recipient_domain,
    permit_mynetworks,
    reject_unauth_destination,
    reject_unknown_reverse_client_hostname,
    reject_rbl_client bl.bench.test,
    reject_rbl_client bl2.bench.test,
    check_policy_service unix:private/policyd-spf
policyd-spf_time_limit = 3600
{content_checks}
smtp_dns_support_level = disabled
message_size_limit = 25600000
default_transport = error:no outside delivery
queue_directory = {queue}
data_directory = {data}
maillog_file = {maillog}
maillog_file_prefixes = {workdir}
"""

POLICYD_SPF_CONF = """\
debugLevel = 1
TestOnly = 1
HELO_reject = Fail
Mail_From_reject = Fail
PermError_reject = False
TempError_Defer = False
# The benchmark client is 127.0.0.1 and must be checked. An empty value
# crashes spf-engine 3.0.4 (_spfbypass returns None), so: one documentation
# address (RFC 5737) that never connects here.
skip_addresses = 192.0.2.1/32
"""


class PolicyPostfix(Postfix):
    """Postfix with postscreen, the seed's restrictions and policyd-spf, started
    in a mount namespace whose /etc/resolv.conf points at the bench DNS server."""

    def __init__(self, workdir: Path, sink: Sink, content_filter: bool) -> None:
        super().__init__(workdir, sink)
        self.content_filter = content_filter

    def _main_cf(self) -> str:
        sites = ", ".join(
            f"{zone}{'=' + codes if codes else ''}*{weight}" for zone, codes, weight in DNSBL_SITES
        )
        content = ""
        if self.content_filter:
            header_checks = self.etc / "mime_header_checks"
            exts = "|".join(REJECT_EXTENSIONS)
            # the seed's rule: a filename/name parameter ending in a rejected extension
            header_checks.write_text(
                f'/^Content-(Disposition|Type).*name\\s*=\\s*"?[^;]*\\.({exts})"?\\s*(;|$)/\n'
                "    REJECT Attachment type not allowed\n"
            )
            content = f"mime_header_checks = regexp:{header_checks}"
        return POLICY_MAIN_CF.format(
            mynetworks=MYNETWORKS,
            recipient=RECIPIENT,
            sink_port=self.sink.port,
            dnsbl_sites=sites,
            dnsbl_threshold=DNSBL_THRESHOLD,
            content_checks=content,
            queue=self.workdir / "spool",
            data=self.workdir / "data",
            maillog=self.workdir / "maillog",
            workdir=self.workdir,
        )

    def _master_cf(self) -> str:
        """Debian's master.cf, chroot off, postscreen on our port, smtpd behind it."""
        spf_conf = self.workdir / "policyd-spf.conf"
        spf_conf.write_text(POLICYD_SPF_CONF)
        lines = []
        for line in Path("/etc/postfix/master.cf").read_text().splitlines():
            fields = line.split()
            if line and not line[0].isspace() and not line.startswith("#") and len(fields) >= 8:
                fields[4] = "n"  # chroot off
                if fields[0] == "smtp" and fields[1] == "inet":
                    fields = [f"{HOST}:{self.port}", "inet", "n", "-", "n", "-", "1", "postscreen"]
                line = "  ".join(fields)
            lines.append(line)
        lines += [
            "smtpd  pass  -  -  n  -  -  smtpd",
            "dnsblog  unix  -  -  n  -  0  dnsblog",
            "tlsproxy  unix  -  -  n  -  0  tlsproxy",
            "policyd-spf  unix  -  n  n  -  0  spawn",
            f"  user=policyd-spf argv={POLICYD_SPF} {spf_conf}",
        ]
        return "\n".join(lines) + "\n"

    def _postfix(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        if args[:1] != ("start",):
            return super()._postfix(*args, check=check)
        # Its own view of /etc/resolv.conf and /etc/hosts; master and every
        # daemon it forks (and policyd-spf) inherit the namespace.
        resolv = self.workdir / "resolv.conf"
        resolv.write_text(f"nameserver {HOST}\noptions timeout:2 attempts:2\n")
        hosts = self.workdir / "hosts"
        hosts.write_text("# benchmark: no entries; the client's name comes from its PTR\n")
        script = (
            f"mount --bind {resolv} /etc/resolv.conf && mount --bind {hosts} /etc/hosts"
            f' && exec {POSTFIX} -c {self.etc} "$@"'
        )
        return subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=check,
        )

    def log_text(self) -> str:
        path = self.workdir / "maillog"
        return path.read_text(errors="replace") if path.exists() else ""


# -- mailrelay with the same policy -----------------------------------------------------


POLICY_RELAY_YAML = """\
apiVersion: mailrelay.io/v1alpha1
kind: MailRelay
metadata: {{name: bench, namespace: default}}
spec:
  hostname: relay.perf.test
  network:
    mynetworks: [{mynetworks}]
  postscreen:
    greet: {{action: enforce, wait: 6s}}
    dnsbl:
      action: enforce
      threshold: {dnsbl_threshold}
      sites:
{dnsbl_sites}
  restrictions:
    rejectUnauthPipelining: true
    rejectNonFqdnRecipient: true
    rejectUnknownRecipientDomain: true
    rejectUnknownReverseClientHostname: true
    rblClients:
      - {{zone: bl.bench.test}}
      - {{zone: bl2.bench.test}}
    spf: {{enabled: true, skipAddresses: []}}
  contentFilters: {{rejectAttachmentExtensions: [{extensions}]}}
  dns: {{nameservers: ["{host}:{dns_port}"], timeout: 5s}}
---
apiVersion: mailrelay.io/v1alpha1
kind: RelayDomain
metadata: {{name: example-com, namespace: default}}
spec:
  domain: example.com
  relayRef: {{name: bench}}
  nextHop: {{host: 127.0.0.1, port: {sink_port}, tls: none}}
  recipients: listed
---
apiVersion: mailrelay.io/v1alpha1
kind: RecipientList
metadata: {{name: example-com-rcpt, namespace: default}}
spec:
  domainRef: {{name: example-com}}
  addresses: [{recipient}]
"""


class PolicyMailrelay(Mailrelay):
    def __init__(
        self,
        workdir: Path,
        sink: Sink,
        workers: int,
        content_filter: bool,
        profile: Path | None = None,
    ) -> None:
        super().__init__(workdir, sink, 1 if profile else workers, content_filter)
        self.profile = profile  # cProfile output: one worker, in process

    def _command(self) -> list[str]:
        if self.profile is None:
            return super()._command()
        profile = ["-m", "cProfile", "-o", str(self.profile)]
        return [sys.executable, *profile, "-m", "relay.process.cli"]

    def _manifests(self) -> str:
        sites = "\n".join(
            f"        - {{zone: {zone}, weight: {weight}"
            + (f', returnCodes: ["{codes}"]' if codes else "")
            + "}"
            for zone, codes, weight in DNSBL_SITES
        )
        return POLICY_RELAY_YAML.format(
            mynetworks=MYNETWORKS,
            dnsbl_threshold=DNSBL_THRESHOLD,
            dnsbl_sites=sites,
            extensions=", ".join(REJECT_EXTENSIONS) if self.content_filter else "",
            host=HOST,
            dns_port=DNS_PORT,
            sink_port=self.sink.port,
            recipient=RECIPIENT,
        )

    def log_text(self) -> str:
        path = self.workdir / "relay.log"
        return path.read_text(errors="replace") if path.exists() else ""


PolicySystem = PolicyPostfix | PolicyMailrelay


# -- runs ---------------------------------------------------------------------------------


@dataclass
class PolicyRun(Run):
    dns_queries: int = 0
    dns_by_name: dict[str, int] = field(default_factory=dict)  # "name type" -> queries
    dns_cpu_seconds: float = 0.0
    pass_new: int = 0  # postscreen passes that waited for the greet timer: should be 0
    pass_old: int = 0  # cached passes
    load_average: float = 0.0  # 1-minute load average when the run started

    def summary(self) -> dict[str, Any]:
        d = super().summary()
        n = self.messages or 1
        d.update(
            dns_queries_per_message=round(self.dns_queries / n, 2),
            dns_cpu_ms_per_message=round(1000 * self.dns_cpu_seconds / n, 3),
        )
        return d


def screen_counts(system: PolicySystem) -> tuple[int, int]:
    """postscreen's PASS NEW and PASS OLD lines so far, once the log has settled
    (Postfix's postlogd writes a little after the fact)."""
    last = (-1, -1)
    for _ in range(20):
        text = system.log_text()
        now = (text.count("PASS NEW"), text.count("PASS OLD"))
        if now == last:
            break
        last = now
        time.sleep(0.25)
    return last


SENT: dict[str, int] = {}  # messages sent to each system so far (all are accepted)
BACKLOG_TIMEOUT = 120.0


def load(system: PolicySystem, dns: BenchDns, messages: int, size: int, sessions: int) -> PolicyRun:
    run = PolicyRun(system.name, messages, size, sessions, load_average=os.getloadavg()[0])
    sink = system.sink
    # Every message of the earlier runs must be in first, or they would count for this one.
    sent = SENT.get(system.name, 0)
    with contextlib.suppress(TimeoutError):
        wait_until(lambda: sink.count >= sent, BACKLOG_TIMEOUT, "earlier messages")
    backlog = sent - sink.count
    target = sent + messages
    SENT[system.name] = target
    new0, old0 = screen_counts(system)
    queries0, dns_cpu0 = dns.queries(), dns.cpu_seconds()
    argv = [SMTP_SOURCE, "-4", "-f", SENDER, "-M", HELO, "-t", RECIPIENT]
    argv += ["-l", str(size), "-m", str(messages), "-s", str(sessions), f"{HOST}:{system.port}"]
    drive(system, run, argv, target)
    if backlog > 0:
        run.ok = False
        run.error = f"{backlog} messages of earlier runs had not arrived at the start; {run.error}"
    run.dns_cpu_seconds = dns.cpu_seconds() - dns_cpu0
    by_name = dns.queries() - queries0
    run.dns_queries = by_name.total()
    run.dns_by_name = dict(by_name.most_common())
    new1, old1 = screen_counts(system)
    run.pass_new, run.pass_old = new1 - new0, old1 - old0
    return run


def warm_up(system: PolicySystem, dns: BenchDns, messages: int, sessions: int) -> PolicyRun:
    """Until every connection is a cached postscreen pass (the first ones wait
    the 6 s greet timer, per worker process), then the given messages."""
    for _attempt in range(5):
        run = load(system, dns, max(sessions * 4, 40), 1024, sessions)
        if run.ok and run.pass_new == 0 and run.pass_old > 0:
            break
    return load(system, dns, messages, 5120, sessions)


ATTACHMENT_PROBE = (
    "From: <{sender}>\r\nTo: <{rcpt}>\r\nSubject: probe\r\nMIME-Version: 1.0\r\n"
    'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
    "--b\r\nContent-Type: text/plain\r\n\r\nhello\r\n"
    "--b\r\nContent-Type: application/octet-stream\r\n"
    'Content-Disposition: attachment; filename="setup.exe"\r\n\r\nTVqQAAMAAAAEAAAA\r\n'
    "--b--\r\n"
)


def probe(system: PolicySystem, content_filter: bool) -> dict[str, str]:
    """The policy is live: SPF fail, an unlisted recipient (and an .exe
    attachment) are refused with their own replies."""
    out = {}
    cases = {
        "spf_fail": ("probe@spf-fail.bench.test", RECIPIENT, False),
        "unlisted_recipient": (SENDER, "nobody@example.com", False),
    }
    if content_filter:
        cases["exe_attachment"] = (SENDER, RECIPIENT, True)
    for name, (sender, rcpt, data) in cases.items():
        argv = [SWAKS, "--server", f"{HOST}:{system.port}", "--helo", HELO, "--timeout", "30"]
        argv += ["--from", sender, "--to", rcpt]
        if data:
            argv += ["--data", ATTACHMENT_PROBE.format(sender=sender, rcpt=rcpt)]
        else:
            argv += ["--quit-after", "RCPT"]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        replies = [ln[4:] for ln in done.stdout.splitlines() if ln.startswith("<** ")]
        out[name] = replies[-1] if replies else "(no error reply)"
    return out


def report(results: dict[str, Any]) -> str:
    fields = PolicyRun.__dataclass_fields__
    runs = {
        name: [PolicyRun(**{k: v for k, v in r.items() if k in fields}) for r in rs]
        for name, rs in results["runs"].items()
    }
    loads = [r.load_average for rs in runs.values() for r in rs]
    lines = [
        f"Policy benchmark {results['started']} (commit {results.get('commit', '?')}) on "
        f"{results['machine']}: smtp-source -> relay "
        f"-> smtp-sink, {results['messages']} x {results['size']} B, {results['sessions']} "
        f"sessions from {CLIENT_IP}, {results['rounds']} interleaved runs after warm-up, "
        f"medians; mailrelay with {results['workers'] or 'its default number of'} workers; "
        "the seed's full policy on "
        "both (postscreen DNSBL x2 + greet enforce as cached passes, RCPT restrictions with "
        "PTR, RBL x2, SPF; attachment checks "
        f"{'on' if results['content_filter'] else 'off'}); "
        + (
            "dnsmasq on 127.0.0.1:53 caching in front of the dnspython DNS server (DNS queries: "
            "those reaching the dnspython server; DNS CPU: both)"
            if results.get("caching_resolver")
            else "one dnspython DNS server on 127.0.0.1:53"
        )
        + f". Load average at run start: {min(loads, default=0):.1f}-"
        f"{max(loads, default=0):.1f}.",
        "",
        "| system | accept msgs/s | end-to-end msgs/s | CPU per message | cores used "
        "| peak memory (PSS) | DNS queries per message | DNS server CPU per message |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in ("postfix", "mailrelay"):
        rs = runs.get(name, [])
        if not rs:
            continue
        ok = [r for r in rs if r.ok]
        cores = median_of(
            [r.cpu_seconds / r.end_to_end_seconds for r in ok if r.end_to_end_seconds]
        )
        dns_q = median_of([r.dns_queries / r.messages for r in ok])
        dns_cpu = median_of([1000 * r.dns_cpu_seconds / r.messages for r in ok])
        lines.append(
            f"| {name} | {median(rs, 'accept_rate'):.0f} | {median(rs, 'end_to_end_rate'):.0f} "
            f"| {median(rs, 'cpu_ms_per_message'):.2f} ms | {cores:.2f} "
            f"| {max((r.peak_mb for r in rs), default=0):.0f} MB | {dns_q:.2f} "
            f"| {dns_cpu:.2f} ms |"
        )
    pf = median(runs.get("postfix", []), "end_to_end_rate")
    mr = median(runs.get("mailrelay", []), "end_to_end_rate")
    if pf and mr:
        ratio = f"End-to-end ratio mailrelay / Postfix: **{mr / pf:.2f}x**"
        lines += ["", f"{ratio} (target >= 3x, issue #14)."]
    for name, rs in runs.items():
        new = sum(r.pass_new for r in rs)
        old = sum(r.pass_old for r in rs)
        lines.append(
            f"postscreen {name}: {old} cached passes (PASS OLD), {new} greet waits (PASS NEW) "
            "in the measured runs."
        )
    for name, replies in results.get("probe", {}).items():
        shown = "; ".join(f"{case}: `{reply}`" for case, reply in replies.items())
        lines.append(f"Policy probe {name}: {shown}")
    for r in (r for rs in runs.values() for r in rs if not r.ok):
        lines.append(f"FAILED run of {r.system}: {r.error}")
    return "\n".join(lines) + "\n"


def median_of(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def median(runs: list[PolicyRun], attr: str) -> float:
    return median_of([getattr(r, attr) for r in runs if r.ok])


@contextlib.contextmanager
def systems(
    workdir: Path,
    workers: int,
    which: list[str],
    content_filter: bool,
    profile: Path | None = None,
    caching_resolver: bool = False,
) -> Iterator[tuple[BenchDns, list[PolicySystem]]]:
    started: list[Any] = []
    try:
        dns = BenchDns(workdir, caching_resolver)
        started.append(dns)
        dns.start()
        out: list[PolicySystem] = []
        for name in which:
            sink = Sink(workdir).start()
            started.append(sink)
            system: PolicySystem
            if name == "postfix":
                system = PolicyPostfix(workdir / "postfix", sink, content_filter)
            else:
                system = PolicyMailrelay(
                    workdir / "mailrelay", sink, workers, content_filter, profile
                )
            started.append(system)
            system.start()
            out.append(system)
        yield dns, out
    finally:
        for thing in reversed(started):
            with contextlib.suppress(Exception):
                thing.stop()


def profile_mailrelay(args: argparse.Namespace) -> int:
    """Where a mailrelay worker spends its time under the policy: warm-up, one
    run under cProfile, pstats to bench/results/<time>-policy-profile/profile.txt."""
    out_dir = RESULTS / f"{time.strftime('%Y%m%d-%H%M%S')}-policy-profile"
    out_dir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="mailrelay-policy-profile-"))
    stats = out_dir / "relay.prof"
    try:
        with systems(workdir, 1, ["mailrelay"], args.content_filter, stats) as (dns, running):
            system = running[0]
            warm_up(system, dns, args.warmup, args.sessions)
            run = load(system, dns, args.messages, args.size, args.sessions)
            print(f"profiled run: {run.summary()}", flush=True)
        import pstats

        with (out_dir / "profile.txt").open("w") as f:
            for order in ("tottime", "cumulative"):
                pstats.Stats(str(stats), stream=f).sort_stats(order).print_stats(45)
            # the policy's own code: the spam modules, pyspf, dnspython, the email parser
            policy = (
                r"relay/(screen|dnsbl|dnschecks|spf|policy|content|dns)\.py|/spf\.py|/dns/|/email/"
            )
            pstats.Stats(str(stats), stream=f).sort_stats("cumulative").print_stats(policy, 60)
        print(f"profile: {out_dir / 'profile.txt'}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def git_describe() -> str:
    """The commit measured, and whether the working tree differed from it."""
    head = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no", "relay"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return head + (" (relay/ modified)" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--messages", type=int, default=5000)
    p.add_argument("--size", type=int, default=5120)
    p.add_argument("--sessions", type=int, default=20)
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--workers", type=int, default=0, help="mailrelay's workers (default: its own)")
    p.add_argument("--only", choices=["postfix", "mailrelay"], action="append")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder")
    hoststate.add_settle_option(p)
    p.add_argument(
        "--no-content-filter",
        dest="content_filter",
        action="store_false",
        help="no attachment checks on either side",
    )
    p.add_argument(
        "--caching-resolver",
        action="store_true",
        help="dnsmasq on 127.0.0.1:53 caching in front of the dnspython server (both sides)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="profile mailrelay instead (one worker under cProfile, one run): profile.txt",
    )
    p.add_argument("--serve-dns", nargs=2, metavar=("PORT", "COUNT_FILE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    hoststate.SETTLE_SECONDS = args.settle
    if args.serve_dns:
        serve_dns(int(args.serve_dns[0]), Path(args.serve_dns[1]))
        return 0
    # SIGTERM unwinds like Ctrl-C, so Postfix, the DNS server and the sinks are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if os.geteuid() != 0:
        print("policy_vs_postfix: needs root (postfix, port 53, mount namespace)", file=sys.stderr)
        return 2
    ensure_packages(args.caching_resolver)
    if args.profile:
        return profile_mailrelay(args)
    which = args.only or ["postfix", "mailrelay"]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = RESULTS / f"{stamp}-policy"
    out_dir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="mailrelay-policy-bench-"))
    workdir.chmod(0o755)  # Postfix's daemons and policyd-spf run as their own users
    results: dict[str, Any] = {
        "started": stamp,
        "machine": f"{os.cpu_count()} cores, {os.uname().release}",
        "commit": git_describe(),
        "load_average_at_start": os.getloadavg(),
        "messages": args.messages,
        "size": args.size,
        "sessions": args.sessions,
        "warmup": args.warmup,
        "rounds": args.runs,
        "workers": args.workers,
        "content_filter": args.content_filter,
        "caching_resolver": args.caching_resolver,
        "runs": {name: [] for name in which},
        "warmups": {},
        "probe": {},
    }
    try:
        with systems(
            workdir, args.workers, which, args.content_filter, None, args.caching_resolver
        ) as (dns, running):
            for system in running:
                print(f"warm-up {system.name}", flush=True)
                warm = warm_up(system, dns, args.warmup, args.sessions)
                results["warmups"][system.name] = warm.summary()
                results["probe"][system.name] = probe(system, args.content_filter)
                print(f"  probe: {results['probe'][system.name]}", flush=True)
            for i in range(args.runs):
                order = running if i % 2 == 0 else list(reversed(running))
                for system in order:
                    run = load(system, dns, args.messages, args.size, args.sessions)
                    results["runs"][system.name].append(run.summary())
                    print(
                        f"run {i + 1} {system.name} (load {run.load_average:.1f}): "
                        f"accept {run.accept_rate:.0f}/s, end-to-end {run.end_to_end_rate:.0f}/s, "
                        f"{run.cpu_ms_per_message:.2f} ms CPU/msg, peak {run.peak_mb:.0f} MB, "
                        f"DNS {run.dns_queries / run.messages:.1f} q/msg, "
                        f"PASS NEW {run.pass_new} OLD {run.pass_old}"
                        + ("" if run.ok else f" FAILED: {run.error}"),
                        flush=True,
                    )
    finally:
        (out_dir / "results.json").write_text(json.dumps(results, indent=2))
        summary = report(results)
        (out_dir / "summary.md").write_text(summary)
        print()
        print(summary)
        print(f"results: {out_dir}")
        failed = any(not r["ok"] for rs in results["runs"].values() for r in rs)
        if args.keep or failed:  # a failed run's logs are worth reading
            print(f"scratch folder kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
