"""Outbound TLS per RelayDomain nextHop.tls (none | may | encrypt | verify),
against real next hops with certificates from a test CA, names in a real
DNS server on 127.0.0.1."""

from __future__ import annotations

import logging
import ssl
import subprocess
from pathlib import Path
from typing import Any

import pytest
from mrtest.delivery_helpers import FakeClock, Sink, message
from mrtest.dnsserver import DnsServer
from mrtest.relayproc import next_loopback

from relay.config import DnsPolicy, Domain, NextHop, RelayConfig
from relay.delivery.qmgr import Delivery
from relay.dns import Resolver
from relay.queue.store import Queue


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_ca(folder: Path) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    key, crt = folder / "ca.key", folder / "ca.crt"
    openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-days", "2", "-subj", "/CN=mailrelay test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-keyout", str(key), "-out", str(crt),
    )  # fmt: skip
    return crt, key


def make_leaf(folder: Path, ca: tuple[Path, Path], name: str) -> ssl.SSLContext:
    """A server context with a certificate for `name`, signed by the CA."""
    folder.mkdir(parents=True, exist_ok=True)
    key, csr, crt, ext = (folder / f"{name}.{x}" for x in ("key", "csr", "crt", "ext"))
    ext.write_text(
        f"subjectAltName=DNS:{name}\nbasicConstraints=CA:FALSE\n"
        "keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n"
        "authorityKeyIdentifier=keyid\nsubjectKeyIdentifier=hash\n"
    )
    openssl(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(csr),
    )  # fmt: skip
    openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]),
        "-CAcreateserial", "-days", "2", "-extfile", str(ext), "-out", str(crt),
    )  # fmt: skip
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(crt, key)
    return ctx


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("pki")
    ca = make_ca(folder / "ca")
    rogue = make_ca(folder / "rogue")  # a CA nobody trusts
    return {
        "ca": ca[0],
        "right": make_leaf(folder / "right", ca, "mx.right.test"),
        "untrusted": make_leaf(folder / "untrusted", rogue, "mx.right.test"),
    }


async def run_delivery(
    tmp_path: Path, pki: dict[str, Any], hop_host: str, tls: str, sink: Sink, dns: DnsServer
) -> tuple[Queue, str]:
    clock = FakeClock()
    config = RelayConfig(
        name="t",
        hostname="relay.test",
        domains={
            "example.com": Domain("example.com", NextHop(hop_host, sink.port, tls=tls), "any")
        },
        recipients=set(),
        dns=DnsPolicy(nameservers=(dns.nameserver,), timeout=2.0),
    )
    queue = Queue(tmp_path / f"queue-{tls}-{hop_host}", clock=clock)
    verify = ssl.create_default_context(cafile=str(pki["ca"]))
    delivery = Delivery(queue, lambda: config, Resolver(config.dns), clock, verify_context=verify)
    await delivery.recover()
    msg = queue.incoming()
    msg.write(message(subject=f"tls {tls}"))
    qid = await msg.commit("a@example.org", ["b@example.com"], "127.0.0.9")
    delivery.wake(qid)
    await delivery.idle()
    await delivery.stop(grace=5)
    return queue, qid


@pytest.fixture
async def names() -> Any:
    host = next_loopback()
    records = {
        "mx.right.test": [("A", host)],
        "mx.wrong.test": [("A", host)],  # same server, a name its cert does not carry
    }
    with DnsServer(records) as dns:
        yield host, dns


@pytest.mark.parametrize(
    ("hop", "tls", "server", "delivered", "why"),
    [
        ("mx.right.test", "verify", "right", True, ""),
        ("mx.wrong.test", "verify", "right", False, "Hostname mismatch"),
        ("mx.right.test", "verify", "untrusted", False, "certificate verify failed"),
        ("mx.wrong.test", "encrypt", "right", True, ""),  # encrypt: no name check
        ("mx.right.test", "encrypt", None, False, "TLS is required, but was not offered"),
        ("mx.right.test", "verify", None, False, "TLS is required, but was not offered"),
        ("mx.wrong.test", "may", "untrusted", True, ""),
        ("mx.right.test", "may", None, True, ""),
        ("mx.right.test", "none", "right", True, ""),
    ],
)
async def test_tls_policy(
    tmp_path: Path,
    pki: dict[str, Any],
    names: Any,
    caplog: pytest.LogCaptureFixture,
    hop: str,
    tls: str,
    server: str | None,
    delivered: bool,
    why: str,
) -> None:
    caplog.set_level(logging.INFO, logger="relay.delivery")
    host, dns = names
    sink = await Sink(host=host, tls_context=pki[server] if server else None).start()
    try:
        queue, qid = await run_delivery(tmp_path, pki, hop, tls, sink, dns)
    finally:
        await sink.stop()
    if delivered:
        assert len(sink.messages) == 1, caplog.text
        assert list(queue.messages()) == []
    else:
        # Deferred, never sent in clear or to the wrong server.
        assert sink.messages == [] and sink.transactions == 0
        [queued] = list(queue.messages())
        assert queued.queue_id == qid
        assert why in caplog.text, caplog.text
        assert "status=deferred" in caplog.text
    await queue.close()
