"""Greylisting (restrictions.greylist): postgrey's triplets, on the queue volume.

A triplet is (the client's network, the sender, the recipient), as postgrey
forms it: the network is the IPv4 /24 or IPv6 /64 (--lookup-by-subnet: a
sender's retry often comes from another host of its farm), the sender is
lowercased with its +extension dropped, a BATV/SRS-style prvs= tag removed
and numbers replaced by "#" (one key for a VERP sender's every message). Its
first attempt is deferred; a retry after `delay` and within `retryWindow`
passes, and the triplet is then remembered for `ttl` after its last mail
(postgrey's max-age). Later attempts of a remembered triplet pass at once.

A client network is counted as postgrey's --auto-whitelist-clients counts it:
each triplet of it that passes after the delay counts, and so does a
remembered triplet's mail at most once an hour (CLIENT_INTERVAL; a burst of
mail is one pass). At `autoAllowlistClients` passes the network is
allowlisted: any triplet of it passes at once, unrecorded, until it sends no
mail for `ttl`. Its entry (a hash of the network, with its count and last
pass) lives in the buckets beside the triplets and is bounded with them.

The state is shared as relay.verify_cache shares its answers: files in a
folder on the queue volume, with fcntl byte-range locks on one lock file
between the pod's worker processes; it survives a restart as postgrey's
database does. A bucket is written as the queue writes its files
(relay.durable: temp file fsynced, renamed, folder fsynced), so a crash
leaves the old bucket or the new one; a temp file a crash left behind is
never read, and removed the first time its bucket is written again.

The triplets are hashed into BUCKETS files (a key is a hash: no address is
stored), each holding at most MAX_ENTRIES / BUCKETS entries, so the folder
is bounded (a few MB) however many senders an attacker rotates through: a
full bucket drops the triplets that never passed first, the oldest first,
then the least recently used ones. A bucket is read, decided on and
rewritten under its lock, in a thread, never on the event loop. An
unreadable bucket (torn, truncated, foreign) is logged and starts empty:
its triplets are greylisted once more, nothing worse.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import fcntl
import hashlib
import ipaddress
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from relay.config import GreylistPolicy
from relay.dns import unmapped
from relay.durable import GroupSync, replace_file_sync

log = logging.getLogger("mailrelay.greylist")
T = TypeVar("T")

# The state's folder in the queue directory.
GREYLIST_FOLDER = "greylist"
BUCKETS = 256
MAX_ENTRIES = 100_000  # over all buckets
PER_BUCKET = MAX_ENTRIES // BUCKETS
# A remembered triplet's last use is written at most this often (a burst of
# mail does not rewrite its bucket for every recipient).
REFRESH = 60.0
IPV4_PREFIX = 24  # postgrey --ipv4cidr
IPV6_PREFIX = 64  # postgrey --ipv6cidr
# A client's count grows at most this often from remembered triplets, and an
# allowlisted client's last pass is written at most this often (postgrey: 1h).
CLIENT_INTERVAL = 3600.0
_LOCK_FILE = ".lock"
_VERSION = 1

# triplet key -> [first seen, last passed (0: not yet)];
# client key ("n" + hash: never hex) -> [passes, last pass]: "passed", as prune sees it
Entries = dict[str, list[float]]


class Outcome(enum.StrEnum):
    NEW = "new"  # first attempt: deferred
    EARLY = "early"  # retried before the delay: deferred
    PASSED = "passed"  # retried after the delay: passes, remembered from now on
    KNOWN = "known"  # remembered: passes
    CLIENT = "client"  # its client network is auto-allowlisted: passes


@dataclass(frozen=True)
class Decision:
    outcome: Outcome
    wait: float = 0.0  # deferred: seconds until a retry passes
    waited: float = 0.0  # passed: seconds since the first attempt

    @property
    def passes(self) -> bool:
        return self.outcome in (Outcome.PASSED, Outcome.KNOWN, Outcome.CLIENT)


def client_network(client_ip: str) -> str:
    """postgrey --lookup-by-subnet: the client's IPv4 /24 or IPv6 /64."""
    try:
        ip = unmapped(ipaddress.ip_address(client_ip))
    except ValueError:
        return client_ip
    prefix = IPV4_PREFIX if ip.version == 4 else IPV6_PREFIX
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


_BATV = re.compile(r"^(prvs|msprvs1|btv1)=[^=]*=")
_NUMBER = re.compile(r"\b\d+\b")


def sender_key(sender: str) -> str:
    """postgrey's sender substitutions: no +extension, no BATV tag, numbers as #."""
    user, at, domain = sender.lower().rpartition("@")
    if not at:
        return sender.lower()
    user = _BATV.sub("", user).split("+", 1)[0]
    return f"{_NUMBER.sub('#', user)}@{domain}"


def triplet_key(client_ip: str, sender: str, recipient: str) -> str:
    text = f"{client_network(client_ip)}/{sender_key(sender)}/{recipient.lower()}"
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:32]


def client_key(client_ip: str) -> str:
    """The key of the client's network's pass count (never a triplet's)."""
    text = f"client/{client_network(client_ip)}"
    return "n" + hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:32]


def bucket_of(key: str) -> int:
    """The bucket a triplet's or a client's key lives in (its file: "%02x")."""
    return int(key.removeprefix("n")[:8], 16) % BUCKETS


def client_allowlisted(
    entries: Entries, key: str, now: float, policy: GreylistPolicy
) -> tuple[bool, bool]:
    """Whether the client's network passed often enough (and within ttl);
    updates its last pass at most every CLIENT_INTERVAL. True: entries changed."""
    passes, last = entries.get(key, (0.0, 0.0))
    if passes < policy.auto_allowlist_clients or now - last > policy.ttl:
        return False, False
    if now - last < CLIENT_INTERVAL:
        return True, False
    entries[key] = [passes, now]
    return True, True


def count_pass(
    entries: Entries, key: str, now: float, decision: Decision, policy: GreylistPolicy
) -> bool:
    """One more pass of the client's network: every triplet that passed after
    the delay, a remembered triplet's mail at most every CLIENT_INTERVAL.
    True: entries changed."""
    passes, last = entries.get(key, (0.0, 0.0))
    if now - last > policy.ttl:
        passes = 0.0  # expired: counts from scratch
    elif decision.outcome is not Outcome.PASSED and now - last < CLIENT_INTERVAL:
        return False
    entries[key] = [passes + 1, now]
    if passes + 1 == policy.auto_allowlist_clients:
        log.info("greylist: client network allowlisted after %d passes", passes + 1)
    return True


def decide(entries: Entries, key: str, now: float, policy: GreylistPolicy) -> tuple[Decision, bool]:
    """postgrey's decision for one triplet; updates `entries`. True: they changed."""
    first, passed = entries.get(key, (0.0, 0.0))
    if passed and now - passed <= policy.ttl:
        if now - passed < REFRESH:
            return Decision(Outcome.KNOWN), False
        entries[key] = [first, now]
        return Decision(Outcome.KNOWN), True
    if first and not passed and 0 <= now - first <= policy.retry_window:
        if now - first >= policy.delay:
            entries[key] = [first, now]
            return Decision(Outcome.PASSED, waited=now - first), True
        return Decision(Outcome.EARLY, wait=first + policy.delay - now), False
    entries[key] = [now, 0.0]
    return Decision(Outcome.NEW, wait=policy.delay), True


def prune(entries: Entries, now: float, policy: GreylistPolicy, cap: int = PER_BUCKET) -> None:
    """Drops expired triplets, then what is over `cap`: the ones that never
    passed, oldest first, then the least recently passed."""
    for key, (first, passed) in list(entries.items()):
        if (now - passed > policy.ttl) if passed else (now - first > policy.retry_window):
            del entries[key]
    if len(entries) > cap:
        order = sorted(entries, key=lambda k: (entries[k][1] > 0, max(entries[k])))
        for key in order[: len(entries) - cap]:
            del entries[key]


class Greylist:
    """The triplets of one relay pod; one per worker process."""

    def __init__(
        self,
        directory: Path,
        *,
        clock: Callable[[], float] = time.time,
        per_bucket: int = PER_BUCKET,
    ) -> None:
        self.directory = directory
        self.clock = clock
        self.per_bucket = per_bucket
        self._lock_fd = -1
        self._folder: GroupSync | None = None  # fsyncs the folder after a rename
        self._opening = threading.Lock()  # (buckets' threads open the two fds once)
        self._swept: set[int] = set()  # buckets whose crash leftovers are gone
        # fcntl locks belong to the process: its threads take turns here first.
        self._thread_locks = [threading.Lock() for _ in range(BUCKETS)]

    async def check(
        self, client_ip: str, sender: str, recipient: str, policy: GreylistPolicy
    ) -> Decision:
        key = triplet_key(client_ip, sender, recipient)
        client = client_key(client_ip) if policy.auto_allowlist_clients > 0 else ""
        return await asyncio.to_thread(self._check_sync, key, client, policy)

    def close(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
        if self._folder is not None:
            self._folder.close()
            self._folder = None

    # -- in threads ------------------------------------------------------------

    def _check_sync(self, key: str, client: str, policy: GreylistPolicy) -> Decision:
        """The triplet's decision; with a client key, its network's count first
        (allowlisted: passes) and after (a pass counts). One bucket locked at a time."""
        if client and self._update_sync(
            client, policy, lambda entries, now: client_allowlisted(entries, client, now, policy)
        ):
            return Decision(Outcome.CLIENT)
        decision = self._update_sync(
            key, policy, lambda entries, now: decide(entries, key, now, policy)
        )
        if client and decision.passes:
            self._update_sync(
                client,
                policy,
                lambda entries, now: (None, count_pass(entries, client, now, decision, policy)),
            )
        return decision

    def _update_sync(
        self,
        key: str,
        policy: GreylistPolicy,
        update: Callable[[Entries, float], tuple[T, bool]],
    ) -> T:
        """update(entries, now) on the key's bucket under its lock; the bucket
        is written when it says it changed. Returns update's answer."""
        bucket = bucket_of(key)
        with self._locked(bucket):
            entries = self._read_sync(bucket)
            now = self.clock()
            answer, changed = update(entries, now)
            if changed:
                prune(entries, now, policy, self.per_bucket)
                self._write_sync(bucket, entries)
        return answer

    def _path(self, bucket: int) -> Path:
        return self.directory / f"{bucket:02x}"

    @contextlib.contextmanager
    def _locked(self, bucket: int) -> Iterator[None]:
        with self._thread_locks[bucket]:
            try:
                fd = self._lock_fd_sync()
                fcntl.lockf(fd, fcntl.LOCK_EX, 1, bucket)
            except OSError as e:  # no lock to be had (a read-only volume): decide anyway
                log.warning("greylist lock unavailable: %s", e)
                yield
                return
            try:
                yield
            finally:
                with contextlib.suppress(OSError):
                    fcntl.lockf(fd, fcntl.LOCK_UN, 1, bucket)

    def _lock_fd_sync(self) -> int:
        with self._opening:
            if self._lock_fd < 0:
                self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
                self._lock_fd = os.open(
                    self.directory / _LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
                )
            return self._lock_fd

    def _folder_sync(self) -> GroupSync:
        with self._opening:
            if self._folder is None:
                self._folder = GroupSync(self.directory)
            return self._folder

    def _sweep_sync(self, bucket: int) -> None:
        """Removes the bucket's temp files a crash left behind (under its lock:
        no other writer of it is at work)."""
        self._swept.add(bucket)
        prefix = f".{bucket:02x}."
        with contextlib.suppress(OSError), os.scandir(self.directory) as entries:
            for entry in entries:
                if entry.name.startswith(prefix):
                    log.info("greylist: removing %s, left by a crash", entry.name)
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)

    def _read_sync(self, bucket: int) -> Entries:
        path = self._path(bucket)
        try:
            doc = json.loads(path.read_bytes())
            if doc["version"] != _VERSION:
                raise ValueError(f"version {doc['version']!r}")
            return {str(k): [float(v[0]), float(v[1])] for k, v in dict(doc["entries"]).items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
            log.warning("greylist state %s unreadable, starting it empty: %s", path, e)
            return {}

    def _write_sync(self, bucket: int, entries: Entries) -> None:
        """Under the bucket's lock."""
        if bucket not in self._swept:
            self._sweep_sync(bucket)
        path = self._path(bucket)
        doc = json.dumps({"version": _VERSION, "entries": entries}, separators=(",", ":"))
        tmp = path.with_name(f".{path.name}.{os.getpid()}")  # one per worker process
        try:
            replace_file_sync(path, doc.encode(), tmp, self._folder_sync())
        except OSError as e:  # a full disk: this decision still holds
            log.warning("greylist state %s not written: %s", path, e)
