#!/usr/bin/env python3
"""mailrelay and Postfix side by side: smtp-source -> relay -> smtp-sink.

Both relays store and forward with fsync before 250, on loopback, each with
its own smtp-sink as next hop. Per system: a warm-up of 500 messages, then
5 interleaved runs of 5,000 x 5 KB over 20 sessions; medians reported.
End to end = from starting smtp-source until the sink counted every message.
CPU per message = CPU time of the relay's process tree over the run (not the
load generator nor the sink), divided by the messages it handled meanwhile:
the load's and the latency probe's. Memory = peak PSS summed over the relay's
processes, sampled every 50 ms. Then a memory run: 20 sessions each sending
one 25 MB message (target for mailrelay: peak <= 100 MB).

Latency (bench/latency.py): during each run a probe sends one message at a
time (default 20 a second) to a second relay domain, probe.example, whose next
hop is a sink in this process; it reports p50/p99 from the final "." to the
relay's 250 (accept), and from that 250 to the next hop having the message
(forward). --probe-rate 0 turns it off.

Content checks, as shipped (on by default; --no-content-filter turns both
off): mailrelay's attachment filter with its default extensions, and on the
Postfix side mime_header_checks with a regexp rejecting the same extensions.

Every run (warm-up and memory run too) starts the same way for both systems:
sync, then up to --settle seconds (default 5; 0 skips it) waiting for idle
cores, so that a run does not pay for the one before (its logs' writeback, its
tail of work). Each run records the host meanwhile (bench/hoststate.py, "host"
in results.json): steal, iowait, the CPU of everything else on the machine
("foreign_s": other helpers' work), a fixed reference work's CPU time (the
cores' speed), Dirty/Writeback, TIME-WAIT sockets, the queue folders' sizes and
the system's process count. --fresh starts both systems again in new folders
(queue, logs, sinks) before every round.

Postfix is configured as docs/benchmarks.md describes, in a scratch
folder (its own config, queue_directory and data_directory), started with
`postfix -c DIR start` and always stopped at the end. Needs root (Postfix
master and smtp-sink -u) and the Debian postfix package (hack/setup.sh).

    .venv/bin/python bench/relay_vs_postfix.py [--messages 5000] [--runs 5] [--workers N]

mailrelay runs with its default number of workers unless --workers is given.

Results: bench/results/<time>/results.json and summary.md (paste into README).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hoststate
from latency import PROBE_DOMAIN, Probe, median_of  # bench/ is not a package

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
HOST = "127.0.0.1"
SMTP_SOURCE = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
SMTP_SINK = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
POSTFIX = shutil.which("postfix") or "/usr/sbin/postfix"
CLK_TCK = os.sysconf("SC_CLK_TCK")
# mailrelay's default contentFilters.rejectAttachmentExtensions
REJECT_EXTENSIONS = ("bat", "com", "exe", "jar", "pif", "scr", "swf")
RUN_TIMEOUT = 300.0  # no single run may take longer than this


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.02)


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((HOST, port)) == 0


# -- process trees: CPU and memory --------------------------------------------------


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def process_tree(root: int) -> list[int]:
    tree = _children()
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += tree.get(pid, [])
    return out


def tree_cpu_seconds(root: int) -> float:
    """CPU used by the tree so far: live processes plus the children they reaped."""
    total = 0
    for pid in process_tree(root):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # utime, stime, cutime, cstime are fields 14-17 (1-based) of stat
        total += sum(int(x) for x in fields[11:15])
    return total / CLK_TCK


def tree_pss_mb(root: int) -> float:
    total_kb = 0
    for pid in process_tree(root):
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        m = re.search(r"^Pss:\s+(\d+) kB", text, re.M)
        if m:
            total_kb += int(m.group(1))
    return total_kb / 1024


class PeakMemory(hoststate.Sampler):
    """Samples a process tree's PSS in a thread; `peak` in MB."""

    interval = 0.05

    def __init__(self, root: Callable[[], int]) -> None:
        super().__init__()
        self.root = root
        self.peak = 0.0

    def sample(self) -> None:
        with contextlib.suppress(Exception):
            self.peak = max(self.peak, tree_pss_mb(self.root()))


# -- the next hop -------------------------------------------------------------------


class Sink:
    """Postfix's smtp-sink with -c: counts messages from its running counters."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.count = 0
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> Sink:
        self.proc = subprocess.Popen(
            [SMTP_SINK, "-u", "nobody", "-c", f"{HOST}:{self.port}", "1024"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        wait_until(lambda: listening(self.port), 10, "smtp-sink")
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        tail = b""
        while True:
            data = self.proc.stdout.read1(65536)  # type: ignore[attr-defined]
            if not data:
                return
            tail = (tail + data)[-200:]
            found = re.findall(rb"mesg=(\d+)", tail)
            if found:
                self.count = max(self.count, int(found[-1]))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc = None


# -- the systems under test ------------------------------------------------------------


MAIN_CF = """\
compatibility_level = 3.6
myhostname = relay.perf.test
mydestination = localhost
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
alias_maps =
local_recipient_maps =
relay_domains = example.com
relay_recipient_maps = inline:{{ @example.com=OK }}
transport_maps = inline:{{ example.com=smtp:[127.0.0.1]:{sink_port} }}
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
smtpd_peername_lookup = no
smtp_dns_support_level = disabled
message_size_limit = 25600000
default_transport = error:no outside delivery
queue_directory = {queue}
data_directory = {data}
maillog_file = {maillog}
maillog_file_prefixes = {workdir}
"""


class Postfix:
    name = "postfix"

    def __init__(
        self,
        workdir: Path,
        sink: Sink,
        content_filter: bool = False,
        probe_port: int = 0,
        milter: str = "",
    ) -> None:
        self.workdir = workdir
        self.sink = sink
        self.probe_port = probe_port  # the latency probe's next hop (0: no probe domain)
        self.port = free_port()
        self.etc = workdir / "etc"
        self.started = False
        self.content_filter = content_filter
        self.milter = milter  # "inet:host:port": smtpd_milters (bench/milter_vs_postfix.py)

    def _postfix(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [POSTFIX, "-c", str(self.etc), *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=check,
        )

    def start(self) -> Postfix:
        for folder in (self.etc, self.workdir / "spool", self.workdir / "data"):
            folder.mkdir(parents=True)
        import pwd

        owner = pwd.getpwnam("postfix")
        os.chown(self.workdir / "data", owner.pw_uid, owner.pw_gid)  # postfix writes there
        (self.etc / "main.cf").write_text(self._main_cf())
        (self.etc / "master.cf").write_text(self._master_cf())
        started = self._postfix("start", check=False)
        self.started = True
        if started.returncode != 0:
            maillog = self.workdir / "maillog"
            tail = maillog.read_text(errors="replace")[-2000:] if maillog.exists() else ""
            raise RuntimeError(f"postfix start failed:\n{tail}")
        wait_until(lambda: listening(self.port), 30, "postfix smtpd")
        return self

    def _main_cf(self) -> str:
        main_cf = MAIN_CF.format(
            sink_port=self.sink.port,
            queue=self.workdir / "spool",
            data=self.workdir / "data",
            maillog=self.workdir / "maillog",
            workdir=self.workdir,
        )
        if self.probe_port:
            probe = f"{PROBE_DOMAIN}=smtp:[{HOST}]:{self.probe_port}"
            main_cf = main_cf.replace(
                "relay_domains = example.com", f"relay_domains = example.com, {PROBE_DOMAIN}"
            )
            main_cf = main_cf.replace("@example.com=OK }", f"@example.com=OK @{PROBE_DOMAIN}=OK }}")
            main_cf = main_cf.replace(
                f"example.com=smtp:[127.0.0.1]:{self.sink.port} }}",
                f"example.com=smtp:[127.0.0.1]:{self.sink.port} {probe} }}",
            )
        if self.content_filter:
            # The same work as mailrelay's attachment filter, the Postfix way:
            # every MIME header of every part through a regexp (the seed's rule).
            checks = self.etc / "mime_header_checks"
            checks.write_text(
                f'/^Content-(Disposition|Type).*name\\s*=\\s*"?[^;]*\\.({"|".join(REJECT_EXTENSIONS)})"?'
                "\\s*(;|$)/\n    REJECT Attachment type not allowed\n"
            )
            main_cf += f"mime_header_checks = regexp:{checks}\n"
        if self.milter:
            main_cf += f"smtpd_milters = {self.milter}\nmilter_default_action = tempfail\n"
        return main_cf

    def _master_cf(self) -> str:
        """Debian's master.cf with chroot off and smtpd on our port."""
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from mrtest.postfix import master_cf

        return master_cf(f"{HOST}:{self.port}")

    def root_pid(self) -> int:
        for candidate in (
            self.workdir / "spool" / "pid" / "master.pid",
            self.workdir / "data" / "master.lock",
        ):
            with contextlib.suppress(OSError, ValueError):
                return int(candidate.read_text().split()[0])
        raise RuntimeError("postfix master pid not found")

    def stop(self) -> None:
        if not self.started:
            return
        self.started = False
        with contextlib.suppress(Exception):
            self._postfix("stop", check=False)
        with contextlib.suppress(Exception):
            pid = self.root_pid()
            for _ in range(100):
                os.kill(pid, 0)
                time.sleep(0.1)
            self._postfix("abort", check=False)
        with contextlib.suppress(Exception):  # anything left of this instance
            for pid in process_tree(self.root_pid()):
                os.kill(pid, signal.SIGKILL)


RELAY_YAML = """\
apiVersion: mailrelay.io/v1alpha1
kind: MailRelay
metadata: {{name: bench, namespace: default}}
spec:
  hostname: relay.perf.test
  network:
    mynetworks: [127.0.0.0/8]
  postscreen:
    greet: {{action: ignore, wait: 0s}}
    dnsbl: {{sites: []}}
  restrictions:
    rejectUnknownRecipientDomain: false
    rejectUnknownReverseClientHostname: false
    rblClients: []
    spf: {{enabled: false}}
  dns: {{nameservers: ["127.0.0.1:9"], timeout: 1s}}
{content_filter}
---
apiVersion: mailrelay.io/v1alpha1
kind: RelayDomain
metadata: {{name: example-com, namespace: default}}
spec:
  domain: example.com
  relayRef: {{name: bench}}
  nextHop: {{host: 127.0.0.1, port: {sink_port}, tls: none}}
  recipients: any
"""

PROBE_DOMAIN_YAML = """\
---
apiVersion: mailrelay.io/v1alpha1
kind: RelayDomain
metadata: {{name: probe, namespace: default}}
spec:
  domain: {domain}
  relayRef: {{name: bench}}
  nextHop: {{host: 127.0.0.1, port: {port}, tls: none}}
  recipients: any
"""


class Mailrelay:
    name = "mailrelay"

    def __init__(
        self,
        workdir: Path,
        sink: Sink,
        workers: int,
        content_filter: bool,
        probe_port: int = 0,
        milter: str = "",
    ) -> None:
        self.workdir = workdir
        self.sink = sink
        self.workers = workers  # 0: mailrelay's default
        self.content_filter = content_filter
        self.probe_port = probe_port
        self.milter = milter  # "inet:host:port": contentFilters.milters
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Mailrelay:
        self.workdir.mkdir(parents=True)
        manifests = self.workdir / "relay.yaml"
        manifests.write_text(self._manifests())
        argv = [*self._command(), "run", "-f", str(manifests)]
        argv += ["--listen", f"{HOST}:{self.port}", "--queue-dir", str(self.workdir / "queue")]
        argv += ["--config-dir", str(self.workdir / "config")]
        if self.workers:
            argv += ["--workers", str(self.workers)]
        log = (self.workdir / "relay.log").open("wb")
        self.proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir, start_new_session=True
        )
        log.close()

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"mailrelay exited: see {self.workdir / 'relay.log'}")
            text = (self.workdir / "relay.log").read_text(errors="replace")
            return text.count("ready: listening on") >= (self.workers or 1)

        wait_until(ready, 60, "mailrelay workers")
        return self

    def _command(self) -> list[str]:
        mailrelay = ROOT / ".venv" / "bin" / "mailrelay"
        return [str(mailrelay) if mailrelay.exists() else "mailrelay"]

    def _manifests(self) -> str:
        # The attachment filter is on by default (its default extensions are
        # REJECT_EXTENSIONS); --no-content-filter turns it off on both sides.
        content = (
            "" if self.content_filter else "  contentFilters: {rejectAttachmentExtensions: []}"
        )
        if self.milter:  # the same defaultAction as Postfix's milter_default_action
            milter = f'{{name: milter, address: "{self.milter}", defaultAction: tempfail}}'
            extensions = "" if self.content_filter else "rejectAttachmentExtensions: [], "
            content = f"  contentFilters: {{{extensions}milters: [{milter}]}}"
        manifests = RELAY_YAML.format(sink_port=self.sink.port, content_filter=content)
        if self.probe_port:
            manifests += PROBE_DOMAIN_YAML.format(domain=PROBE_DOMAIN, port=self.probe_port)
        return manifests

    def root_pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None


System = Postfix | Mailrelay


# -- one run ----------------------------------------------------------------------------


@dataclass
class Run:
    system: str
    messages: int
    size: int
    sessions: int
    accept_seconds: float = 0.0
    end_to_end_seconds: float = 0.0
    cpu_seconds: float = 0.0
    peak_mb: float = 0.0
    # Latency probe messages accepted within the CPU window: the relay's CPU
    # covers them too, so CPU per message counts them.
    probe_messages: int = 0
    latency: dict[str, float | int] = field(default_factory=dict)  # Latencies.summary()
    host: dict[str, Any] = field(default_factory=dict)  # hoststate.delta() over the run
    ok: bool = True
    error: str = ""

    @property
    def accept_rate(self) -> float:
        return self.messages / self.accept_seconds if self.accept_seconds else 0.0

    @property
    def end_to_end_rate(self) -> float:
        return self.messages / self.end_to_end_seconds if self.end_to_end_seconds else 0.0

    @property
    def cpu_ms_per_message(self) -> float:
        handled = self.messages + self.probe_messages
        return 1000 * self.cpu_seconds / handled if handled else 0.0

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(
            accept_rate=round(self.accept_rate, 1),
            end_to_end_rate=round(self.end_to_end_rate, 1),
            cpu_ms_per_message=round(self.cpu_ms_per_message, 3),
            cores=round(self.cpu_seconds / self.end_to_end_seconds, 2)
            if self.end_to_end_seconds
            else 0.0,
        )
        return d


def load(
    system: System, messages: int, size: int, sessions: int, probe: Probe | None = None
) -> Run:
    run = Run(system.name, messages, size, sessions)
    argv = [SMTP_SOURCE, "-4", "-f", "sender@source.test", "-M", "client.test"]
    argv += ["-t", "rcpt@example.com", "-l", str(size), "-m", str(messages), "-s", str(sessions)]
    argv += [f"{HOST}:{system.port}"]
    drive(system, run, argv, system.sink.count + messages, probe)
    return run


def drive(
    system: System, run: Run, argv: list[str], target: int, probe: Probe | None = None
) -> None:
    """Runs smtp-source (argv) against the system until its sink counts `target`
    messages; fills in run's timings, CPU (the system's process tree) and peak memory,
    and with a probe the latencies measured meanwhile."""
    sink = system.sink
    root = system.root_pid()
    settled = hoststate.settle()
    reference_ms = hoststate.reference_ms()
    host0 = hoststate.snapshot(system.workdir)
    processes = len(process_tree(root))
    cpu0 = tree_cpu_seconds(root)
    ours0 = bench_cpu_seconds(root)
    if probe is not None:
        probe.begin(system.port)
    t0 = time.monotonic()
    try:
        with PeakMemory(system.root_pid) as mem, hoststate.ReferenceDuring() as reference:
            source = subprocess.run(argv, capture_output=True, text=True, timeout=RUN_TIMEOUT)
            run.accept_seconds = time.monotonic() - t0
            if source.returncode != 0:
                raise RuntimeError(f"smtp-source failed: {source.stdout}{source.stderr}")
            wait_until(
                lambda: sink.count >= target, RUN_TIMEOUT, f"{run.messages} messages at the sink"
            )
            run.end_to_end_seconds = time.monotonic() - t0
            run.cpu_seconds = tree_cpu_seconds(root) - cpu0
            run.probe_messages = probe.accepted() if probe is not None else 0
            run.host = hoststate.delta(host0, hoststate.snapshot(system.workdir))
            run.host["reference_ms"] = reference_ms
            run.host["settle_s"] = settled
            run.host["processes"] = [processes, len(process_tree(root))]  # at start, at end
            run.host["reference_during_ms"] = reference.median_ms()
            # CPU of everything else on the machine meanwhile (other helpers' work)
            run.host["foreign_s"] = round(run.host["busy_s"] - (bench_cpu_seconds(root) - ours0), 2)
        run.peak_mb = mem.peak
    except (RuntimeError, TimeoutError, subprocess.TimeoutExpired) as e:
        run.ok = False
        run.error = str(e)[:500]
    finally:
        if probe is not None:
            run.latency = probe.end().summary()


def bench_cpu_seconds(root: int) -> float:
    """CPU of this benchmark's processes: this one and its children (sinks,
    mailrelay, smtp-source once reaped) and the system under test's tree."""
    ours = process_tree(os.getpid())
    return tree_cpu_seconds(os.getpid()) + (0.0 if root in ours else tree_cpu_seconds(root))


def commit_measured() -> str:
    """The commit under test, with "+dirty" when the work tree has changes."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()

    return git("rev-parse", "--short", "HEAD") + (
        "+dirty" if git("status", "--porcelain", "-uno") else ""
    )


def median(runs: list[Run], attr: str) -> float:
    values = [getattr(r, attr) for r in runs if r.ok]
    return statistics.median(values) if values else 0.0


def report(results: dict[str, Any]) -> str:
    runs = {
        name: [Run(**{k: v for k, v in r.items() if k in Run.__dataclass_fields__}) for r in rs]
        for name, rs in results["runs"].items()
    }
    lines = [
        f"Benchmark {results['started']} on {results['machine']}: smtp-source -> relay -> "
        f"smtp-sink, {results['messages']} x {results['size']} B, {results['sessions']} sessions, "
        f"warm-up {results['warmup']}, {results['rounds']} interleaved runs, medians; "
        f"mailrelay with {results['workers'] or 'its default number of'} workers, "
        "attachment filter "
        f"{'on (Postfix: mime_header_checks)' if results.get('content_filter') else 'off'}; "
        "both fsync before 250.",
        "",
        "| system | accept msgs/s | end-to-end msgs/s | CPU per message | peak memory (PSS) |",
        "|---|---|---|---|---|",
    ]
    for name in ("postfix", "mailrelay"):
        rs = runs.get(name, [])
        if not rs:
            continue
        lines.append(
            f"| {name} | {median(rs, 'accept_rate'):.0f} | {median(rs, 'end_to_end_rate'):.0f} | "
            f"{median(rs, 'cpu_ms_per_message'):.2f} ms | "
            f"{max((r.peak_mb for r in rs), default=0):.0f} MB |"
        )
    latency = {name: [r.latency for r in rs if r.ok and r.latency] for name, rs in runs.items()}
    if any(latency.values()):
        lines += [
            "",
            f"Latency under that load (probe at {results.get('probe_rate')}/s, medians of "
            'the runs\' percentiles): accept = final "." to 250, forward = 250 to the '
            "next hop's 250.",
            "",
            "| system | accept p50 | accept p99 | forward p50 | forward p99 |",
            "|---|---|---|---|---|",
        ]
        for name in ("postfix", "mailrelay"):
            if latency.get(name):
                lines.append(
                    f"| {name} | "
                    + " | ".join(
                        f"{median_of(latency[name], key):.1f} ms"
                        for key in (
                            "accept_p50_ms",
                            "accept_p99_ms",
                            "forward_p50_ms",
                            "forward_p99_ms",
                        )
                    )
                    + " |"
                )
    pf = median(runs.get("postfix", []), "end_to_end_rate")
    mr = median(runs.get("mailrelay", []), "end_to_end_rate")
    if pf and mr:
        lines += ["", f"End-to-end ratio mailrelay / Postfix: **{mr / pf:.2f}x** (target >= 2.0x)."]
    for name, mem in results.get("memory", {}).items():
        lines.append(
            f"Memory run ({name}): {mem['messages']} sessions x "
            f"{mem['size'] // 1_000_000} MB at once: peak {mem['peak_mb']:.0f} MB PSS"
            + (", ok." if mem["ok"] else f", FAILED: {mem['error']}")
        )
    failed = [r for rs in runs.values() for r in rs if not r.ok]
    for r in failed:
        lines.append(f"FAILED run of {r.system}: {r.error}")
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def systems(
    workdir: Path,
    workers: int,
    which: list[str],
    content_filter: bool,
    probe_port: int = 0,
    milter: str = "",
) -> Iterator[list[System]]:
    started: list[Any] = []
    try:
        out: list[System] = []
        for name in which:
            sink = Sink(workdir).start()
            started.append(sink)
            system: System
            if name == "postfix":
                system = Postfix(workdir / "postfix", sink, content_filter, probe_port, milter)
            else:
                system = Mailrelay(
                    workdir / "mailrelay", sink, workers, content_filter, probe_port, milter
                )
            started.append(system)
            system.start()
            out.append(system)
        yield out
    finally:
        for thing in reversed(started):
            with contextlib.suppress(Exception):
                thing.stop()


def load_options(p: argparse.ArgumentParser, *, messages: int, warmup: int) -> None:
    """The load's options (messages of a size over sessions, warm-up, interleaved
    runs) and mailrelay's workers, shared by the benchmarks built on this one."""
    p.add_argument("--messages", type=int, default=messages)
    p.add_argument("--size", type=int, default=5120)
    p.add_argument("--sessions", type=int, default=20)
    p.add_argument("--warmup", type=int, default=warmup)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--workers", type=int, default=0, help="mailrelay's workers (default: its own)")
    hoststate.add_settle_option(p)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    load_options(p, messages=5000, warmup=500)
    p.add_argument("--probe-rate", type=float, default=20.0, help="latency probes/s (0: none)")
    p.add_argument("--only", choices=["postfix", "mailrelay"], action="append")
    p.add_argument("--memory-size", type=int, default=25_000_000, help="0 skips the memory run")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder")
    p.add_argument(
        "--fresh",
        action="store_true",
        help="start both systems again in new folders before every round (each with its warm-up)",
    )
    p.add_argument(
        "--content-filter",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="mailrelay's attachment filter (its default) and Postfix's mime_header_checks "
        "rejecting the same extensions (default: on)",
    )
    args = p.parse_args(argv)
    hoststate.SETTLE_SECONDS = args.settle
    if os.geteuid() != 0:
        print("relay_vs_postfix: needs root (postfix master, smtp-sink -u)", file=sys.stderr)
        return 2
    which = args.only or ["postfix", "mailrelay"]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = RESULTS / stamp
    out_dir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="mailrelay-bench-"))
    workdir.chmod(0o755)  # Postfix's daemons run as the postfix user
    results: dict[str, Any] = {
        "started": stamp,
        "machine": f"{os.cpu_count()} cores, {os.uname().release}",
        "messages": args.messages,
        "size": args.size,
        "sessions": args.sessions,
        "warmup": args.warmup,
        "rounds": args.runs,
        "workers": args.workers,
        "content_filter": args.content_filter,
        "probe_rate": args.probe_rate,
        "settle": args.settle,
        "fresh": args.fresh,
        "commit": commit_measured(),
        "load_average_start": os.getloadavg(),
        "runs": {name: [] for name in which},
        "memory": {},
    }
    probe = Probe(args.probe_rate) if args.probe_rate > 0 else None
    probe_port = probe.start_sink() if probe is not None else 0
    try:
        measure(args, which, workdir, probe, probe_port, results)
    finally:
        if probe is not None:
            probe.close()
        finish(results, report, out_dir, workdir, keep=args.keep)
    return 0


def measure(
    args: argparse.Namespace,
    which: list[str],
    workdir: Path,
    probe: Probe | None,
    probe_port: int,
    results: dict[str, Any],
) -> None:
    """The warm-up, the interleaved runs and the memory run. With --fresh, every
    round starts both systems again in new folders (queue, logs, sinks), each
    with its warm-up, and stops them after; without, one start serves all runs."""
    rounds = [[i] for i in range(args.runs)] if args.fresh else [list(range(args.runs))]
    for n, indexes in enumerate(rounds):
        last = n == len(rounds) - 1
        folder = workdir / f"round-{n + 1}" if args.fresh else workdir
        with systems(folder, args.workers, which, args.content_filter, probe_port) as running:
            for system in running:
                print(f"warm-up {system.name}: {args.warmup} messages", flush=True)
                load(system, args.warmup, args.size, args.sessions)
            for i in indexes:
                order = running if i % 2 == 0 else list(reversed(running))
                for system in order:
                    run = load(system, args.messages, args.size, args.sessions, probe)
                    results["runs"][system.name].append(run.summary())
                    print(
                        f"run {i + 1} {system.name}: accept {run.accept_rate:.0f}/s, "
                        f"end-to-end {run.end_to_end_rate:.0f}/s, "
                        f"{run.cpu_ms_per_message:.2f} ms CPU/msg, peak {run.peak_mb:.0f} MB "
                        + hoststate.brief(run.host)
                        + ("" if run.ok else f" FAILED: {run.error}"),
                        flush=True,
                    )
            if args.memory_size and last:
                for system in running:
                    run = load(system, args.sessions, args.memory_size, args.sessions)
                    results["memory"][system.name] = run.summary()
                    print(
                        f"memory {system.name}: {args.sessions} x {args.memory_size} B: "
                        f"peak {run.peak_mb:.0f} MB" + ("" if run.ok else f" FAILED: {run.error}"),
                        flush=True,
                    )


def finish(
    results: dict[str, Any],
    report: Callable[[dict[str, Any]], str],
    out_dir: Path,
    workdir: Path,
    *,
    keep: bool = False,
) -> None:
    """The end of a benchmark, pass or fail: the load average, results.json and
    summary.md in out_dir (printed too), the scratch folder removed unless kept."""
    results["load_average_end"] = os.getloadavg()
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    summary = report(results)
    (out_dir / "summary.md").write_text(summary)
    print()
    print(summary)
    print(f"results: {out_dir}")
    if keep:
        print(f"scratch folder kept: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
