"""Real milters from Debian for the tests: rspamd (its proxy worker in milter
mode) and OpenDKIM, each started with its own configuration in a temporary
folder, listening on 127.0.0.1, never as a system service, stopped at the end.

rspamd's configuration is local only: no DNS lists, no fuzzy storage, no
external lookups (its resolver points at 127.0.0.1:1, where nothing answers);
two multimap rules score a marker in the message (REJECT_MARKER: over the
reject threshold; SPAM_MARKER: over add_header, so it adds "X-Spam: Yes"),
and milter_headers adds X-Spamd-Result to every message.

OpenDKIM signs with a key the test makes (opendkim-genkey), or verifies with
the public key served by the test's DNS server (mrtest.dnsserver) through a
libunbound configuration that forwards every query there.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

from mrtest.peers import connectable
from mrtest.relayproc import free_port, wait_until

REJECT_MARKER = "MAILRELAY-REJECT-MARKER"
SPAM_MARKER = "MAILRELAY-SPAMMY-MARKER"


def have(binary: str) -> bool:
    return shutil.which(binary) is not None or Path("/usr/sbin", binary).exists()


@contextlib.contextmanager
def _running(argv: list[str], workdir: Path, port: int, what: str) -> Iterator[None]:
    """Runs argv in its own process group until the block ends."""
    log = (workdir / f"{what}.out").open("ab")
    proc = subprocess.Popen(
        argv, stdout=log, stderr=subprocess.STDOUT, cwd=workdir, start_new_session=True
    )
    log.close()
    try:
        wait_until(lambda: proc.poll() is not None or connectable("127.0.0.1", port), 60, what)
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited: {(workdir / f'{what}.out').read_text()}")
        yield
    finally:
        # The group is this process and its workers (rspamd forks them).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


RSPAMD_CONF = """\
lua = "$RULESDIR/rspamd.lua"
modules {{ path = "${{PLUGINSDIR}}"; }}
options {{
  pidfile = "{dir}/rspamd.pid";
  filters = "";
  explicit_modules = [];
  dns {{ nameserver = ["127.0.0.1:1"]; timeout = 1s; retransmits = 1; }}
  hs_cache_dir = "{dir}/db/";
  cache_file = "{dir}/db/symbols.cache";
  local_addrs = [];
  tempdir = "{dir}";
  url_tld = "{dir}/tld.dat";
}}
logging {{ type = "file"; filename = "{dir}/rspamd.log"; level = "info"; }}
actions {{ reject = 15; add_header = 6; }}
worker "rspamd_proxy" {{
  bind_socket = "127.0.0.1:{port}";
  milter = yes;
  upstream "local" {{ default = yes; self_scan = yes; }}
  timeout = 30s;
  count = 1;
  spam_header = "X-Spam";
  reject_message = "Spam message rejected";
}}
multimap {{
  MAILRELAY_REJECT {{ type = "content"; filter = "full"; map = "{dir}/reject.map";
                     regexp = true; score = 20.0; }}
  MAILRELAY_SPAM {{ type = "content"; filter = "full"; map = "{dir}/spam.map";
                   regexp = true; score = 7.0; }}
}}
milter_headers {{ use = ["x-spamd-result"]; skip_local = false; skip_authenticated = false; }}
"""


@contextlib.contextmanager
def rspamd(workdir: Path) -> Iterator[str]:
    """rspamd's milter proxy; yields its milter address."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "db").mkdir(exist_ok=True)
    # A short public-suffix list: the full one takes seconds to compile.
    (workdir / "tld.dat").write_text("com\nnet\norg\ntest\n")
    (workdir / "reject.map").write_text(f"/{REJECT_MARKER}/\n")
    (workdir / "spam.map").write_text(f"/{SPAM_MARKER}/\n")
    port = free_port()
    (workdir / "rspamd.conf").write_text(RSPAMD_CONF.format(dir=workdir, port=port))
    argv = ["rspamd", "-f", "-i", "-c", str(workdir / "rspamd.conf")]
    for var in ("DBDIR", "RUNDIR", "LOGDIR"):
        argv += ["--var", f"{var}={workdir}"]
    with _running(argv, workdir, port, "rspamd"):
        yield f"inet:127.0.0.1:{port}"


def dkim_key(workdir: Path, domain: str, selector: str) -> tuple[Path, str]:
    """(private key file, the TXT record's text for DNS) from opendkim-genkey."""
    workdir.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["opendkim-genkey", "-b", "1024", "-D", str(workdir), "-d", domain, "-s", selector],
        check=True,
    )
    record = (workdir / f"{selector}.txt").read_text()
    # "sel._domainkey IN TXT ( "v=DKIM1; h=sha256; k=rsa; " "p=..." )  ; comment"
    text = " ".join(record.split("(", 1)[1].split(")", 1)[0].split())
    return workdir / f"{selector}.private", text


@contextlib.contextmanager
def opendkim(workdir: Path, settings: dict[str, str]) -> Iterator[str]:
    """OpenDKIM in the foreground with these settings; yields its milter address."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = {
        "Socket": f"inet:{port}@127.0.0.1",
        "PidFile": str(workdir / "opendkim.pid"),
        "Background": "no",
        "Syslog": "no",
        "RequireSafeKeys": "no",
        "Canonicalization": "relaxed/relaxed",
        "AuthservID": "mx.example.net",
        **settings,
    }
    (workdir / "opendkim.conf").write_text("".join(f"{k} {v}\n" for k, v in conf.items()))
    argv = ["opendkim", "-f", "-x", str(workdir / "opendkim.conf")]
    with _running(argv, workdir, port, "opendkim"):
        yield f"inet:127.0.0.1:{port}"


def unbound_forwarding_to(workdir: Path, nameserver: str) -> Path:
    """A libunbound configuration that sends every query to the test's DNS server."""
    host, port = nameserver.rsplit(":", 1)
    path = workdir / "unbound.conf"
    path.write_text(
        'server:\n  do-not-query-localhost: no\n  module-config: "iterator"\n'
        f'forward-zone:\n  name: "."\n  forward-addr: {host}@{port}\n'
    )
    return path
