"""`mailrelay run` / `mailrelay relay` as processes, with real peers: swaks and
smtp-source as clients on 127.0.0.x, Postfix's smtp-sink or aiosmtpd as the
next hop."""

from __future__ import annotations

import asyncio
import os
import signal
import urllib.request
from pathlib import Path

from mrtest.peers import AiosmtpdSink, PostfixSink, RawClient, smtp_source, swaks
from mrtest.proc import tree_pids
from mrtest.relayproc import (
    RelayProcess,
    make_certificate,
    next_loopback,
    render_config,
    wait_until,
    write_manifests,
)

from relay.process import eventloop

DOMAINS: dict[str, list[str] | str] = {
    "example.com": ["info@example.com", "joe@example.com"],
    "example.org": "any",
}


def test_relay_end_to_end_with_postfix_peers(tmp_path: Path) -> None:
    with PostfixSink(next_loopback(), tmp_path) as sink:
        manifests = write_manifests(tmp_path / "m", next_hop=sink.address, domains=DOMAINS)
        with RelayProcess(manifests, tmp_path / "relay") as relay:
            ok = swaks(relay.address, to="info@example.com", local="127.0.0.2")
            assert ok.returncode == 0, ok.output
            denied = swaks(relay.address, to="victim@evil.test", local="127.0.0.3")
            assert denied.returncode == 24, denied.output  # swaks: RCPT rejected
            assert "554 5.7.1 <victim@evil.test>: Relay access denied" in denied.output
            unknown = swaks(relay.address, to="nobody@example.com", local="127.0.0.4")
            assert "550 5.1.1 <nobody@example.com>" in unknown.output

            result = smtp_source(relay.address, count=30, sessions=5, size=2000, to="a@example.org")
            assert result.returncode == 0, result.output
            messages = sink.wait_for(31)
            relay.wait_for_log(r"reject: RCPT from unknown\[127\.0\.0\.3\]: 554 5\.7\.1")
            relay.wait_for_log(r"client=unknown\[127\.0\.0\.2\], from=<sender@client\.test>")
            relay.wait_for_log(f"event loop {eventloop.requested()}")  # uvloop unless asked
            assert relay.stop() == 0
    first = next(m for m in messages if "info@example.com" in m.recipients)
    assert first.header("Received") is not None
    assert sorted(len(m.recipients) for m in messages) == [1] * 31


def test_reload_picks_up_new_domains_and_keeps_sessions(tmp_path: Path) -> None:
    with AiosmtpdSink(next_loopback()) as sink:
        manifests = write_manifests(tmp_path / "m", next_hop=sink.address, domains=DOMAINS)
        with RelayProcess(manifests, tmp_path / "relay") as relay:

            async def session() -> None:
                async with RawClient(*relay.address, local="127.0.0.2") as c:
                    await c.greet()
                    await c.command("MAIL FROM:<a@client.test>")
                    assert (await c.command("RCPT TO:<a@example.net>")).startswith("554")
                    await c.command("RSET")
                    # Add a domain while this session is open.
                    write_manifests(
                        tmp_path / "m",
                        next_hop=sink.address,
                        domains={**DOMAINS, "example.net": "any"},
                    )
                    # Every worker reloads on its own; this session may be on any.
                    await asyncio.get_running_loop().run_in_executor(
                        None,
                        lambda: relay.wait_for_log(
                            "configuration reloaded: 3 domains", count=relay.worker_count
                        ),
                    )
                    await c.command("MAIL FROM:<a@client.test>")
                    assert await c.command("RCPT TO:<a@example.net>") == "250 2.1.5 Ok"
                    assert (await c.command("DATA")).startswith("354")
                    await c.send(b"Subject: new domain\r\n\r\nhi\r\n.\r\n")
                    assert (await c.read_reply()).startswith("250 2.0.0 Ok: queued")

            asyncio.run(session())
            sink.wait_for(1)

            # A broken manifest: logged, the running configuration stays.
            (tmp_path / "m" / "broken.yaml").write_text(
                "apiVersion: mailrelay.io/v1alpha1\nkind: RelayDomain\n"
                "metadata: {name: bad}\nspec: {domain: 'not a domain'}\n"
            )
            relay.wait_for_log("keeping the running configuration")
            assert swaks(relay.address, to="b@example.net", local="127.0.0.3").returncode == 0
            sink.wait_for(2)


def test_sigterm_lets_a_transaction_finish(tmp_path: Path) -> None:
    with AiosmtpdSink(next_loopback()) as sink:
        manifests = write_manifests(tmp_path / "m", next_hop=sink.address, domains=DOMAINS)
        relay = RelayProcess(manifests, tmp_path / "relay").start()
        try:

            async def session() -> None:
                async with (
                    RawClient(*relay.address, local="127.0.0.2") as busy,
                    RawClient(*relay.address, local="127.0.0.3") as idle,
                ):
                    await busy.greet()
                    await idle.greet()
                    await busy.command("MAIL FROM:<a@client.test>")
                    await busy.command("RCPT TO:<info@example.com>")
                    assert (await busy.command("DATA")).startswith("354")
                    await busy.send(b"Subject: in flight\r\n\r\npart one\r\n")
                    relay.send_signal(signal.SIGTERM)
                    assert (await idle.read_reply()).startswith("421 4.3.2")
                    await busy.send(b"part two\r\n.\r\n")
                    assert (await busy.read_reply()).startswith("250 2.0.0 Ok: queued")
                    assert (await busy.read_reply()).startswith("421 4.3.2")

            asyncio.run(session())
            assert relay.proc is not None
            assert relay.proc.wait(30) == 0
            assert "stopped" in relay.log()
        finally:
            relay.stop(signal.SIGKILL)
        # The message was acknowledged: it is delivered now or after a restart.
        with RelayProcess(manifests, tmp_path / "relay"):
            [message] = sink.wait_for(1)
            assert b"part one\r\npart two\r\n" in message.data


def test_grace_period_ends_with_421(tmp_path: Path) -> None:
    manifests = write_manifests(tmp_path / "m", next_hop=("127.0.0.1", 9), domains=DOMAINS)
    relay = RelayProcess(
        manifests, tmp_path / "relay", env={"MAILRELAY_SHUTDOWN_GRACE": "0.5"}
    ).start()
    try:

        async def session() -> None:
            async with RawClient(*relay.address, local="127.0.0.2") as c:
                await c.greet()
                await c.command("MAIL FROM:<a@client.test>")
                relay.send_signal(signal.SIGTERM)
                assert (await c.read_reply()).startswith("421 4.3.2")
                assert await c.closed()

        asyncio.run(session())
        assert relay.proc is not None and relay.proc.wait(30) == 0
    finally:
        relay.stop(signal.SIGKILL)


def test_starttls_with_swaks(tmp_path: Path) -> None:
    certs = make_certificate(tmp_path / "tls")
    with AiosmtpdSink(next_loopback()) as sink:
        manifests = write_manifests(tmp_path / "m", next_hop=sink.address, domains=DOMAINS)
        with RelayProcess(manifests, tmp_path / "relay", tls_dir=certs) as relay:
            result = swaks(relay.address, to="info@example.com", local="127.0.0.2", tls=True)
            assert result.returncode == 0, result.output
            assert "220 2.0.0 Ready to start TLS" in result.output
            [message] = sink.wait_for(1)
            assert b"with ESMTPS id" in message.data


def two_workers(tmp_path: Path, next_hop: tuple[str, int], *args: str) -> RelayProcess:
    """`mailrelay relay` (the pod's entrypoint) with two workers and /metrics."""
    manifests = write_manifests(tmp_path / "m", next_hop=next_hop, domains=DOMAINS)
    return RelayProcess(
        None,
        tmp_path / "relay",
        command="relay",
        config_dir=render_config(manifests, tmp_path / "config"),
        workers=2,
        metrics=True,
        args=list(args),
    )


def test_workers_share_the_port_and_metrics(tmp_path: Path) -> None:
    with AiosmtpdSink(next_loopback()) as sink:
        relay = two_workers(tmp_path, sink.address)
        with relay:
            result = smtp_source(relay.address, count=40, sessions=8, to="a@example.org")
            assert result.returncode == 0, result.output
            sink.wait_for(40)
            lines = relay.wait_for_log("queue active", count=40)
            pids = {ln.split("mailrelay/smtpd[")[1].split("]")[0] for ln in lines}
            assert len(pids) == 2, "both workers took connections"

            def accepted() -> bool:
                text = urllib.request.urlopen(relay.metrics_url, timeout=5).read().decode()
                return "mailrelay_messages_accepted_total 40.0" in text

            wait_until(accepted, 10, "40 accepted in /metrics")
            assert relay.stop() == 0


def test_workers_metrics_with_a_handover_secret(tmp_path: Path) -> None:
    """The pod's command line (a handover secret, several workers): /metrics
    still sums the workers (loading the secret must not import prometheus_client
    before its multiprocess folder is set)."""
    secret = tmp_path / "secret"
    secret.write_text("s" * 64)
    with AiosmtpdSink(next_loopback()) as sink:
        relay = two_workers(tmp_path, sink.address, "--handover-secret-file", str(secret))
        with relay:
            result = smtp_source(relay.address, count=6, sessions=2, to="a@example.org")
            assert result.returncode == 0, result.output
            sink.wait_for(6)

            def accepted() -> bool:
                text = urllib.request.urlopen(relay.metrics_url, timeout=5).read().decode()
                return "mailrelay_messages_accepted_total 6.0" in text

            wait_until(accepted, 10, "6 accepted in /metrics")
            assert "already imported" not in relay.log()
            assert relay.stop() == 0


def test_workers_stop_when_the_supervisor_is_killed(tmp_path: Path) -> None:
    """kill -9 of the supervisor alone: its workers stop too (PR_SET_PDEATHSIG), and
    none keeps serving the port orphaned."""
    manifests = write_manifests(tmp_path / "m", next_hop=("127.0.0.1", 9), domains=DOMAINS)
    relay = RelayProcess(manifests, tmp_path / "relay", workers=2).start()
    try:
        assert relay.proc is not None
        workers = [pid for pid in tree_pids(relay.proc.pid) if pid != relay.proc.pid]
        assert len(workers) == 2
        os.kill(relay.proc.pid, signal.SIGKILL)
        relay.proc.wait(10)

        def gone(pid: int) -> bool:
            try:
                return "Z" in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                return True

        wait_until(lambda: all(gone(pid) for pid in workers), 30, "the workers to stop")
    finally:
        relay.stop(signal.SIGKILL)


def test_smtputf8_and_dsn_parameters_end_to_end(tmp_path: Path) -> None:
    """A client's DSN parameters reach smtp-sink (DSN, 8BITMIME, no SMTPUTF8)
    through `mailrelay run`; a message that needs SMTPUTF8 comes back 5.6.7."""
    with PostfixSink(next_loopback(), tmp_path) as sink:
        manifests = write_manifests(tmp_path / "m", next_hop=sink.address, domains=DOMAINS)
        with RelayProcess(manifests, tmp_path / "relay") as relay:

            async def session() -> list[str]:
                async with RawClient(*relay.address, local="127.0.0.2") as c:
                    await c.greet()
                    replies = []
                    for line, data in [
                        ("MAIL FROM:<a@example.org> BODY=8BITMIME RET=HDRS ENVID=e+2B1", None),
                        ("RCPT TO:<info@example.com> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;x", None),
                        ("DATA", "Subject: Käse\r\n\r\nBrötchen\r\n.\r\n"),
                        ("MAIL FROM:<a@example.org> SMTPUTF8", None),
                        ("RCPT TO:<joe@example.com>", None),
                        ("DATA", "Subject: Grüße\r\n\r\nhi\r\n.\r\n"),
                    ]:
                        replies.append(await c.command(line))
                        if data is not None:
                            await c.send(data.encode())
                            replies.append(await c.read_reply())
                    return replies

            replies = asyncio.run(session())
            assert [r[:3] for r in replies] == ["250", "250", "354", "250"] * 2, replies
            messages = sink.wait_for(2)  # the first message, and the 5.6.7 bounce of the second
            relay.wait_for_log(r"dsn=5\.6\.7, status=bounced \(SMTPUTF8 is required")
            assert relay.stop() == 0
    [relayed] = [m for m in messages if m.recipients == ["info@example.com"]]
    assert relayed.mail_args.split()[1:] == ["BODY=8BITMIME", "RET=HDRS", "ENVID=e+2B1"]
    # ORCPT before NOTIFY, in the order Postfix's smtp client sends them.
    assert relayed.rcpt_args == ["<info@example.com> ORCPT=rfc822;x NOTIFY=SUCCESS,FAILURE"]
    assert "Brötchen".encode() in relayed.data
    [bounce] = [m for m in messages if m.recipients == ["a@example.org"]]
    assert b"Status: 5.6.7" in bounce.data and b"joe@example.com" in bounce.data
