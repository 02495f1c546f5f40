"""The relay process: `run_relay()`, what `mailrelay run` and `mailrelay relay` call.

How many workers: `--workers N`, or auto (the default for `run` and `relay`):
the CPUs this process may use (relay.process.cpus: affinity, cgroup quota,
the pod's CPU limit).
- One worker: everything runs in this process (relay.process.worker).
- N workers: this process, the Supervisor, reserves the ports, forks N
  workers that each listen on them with SO_REUSEPORT
  (relay.process.listeners), restarts a worker that dies, serves /metrics for
  all of them (prometheus_client multiprocess mode), re-renders the manifests
  of `run -f` and forwards SIGTERM. It also holds the per-client counters in
  shared memory (relay.smtpd.anvil_shared), so limits hold per relay.

The metrics port is also the control port (relay.handover.control: /queue,
POST /drain, authenticated with the handover secret). Options and the
environment knobs: relay.process.options.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from mailrelay_api.render import RELAY_FILE
from relay.process import eventloop
from relay.process.listeners import Addresses, ListenError, parse_listen
from relay.process.options import ProcessOptions, env_float
from relay.process.watch import SourceWatcher
from relay.process.worker import Worker

log = logging.getLogger("mailrelay.server")

WORKER_RESTART_DELAY = 1.0
# A relay that starts while the shard count moves waits this long for the
# rest of the set the index names (the kubelet refreshes each ConfigMap on
# its own schedule, within about a minute) before it gives up.
STARTUP_SHARD_WAIT_SECONDS = 90.0
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def setup_logging(options: ProcessOptions) -> None:
    """Until the configuration is read: the command line's format and level,
    else text and MAILRELAY_LOG_LEVEL (else INFO)."""
    from relay import logbuffer

    level = (options.log_level or os.environ.get("MAILRELAY_LOG_LEVEL", "INFO")).upper()
    logbuffer.install(sys.stderr, level, options.log_format or "text")  # one write per iteration
    logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd's chatter


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


def run_relay(options: ProcessOptions) -> int:
    """Runs the relay until SIGTERM/SIGINT; returns the exit code."""
    setup_logging(options)
    try:
        addresses = Addresses.of(options)
    except ValueError as e:
        log.error("%s", e)
        return 2
    # Before anything imports relay.metrics (the handover's secret loader
    # does): prometheus_client picks its value store at import.
    multiprocess = (
        options.worker_count() > 1
        and bool(options.metrics_listen)
        and _prepare_multiprocess_metrics()
    )
    handover_secret = None
    if options.handover_secret_file is not None:
        from relay.handover.transfer import load_secret

        try:
            handover_secret = load_secret(options.handover_secret_file)
        except (OSError, ValueError) as e:
            log.error("handover secret: %s", e)
            return 1
    if addresses.handover is not None and handover_secret is None:
        log.error("--handover-listen needs --handover-secret-file")
        return 2
    from relay import logbuffer
    from relay.config import load_config_waiting

    try:
        # Fail fast, before binding anything (but for shards still arriving).
        config = load_config_waiting(options.config_dir, STARTUP_SHARD_WAIT_SECONDS)
    except ValueError as e:
        log.error("%s", e)
        return 1
    logbuffer.configure(*options.logging_of(config.logging))  # spec.logging, unless the CLI said
    options.queue_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # as Postfix's queue
    sources = SourceWatcher(options.watch_sources) if options.watch_sources else None
    if options.worker_count() > 1:
        return Supervisor(options, addresses, handover_secret, sources).run(multiprocess)
    try:
        sockets = addresses.bind(reuse_port=False, listen=True)
    except ListenError as e:
        log.error("%s", e)
        return 1
    if options.metrics_listen:
        serve_metrics(
            options.metrics_listen,
            multiprocess=False,
            queue_dir=options.queue_dir,
            secret=handover_secret,
        )
    worker = Worker(options, sockets, handover_secret=handover_secret, sources=sources)
    return eventloop.run(worker.run())


def stop_with_parent(signum: int) -> None:
    """Linux's PR_SET_PDEATHSIG: `signum` to this process when its parent dies."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
            log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())


class Supervisor:
    """Forks the workers and keeps them running; synchronous on purpose (it
    forks, so it never runs an event loop itself)."""

    def __init__(
        self,
        options: ProcessOptions,
        addresses: Addresses,
        handover_secret: bytes | None,
        sources: SourceWatcher | None,
    ) -> None:
        self.options = options
        self.addresses = addresses
        self.handover_secret = handover_secret
        self.sources = sources
        self.children: dict[int, int] = {}  # pid -> slot
        self._relay_file_sig: tuple[int, int, int] | None = None
        self.stopping = False
        # Made before the forks: per-client limits hold for the relay, not per worker.
        # (Imported here, after run_relay prepared the multiprocess metrics.)
        from relay.smtpd.anvil_shared import SharedCounters

        self.counters = SharedCounters()

    def run(self, multiprocess: bool) -> int:
        """Until the workers stopped; `multiprocess`: /metrics sums theirs
        (_prepare_multiprocess_metrics() was called before any import of it)."""
        options = self.options
        try:
            # Holds the ports (port 0 picks one) without listening: only the
            # workers' SO_REUSEPORT sockets receive connections.
            reservations = self.addresses.bind(reuse_port=True, listen=False)
        except ListenError as e:
            log.error("%s", e)
            return 1
        self.addresses = self.addresses.with_ports_of(reservations)
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        for slot in range(options.worker_count()):
            self._fork(slot)
        if options.metrics_listen:
            serve_metrics(
                options.metrics_listen,
                multiprocess=multiprocess,
                queue_dir=options.queue_dir,
                secret=self.handover_secret,
            )
        interval = env_float("MAILRELAY_RELOAD_INTERVAL", 1.0)
        next_poll = time.monotonic() + interval
        while self.children:
            self._reap()
            if not self.stopping and time.monotonic() >= next_poll:
                next_poll = time.monotonic() + interval
                self._poll_sources()
                self._follow_logging()
            time.sleep(0.1)
        reservations.close()
        log.info("all workers stopped")
        return 0

    def _fork(self, slot: int) -> None:
        supervisor = os.getpid()
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                # A supervisor killed outright (kill -9, OOM) takes its workers
                # along: they stop as on SIGTERM instead of serving on, orphaned.
                stop_with_parent(signal.SIGTERM)
                if os.getppid() != supervisor:  # it died before the line above
                    return
                from relay.smtpd.anvil_shared import SharedAnvil

                sockets = self.addresses.bind(reuse_port=True, listen=True)
                worker = Worker(
                    self.options,
                    sockets,
                    handover_secret=self.handover_secret,
                    anvil=SharedAnvil(self.counters, slot),
                )
                code = eventloop.run(worker.run())
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
            self.counters.forget_worker(slot)  # its connections died with it
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

    def _follow_logging(self) -> None:
        """The supervisor's own lines follow spec.logging as the workers' do."""
        from relay import logbuffer
        from relay.config import load_logging

        path = self.options.config_dir / RELAY_FILE
        try:
            st = path.stat()
            sig = (st.st_ino, st.st_mtime_ns, st.st_size)
            if sig == self._relay_file_sig:
                return
            self._relay_file_sig = sig
            logbuffer.configure(*self.options.logging_of(load_logging(self.options.config_dir)))
        except (OSError, KeyError, ValueError, TypeError):
            pass  # the workers log why the configuration is refused

    def _poll_sources(self) -> None:
        rerender = self.options.on_source_change
        if self.sources is None or rerender is None:
            return
        try:
            if self.sources.changed():
                log.info("manifests changed: rendering them again")
                rerender()
        except Exception:
            log.exception("re-rendering the manifests failed")
