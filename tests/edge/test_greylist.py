"""Greylisting (restrictions.greylist, relay.smtpd.greylist) as postgrey does
it: a real relay with two worker processes, real SMTP sessions, the state on
the queue volume across a restart, a corrupt state file; the store's
decisions, expiry and bounds with a clock of our own."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import json
import os
import re
import signal
import stat
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from mrtest.dnsserver import DnsServer
from mrtest.peers import RawClient
from mrtest.relayproc import RelayProcess, wait_until, write_manifests
from mrtest.spamzones import RECORDS, SILENT

from relay.config import (
    ClientAccessEntry,
    Domain,
    GreylistPolicy,
    NextHop,
    RelayConfig,
    Restrictions,
    SpfPolicy,
)
from relay.smtpd.addresses import parse_path
from relay.smtpd.greylist import (
    BUCKETS,
    CLIENT_INTERVAL,
    GREYLIST_FOLDER,
    Greylist,
    Outcome,
    bucket_of,
    client_network,
    prune,
    sender_key,
    triplet_key,
)
from relay.smtpd.policy import Check, check_recipient, greylist
from relay.smtpd.session import ScreenResult, Session, Transaction

CLIENT = "127.0.0.20"  # clean in the test DNS
ALLOWLISTED = "127.0.0.14"  # in the allowlist allow.test (mrtest.spamzones)


def greylist_relay(
    tmp_path: Path, nameserver: str, *, metrics: bool = False, **greylist: Any
) -> RelayProcess:
    spec = {
        "restrictions": {"greylist": {"enabled": True, **greylist}},
        "postscreen": {
            "greet": {"action": "ignore", "wait": "1s"},
            "dnsbl": {
                "allowlistThreshold": -1,
                "sites": [
                    {"zone": "allow.test", "returnCodes": ["127.0.[0..255].1"], "weight": -2}
                ],
            },
        },
        "dns": {"nameservers": [nameserver], "timeout": "1s"},
    }
    manifests = write_manifests(
        tmp_path / "manifests", next_hop=("127.0.0.1", 9), domains={"example.com": "any"}, spec=spec
    )
    return RelayProcess(manifests, tmp_path / "relay", workers=2, metrics=metrics)


async def transaction(c: RawClient, sender: str, rcpt: str) -> str:
    """MAIL, RCPT, RSET on an open session; the RCPT reply."""
    assert (await c.command(f"MAIL FROM:<{sender}>")).startswith("250")
    reply = await c.command(f"RCPT TO:<{rcpt}>")
    assert (await c.command("RSET")).startswith("250")
    return reply


async def attempt(relay: RelayProcess, sender: str, rcpt: str, local: str = CLIENT) -> str:
    async with RawClient(*relay.address, local=local) as c:
        await c.greet()
        return await transaction(c, sender, rcpt)


def worker_of(relay: RelayProcess, pattern: str) -> str:
    """The pid of the worker that logged the last line matching pattern."""
    line = relay.wait_for_log(pattern)[-1]
    found = re.search(r" mailrelay[/\w]*\[(\d+)\]: ", line)  # mailrelay/smtpd[pid]:
    assert found is not None, line
    return found.group(1)


async def session_on_another_worker(
    relay: RelayProcess, stack: contextlib.AsyncExitStack, pid: str
) -> RawClient:
    """An open session served by a worker other than `pid` (SO_REUSEPORT picks
    the worker: a probe recipient of each session tells which one it is)."""
    for i in range(40):
        c = await stack.enter_async_context(RawClient(*relay.address, local=CLIENT))
        await c.greet()
        probe = f"probe{i}@example.com"
        assert (await transaction(c, "probe@sender.test", probe)).startswith("450 4.2.0")
        if worker_of(relay, re.escape(f"<{probe}>")) != pid:
            return c
    raise AssertionError("every session went to one worker")


def restart(relay: RelayProcess, name: str) -> None:
    """A log of its own for the next start (its "ready" lines are counted)."""
    relay.log_path = relay.workdir / f"relay-{name}.log"


GREYLISTED = "450 4.2.0 <bob@example.com>: Recipient address rejected: Greylisted, try again in"


async def test_two_workers_share_the_triplets_across_a_restart(tmp_path: Path) -> None:
    with DnsServer(RECORDS, silent=SILENT) as dns:
        relay = greylist_relay(tmp_path, dns.nameserver, metrics=True, delay="3s")
        with relay:
            # First attempt, and a retry before the delay: both deferred.
            async with RawClient(*relay.address, local=CLIENT) as c:  # one session: no wait
                await c.greet()
                first = await transaction(c, "alice@sender.test", "bob@example.com")
                assert first == f"{GREYLISTED} 3 seconds"
                early = await transaction(c, "alice@sender.test", "bob@example.com")
                assert early.startswith(GREYLISTED)
            first_worker = worker_of(relay, "<bob@example.com>: Recipient address rejected")
            # A client of a postscreen allowlist (DNSWL) is not greylisted.
            dnswl = await attempt(relay, "carol@sender.test", "bob@example.com", ALLOWLISTED)
            assert dnswl.startswith("250")
            # A triplet seen just before the restart.
            pending = await attempt(relay, "dave@sender.test", "bob@example.com")
            pending_since = time.monotonic()
            assert pending.startswith(GREYLISTED)
            await asyncio.sleep(3.2)
            # The retry after the delay, on the other worker, passes.
            async with contextlib.AsyncExitStack() as stack:
                other = await session_on_another_worker(relay, stack, first_worker)
                retry = await transaction(other, "alice@sender.test", "bob@example.com")
                assert retry.startswith("250 2.1.5")
            passed_by = worker_of(relay, r"greylist: pass after \d+s: .* from=<alice@sender.test>")
            assert passed_by != first_worker
            # Versions and numbers of a sender are one triplet (postgrey's substitutions).
            known = await attempt(relay, "Alice+list@Sender.TEST", "bob@example.com")
            assert known.startswith("250 2.1.5")

            def counted() -> bool:
                text = urllib.request.urlopen(relay.metrics_url, timeout=5).read().decode()
                return 'mailrelay_greylist_total{result="passed"} 1.0' in text

            wait_until(counted, 10, "the pass in /metrics")
            text = urllib.request.urlopen(relay.metrics_url, timeout=5).read().decode()
            assert 'mailrelay_greylist_total{result="allowlisted"} 1.0' in text
            assert 'mailrelay_rejected_total{reason="greylist"}' in text
            # The DNSWL client's triplet was never recorded: from elsewhere it is new.
            assert (await attempt(relay, "carol@sender.test", "bob@example.com")).startswith(
                GREYLISTED
            )
            assert relay.stop() == 0
        restart(relay, "second")
        with relay.start():
            await asyncio.sleep(max(0.0, pending_since + 3.2 - time.monotonic()))
            # Kept on the queue volume: no one is greylisted again.
            assert (await attempt(relay, "alice@sender.test", "bob@example.com")).startswith("250")
            assert (await attempt(relay, "dave@sender.test", "bob@example.com")).startswith("250")
            assert relay.stop() == 0
        state = relay.queue_dir / GREYLIST_FOLDER
        buckets = [p for p in state.iterdir() if not p.name.startswith(".")]
        assert 0 < len(buckets) <= BUCKETS
        for bucket in buckets:  # torn writes, a full disk, someone's editor
            bucket.write_bytes(bucket.read_bytes()[:20])
        restart(relay, "third")
        with relay.start():
            # Unreadable state starts empty (logged): greylisted once more, nothing worse.
            assert (await attempt(relay, "alice@sender.test", "bob@example.com")).startswith(
                GREYLISTED
            )
            relay.wait_for_log("greylist state .* unreadable, starting it empty")
            relay.stop(signal.SIGTERM)


async def test_passed_triplets_expire_after_ttl_and_unretried_ones_after_the_window(
    tmp_path: Path,
) -> None:
    with (
        DnsServer(RECORDS, silent=SILENT) as dns,
        greylist_relay(tmp_path, dns.nameserver, delay="1s", retryWindow="6s", ttl="2s") as relay,
    ):
        assert (await attempt(relay, "a@sender.test", "bob@example.com")).startswith(GREYLISTED)
        assert (await attempt(relay, "b@sender.test", "bob@example.com")).startswith(GREYLISTED)
        await asyncio.sleep(1.2)
        assert (await attempt(relay, "a@sender.test", "bob@example.com")).startswith("250")
        await asyncio.sleep(5.0)
        # a: passed over ttl ago; b: never retried within retryWindow. Both start over.
        assert (await attempt(relay, "a@sender.test", "bob@example.com")) == (
            f"{GREYLISTED} 1 seconds"
        )
        assert (await attempt(relay, "b@sender.test", "bob@example.com")) == (
            f"{GREYLISTED} 1 seconds"
        )


@pytest.mark.parametrize("passes", [2, 0])
async def test_a_client_network_that_passed_often_enough_is_allowlisted(
    tmp_path: Path, passes: int
) -> None:
    """postgrey --auto-whitelist-clients: after `passes` triplets of a client
    network retried after the delay, a brand-new triplet from another host of
    that /24 passes at once; with 0 it is greylisted like any other."""
    with (
        DnsServer(RECORDS, silent=SILENT) as dns,
        greylist_relay(
            tmp_path, dns.nameserver, metrics=True, delay="1s", autoAllowlistClients=passes
        ) as relay,
    ):
        senders = ["a@sender.test", "b@other.test"]
        for sender in senders:
            assert (await attempt(relay, sender, "bob@example.com")).startswith(GREYLISTED)
        await asyncio.sleep(1.2)
        for sender in senders:
            assert (await attempt(relay, sender, "bob@example.com")).startswith("250 2.1.5")
        fresh = await attempt(relay, "new@elsewhere.test", "carol@example.com", "127.0.0.23")
        if passes:
            assert fresh.startswith("250 2.1.5")
            relay.wait_for_log("greylist: client network allowlisted after 2 passes")

            def counted() -> bool:
                text = urllib.request.urlopen(relay.metrics_url, timeout=5).read().decode()
                return 'mailrelay_greylist_total{result="client"} 1.0' in text

            wait_until(counted, 10, "the allowlisted client in /metrics")
        else:
            assert fresh.startswith("450 4.2.0 <carol@example.com>: Recipient address rejected")


# -- the restriction and the store, with a clock of our own ------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


POLICY = GreylistPolicy(enabled=True, delay=300, retry_window=2 * 86400, ttl=35 * 86400)


def check_for(store: Greylist, policy: GreylistPolicy, *, allowlisted: bool) -> Check:
    restrictions = Restrictions(  # nothing that asks DNS
        reject_unknown_recipient_domain=False,
        reject_unknown_reverse_client_hostname=False,
        spf=SpfPolicy(enabled=False),
        greylist=policy,
    )
    config = RelayConfig("t", "mx.test", {}, set(), restrictions=restrictions)
    session = Session(client_ip="192.0.2.7", screen=ScreenResult(allowlisted=allowlisted))
    rcpt, _ = parse_path("<bob@example.com>")
    unused: Any = None  # no DNS or SPF check runs here
    return Check(config, session, Transaction("a@b.test"), rcpt, unused, unused, greylist=store)


@pytest.mark.parametrize("client", ["127.0.1.5", "127.0.2.1"])
async def test_mynetworks_and_client_access_permit_are_never_greylisted(
    tmp_path: Path, client: str
) -> None:
    store = Greylist(tmp_path / "g")
    check = check_for(store, dataclasses.replace(POLICY, skip_allowlisted=False), allowlisted=False)
    check.config = dataclasses.replace(
        check.config,
        domains={"example.com": Domain("example.com", NextHop("127.0.0.1", 9), "any")},
        mynetworks=(ipaddress.ip_network("127.0.1.0/24"),),
        client_access=(ClientAccessEntry(ipaddress.ip_network("127.0.2.1/32"), "permit"),),
    )
    check.session.client_ip = client
    check.session.trusted = client.startswith("127.0.1.")
    assert await check_recipient(check) is None
    assert check.reasons == ["permit_mynetworks" if check.session.trusted else "client_access"]
    assert not (tmp_path / "g").exists()  # never asked
    check.session.client_ip, check.session.trusted = "127.0.3.1", False
    assert str(await check_recipient(check)).startswith("450 4.2.0")
    store.close()


@pytest.mark.parametrize("skip", [True, False])
async def test_skip_allowlisted_is_a_choice(tmp_path: Path, skip: bool) -> None:
    store = Greylist(tmp_path / "g")
    policy = dataclasses.replace(POLICY, skip_allowlisted=skip)
    verdict = await greylist(check_for(store, policy, allowlisted=True))
    if skip:
        assert verdict is None
    else:
        assert str(verdict) == (
            "450 4.2.0 <bob@example.com>: Recipient address rejected: Greylisted, try again "
            "in 300 seconds"
        )
    store.close()


async def test_the_decisions_with_time(tmp_path: Path) -> None:
    clock = Clock()
    store = Greylist(tmp_path / "g", clock=clock)
    ask = store.check
    assert (await ask("192.0.2.7", "a@s.test", "r@x.test", POLICY)).outcome is Outcome.NEW
    clock.now += 100
    early = await ask("192.0.2.200", "a@s.test", "r@x.test", POLICY)  # the same /24
    assert early.outcome is Outcome.EARLY and early.wait == 200
    clock.now += 200
    passed = await ask("192.0.2.7", "a@s.test", "r@x.test", POLICY)
    assert passed.outcome is Outcome.PASSED and passed.waited == 300
    clock.now += 30 * 86400
    assert (await ask("192.0.2.7", "a@s.test", "r@x.test", POLICY)).outcome is Outcome.KNOWN
    clock.now += 34 * 86400  # ttl counts from the last pass
    assert (await ask("192.0.2.7", "a@s.test", "r@x.test", POLICY)).outcome is Outcome.KNOWN
    clock.now += 36 * 86400
    assert (await ask("192.0.2.7", "a@s.test", "r@x.test", POLICY)).outcome is Outcome.NEW
    # Another network, sender or recipient is another triplet.
    assert (await ask("192.0.3.7", "a@s.test", "r@x.test", POLICY)).outcome is Outcome.NEW
    store.close()


async def test_client_passes_are_counted_expire_and_bounded_with_the_triplets(
    tmp_path: Path,
) -> None:
    clock = Clock()
    store = Greylist(tmp_path / "g", clock=clock)
    policy = dataclasses.replace(POLICY, auto_allowlist_clients=3)

    async def ask(sender: str, client: str = "192.0.2.7") -> Outcome:
        return (await store.check(client, sender, "r@x.test", policy)).outcome

    for sender in ("a@s.test", "b@s.test"):  # two triplets retried after the delay: 2 passes
        assert await ask(sender) is Outcome.NEW
        clock.now += 300
        assert await ask(sender) is Outcome.PASSED
    # A remembered triplet's mail counts once an hour at most: a burst is one pass.
    assert await ask("a@s.test") is Outcome.KNOWN
    assert await ask("new@s.test") is Outcome.NEW
    clock.now += CLIENT_INTERVAL
    assert await ask("a@s.test") is Outcome.KNOWN  # the third pass
    assert await ask("c@s.test", "192.0.2.99") is Outcome.CLIENT  # any host of the /24
    assert await ask("c@s.test", "192.0.3.7") is Outcome.NEW  # not another network
    # An allowlisted network's mail keeps it allowlisted; ttl without mail ends it.
    clock.now += 30 * 86400
    assert await ask("d@s.test") is Outcome.CLIENT
    clock.now += 30 * 86400
    assert await ask("e@s.test") is Outcome.CLIENT
    clock.now += 36 * 86400
    assert await ask("e@s.test") is Outcome.NEW
    # Off: never allowlisted, and nothing is counted.
    off = dataclasses.replace(policy, auto_allowlist_clients=0)
    assert (await store.check("198.51.100.1", "f@s.test", "r@x.test", off)).outcome is Outcome.NEW
    clock.now += 300
    assert (await store.check("198.51.100.1", "f@s.test", "r@x.test", off)).passes
    entries: dict[str, Any] = {}
    for p in (tmp_path / "g").iterdir():
        if not p.name.startswith("."):
            entries.update(json.loads(p.read_text())["entries"])
    counts = {k: v for k, v in entries.items() if k.startswith("n")}
    assert [v[0] for v in counts.values()] == [3.0]  # 192.0.2.0/24 only
    store.close()


def test_triplets_as_postgrey_forms_them() -> None:
    assert client_network("198.51.100.77") == "198.51.100.0/24"
    assert client_network("::ffff:198.51.100.77") == "198.51.100.0/24"
    assert client_network("2001:db8:1:2:3::4") == "2001:db8:1:2::/64"
    assert sender_key("Bounce-123-456@List.Example") == "bounce-#-#@list.example"
    assert sender_key("prvs=1234abcd=joe@example.org") == "joe@example.org"
    assert sender_key("joe+tag@example.org") == "joe@example.org"
    assert sender_key("") == ""
    assert triplet_key("198.51.100.1", "a@b", "c@d") == triplet_key("198.51.100.2", "A@B", "C@D")


def test_a_bucket_is_bounded_and_keeps_the_triplets_that_passed() -> None:
    now = 1_700_000_000.0
    entries = {f"passed{i}": [now - 1000, now - 500 + i] for i in range(3)}
    entries.update({f"new{i}": [now - 100 + i, 0.0] for i in range(10)})
    entries["expired"] = [now - 3 * 86400, 0.0]
    prune(entries, now, POLICY, cap=5)
    assert sorted(entries) == ["new8", "new9", "passed0", "passed1", "passed2"]


async def test_an_attacker_rotating_senders_cannot_fill_the_disk(tmp_path: Path) -> None:
    store = Greylist(tmp_path / "g", per_bucket=2)
    for i in range(BUCKETS * 3):
        await store.check("203.0.113.9", f"spam{i}x@s.test", "r@x.test", POLICY)
    files = [p for p in (tmp_path / "g").iterdir() if not p.name.startswith(".")]
    assert len(files) <= BUCKETS
    assert sum(len(json.loads(p.read_text())["entries"]) for p in files) <= BUCKETS * 2
    store.close()


async def test_a_torn_temp_file_is_ignored_and_removed_and_the_state_survives_a_restart(
    tmp_path: Path,
) -> None:
    clock = Clock()
    folder = tmp_path / "g"
    store = Greylist(folder, clock=clock)
    assert (await store.check("192.0.2.7", "a@s.test", "r@x.test", POLICY)).outcome is Outcome.NEW
    clock.now += 300
    assert (await store.check("192.0.2.7", "a@s.test", "r@x.test", POLICY)).passes
    store.close()
    # A crash in the middle of the next write of that bucket: its temp file, torn.
    bucket = folder / f"{bucket_of(triplet_key('192.0.2.7', 'a@s.test', 'r@x.test')):02x}"
    torn = folder / f".{bucket.name}.99999"
    torn.write_bytes(b'{"version":1,"entries":{"')
    restarted = Greylist(folder, clock=clock)
    clock.now += 3600  # past REFRESH: this pass rewrites the bucket
    known = await restarted.check("192.0.2.7", "a@s.test", "r@x.test", POLICY)
    assert known.outcome is Outcome.KNOWN
    assert not torn.exists()
    assert not [p for p in folder.iterdir() if p.name.startswith(f".{bucket.name}")]
    assert json.loads(bucket.read_text())["version"] == 1
    restarted.close()


async def test_a_bucket_is_written_as_the_queue_writes_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Temp file fsynced, renamed, folder fsynced (relay.durable), in a thread."""
    steps: list[tuple[str, bool]] = []
    loop_thread = threading.get_ident()
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd: int) -> None:
        what = "fsync folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file"
        steps.append((what, threading.get_ident() == loop_thread))
        real_fsync(fd)

    def rename(src: Any, dst: Any) -> None:
        steps.append(("rename", threading.get_ident() == loop_thread))
        real_rename(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    store = Greylist(tmp_path / "g", clock=Clock())
    await store.check("192.0.2.7", "a@s.test", "r@x.test", POLICY)
    store.close()
    assert steps == [("fsync file", False), ("rename", False), ("fsync folder", False)]
