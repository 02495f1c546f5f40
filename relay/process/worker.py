"""One worker process of the relay: the SMTP server, delivery, reload, shutdown.

A worker runs the SMTP listener (and the PROXY protocol one, with
`proxy_listen`), delivers what it accepted (the queue's locks make sure no
two processes deliver one message), follows drain orders and, with a
handover secret, takes the queues peer pods hand over
(relay.handover.drain, relay.handover.transfer). It polls the config folder
every MAILRELAY_RELOAD_INTERVAL (relay.process.watch): a bad configuration
is logged and the running one kept. The certificate in `tls_dir` is
reloaded when it changes (relay.process.tlsreload).

On SIGTERM: no new connections, sessions get `shutdown_grace` to finish,
deliveries under way get theirs (relay.delivery.qmgr.stop), then the
queue is closed; mail still queued stays on the volume.

The stages are imported when the worker runs, not with this module: the
supervisor must set up prometheus_client's multiprocess folder before
anything imports relay.metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import platform
import signal
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mailrelay_api.allocator import settle_allocator
from relay.process import eventloop
from relay.process.listeners import LISTEN_BACKLOG, Sockets
from relay.process.options import ProcessOptions, env_float, relay_version
from relay.process.watch import SourceWatcher, config_hash, config_signature

if TYPE_CHECKING:
    from relay.config import RelayConfig
    from relay.delivery.qmgr import Delivery
    from relay.dns import Resolver
    from relay.queue.store import Queue
    from relay.smtpd.anvil import Anvil
    from relay.smtpd.greylist import Greylist
    from relay.smtpd.screen import Postscreen
    from relay.smtpd.server import ServerContext
    from relay.verify_cache import Verifier

log = logging.getLogger("mailrelay.server")


def settle_garbage_collector() -> None:
    """What lives as long as the worker (modules, configuration, listeners)
    is set aside from the cyclic collector (gc.freeze): its collections of
    the older generations no longer walk those objects each time (the
    collector took ~2% of a worker's CPU under load). The thresholds stay
    Python's: a first one of 10,000 saved a little more but let garbage
    cycles live longer (+7 MB PSS with 20 messages of 25 MB at once)."""
    gc.collect()
    gc.freeze()


@dataclass
class _Running:
    """What a running worker has to stop."""

    ctx: ServerContext
    queue: Queue
    postscreen: Postscreen
    delivery: Delivery
    verifier: Verifier
    greylist: Greylist
    servers: list[asyncio.AbstractServer] = field(default_factory=list)
    background: list[asyncio.Task[Any]] = field(default_factory=list)


def start_delivery(
    queue: Queue, config_getter: Callable[[], RelayConfig], resolver: Resolver
) -> Delivery:
    from relay.delivery.qmgr import Delivery

    return Delivery(queue, config_getter, resolver)


class Worker:
    """The SMTP server, delivery and config reload of one process."""

    def __init__(
        self,
        options: ProcessOptions,
        sockets: Sockets,
        *,
        handover_secret: bytes | None,
        sources: SourceWatcher | None = None,
        anvil: Anvil | None = None,
    ) -> None:
        self.options = options
        self.sockets = sockets
        self.handover_secret = handover_secret
        self.anvil = anvil  # the relay-wide counters with several workers; else a local one
        self.sources = sources  # re-rendered here (one worker); else by the supervisor
        self.stop_event = asyncio.Event()

    async def run(self) -> int:
        from relay import logbuffer
        from relay.config import load_config

        settle_allocator()
        loop = asyncio.get_running_loop()
        config_dir = self.options.config_dir
        sig = config_signature(config_dir)
        digest = await loop.run_in_executor(None, config_hash, config_dir)
        config = await loop.run_in_executor(None, load_config, config_dir)
        logbuffer.configure(*self.options.logging_of(config.logging))
        running = await self._start(config)
        settle_garbage_collector()
        reload_task = asyncio.create_task(self._watch_config(running.ctx, sig, digest))
        await self.stop_event.wait()
        await self._stop(running, reload_task)
        return 0

    async def _start(self, config: RelayConfig) -> _Running:
        from relay import metrics
        from relay.delivery.verify import Prober
        from relay.dns import Resolver
        from relay.process.tlsreload import TlsReloader
        from relay.queue.store import Queue
        from relay.smtpd.dnschecks import DnsChecks
        from relay.smtpd.greylist import GREYLIST_FOLDER, Greylist
        from relay.smtpd.screen import Postscreen
        from relay.smtpd.server import RelaySMTP, ServerContext
        from relay.smtpd.spf import SpfChecker
        from relay.verify_cache import VERIFY_FOLDER, Verifier

        loop = asyncio.get_running_loop()
        metrics.BUILD_INFO.labels(relay_version(), platform.python_version()).set(1)
        queue_dir = self.options.queue_dir
        resolver = Resolver(config.dns)
        queue = Queue(queue_dir)
        tls = None
        if self.options.tls_dir is not None:
            tls = TlsReloader(
                self.options.tls_dir, interval=env_float("MAILRELAY_TLS_RELOAD_INTERVAL", 2.0)
            )
            await loop.run_in_executor(None, tls.load_sync)
        postscreen = Postscreen(config, resolver, queue_dir / "postscreen")
        ctx = ServerContext(
            config,
            queue,
            postscreen=postscreen,
            dns_checks=DnsChecks(config, resolver),
            spf=SpfChecker(config, resolver),
            tls_context=tls.context if tls is not None else None,
            idle_timeout=env_float("MAILRELAY_SMTPD_TIMEOUT", 300.0),
            min_data_rate=env_float("MAILRELAY_SMTPD_MIN_DATA_RATE", 500.0),
            anvil=self.anvil,
        )
        delivery = start_delivery(queue, lambda: ctx.config, resolver)
        ctx.on_queued = delivery.wake
        # recipients: verify probes over delivery's connections; the cache is
        # shared with the other workers on the queue volume.
        verifier = Verifier(
            queue_dir / VERIFY_FOLDER, Prober(delivery.pool, lambda: ctx.config.hostname)
        )
        ctx.verifier = verifier
        # restrictions.greylist: the triplets on the queue volume, shared with the
        # other workers and kept across restarts.
        ctx.greylist = Greylist(queue_dir / GREYLIST_FOLDER)
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stop_event.set)
        running = _Running(ctx, queue, postscreen, delivery, verifier, ctx.greylist)
        running.servers.append(await _serve(loop, lambda: RelaySMTP(ctx), self.sockets.smtp))
        if self.sockets.proxy is not None:
            proxied = lambda: RelaySMTP(ctx, via_proxy=True)  # noqa: E731
            running.servers.append(await _serve(loop, proxied, self.sockets.proxy))
            log.info(
                "PROXY protocol listener on %s (trusted: %s)",
                "{}:{}".format(*self.sockets.proxy.getsockname()[:2]),
                ", ".join(str(n) for n in config.proxy_protocol.trusted) or "nobody",
            )
        await self._start_handover(running)
        log.info(
            "ready: listening on %s with %d domains, queue %s, event loop %s",
            "{}:{}".format(*self.sockets.smtp.getsockname()[:2]),
            len(config.domains),
            queue_dir,
            eventloop.name_of(loop),
        )
        running.background.append(asyncio.create_task(delivery.run()))
        if tls is not None:

            def use_context(context: ssl.SSLContext) -> None:
                ctx.tls_context = context  # new STARTTLS handshakes only

            running.background.append(asyncio.create_task(tls.watch(use_context)))
        return running

    async def _start_handover(self, running: _Running) -> None:
        """Drain orders (always) and the handover listener (with a secret)."""
        from relay.handover.drain import Drainer
        from relay.handover.transfer import LINE_LIMIT, HandoverServer

        ctx = running.ctx

        def stop_taking_mail() -> None:
            # Draining: every session is told 421 now (clients go to another
            # MX host; the readiness probe fails); delivery goes on.
            ctx.begin_shutdown()
            ctx.close_all()

        drainer = Drainer(
            running.queue,
            self.handover_secret,
            on_start=stop_taking_mail,
            on_end=lambda: setattr(ctx, "shutting_down", False),
            interval=env_float("MAILRELAY_RELOAD_INTERVAL", 1.0),
        )
        running.background.append(asyncio.create_task(drainer.run()))
        sock = self.sockets.handover
        if sock is None or self.handover_secret is None:
            return
        receiver = HandoverServer(
            running.queue,
            self.handover_secret,
            hostname=lambda: ctx.config.hostname,
            max_size=lambda: ctx.config.limits.message_size,
            draining=lambda: drainer.draining,
            on_queued=running.delivery.wake,
        )
        running.servers.append(
            await asyncio.start_server(receiver.handle, sock=sock, limit=LINE_LIMIT)
        )
        log.info("handover listener on %s", "{}:{}".format(*sock.getsockname()[:2]))

    async def _stop(self, running: _Running, reload_task: asyncio.Task[None]) -> None:
        ctx = running.ctx
        log.info("shutting down: no new connections, %d sessions open", len(ctx.sessions))
        for server in running.servers:
            server.close()
        ctx.begin_shutdown()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.options.shutdown_grace
        while ctx.sessions and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if ctx.sessions:
            log.info("grace period over: closing %d sessions", len(ctx.sessions))
            ctx.close_all()
            await asyncio.sleep(0.1)  # let connection_lost run and abort their DATA
        reload_task.cancel()
        with contextlib.suppress(Exception):
            await running.delivery.stop()
        running.verifier.close()
        running.greylist.close()
        for t in running.background:
            t.cancel()
        await asyncio.gather(reload_task, *running.background, return_exceptions=True)
        with contextlib.suppress(Exception):
            await running.postscreen.close()  # writes the cache entries still batched
        with contextlib.suppress(Exception):
            await running.queue.close()
        log.info("stopped")

    async def _watch_config(self, ctx: ServerContext, sig: tuple[Any, ...], digest: str) -> None:
        from relay import logbuffer, metrics
        from relay.config import IncompleteShardSet, load_config

        loop = asyncio.get_running_loop()
        config_dir = self.options.config_dir
        interval = env_float("MAILRELAY_RELOAD_INTERVAL", 1.0)
        while True:
            await asyncio.sleep(interval)
            await self._rerender_sources()
            new_sig = await loop.run_in_executor(None, config_signature, config_dir)
            if new_sig == sig:
                continue
            sig = new_sig
            try:
                new_digest = await loop.run_in_executor(None, config_hash, config_dir)
                if new_digest == digest:
                    metrics.CONFIG_INCOMPLETE.set(0)  # back to the running one
                    continue
                config = await loop.run_in_executor(None, load_config, config_dir)
            except IncompleteShardSet as e:
                # The rest of the set comes with one of the next swaps of ..data.
                metrics.CONFIG_RELOADS.labels("incomplete").inc()
                metrics.CONFIG_INCOMPLETE.set(1)
                log.warning("configuration not reloaded yet, keeping the running one: %s", e)
                continue
            except (OSError, ValueError) as e:
                metrics.CONFIG_INCOMPLETE.set(0)  # MailRelayConfigReloadFailing's now
                metrics.CONFIG_RELOADS.labels("error").inc()
                log.error("configuration not reloaded, keeping the running one: %s", e)
                continue
            digest = new_digest
            ctx.update_config(config)
            metrics.CONFIG_RELOADS.labels("ok").inc()
            metrics.CONFIG_INCOMPLETE.set(0)
            log.info(
                "configuration reloaded: %d domains, %d recipients",
                len(config.domains),
                len(config.recipients),
            )
            # After the line above: it is written as the lines before it were.
            logbuffer.configure(*self.options.logging_of(config.logging))

    async def _rerender_sources(self) -> None:
        rerender = self.options.on_source_change
        if self.sources is None or rerender is None:
            return
        loop = asyncio.get_running_loop()
        try:
            if await loop.run_in_executor(None, self.sources.changed):
                log.info("manifests changed: rendering them again")
                await loop.run_in_executor(None, rerender)
        except Exception:
            log.exception("re-rendering the manifests failed")


async def _serve(
    loop: asyncio.AbstractEventLoop,
    protocol: Callable[[], asyncio.BaseProtocol],
    sock: socket.socket,
) -> asyncio.Server:
    """Serves a listening socket. create_server listens on it again, with a
    backlog of 100 unless told: LISTEN_BACKLOG keeps a burst of connections
    out of SYN cookies (a client whose last ACK is dropped waits for ever)."""
    return await loop.create_server(protocol, sock=sock, backlog=LISTEN_BACKLOG)
