"""Postscreen: connection-time tests before the SMTP session (Postfix postscreen).

Contract with relay.smtpd.server: `screen()` runs right after accept, before the
server's final "220 " greeting line. When the pregreet test runs, it has
already written the "220-" teaser; the server then writes "220 <host> ESMTP".
The verdict (ScreenResult):
  - pass: go on; `allowlisted` says the client may skip the other tests;
  - enforce: run the session, answer every RCPT with `reply` (550) and log
    helo/sender/recipient; DATA never comes (no recipient is accepted);
  - drop: send `reply` (521, disconnect=True) when there is one, then close.
    With reason "hangup" the client is gone and there is nothing to send.

What it does, in Postfix's order (postscreen.c, postscreen_early.c):
  1. the access list: mynetworks, then clientAccess CIDRs (first match wins).
     permit: ALLOWLISTED, no tests. reject: DENYLISTED, the denylist action.
  2. the cache: a client whose earlier results are all still valid is
     PASS OLD and handed off at once, without the teaser or any wait.
  3. the early tests, together: the "220-" teaser, then up to greet.wait for
     the client to speak first (PREGREET), while every DNSBL zone is queried
     in parallel; the wait ends early when all that is left to wait for is
     done. Split as Postfix splits psc_early_tests/psc_early_event: `_race`
     runs the tests and only records what it saw (a pregreet drop ends it at
     once), `_verdict` concludes: the DNSBL score (partial if answers were
     late), the action, and what the cache remembers. A client that passes
     everything is PASS NEW.
  4. results are cached per client IP: pregreet 1 day, DNSBL the answer's
     TTL within [60 s, 1 h]; the cache file lives on the pod's volume.

Reading for the pregreet test never consumes input: like postscreen's
MSG_PEEK, the bytes stay in the stream for the SMTP engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from relay import logbuffer, metrics
from relay.config import RelayConfig
from relay.dns import Resolver, unmapped
from relay.durable import replace_file_sync
from relay.smtpd import dnsbl
from relay.smtpd.session import AccessAction, Reply, ScreenResult, Session, access_action


class ClientStream(Protocol):
    """What the screen needs of the client's connection
    (relay.smtpd.aiosmtpd_adapter.StreamProtocol)."""

    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...

    async def wait_readable(self) -> bytes:
        """The bytes the client sent, once it sent any (empty at EOF); consumes nothing."""
        ...


log = logging.getLogger("mailrelay.postscreen")

PREGREET_TTL = 86400.0  # postscreen_greet_ttl
CACHE_RETENTION = 7 * 86400.0  # postscreen_cache_retention_time
CACHE_FILE = "postscreen-cache.json"
CACHE_MAX_ENTRIES = 500_000
SAVE_DELAY = 2.0  # batch cache writes: at most one file write per this many seconds
PREGREET_LOG_BYTES = 100
ACCESS_CACHE_SIZE = 4096  # addresses whose access-list verdict is remembered

Clock = Callable[[], float]


@dataclass
class CacheEntry:
    """Wall-clock times until which each result stays valid."""

    pregreet: float = 0.0
    dnsbl: float = 0.0
    allowlist: float = 0.0  # DNSBL allowlist threshold met: skip other tests

    def newest(self) -> float:
        return max(self.pregreet, self.dnsbl, self.allowlist)


def _escape(data: bytes) -> str:
    """C-style escaping for the PREGREET log line."""
    out = []
    for b in data[:PREGREET_LOG_BYTES]:
        c = chr(b)
        if c == "\r":
            out.append("\\r")
        elif c == "\n":
            out.append("\\n")
        elif c == "\\":
            out.append("\\\\")
        elif 32 <= b < 127:
            out.append(c)
        else:
            out.append(f"\\{b:03o}")
    return "".join(out)


@dataclass
class EarlyRace:
    """What the early tests saw before the greet wait ended."""

    started: float  # time.monotonic() at the start of the wait
    pregreet: bytes | None = None  # what the client sent before its turn
    hangup: bool = False  # the client left during the wait
    score: dnsbl.Score | None = None  # None: DNSBL not asked
    allowlisted_early: bool = False  # met the DNSBL allowlist threshold during the wait

    @property
    def pregreet_done(self) -> bool:
        return self.pregreet is not None or self.allowlisted_early


async def _cancel(*waits: asyncio.Future[Any] | None) -> None:
    """Stops what the race still waits for, and waits until it has stopped."""
    for waited in waits:
        if waited is not None and not waited.done():
            waited.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waited


class PostscreenCache:
    """Per-client-IP results, kept in memory and saved to a JSON file in cache_dir.

    Saves are batched and done in an executor; on save, entries written by
    other processes sharing the folder are merged (the later expiry wins).
    """

    def __init__(self, cache_dir: Path | None, clock: Clock = time.time) -> None:
        self.cache_dir = cache_dir
        self.clock = clock
        self.entries: dict[str, CacheEntry] = {}
        self._loaded = cache_dir is None
        self._load_lock = asyncio.Lock()
        self._dirty = False
        self._save_handle: asyncio.TimerHandle | None = None
        self._saving: asyncio.Task[None] | None = None

    @property
    def path(self) -> Path | None:
        return self.cache_dir / CACHE_FILE if self.cache_dir else None

    async def load(self) -> None:
        if self._loaded:
            return
        async with self._load_lock:
            if self._loaded:
                return
            loop = asyncio.get_running_loop()
            read = await loop.run_in_executor(None, self._read_file)
            for ip, entry in read.items():
                mine = self.entries.get(ip)
                if mine is None or mine.newest() < entry.newest():
                    self.entries[ip] = entry
            self._loaded = True

    def _read_file(self) -> dict[str, CacheEntry]:
        path = self.path
        if path is None:
            return {}
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            log.warning("postscreen cache %s unreadable, starting empty: %s", path, e)
            return {}
        cutoff = self.clock() - CACHE_RETENTION
        out: dict[str, CacheEntry] = {}
        for ip, times in raw.get("clients", {}).items():
            try:
                entry = CacheEntry(*(float(t) for t in times[:3]))
            except (TypeError, ValueError):
                continue
            if entry.newest() >= cutoff:
                out[ip] = entry
        return out

    def get(self, ip: str) -> CacheEntry | None:
        return self.entries.get(ip)

    def put(self, ip: str, entry: CacheEntry) -> None:
        if len(self.entries) >= CACHE_MAX_ENTRIES and ip not in self.entries:
            self._expire(force=True)
        self.entries[ip] = entry
        self._dirty = True
        if self.cache_dir is not None and self._save_handle is None:
            loop = asyncio.get_running_loop()
            self._save_handle = loop.call_later(SAVE_DELAY, self._start_save)

    def _expire(self, force: bool = False) -> None:
        cutoff = self.clock() - CACHE_RETENTION
        self.entries = {ip: e for ip, e in self.entries.items() if e.newest() >= cutoff}
        if force and len(self.entries) >= CACHE_MAX_ENTRIES:
            # Still full of live entries: drop the half that expires first.
            keep = sorted(self.entries.items(), key=lambda kv: kv[1].newest())
            self.entries = dict(keep[len(keep) // 2 :])

    def _start_save(self) -> None:
        self._save_handle = None
        if self._saving is None or self._saving.done():
            self._saving = asyncio.get_running_loop().create_task(self.flush())

    async def flush(self) -> None:
        """Writes the cache now (if anything changed)."""
        if self._save_handle is not None:
            self._save_handle.cancel()
            self._save_handle = None
        if not self._dirty or self.cache_dir is None:
            return
        self._dirty = False
        self._expire()
        snapshot = {ip: [e.pregreet, e.dnsbl, e.allowlist] for ip, e in self.entries.items()}
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, self._write_file, snapshot)
        except OSError as e:
            log.warning("postscreen cache %s not saved: %s", self.path, e)

    def _write_file(self, snapshot: dict[str, list[float]]) -> None:
        path = self.path
        assert path is not None and self.cache_dir is not None
        self.cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Merge what other processes on this volume saved meanwhile.
        for ip, other in self._read_file().items():
            mine = snapshot.get(ip)
            if mine is None or max(mine) < other.newest():
                snapshot[ip] = [other.pregreet, other.dnsbl, other.allowlist]
        doc = json.dumps({"version": 1, "clients": snapshot}, separators=(",", ":"))
        # Mode 0600: client addresses and verdicts are for the relay's eyes only.
        replace_file_sync(path, doc.encode(), path.with_name(f".{CACHE_FILE}.{os.getpid()}.tmp"))


class Postscreen:
    def __init__(
        self,
        config: RelayConfig,
        resolver: Resolver,
        cache_dir: Path | None,
        clock: Clock = time.time,
    ) -> None:
        self.config = config
        self.resolver = resolver
        self.cache_dir = cache_dir
        self.clock = clock
        self.cache = PostscreenCache(cache_dir, clock)
        self._entries = dnsbl.site_entries(config.postscreen.dnsbl_sites)
        self._access_config = config
        self._access: dict[str, AccessAction | None] = {}

    def update_config(self, config: RelayConfig) -> None:
        self.config = config
        self._entries = dnsbl.site_entries(config.postscreen.dnsbl_sites)

    async def close(self) -> None:
        """Saves the cache; call at shutdown."""
        await self.cache.flush()

    # --- the access list ---------------------------------------------------------
    def access(self, ip: str) -> AccessAction | None:
        """None when nothing matches: permit_mynetworks, then clientAccess.
        Remembered per address while the configuration stays the same."""
        if self._access_config is not self.config:
            self._access_config, self._access = self.config, {}
        if ip in self._access:
            return self._access[ip]
        if len(self._access) >= ACCESS_CACHE_SIZE:
            self._access.clear()
        action = self._access[ip] = self._access_uncached(ip)
        return action

    def _access_uncached(self, ip: str) -> AccessAction | None:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return None
        addr = unmapped(addr)
        if any(addr in net for net in self.config.mynetworks):
            return "permit"
        for entry in self.config.client_access:
            if addr in entry.network:
                return access_action(entry.action)
        return None

    # --- the screen ----------------------------------------------------------------
    async def screen(self, session: Session, client: ClientStream) -> ScreenResult:
        """The verdict on one connection: pass, enforce (550 on every RCPT) or drop."""
        ip = session.client_ip
        where = f"[{ip}]:{session.client_port}"
        ps = self.config.postscreen
        result = ScreenResult()

        acl = self.access(ip)
        if acl == "permit":
            logbuffer.info(log, "ALLOWLISTED %s", where)
            metrics.child(metrics.SCREEN, "allowlisted").inc()
            return ScreenResult(reason="access", allowlisted=True)
        if acl == "reject":
            log.info("DENYLISTED %s", where)
            metrics.child(metrics.SCREEN, "access").inc()
            if ps.denylist_action == "drop":
                metrics.child(metrics.REJECTED, "postscreen_access").inc()
                return ScreenResult(
                    "drop",
                    "access",
                    Reply(521, "5.3.2", "Service currently unavailable", disconnect=True),
                )
            if ps.denylist_action == "enforce":
                result = ScreenResult(
                    "enforce", "access", Reply(550, "5.3.2", "Service currently unavailable")
                )

        await self.cache.load()
        now = self.clock()
        cached = self.cache.get(ip) or CacheEntry()
        pregreet_todo = cached.pregreet <= now
        dnsbl_todo = bool(self._entries) and cached.dnsbl <= now
        if result.action == "pass" and not pregreet_todo and not dnsbl_todo:
            logbuffer.info(log, "PASS OLD %s", where)
            metrics.child(metrics.SCREEN, "pass_old").inc()
            return ScreenResult(cached=True, allowlisted=cached.allowlist > now)

        race = await self._race(session, client, result, pregreet_todo, dnsbl_todo)
        return self._verdict(session, result, cached, race, pregreet_todo, dnsbl_todo)

    async def _race(
        self,
        session: Session,
        client: ClientStream,
        result: ScreenResult,
        pregreet_todo: bool,
        dnsbl_todo: bool,
    ) -> EarlyRace:
        """The early tests together, as psc_early_tests starts them: the "220-"
        teaser, the wait for a client that speaks first and every DNSBL zone,
        until greet.wait is over or nothing is left to wait for. Decides
        nothing but the pregreet drop, which ends the wait at once."""
        where = f"[{session.client_ip}]:{session.client_port}"
        ps = self.config.postscreen
        race = EarlyRace(started=time.monotonic())
        deadline = race.started + ps.greet_wait
        if pregreet_todo:
            try:
                client.write(f"220-{self.config.hostname} ESMTP\r\n".encode())
                await client.drain()
            except (ConnectionError, OSError):
                race.hangup = True
                return race
        loop = asyncio.get_running_loop()
        zones = dict.fromkeys(e.zone for e in self._entries) if dnsbl_todo else {}
        zone_tasks = [
            loop.create_task(dnsbl.query_zone(self.resolver, zone, session.client_ip))
            for zone in zones
        ]
        dnsbl_all: asyncio.Future[list[dnsbl.ZoneAnswer | BaseException]] | None = (
            asyncio.gather(*zone_tasks, return_exceptions=True) if zone_tasks else None
        )
        input_task = loop.create_task(client.wait_readable()) if pregreet_todo else None
        # Failed already (denylisted under enforce): no DNSBL allowlisting.
        failed = result.action != "pass"
        try:
            while not (race.pregreet_done or not pregreet_todo) or (
                dnsbl_all is not None and race.score is None
            ):
                waiting: set[asyncio.Future[object]] = set()
                if input_task is not None and not race.pregreet_done:
                    waiting.add(input_task)  # type: ignore[arg-type]
                if dnsbl_all is not None and race.score is None:
                    waiting.add(dnsbl_all)  # type: ignore[arg-type]
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                done, _ = await asyncio.wait(
                    waiting, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                )
                if not done:
                    break
                if input_task is not None and input_task in done:
                    data = input_task.result()
                    if not data:  # EOF: the client hung up during the wait
                        race.hangup = True
                        return race
                    race.pregreet = data
                    after = time.monotonic() - race.started
                    log.info(
                        "PREGREET %d after %.2f from %s: %s", len(data), after, where, _escape(data)
                    )
                    metrics.child(metrics.SCREEN, "pregreet").inc()
                    if ps.greet_action == "drop":
                        return race
                    failed = failed or ps.greet_action == "enforce"
                if dnsbl_all is not None and dnsbl_all in done:
                    race.score = self._score(zone_tasks)
                    if self._allowlist(race.score, failed or race.pregreet is not None):
                        # Postfix: the other tests count as passed, until the DNSBL TTL.
                        race.allowlisted_early = True
        finally:
            await _cancel(input_task, dnsbl_all)
        if dnsbl_todo and race.score is None:
            # Partial: the answers that came in before the wait ended.
            race.score = self._score(zone_tasks)
        return race

    def _verdict(
        self,
        session: Session,
        result: ScreenResult,
        entry: CacheEntry,
        race: EarlyRace,
        pregreet_todo: bool,
        dnsbl_todo: bool,
    ) -> ScreenResult:
        """Concludes the race, as psc_early_event does when the timer fires
        (or everything is in): the verdict, and what the cache remembers."""
        ip = session.client_ip
        where = f"[{ip}]:{session.client_port}"
        ps = self.config.postscreen
        if race.hangup:
            return self._hangup(where, race.started)
        failed = result.action != "pass"  # denylisted under enforce
        pregreet_failed = race.pregreet is not None
        if pregreet_failed and ps.greet_action == "drop":
            metrics.child(metrics.REJECTED, "postscreen_pregreet").inc()
            return ScreenResult(
                "drop", "pregreet", Reply(521, "5.5.1", "Protocol error", disconnect=True)
            )
        if pregreet_failed and ps.greet_action == "enforce":
            failed = True
            result = ScreenResult("enforce", "pregreet", Reply(550, "5.5.1", "Protocol error"))
        now = self.clock()
        if pregreet_todo and not pregreet_failed and not race.allowlisted_early:
            entry.pregreet = max(entry.pregreet, now + PREGREET_TTL)
        if dnsbl_todo and race.score is not None:
            score = race.score
            result.dnsbl_score = score.total
            if self._allowlist(score, failed or pregreet_failed):
                entry.allowlist = now + score.ttl
                entry.pregreet = max(entry.pregreet, now + score.ttl)
                result.allowlisted = True
            if score.total < ps.dnsbl_threshold:
                entry.dnsbl = now + score.ttl
            else:
                log.info("DNSBL rank %d for %s (%s)", score.total, where, ", ".join(score.matched))
                metrics.child(metrics.SCREEN, "dnsbl").inc()
                listed = f"Service unavailable; client [{ip}] blocked using {score.name or '?'}"
                if ps.dnsbl_action == "drop":
                    metrics.child(metrics.REJECTED, "postscreen_dnsbl").inc()
                    reply = Reply(521, "5.7.1", listed, disconnect=True)
                    dropped = ScreenResult("drop", "dnsbl", reply, dnsbl_score=score.total)
                    return self._remember(ip, entry, dropped)
                if ps.dnsbl_action == "enforce":
                    failed = True
                    reply = Reply(550, "5.7.1", listed)
                    result = ScreenResult("enforce", "dnsbl", reply, dnsbl_score=score.total)
        if result.action == "pass" and not pregreet_failed and not failed:
            log.info("PASS NEW %s", where)
            metrics.child(metrics.SCREEN, "pass_new").inc()
        return self._remember(ip, entry, result)

    def _remember(self, ip: str, entry: CacheEntry, result: ScreenResult) -> ScreenResult:
        if entry.newest() > 0:
            self.cache.put(ip, entry)
        return result

    def _allowlist(self, score: dnsbl.Score, failed: bool) -> bool:
        ps = self.config.postscreen
        return (
            not failed
            and ps.dnsbl_allowlist_threshold < 0
            and score.total < ps.dnsbl_threshold
            and score.total <= ps.dnsbl_allowlist_threshold
        )

    def _score(self, tasks: list[asyncio.Task[dnsbl.ZoneAnswer]]) -> dnsbl.Score:
        """The DNSBL score from the zones that have answered."""
        answers: dict[str, dnsbl.ZoneAnswer] = {}
        for t in tasks:
            if t.done() and not t.cancelled() and t.exception() is None:
                za = t.result()
                answers[za.zone] = za
            elif t.done() and not t.cancelled():
                log.warning("DNSBL lookup failed: %s", t.exception())
        return dnsbl.score(self._entries, answers)

    @staticmethod
    def _hangup(where: str, started: float) -> ScreenResult:
        log.info("HANGUP after %.2f from %s", time.monotonic() - started, where)
        metrics.child(metrics.SCREEN, "hangup").inc()
        return ScreenResult("drop", "hangup")
