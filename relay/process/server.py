"""The relay process: listeners, worker processes, reload, metrics, shutdown.

`run_relay()` is what `mailrelay run` and `mailrelay relay` call.

- One worker (the default for `run`): everything runs in this process.
- N workers (the default for `relay`: one per CPU): this process binds the
  port, forks N workers that each listen on it with SO_REUSEPORT (the kernel
  spreads connections), restarts a worker that dies, serves /metrics for all
  of them (prometheus_client multiprocess mode) and forwards SIGTERM.

Each worker runs the SMTP server, delivers what it accepted (the queue's
locks make sure no two processes deliver one message), and polls the config
folder every second: a ConfigMap mount swaps a `..data` symlink, so changes
are seen by stat() and confirmed by a content hash; a bad configuration is
logged and the running one kept.

Environment knobs (for tests and operators; the CLI keeps to API.md):
  MAILRELAY_LOG_LEVEL         default INFO
  MAILRELAY_SHUTDOWN_GRACE    seconds sessions get after SIGTERM (default 25)
  MAILRELAY_SMTPD_TIMEOUT     idle timeout of a session (default 300)
  MAILRELAY_RELOAD_INTERVAL   config poll interval (default 1)
  MAILRELAY_TLS_RELOAD_INTERVAL  tls.crt/tls.key poll interval (default 2)

With `proxy_listen`, each worker also serves a second port where every
connection must start with a PROXY header from spec.proxyProtocol.trustedCIDRs
(relay.smtpd.proxy); the plain port stays for probes and in-cluster clients.
The certificate in `tls_dir` is reloaded when it changes (relay.process.tlsreload).

With `handover_listen` and a `handover_secret`, each worker also serves the
handover listener (relay.handover.transfer: peer pods hand their queue over here when
they are scaled away) and follows drain orders (relay.handover.drain); the metrics
port is then the control port too (relay.handover.control: /queue, POST /drain).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import signal
import socket
import ssl
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("mailrelay.server")

DEFAULT_SHUTDOWN_GRACE = 25.0
LISTEN_BACKLOG = 1024
WORKER_RESTART_DELAY = 1.0


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


def setup_logging() -> None:
    from relay import logbuffer

    level = os.environ.get("MAILRELAY_LOG_LEVEL", "INFO").upper()
    logbuffer.install(sys.stderr, level)  # one write per event-loop iteration
    logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd's chatter


def parse_listen(text: str) -> tuple[str, int]:
    """'host:port', '[v6]:port' or ':port' -> (host, port)."""
    if text.startswith("["):
        host, _, port = text[1:].partition("]:")
    else:
        host, _, port = text.rpartition(":")
    if not port.isdigit():
        raise ValueError(f"not HOST:PORT: {text!r}")
    return host or "0.0.0.0", int(port)


def bind_socket(host: str, port: int, *, reuse_port: bool, listen: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    if listen:
        sock.listen(LISTEN_BACKLOG)
    sock.setblocking(False)
    return sock


def load_tls(tls_dir: Path | None) -> ssl.SSLContext | None:
    """A server context from tls.crt/tls.key, or None (no STARTTLS)."""
    if tls_dir is None:
        return None
    crt, key = tls_dir / "tls.crt", tls_dir / "tls.key"
    if not (crt.exists() and key.exists()):
        log.warning("no tls.crt/tls.key in %s: STARTTLS is off", tls_dir)
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(crt, key)
    return ctx


# -- watching files ------------------------------------------------------------


def _stat_signature(paths: list[Path]) -> tuple[Any, ...]:
    """What changes when any file under these paths changes (stat follows symlinks)."""
    sig: list[Any] = []
    for root in paths:
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for f in files:
            try:
                st = f.stat()
            except OSError:
                continue
            sig.append((str(f), st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(sig)


def config_signature(config_dir: Path) -> tuple[Any, ...]:
    """stat() of the rendered files (not dotfiles: `..data`, temp files)."""
    sig: list[Any] = []
    try:
        names = sorted(os.listdir(config_dir))
    except OSError:
        return ()
    for name in names:
        if name.startswith("."):
            continue
        try:
            st = os.stat(config_dir / name)
        except OSError:
            continue
        sig.append((name, st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(sig)


def config_hash(config_dir: Path) -> str:
    h = hashlib.sha256()
    for name in sorted(os.listdir(config_dir)):
        if name.startswith("."):
            continue
        path = config_dir / name
        if path.is_file():
            h.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


class SourceWatcher:
    """Polls manifest files/folders (`mailrelay run -f`) for changes."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths
        self._sig = _stat_signature(paths)

    def changed(self) -> bool:
        sig = _stat_signature(self.paths)
        if sig == self._sig:
            return False
        self._sig = sig
        return True


# -- one worker -----------------------------------------------------------------


class Worker:
    """The SMTP server, delivery and config reload of one process."""

    def __init__(
        self,
        config_dir: Path,
        queue_dir: Path,
        sock: socket.socket,
        *,
        tls_dir: Path | None,
        shutdown_grace: float,
        sources: SourceWatcher | None = None,
        on_source_change: Callable[[], None] | None = None,
        proxy_sock: socket.socket | None = None,
        handover_sock: socket.socket | None = None,
        handover_secret: bytes | None = None,
    ) -> None:
        self.config_dir = config_dir
        self.handover_sock = handover_sock
        self.handover_secret = handover_secret
        self.queue_dir = queue_dir
        self.sock = sock
        self.proxy_sock = proxy_sock
        self.tls_dir = tls_dir
        self.shutdown_grace = shutdown_grace
        self.sources = sources
        self.on_source_change = on_source_change
        self.stop_event = asyncio.Event()

    async def run(self) -> int:
        from relay import metrics
        from relay.config import load_config
        from relay.dns import Resolver
        from relay.handover.drain import Drainer
        from relay.handover.transfer import LINE_LIMIT, HandoverServer
        from relay.process.tlsreload import TlsReloader
        from relay.queue.store import Queue
        from relay.smtpd.dnschecks import DnsChecks
        from relay.smtpd.screen import Postscreen
        from relay.smtpd.server import RelaySMTP, ServerContext
        from relay.smtpd.spf import SpfChecker

        loop = asyncio.get_running_loop()
        sig = config_signature(self.config_dir)
        digest = await loop.run_in_executor(None, config_hash, self.config_dir)
        config = await loop.run_in_executor(None, load_config, self.config_dir)
        resolver = Resolver(config.dns)
        queue = Queue(self.queue_dir)
        tls = None
        if self.tls_dir is not None:
            tls = TlsReloader(
                self.tls_dir, interval=_env_float("MAILRELAY_TLS_RELOAD_INTERVAL", 2.0)
            )
            await loop.run_in_executor(None, tls.load_sync)
        postscreen = Postscreen(config, resolver, self.queue_dir / "postscreen")
        ctx = ServerContext(
            config,
            queue,
            postscreen=postscreen,
            dns_checks=DnsChecks(config, resolver),
            spf=SpfChecker(config, resolver),
            tls_context=tls.context if tls is not None else None,
            idle_timeout=_env_float("MAILRELAY_SMTPD_TIMEOUT", 300.0),
            min_data_rate=_env_float("MAILRELAY_SMTPD_MIN_DATA_RATE", 500.0),
        )
        delivery = start_delivery(queue, lambda: ctx.config, resolver)
        if delivery is not None:
            ctx.on_queued = delivery.wake
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stop_event.set)
        server = await loop.create_server(lambda: RelaySMTP(ctx), sock=self.sock)
        proxy_server = None
        if self.proxy_sock is not None:
            proxy_server = await loop.create_server(
                lambda: RelaySMTP(ctx, via_proxy=True), sock=self.proxy_sock
            )
            log.info(
                "PROXY protocol listener on %s (trusted: %s)",
                "{}:{}".format(*self.proxy_sock.getsockname()[:2]),
                ", ".join(str(n) for n in config.proxy_protocol.trusted) or "nobody",
            )

        def stop_taking_mail() -> None:
            # Draining: every session is told 421 now (clients go to another
            # MX host; the readiness probe fails); delivery goes on.
            ctx.begin_shutdown()
            ctx.close_all()

        drainer = Drainer(
            queue,
            self.handover_secret,
            on_start=stop_taking_mail,
            on_end=lambda: setattr(ctx, "shutting_down", False),
            interval=_env_float("MAILRELAY_RELOAD_INTERVAL", 1.0),
        )
        handover_server = None
        if self.handover_sock is not None and self.handover_secret is not None:
            receiver = HandoverServer(
                queue,
                self.handover_secret,
                hostname=lambda: ctx.config.hostname,
                max_size=lambda: ctx.config.limits.message_size,
                draining=lambda: drainer.draining,
                on_queued=delivery.wake if delivery is not None else None,
            )
            handover_server = await asyncio.start_server(
                receiver.handle, sock=self.handover_sock, limit=LINE_LIMIT
            )
            log.info(
                "handover listener on %s", "{}:{}".format(*self.handover_sock.getsockname()[:2])
            )
        log.info(
            "ready: listening on %s with %d domains, queue %s",
            "{}:{}".format(*self.sock.getsockname()[:2]),
            len(config.domains),
            self.queue_dir,
        )
        background: list[asyncio.Task[Any]] = [asyncio.create_task(drainer.run())]
        if delivery is not None:
            background.append(asyncio.create_task(delivery.run()))
        if tls is not None:

            def use_context(context: ssl.SSLContext) -> None:
                ctx.tls_context = context  # new STARTTLS handshakes only

            background.append(asyncio.create_task(tls.watch(use_context)))
        reload_task = asyncio.create_task(self._watch_config(ctx, sig, digest, metrics))
        await self.stop_event.wait()

        log.info("shutting down: no new connections, %d sessions open", len(ctx.sessions))
        server.close()
        if proxy_server is not None:
            proxy_server.close()
        if handover_server is not None:
            handover_server.close()
        ctx.begin_shutdown()
        deadline = loop.time() + self.shutdown_grace
        while ctx.sessions and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if ctx.sessions:
            log.info("grace period over: closing %d sessions", len(ctx.sessions))
            ctx.close_all()
            await asyncio.sleep(0.1)  # let connection_lost run and abort their DATA
        reload_task.cancel()
        if delivery is not None:
            with contextlib.suppress(Exception):
                await delivery.stop()
        for t in background:
            t.cancel()
        await asyncio.gather(reload_task, *background, return_exceptions=True)
        with contextlib.suppress(Exception):
            await postscreen.close()  # writes the cache entries still batched
        with contextlib.suppress(Exception):
            await queue.close()
        log.info("stopped")
        return 0

    async def _watch_config(
        self, ctx: Any, sig: tuple[Any, ...], digest: str, metrics: Any
    ) -> None:
        from relay.config import load_config

        loop = asyncio.get_running_loop()
        interval = _env_float("MAILRELAY_RELOAD_INTERVAL", 1.0)
        while True:
            await asyncio.sleep(interval)
            if self.sources is not None and self.on_source_change is not None:
                try:
                    if await loop.run_in_executor(None, self.sources.changed):
                        log.info("manifests changed: rendering them again")
                        await loop.run_in_executor(None, self.on_source_change)
                except Exception:
                    log.exception("re-rendering the manifests failed")
            new_sig = await loop.run_in_executor(None, config_signature, self.config_dir)
            if new_sig == sig:
                continue
            sig = new_sig
            try:
                new_digest = await loop.run_in_executor(None, config_hash, self.config_dir)
                if new_digest == digest:
                    continue
                config = await loop.run_in_executor(None, load_config, self.config_dir)
            except (OSError, ValueError) as e:
                metrics.CONFIG_RELOADS.labels("error").inc()
                log.error("configuration not reloaded, keeping the running one: %s", e)
                continue
            digest = new_digest
            ctx.update_config(config)
            metrics.CONFIG_RELOADS.labels("ok").inc()
            log.info(
                "configuration reloaded: %d domains, %d recipients",
                len(config.domains),
                len(config.recipients),
            )


def start_delivery(queue: Any, config_getter: Callable[[], Any], resolver: Any) -> Any:
    """The queue engineer's delivery engine, when it is there."""
    try:
        from relay.delivery.qmgr import Delivery  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        log.warning("relay.delivery.qmgr is not available: messages stay queued")
        return None
    return Delivery(queue, config_getter, resolver)


# -- metrics ------------------------------------------------------------------------


def serve_metrics(
    listen: str, *, multiprocess: bool, queue_dir: Path, secret: bytes | None = None
) -> None:
    """The control port on a thread: /metrics (in multiprocess mode, the sum
    over the workers), /queue and POST /drain (relay.handover.control)."""
    from prometheus_client import REGISTRY, CollectorRegistry

    from relay.handover import control

    host, port = parse_listen(listen)
    registry = REGISTRY
    if multiprocess:
        from prometheus_client import multiprocess as mp

        registry = CollectorRegistry()
        mp.MultiProcessCollector(registry)
    control.serve(host, port, registry=registry, queue_dir=queue_dir, secret=secret)
    log.info("metrics on http://%s:%d/metrics (and /queue)", host, port)


def _prepare_multiprocess_metrics() -> bool:
    """prometheus_client picks its value store at import: set the folder first."""
    if "prometheus_client" in sys.modules and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        log.warning("prometheus_client already imported: /metrics shows the supervisor only")
        return False
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="mailrelay-metrics-")
    for old in Path(os.environ["PROMETHEUS_MULTIPROC_DIR"]).glob("*.db"):
        old.unlink()
    return True


# -- the entry point ------------------------------------------------------------------


def run_relay(
    config_dir: Path,
    *,
    listen: str,
    queue_dir: Path,
    metrics_listen: str | None = None,
    tls_dir: Path | None = None,
    workers: int | None = None,
    proxy_listen: str | None = None,
    watch_sources: list[Path] | None = None,
    on_source_change: Callable[[], None] | None = None,
    shutdown_grace: float | None = None,
    handover_listen: str | None = None,
    handover_secret_file: Path | None = None,
) -> int:
    """Runs the relay until SIGTERM/SIGINT; returns the exit code."""
    setup_logging()
    config_dir, queue_dir = Path(config_dir), Path(queue_dir)
    if workers is None:
        workers = 1 if watch_sources is not None else (os.cpu_count() or 1)
    grace = (
        shutdown_grace
        if shutdown_grace is not None
        else _env_float("MAILRELAY_SHUTDOWN_GRACE", DEFAULT_SHUTDOWN_GRACE)
    )
    try:
        host, port = parse_listen(listen)
        proxy_address = parse_listen(proxy_listen) if proxy_listen else None
        handover_address = parse_listen(handover_listen) if handover_listen else None
    except ValueError as e:
        log.error("%s", e)
        return 2
    handover_secret = None
    if handover_secret_file is not None:
        from relay.handover.transfer import load_secret

        try:
            handover_secret = load_secret(Path(handover_secret_file))
        except (OSError, ValueError) as e:
            log.error("handover secret: %s", e)
            return 1
    if handover_address is not None and handover_secret is None:
        log.error("--handover-listen needs --handover-secret-file")
        return 2
    from relay.config import load_config

    try:
        load_config(config_dir)  # fail fast, before binding anything
    except ValueError as e:
        log.error("%s", e)
        return 1
    queue_dir.mkdir(parents=True, exist_ok=True)
    sources = SourceWatcher(watch_sources) if watch_sources else None

    if workers <= 1:
        try:
            sock = bind_socket(host, port, reuse_port=False, listen=True)
            proxy_sock = (
                bind_socket(*proxy_address, reuse_port=False, listen=True)
                if proxy_address
                else None
            )
            handover_sock = (
                bind_socket(*handover_address, reuse_port=False, listen=True)
                if handover_address
                else None
            )
        except OSError as e:
            log.error("cannot listen on %s: %s", listen, e)
            return 1
        if metrics_listen:
            serve_metrics(
                metrics_listen, multiprocess=False, queue_dir=queue_dir, secret=handover_secret
            )
        worker = Worker(
            config_dir,
            queue_dir,
            sock,
            tls_dir=tls_dir,
            shutdown_grace=grace,
            sources=sources,
            on_source_change=on_source_change,
            proxy_sock=proxy_sock,
            handover_sock=handover_sock,
            handover_secret=handover_secret,
        )
        return asyncio.run(worker.run())
    return Supervisor(
        config_dir,
        queue_dir,
        host,
        port,
        workers=workers,
        tls_dir=tls_dir,
        shutdown_grace=grace,
        metrics_listen=metrics_listen,
        sources=sources,
        on_source_change=on_source_change,
        proxy_address=proxy_address,
        handover_address=handover_address,
        handover_secret=handover_secret,
    ).run()


class Supervisor:
    """Forks the workers and keeps them running; synchronous on purpose (it
    forks, so it never runs an event loop itself)."""

    def __init__(
        self,
        config_dir: Path,
        queue_dir: Path,
        host: str,
        port: int,
        *,
        workers: int,
        tls_dir: Path | None,
        shutdown_grace: float,
        metrics_listen: str | None,
        sources: SourceWatcher | None,
        on_source_change: Callable[[], None] | None,
        proxy_address: tuple[str, int] | None = None,
        handover_address: tuple[str, int] | None = None,
        handover_secret: bytes | None = None,
    ) -> None:
        self.config_dir = config_dir
        self.proxy_address = proxy_address
        self.handover_address = handover_address
        self.handover_secret = handover_secret
        self.queue_dir = queue_dir
        self.host = host
        self.port = port
        self.workers = workers
        self.tls_dir = tls_dir
        self.shutdown_grace = shutdown_grace
        self.metrics_listen = metrics_listen
        self.sources = sources
        self.on_source_change = on_source_change
        self.children: dict[int, int] = {}  # pid -> slot
        self.stopping = False

    def run(self) -> int:
        multiprocess = bool(self.metrics_listen) and _prepare_multiprocess_metrics()
        try:
            # Holds the port (port 0 picks one) without listening: only the
            # workers' SO_REUSEPORT sockets receive connections.
            reservation = bind_socket(self.host, self.port, reuse_port=True, listen=False)
        except OSError as e:
            log.error("cannot listen on %s:%d: %s", self.host, self.port, e)
            return 1
        self.port = reservation.getsockname()[1]
        proxy_reservation = None
        if self.proxy_address is not None:
            try:
                proxy_reservation = bind_socket(*self.proxy_address, reuse_port=True, listen=False)
            except OSError as e:
                log.error("cannot listen on %s:%d: %s", *self.proxy_address, e)
                return 1
            self.proxy_address = (self.proxy_address[0], proxy_reservation.getsockname()[1])
        handover_reservation = None
        if self.handover_address is not None:
            try:
                handover_reservation = bind_socket(
                    *self.handover_address, reuse_port=True, listen=False
                )
            except OSError as e:
                log.error("cannot listen on %s:%d: %s", *self.handover_address, e)
                return 1
            self.handover_address = (
                self.handover_address[0],
                handover_reservation.getsockname()[1],
            )
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        for slot in range(self.workers):
            self._fork(slot)
        if self.metrics_listen:
            serve_metrics(
                self.metrics_listen,
                multiprocess=multiprocess,
                queue_dir=self.queue_dir,
                secret=self.handover_secret,
            )
        interval = _env_float("MAILRELAY_RELOAD_INTERVAL", 1.0)
        next_poll = time.monotonic() + interval
        while self.children:
            self._reap()
            if not self.stopping and time.monotonic() >= next_poll:
                next_poll = time.monotonic() + interval
                self._poll_sources()
            time.sleep(0.1)
        reservation.close()
        if proxy_reservation is not None:
            proxy_reservation.close()
        if handover_reservation is not None:
            handover_reservation.close()
        log.info("all workers stopped")
        return 0

    def _fork(self, slot: int) -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                sock = bind_socket(self.host, self.port, reuse_port=True, listen=True)
                proxy_sock = (
                    bind_socket(*self.proxy_address, reuse_port=True, listen=True)
                    if self.proxy_address is not None
                    else None
                )
                handover_sock = (
                    bind_socket(*self.handover_address, reuse_port=True, listen=True)
                    if self.handover_address is not None
                    else None
                )
                worker = Worker(
                    self.config_dir,
                    self.queue_dir,
                    sock,
                    tls_dir=self.tls_dir,
                    shutdown_grace=self.shutdown_grace,
                    proxy_sock=proxy_sock,
                    handover_sock=handover_sock,
                    handover_secret=self.handover_secret,
                )
                code = asyncio.run(worker.run())
            except BaseException:
                log.exception("worker %d failed", slot)
            finally:
                logging.shutdown()
                os._exit(code)
        self.children[pid] = slot
        log.info("worker %d started (pid %d)", slot, pid)

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            if pid == 0:
                return
            slot = self.children.pop(pid, None)
            if slot is None:
                continue
            if "prometheus_client" in sys.modules and os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
                from prometheus_client import multiprocess as mp

                mp.mark_process_dead(pid)
            if not self.stopping:
                log.error("worker %d (pid %d) exited with %d: restarting it", slot, pid, status)
                time.sleep(WORKER_RESTART_DELAY)
                self._fork(slot)

    def _on_stop(self, signum: int, frame: Any) -> None:
        if self.stopping:
            return
        self.stopping = True
        log.info("signal %d: stopping %d workers", signum, len(self.children))
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    def _poll_sources(self) -> None:
        if self.sources is None or self.on_source_change is None:
            return
        try:
            if self.sources.changed():
                log.info("manifests changed: rendering them again")
                self.on_source_change()
        except Exception:
            log.exception("re-rendering the manifests failed")
