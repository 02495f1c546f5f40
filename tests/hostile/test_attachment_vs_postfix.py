"""Differential, end to end: each message of the hostile MIME corpus goes to
a real Postfix whose mime_header_checks is the benchmark's attachment regexp,
and to a running relay rejecting the same extensions. Wherever Postfix
rejects, the relay rejects too; and since every case hides an .exe that a
recipient's parser (or Postfix) would find, the relay rejects every case
and accepts every control.

Postfix misses some cases (RFC 2231 and 2047 names, a comment or junk
after the quoted name, a quoted pair in the name, an idna charset): the
regexp reads raw header text. Those are the cases where we are stricter;
none where Postfix is."""

from __future__ import annotations

import os
import shutil
import smtplib
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from hostile.corpus import Case, corpus
from mrtest.benchscripts import load_bench
from mrtest.peers import AiosmtpdSink
from mrtest.relayproc import RelayProcess, write_manifests

CASES = corpus()
# (case id, "exe" or "control") -> why the relay may accept what Postfix rejects
ALLOWED_MISSES: dict[tuple[str, str], str] = {}


@pytest.fixture(scope="module")
def sink() -> Iterator[AiosmtpdSink]:
    with AiosmtpdSink("127.0.0.1") as s:
        yield s


@pytest.fixture(scope="module")
def filtering_postfix(sink: AiosmtpdSink) -> Iterator[tuple[str, int]]:
    """Postfix as the benchmark runs it, content filter on: its smtpd address."""
    if os.geteuid() != 0 or shutil.which("postfix") is None:
        pytest.skip("needs root and Postfix (hack/setup.sh)")
    bench = load_bench("relay_vs_postfix")
    # Postfix's own user must get into its folders: pytest's tmp_path is private.
    workdir = Path(tempfile.mkdtemp(prefix="hostile-mime-"))
    workdir.chmod(0o755)
    server = bench.Postfix(workdir, SimpleNamespace(port=sink.port), content_filter=True)
    try:
        server.start()
        yield bench.HOST, server.port
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def filtering_relay(
    tmp_path_factory: pytest.TempPathFactory, sink: AiosmtpdSink
) -> Iterator[tuple[str, int]]:
    """`mailrelay run` rejecting the benchmark's extensions: its address."""
    workdir = tmp_path_factory.mktemp("hostile-mime-relay")
    extensions = list(load_bench("relay_vs_postfix").REJECT_EXTENSIONS)
    manifests = write_manifests(
        workdir / "manifests",
        next_hop=sink.address,
        domains={"example.com": "any"},
        spec={"contentFilters": {"rejectAttachmentExtensions": extensions}},
    )
    with RelayProcess(manifests, workdir) as proc:
        yield proc.address


def final_reply(address: tuple[str, int], data: bytes) -> str:
    """The reply to the end of DATA, one session per message."""
    with smtplib.SMTP(*address, local_hostname="client.test", timeout=30) as smtp:
        smtp.ehlo()
        smtp.mail("a@example.org")
        smtp.rcpt("b@example.com")
        code, text = smtp.data(data)
        return f"{code} {text.decode(errors='replace')}"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_relay_rejects_wherever_postfix_does(
    case: Case, filtering_postfix: tuple[str, int], filtering_relay: tuple[str, int]
) -> None:
    for variant, data in (("exe", case.data), ("control", case.control)):
        theirs = final_reply(filtering_postfix, data)
        ours = final_reply(filtering_relay, data)
        if theirs.startswith("5") and (case.id, variant) not in ALLOWED_MISSES:
            assert ours.startswith("550 5.7.1"), (variant, theirs, ours)
        if variant == "exe":
            assert ours.startswith("550 5.7.1 Attachment"), ours
        else:
            assert ours.startswith("250 "), ours
