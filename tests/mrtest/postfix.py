"""A real Postfix (3.7, from hack/setup.sh) as a peer: its own main.cf,
master.cf and queue in a test folder, `postfix -c DIR start`, always stopped.

    with PostfixServer("127.0.0.9", main_cf={"relay_domains": "example.com"}) as pf:
        pf.address  # ("127.0.0.9", port)

Needs root (the master runs as root and drops to postfix). Nothing leaves
127.0.0.0/8: no DNS, and the default transport is an error.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from mrtest.peers import connectable
from mrtest.relayproc import free_port, wait_until

POSTFIX = shutil.which("postfix") or "/usr/sbin/postfix"

BASE_MAIN_CF = {
    "compatibility_level": "3.6",
    "myhostname": "primary.test",
    "mydestination": "",
    "inet_interfaces": "loopback-only",
    "inet_protocols": "ipv4",
    "mynetworks": "127.0.0.0/8",
    "alias_maps": "",
    "local_recipient_maps": "",
    "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
    "smtpd_peername_lookup": "no",
    "smtp_dns_support_level": "disabled",
    "default_transport": "error:no outside delivery",
}


def master_cf(listen: str) -> str:
    """Debian's master.cf with chroot off and smtpd on `listen` (host:port)."""
    lines = []
    for line in Path("/etc/postfix/master.cf").read_text().splitlines():
        fields = line.split()
        if line and not line[0].isspace() and not line.startswith("#") and len(fields) >= 8:
            if fields[0] == "smtp" and fields[1] == "inet":
                fields[0] = listen
            fields[4] = "n"  # chroot off
            line = "  ".join(fields)
        lines.append(line)
    return "\n".join(lines) + "\n"


def available() -> bool:
    return os.geteuid() == 0 and Path(POSTFIX).exists() and Path("/etc/postfix/master.cf").exists()


class PostfixServer:
    def __init__(self, host: str, *, main_cf: dict[str, str]) -> None:
        # Postfix's daemons run as postfix, who cannot enter pytest's private
        # tmp_path: a folder of its own, removed at stop().
        self.workdir = Path(tempfile.mkdtemp(prefix="postfix-"))
        self.workdir.chmod(0o755)
        self.host = host
        self.port = free_port(host)
        self.etc = self.workdir / "etc"
        self.settings = {
            **BASE_MAIN_CF,
            **main_cf,
            "queue_directory": str(self.workdir / "spool"),
            "data_directory": str(self.workdir / "data"),
            "maillog_file": str(self.workdir / "maillog"),
            "maillog_file_prefixes": str(self.workdir),
        }
        self.started = False

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def _postfix(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [POSTFIX, "-c", str(self.etc), *args], capture_output=True, text=True, timeout=60
        )

    def start(self) -> PostfixServer:
        for folder in (self.etc, self.workdir / "spool", self.workdir / "data"):
            folder.mkdir(parents=True)
        owner = pwd.getpwnam("postfix")
        os.chown(self.workdir / "data", owner.pw_uid, owner.pw_gid)
        (self.etc / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in self.settings.items()))
        (self.etc / "master.cf").write_text(master_cf(f"{self.host}:{self.port}"))
        self.started = True
        done = self._postfix("start")
        if done.returncode != 0:
            self.stop()
            raise RuntimeError(f"postfix start failed: {done.stderr}\n{self.maillog()[-2000:]}")
        wait_until(lambda: connectable(self.host, self.port), 30, "postfix smtpd")
        return self

    def maillog(self) -> str:
        path = self.workdir / "maillog"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_for_log(self, text: str, timeout: float = 30.0) -> str:
        """The maillog once text is in it: postlogd writes it after the reply
        has gone out, so a test reading it at once may read too early."""
        wait_until(lambda: text in self.maillog(), timeout, f"{text!r} in postfix's maillog")
        return self.maillog()

    def stop(self) -> None:
        try:
            self._stop_postfix()
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _stop_postfix(self) -> None:
        if not self.started:
            return
        self.started = False
        pid = self._master_pid()
        self._postfix("stop")
        deadline = time.monotonic() + 20
        while pid is not None and _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if pid is not None and _alive(pid):  # did not stop: nothing of it may stay behind
            self._postfix("abort")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def _master_pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int((self.workdir / "spool" / "pid" / "master.pid").read_text().split()[0])
        return None

    def __enter__(self) -> PostfixServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
