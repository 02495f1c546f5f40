"""Certificate rotation (relay.process.tlsreload): a Secret volume's `..data` swap
serves the new certificate to new sessions, without a restart and without
dropping a session in flight; bad new files keep the old certificate."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import aiosmtplib
from mrtest.peers import AiosmtpdSink
from mrtest.relayproc import RelayProcess, make_certificate, next_loopback, write_manifests

from relay.process.tlsreload import TlsReloader


class SecretVolume:
    """A folder laid out as the kubelet mounts a Secret: tls.crt ->
    ..data/tls.crt, ..data -> ..<version>; `publish` swaps ..data atomically."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.version = 0
        for name in ("tls.crt", "tls.key"):
            (root / name).symlink_to(f"..data/{name}")

    def publish(self, crt: Path, key: Path) -> None:
        self.version += 1
        folder = self.root / f"..2026_01_0{self.version}"
        folder.mkdir()
        shutil.copy(crt, folder / "tls.crt")
        shutil.copy(key, folder / "tls.key")
        tmp = self.root / "..data_tmp"
        tmp.symlink_to(folder.name)
        os.replace(tmp, self.root / "..data")


def fingerprint_of(crt: Path) -> str:
    import ssl

    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(crt.read_text())).hexdigest()


async def open_tls(address: tuple[str, int]) -> tuple[aiosmtplib.SMTP, str]:
    """A STARTTLS session; returns it and the server certificate's SHA-256."""
    smtp = aiosmtplib.SMTP(
        hostname=address[0],
        port=address[1],
        start_tls=False,
        timeout=20,
        local_hostname="client.test",
    )
    await smtp.connect()
    await smtp.ehlo()
    await smtp.starttls(validate_certs=False)
    ssl_object = smtp.transport.get_extra_info("ssl_object")
    der = ssl_object.getpeercert(binary_form=True)
    return smtp, hashlib.sha256(der).hexdigest()


def test_reloader_keeps_old_context_on_bad_files(tmp_path: Path) -> None:
    one = make_certificate(tmp_path / "one", "one.test")
    two = make_certificate(tmp_path / "two", "two.test")
    volume = SecretVolume(tmp_path / "secret")
    reloader = TlsReloader(volume.root)
    assert not reloader.load_sync() and reloader.context is None  # nothing yet
    volume.publish(one / "tls.crt", one / "tls.key")
    assert reloader.load_sync() and reloader.fingerprint == fingerprint_of(one / "tls.crt")
    first = reloader.context
    assert not reloader.load_sync()  # unchanged: nothing done
    volume.publish(two / "tls.crt", one / "tls.key")  # key of another cert
    assert not reloader.load_sync()
    assert reloader.context is first and reloader.failures == 1
    (tmp_path / "garbage.pem").write_text("-----BEGIN CERTIFICATE-----\nnope\n")
    volume.publish(tmp_path / "garbage.pem", two / "tls.key")
    assert not reloader.load_sync() and reloader.context is first
    volume.publish(two / "tls.crt", two / "tls.key")
    assert reloader.load_sync() and reloader.fingerprint == fingerprint_of(two / "tls.crt")
    assert reloader.reloads == 1


async def test_rotation_in_a_running_relay(tmp_path: Path) -> None:
    one = make_certificate(tmp_path / "one", "mx.relay.test")
    two = make_certificate(tmp_path / "two", "mx.relay.test")
    three = make_certificate(tmp_path / "three", "mx.relay.test")
    volume = SecretVolume(tmp_path / "secret")
    volume.publish(one / "tls.crt", one / "tls.key")
    with AiosmtpdSink(next_loopback()) as sink:
        manifests = write_manifests(
            tmp_path / "m", next_hop=sink.address, domains={"example.org": "any"}
        )
        relay = RelayProcess(
            manifests,
            tmp_path / "relay",
            tls_dir=volume.root,
            env={"MAILRELAY_TLS_RELOAD_INTERVAL": "0.1"},
        )
        # Each worker watches the volume on its own: a new session may reach any of them.
        workers = relay.worker_count
        with relay:
            relay.wait_for_log("TLS certificate loaded", count=workers)
            in_flight, seen = await open_tls(relay.address)
            assert seen == fingerprint_of(one / "tls.crt")
            await in_flight.ehlo()
            await in_flight.mail("a@client.test")
            await in_flight.rcpt("x@example.org")

            volume.publish(two / "tls.crt", two / "tls.key")
            relay.wait_for_log("TLS certificate reloaded for new sessions", count=workers)
            fresh, seen = await open_tls(relay.address)
            assert seen == fingerprint_of(two / "tls.crt")
            await fresh.quit()

            # A broken renewal: logged, the last good certificate stays.
            volume.publish(three / "tls.crt", two / "tls.key")
            relay.wait_for_log("cannot load the certificate", count=workers)
            later, seen = await open_tls(relay.address)
            assert seen == fingerprint_of(two / "tls.crt")
            await later.quit()

            # The session that started before all this still delivers.
            code, message = await in_flight.data(b"Subject: in flight\r\n\r\nstill here\r\n")
            assert code == 250, message
            await in_flight.quit()
            sink.wait_for(1)
            assert "Subject: in flight" in sink.messages[0].text
            assert "with ESMTPS" in sink.messages[0].text
