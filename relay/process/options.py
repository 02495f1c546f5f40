"""ProcessOptions: how the relay process runs, as `mailrelay run` and `mailrelay relay` say.

One value from the command line down to the supervisor and its workers
(relay.process.server, relay.process.worker), instead of a dozen keyword
arguments threaded through each. Also the environment knobs (for tests and
operators; the CLI keeps to docs/reference.md):

  MAILRELAY_LOG_LEVEL         the log level, over spec.logging.level (--log-level wins)
  MAILRELAY_SHUTDOWN_GRACE    seconds sessions get after SIGTERM (default 25)
  MAILRELAY_SMTPD_TIMEOUT     idle timeout of a session (default 300)
  MAILRELAY_SMTPD_MIN_DATA_RATE  bytes/s a client must keep up in DATA (default 500)
  MAILRELAY_RELOAD_INTERVAL   config poll interval (default 1)
  MAILRELAY_TLS_RELOAD_INTERVAL  tls.crt/tls.key poll interval (default 2)
  MAILRELAY_EVENT_LOOP        the workers' event loop: uvloop (default) or asyncio
                              (relay.process.eventloop)
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from relay.process.cpus import available_cpus

if TYPE_CHECKING:
    from relay.config import LoggingPolicy

DEFAULT_SHUTDOWN_GRACE = 25.0


def env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


def _shutdown_grace() -> float:
    return env_float("MAILRELAY_SHUTDOWN_GRACE", DEFAULT_SHUTDOWN_GRACE)


@dataclass(frozen=True)
class ProcessOptions:
    config_dir: Path  # the rendered configuration, watched for changes
    listen: str  # HOST:PORT of the SMTP listener
    queue_dir: Path
    metrics_listen: str | None = None  # HOST:PORT of /metrics (the control port)
    tls_dir: Path | None = None  # tls.crt and tls.key for STARTTLS, reloaded when changed
    workers: int | None = None  # None: auto, the CPUs this process may use
    proxy_listen: str | None = None  # HOST:PORT expecting PROXY headers
    # `mailrelay run -f`: manifests rendered again by on_source_change when edited.
    watch_sources: list[Path] | None = None
    on_source_change: Callable[[], None] | None = None
    shutdown_grace: float = field(default_factory=_shutdown_grace)  # seconds after SIGTERM
    handover_listen: str | None = None  # HOST:PORT where peer pods hand their queue over
    handover_secret_file: Path | None = None
    # --log-format / --log-level; None: spec.logging decides (the level: MAILRELAY_LOG_LEVEL first).
    log_format: str | None = None
    log_level: str | None = None

    def logging_of(self, policy: LoggingPolicy) -> tuple[str, str]:
        """(format, level): the command line's, else (the level) MAILRELAY_LOG_LEVEL,
        else the configuration's (spec.logging)."""
        level = self.log_level or os.environ.get("MAILRELAY_LOG_LEVEL") or policy.level
        return self.log_format or policy.format, level.upper()

    def worker_count(self) -> int:
        if self.workers is not None:
            return self.workers
        return available_cpus()


def relay_version() -> str:
    """The installed package's version (`mailrelay --version`, mailrelay_build_info)."""
    try:
        return importlib.metadata.version("mailrelay")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"
