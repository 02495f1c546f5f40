"""Running the relay for a test: manifests, a `mailrelay run` subprocess on a
free 127.0.0.x port, waiting until it answers.

    manifests = write_manifests(tmp_path / "m", next_hop=sink.address,
                                domains={"example.com": ["info@example.com"],
                                         "example.org": "any"})
    with RelayProcess(manifests, tmp_path, host="127.0.0.10") as relay:
        swaks(relay.address, to="info@example.com")
        relay.wait_for_log("queue active")

The test manifests switch off everything that would ask DNS (the relay
never sends a query beyond 127.0.0.0/8 in a test) and the pregreet wait;
pass `spec` to override any MailRelay spec field.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from mrtest.objects import (
    mailrelay_manifest,
    recipient_list_manifest,
    relay_domain_manifest,
    relay_spec_for_tests,
)
from relay.process.cpus import available_cpus

# -- waiting and ports ------------------------------------------------------------


def wait_until(predicate: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    """Polls predicate until it returns something truthy; fails the test after timeout."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


async def await_until(
    predicate: Callable[[], Any], timeout: float = 30.0, what: str = "condition"
) -> Any:
    """wait_until for a test on the event loop: the loop runs while it polls."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)
    return value


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on host right now (bind port 0 and let go)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, 0))
        return int(s.getsockname()[1])


_next_host = [10]


def next_loopback() -> str:
    """A different 127.0.0.x for each call in this process (relays, sinks, clients)."""
    _next_host[0] = _next_host[0] + 1 if _next_host[0] < 250 else 10
    return f"127.0.0.{_next_host[0]}"


# -- manifests ----------------------------------------------------------------------


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def write_manifests(
    folder: Path,
    *,
    next_hop: tuple[str, int],
    domains: dict[str, list[str] | str],
    spec: dict[str, Any] | None = None,
    name: str = "test",
    namespace: str = "default",
    domain_spec: dict[str, Any] | None = None,
) -> Path:
    """Writes a MailRelay and its RelayDomains/RecipientLists; returns the folder.

    `domains` maps each domain to its recipients: a list (recipients: listed),
    "any" or "verify"; `domain_spec` goes into every RelayDomain's spec (e.g.
    `verify`). Call again with other domains to change a running relay.
    """
    folder.mkdir(parents=True, exist_ok=True)
    relay_spec = _merge(relay_spec_for_tests(), spec or {})
    docs: list[dict[str, Any]] = [mailrelay_manifest(name, namespace, spec=relay_spec)]
    for domain, recipients in domains.items():
        obj_name = re.sub(r"[^a-z0-9-]", "-", domain.lower())
        relay_domain = relay_domain_manifest(
            obj_name,
            domain=domain,
            relay=name,
            namespace=namespace,
            next_hop={"host": next_hop[0], "port": next_hop[1], "tls": "none"},
            recipients=recipients if isinstance(recipients, str) else "listed",
        )
        relay_domain["spec"].update(domain_spec or {})
        docs.append(relay_domain)
        if not isinstance(recipients, str):
            docs.append(
                recipient_list_manifest(f"{obj_name}-list", obj_name, list(recipients), namespace)
            )
    tmp = folder / ".relay.yaml.tmp"
    tmp.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    tmp.replace(folder / "relay.yaml")
    return folder


def render_config(manifests: Path, config_dir: Path) -> Path:
    """Renders manifests into a config folder, as `mailrelay render --out` does."""
    from mailrelay_api.load import load_manifests
    from mailrelay_api.render import render_relay
    from relay.process.cli import pick_relay, render_to_dir

    inv = load_manifests([str(manifests)])
    assert not inv.errors, inv.errors
    render_to_dir(render_relay(pick_relay(inv, None), inv), config_dir)
    return config_dir


# -- the relay process ----------------------------------------------------------------


class RelayProcess:
    """`mailrelay run` (or `mailrelay relay` with config_dir given) as a subprocess."""

    def __init__(
        self,
        manifests: Path | None,
        workdir: Path,
        *,
        host: str | None = None,
        port: int = 0,
        command: str = "run",
        config_dir: Path | None = None,
        workers: int | None = None,
        tls_dir: Path | None = None,
        metrics: bool = False,
        env: dict[str, str] | None = None,
        args: list[str] = (),  # type: ignore[assignment]
    ) -> None:
        self.manifests = manifests
        self.workdir = workdir
        self.host = host or next_loopback()
        self.port = port or free_port(self.host)
        self.command = command
        self.config_dir = config_dir or workdir / "config"
        self.queue_dir = workdir / "queue"
        self.workers = workers
        # What the relay runs: --workers, else auto (the CPUs it may use, as it counts them).
        self.worker_count = workers or available_cpus()
        self.tls_dir = tls_dir
        self.metrics_port = free_port(self.host) if metrics else None
        self.env = env or {}
        self.args = list(args)
        self.log_path = workdir / f"relay-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "relay.process.cli", self.command]
        if self.command == "run":
            assert self.manifests is not None
            argv += ["-f", str(self.manifests)]
        argv += [
            "--listen",
            f"{self.host}:{self.port}",
            "--queue-dir",
            str(self.queue_dir),
            "--config-dir",
            str(self.config_dir),
        ]
        if self.workers is not None:
            argv += ["--workers", str(self.workers)]
        if self.tls_dir is not None:
            argv += ["--tls-dir", str(self.tls_dir)]
        if self.metrics_port is not None:
            argv += ["--metrics-listen", f"{self.host}:{self.metrics_port}"]
        return argv + self.args

    def start(self, timeout: float = 60.0) -> RelayProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.update(
            {
                "MAILRELAY_SHUTDOWN_GRACE": "5",
                "MAILRELAY_RELOAD_INTERVAL": "0.2",
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        env.update(self.env)
        log = self.log_path.open("ab")
        # A session of its own: stop(SIGKILL) kills the whole relay, as a pod's end does.
        self.proc = subprocess.Popen(
            self.argv(),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=self.workdir,
            start_new_session=True,
        )
        log.close()
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Until every worker logged that it listens (TCP alone is not enough
        with several workers)."""
        wanted = self.worker_count
        quiet = self.env.get("MAILRELAY_LOG_LEVEL", "INFO").upper() not in ("INFO", "DEBUG")

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"relay exited with {self.proc.returncode}:\n{self.log()}")
            if quiet:  # no "ready" lines to count: settle for TCP
                with socket.socket() as s:
                    s.settimeout(0.5)
                    return s.connect_ex((self.host, self.port)) == 0
            return self.log().count("ready: listening on") >= wanted

        wait_until(ready, timeout, f"relay on {self.host}:{self.port}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, pattern: str, timeout: float = 60.0, count: int = 1) -> list[str]:
        """Waits until `pattern` (a regex) matches `count` log lines; returns them."""
        rx = re.compile(pattern)

        def found() -> list[str]:
            lines = [ln for ln in self.log().splitlines() if rx.search(ln)]
            return lines if len(lines) >= count else []

        result: list[str] = wait_until(found, timeout, f"log line /{pattern}/ x{count}")
        return result

    def send_signal(self, signum: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Stops the relay; returns its exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            if signum == signal.SIGKILL:  # every process of the relay, at once
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
            else:
                self.proc.send_signal(signum)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        code = self.proc.returncode
        self.proc = None
        return code

    def __enter__(self) -> RelayProcess:
        # `with RelayProcess(...).start() as r` must not start a second process.
        return self if self.proc is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            self.stop(signal.SIGKILL if exc[0] is not None else signal.SIGTERM)


def make_certificate(folder: Path, hostname: str = "mx.relay.test") -> Path:
    """A throwaway self-signed tls.crt/tls.key (openssl) in folder; returns it."""
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            f"/CN={hostname}",
            "-keyout",
            str(folder / "tls.key"),
            "-out",
            str(folder / "tls.crt"),
        ],
        check=True,
        capture_output=True,
    )
    return folder
