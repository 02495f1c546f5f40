"""What a cluster run leaves on the machine: hack/netfilter.sh removes the
nftables tables and chains the run added once they are empty (cluster-up.sh
records what was there, cluster-down.sh tidies), and hack/docker-down.sh stops
the Docker engine of hack/docker-up.sh and no other. Neither the real cluster
nor a real dockerd runs here: nft is a fake, or runs in a network namespace of
the test's own; dockerd is a sleeping process with its command line."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from ship.tools import REPO, run

NETFILTER = REPO / "hack" / "netfilter.sh"
DOCKER_DOWN = REPO / "hack" / "docker-down.sh"

MINE = """\
table inet mine {
\tchain keep {
\t}
}
"""
INPUT_CHAIN = """\
\tchain INPUT {
\t\ttype filter hook input priority filter; policy accept;
\t\tcounter packets 0 bytes 0 accept
\t}
"""
BEFORE = MINE + "table ip filter {\n" + INPUT_CHAIN + "}\n"
# After a run, kube-proxy --cleanup and cluster-down.sh's own rules gone.
AFTER = (
    MINE
    + "table ip filter {\n"
    + INPUT_CHAIN
    + """
\tchain FORWARD {
\t\ttype filter hook forward priority filter; policy accept;
\t}
}
table ip6 filter {
\tchain KUBE-X {
\t\tmeta mark 0x00004000 counter packets 0 bytes 0 comment "a { brace"
\t}

\tchain KUBE-EMPTY {
\t}
}
table ip nat {
\tchain PREROUTING {
\t\ttype nat hook prerouting priority dstnat; policy accept;
\t}

\tchain KUBE-SERVICES {
\t}
}
table ip6 nat {
\tchain POSTROUTING {
\t\ttype nat hook postrouting priority srcnat; policy drop;
\t}
}
table inet t {
\tset s {
\t\ttype ipv4_addr
\t}
}
"""
)
FAKE_NFT = """#!/bin/sh
if [ "$1 $2" = "list ruleset" ]; then cat "$FAKE_RULESET"; exit 0; fi
echo "$*" >>"$FAKE_LOG"
"""


def test_nft_tidy_removes_only_what_is_new_and_empty(tmp_path: Path) -> None:
    nft = tmp_path / "nft"
    nft.write_text(FAKE_NFT)
    nft.chmod(0o755)
    (tmp_path / "before.rules").write_text(BEFORE)
    (tmp_path / "after.rules").write_text(AFTER)
    log = tmp_path / "log"
    script = f"""
        . {NETFILTER}
        FAKE_RULESET={tmp_path}/before.rules nft_objects >{tmp_path}/before
        FAKE_RULESET={tmp_path}/after.rules nft_objects
        FAKE_RULESET={tmp_path}/after.rules nft_tidy {tmp_path}/before
        nft_tidy {tmp_path}/absent  # no record of before: nothing
    """
    env = {**os.environ, "NFT": str(nft), "FAKE_LOG": str(log)}
    result = run(["bash", "-c", script], env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "table inet mine - empty",
        "table ip filter - used",
        "table ip6 filter - used",
        "table ip nat - empty",
        "table ip6 nat - used",
        "table inet t - used",
        "chain inet mine keep empty",
        "chain ip filter INPUT used",
        "chain ip filter FORWARD empty",
        "chain ip6 filter KUBE-X used",  # its comment's brace opens no block
        "chain ip6 filter KUBE-EMPTY empty",
        "chain ip nat PREROUTING empty",
        "chain ip nat KUBE-SERVICES empty",
        "chain ip6 nat POSTROUTING used",  # policy drop
    ]
    # What was there before stays (inet mine, empty as it is); a rule, a drop
    # policy or a set keeps a new table, whose new empty chains go.
    assert log.read_text().splitlines() == [
        "delete table ip nat",
        "delete chain ip filter FORWARD",
        "delete chain ip6 filter KUBE-EMPTY",
    ]


def test_without_nft_nothing_is_listed_or_removed(tmp_path: Path) -> None:
    script = f". {NETFILTER}; nft_objects; nft_tidy {NETFILTER}"
    result = run(["bash", "-c", script], env={**os.environ, "NFT": "no-such-nft"})
    assert (result.returncode, result.stdout) == (0, "")


@pytest.mark.skipif(
    os.geteuid() != 0 or not (shutil.which("unshare") and shutil.which("iptables")),
    reason="a network namespace of its own needs root, unshare and iptables",
)
def test_a_run_of_kube_proxys_rules_leaves_the_tables_as_found() -> None:
    """The real nft and iptables, in a network namespace of the test's own: what
    kube-proxy and the kubelet make, then take away, leaves no table behind;
    one that was there before stays, empty or not."""
    script = f"""
        set -e
        . {NETFILTER}
        nft add table inet mine
        nft add chain inet mine keep
        before=$(mktemp)
        trap 'rm -f "$before"' EXIT
        nft_objects >"$before"
        iptables -t nat -N KUBE-SERVICES
        iptables -t nat -A PREROUTING -j KUBE-SERVICES
        iptables -t nat -A KUBE-SERVICES -d 10.214.0.1 -p tcp --dport 443 \\
          -m comment --comment "default/kubernetes {{https}}" \\
          -j DNAT --to-destination 10.213.0.1:6443
        iptables -I FORWARD -j ACCEPT
        ip6tables -t mangle -N KUBE-IPTABLES-HINT
        ip6tables -t nat -N KUBE-KUBELET-CANARY
        iptables -t nat -F; iptables -t nat -X
        iptables -D FORWARD -j ACCEPT
        ip6tables -t mangle -X KUBE-IPTABLES-HINT
        ip6tables -t nat -X KUBE-KUBELET-CANARY
        nft_tidy "$before"
        nft_tidy "$before"
        nft list ruleset 2>/dev/null
    """
    result = run(["unshare", "--net", "bash", "-c", script])
    assert result.returncode == 0, result.stderr
    assert result.stdout == "table inet mine {\n\tchain keep {\n\t}\n}\n"


def sleeper(*args: str) -> subprocess.Popen[bytes]:
    """A process whose command line ends with args (a dockerd, to docker-down.sh)."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", *args])


def docker_down(run_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MAILRELAY_DOCKER_RUN_DIR": str(run_dir)}
    return run(["bash", str(DOCKER_DOWN)], env=env)


def test_docker_down_stops_the_engine_docker_up_started_and_is_safe_twice(
    tmp_path: Path,
) -> None:
    dockerd = sleeper("--host", "unix:///x.sock", "--exec-root", str(tmp_path / "docker"))
    try:
        (tmp_path / "dockerd.pid").write_text(f"{dockerd.pid}\n")
        result = docker_down(tmp_path)
        assert result.returncode == 0, result.stderr
        assert dockerd.wait(timeout=30) != 0  # ended by SIGTERM
        assert not (tmp_path / "dockerd.pid").exists()
        again = docker_down(tmp_path)
        assert again.returncode == 0 and "no dockerd of hack/docker-up.sh runs" in again.stderr
    finally:
        dockerd.kill()
        dockerd.wait()


def test_docker_down_leaves_an_engine_it_did_not_start(tmp_path: Path) -> None:
    """The pid file names a process without our --exec-root (a user's engine, or
    the pid taken by another process): it keeps running."""
    other = sleeper("--exec-root", str(tmp_path / "docker-of-someone-else"))
    try:
        (tmp_path / "dockerd.pid").write_text(f"{other.pid}\n")
        result = docker_down(tmp_path)
        assert result.returncode == 0 and "no dockerd" in result.stderr
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()
