"""The `mailrelay` command line (its contract: docs/reference.md, "Command line")."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

from mailrelay_api import schema as S
from mailrelay_api.load import Inventory, load_manifests
from mailrelay_api.references import cross_reference_errors
from mailrelay_api.render import (
    DOMAINS_FILE,
    DOMAINS_INDEX_FILE,
    Rendered,
    render_relay,
)
from mailrelay_api.validate import manifest_warnings
from relay.process.options import ProcessOptions, relay_version
from relay.process.output import emit, format_table
from relay.process.queue_admin import add_queue_parser, default_queue_dir

DEFAULT_LOCAL_LISTEN = "127.0.0.1:2525"


def _load(paths: list[str]) -> Inventory:
    inv = load_manifests(paths)
    if inv.errors:
        for e in inv.errors:
            print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1)
    return inv


def warn(inv: Inventory) -> list[str]:
    """Prints to stderr what the manifests hold that the relay ignores; returns it."""
    warnings = [str(w) for w in manifest_warnings(inv.relays, inv.domains, inv.recipient_lists)]
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    return warnings


def pick_relay(inv: Inventory, name: str | None) -> dict[str, Any]:
    relays = inv.relays
    if name:
        relays = [
            r
            for r in relays
            if name
            in (r["metadata"]["name"], f"{r['metadata']['namespace']}/{r['metadata']['name']}")
        ]
    if len(relays) != 1:
        found = ", ".join(
            f"{r['metadata']['namespace']}/{r['metadata']['name']}" for r in inv.relays
        )
        what = "no MailRelay" if not relays else "several MailRelays"
        print(
            f"error: {what} in the manifests{f' named {name}' if name else ''} "
            f"(found: {found or 'none'}); choose one with --relay",
            file=sys.stderr,
        )
        raise SystemExit(1)
    return relays[0]


def render_to_dir(rendered: Rendered, config_dir: Path) -> None:
    """Writes the rendered files so a running relay sees a whole new set at once."""
    config_dir.mkdir(parents=True, exist_ok=True)
    for name, data in rendered.files.items():
        tmp = config_dir / f".{name}.tmp"
        tmp.write_bytes(data)
        tmp.replace(config_dir / name)
    # What an earlier render wrote and this one does not: shards of another
    # count, domains.json once the domains are sharded (or the index once not).
    stale = [*config_dir.glob("recipients-*.txt.gz"), *config_dir.glob("domains-*-of-*.json.gz")]
    stale += [config_dir / n for n in (DOMAINS_FILE, DOMAINS_FILE + ".gz", DOMAINS_INDEX_FILE)]
    for old in stale:
        if old.name not in rendered.files:
            old.unlink(missing_ok=True)


def cmd_validate(args: argparse.Namespace) -> int:
    inv = load_manifests(args.file)
    problems = [str(e) for e in inv.errors] + cross_reference_errors(inv)
    warnings = warn(inv)
    objects = [
        {
            "kind": o["kind"],
            "name": f"{o['metadata']['namespace']}/{o['metadata']['name']}",
            "source": o["metadata"].get("annotations", {}).get("mailrelay.io/source", ""),
        }
        for o in inv.relays + inv.domains + inv.recipient_lists
    ]
    if args.output == "table":
        for p in problems:
            print(f"error: {p}", file=sys.stderr)
        if objects:
            rows = [[o["kind"], o["name"], o["source"]] for o in objects]
            print(format_table(["KIND", "NAME", "SOURCE"], rows), end="")
        if not problems:
            noted = f" ({len(warnings)} warning(s))" if warnings else ""
            print(
                f"ok: {len(inv.relays)} MailRelay, {len(inv.domains)} RelayDomain, "
                f"{len(inv.recipient_lists)} RecipientList{noted}"
            )
    else:
        doc = {"valid": not problems, "errors": problems, "warnings": warnings, "objects": objects}
        emit(doc, args.output)
    return 1 if problems or (warnings and args.strict) else 0


def cmd_render(args: argparse.Namespace) -> int:
    inv = _load(args.file)
    if warn(inv) and args.strict:
        print("error: warnings with --strict: nothing rendered", file=sys.stderr)
        return 1
    relay = pick_relay(inv, args.relay)
    rendered = render_relay(relay, inv)
    if args.out:
        render_to_dir(rendered, Path(args.out))
        print(f"wrote {len(rendered.files)} files to {args.out}")
        return 0
    if args.output != "table":
        files = {
            name: (
                {"gzipBytes": len(data), "recipients": rendered.recipients}
                if name.endswith(".gz")
                else json.loads(data)
            )
            for name, data in rendered.files.items()
        }
        verdicts = [
            {
                "relayDomain": f"{v.namespace}/{v.name}",
                "domain": v.domain,
                "accepted": v.accepted,
                "reason": v.reason,
                "message": v.message,
                "recipients": v.recipients,
            }
            for v in rendered.domains
        ]
        emit({"configHash": rendered.config_hash, "files": files, "domains": verdicts}, args.output)
        return 0
    for name, data in rendered.files.items():
        if name.endswith(".gz"):
            print(f"# {name}: {len(data)} bytes (gzip, {rendered.recipients} recipients in all)")
        else:
            print(f"# {name}")
            print(data.decode(), end="")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from relay.process.server import run_relay  # the relay process, with its reload loop

    inv = _load(args.file)
    warn(inv)
    relay = pick_relay(inv, args.relay)
    config_dir = Path(args.config_dir or tempfile.mkdtemp(prefix="mailrelay-config-"))
    render_to_dir(render_relay(relay, inv), config_dir)

    def rerender() -> None:
        # Called by the relay's reload loop: manifests edited while running
        # are rendered again and picked up without a restart.
        # Logged, not printed: in the relay's log format, with its level and component.
        log = logging.getLogger("mailrelay.run")
        fresh = load_manifests(args.file)
        if fresh.errors:
            for e in fresh.errors:
                log.error("%s (keeping the running configuration)", e)
            return
        try:
            render_to_dir(render_relay(pick_relay(fresh, args.relay), fresh), config_dir)
        except SystemExit:
            log.error("manifests changed; keeping the running configuration")

    return run_relay(
        ProcessOptions(
            config_dir,
            listen=args.listen or DEFAULT_LOCAL_LISTEN,
            queue_dir=Path(args.queue_dir or default_queue_dir()),
            metrics_listen=args.metrics_listen,
            tls_dir=Path(args.tls_dir) if args.tls_dir else None,
            workers=args.workers,
            log_format=args.log_format,
            log_level=args.log_level,
            watch_sources=[Path(p) for p in args.file],
            on_source_change=rerender,
        )
    )


def cmd_relay(args: argparse.Namespace) -> int:
    from relay.process.server import run_relay

    return run_relay(
        ProcessOptions(
            Path(args.config_dir),
            listen=args.listen,
            queue_dir=Path(args.queue_dir or default_queue_dir()),
            metrics_listen=args.metrics_listen,
            tls_dir=Path(args.tls_dir) if args.tls_dir else None,
            workers=args.workers,
            log_format=args.log_format,
            log_level=args.log_level,
            proxy_listen=args.proxy_listen,
            handover_listen=args.handover_listen,
            handover_secret_file=(
                Path(args.handover_secret_file) if args.handover_secret_file else None
            ),
        )
    )


def cmd_queue(args: argparse.Namespace) -> int:
    from relay.process.queue_admin import run_queue_command

    return run_queue_command(args)


def cmd_probe(args: argparse.Namespace) -> int:
    from relay.process.probe import run_probe

    return run_probe(args.address, args.timeout, args.liveness)


def cmd_operator(args: argparse.Namespace) -> int:
    from mailrelay_operator.main import run_operator

    return run_operator(args)


def workers_arg(text: str) -> int | None:
    """--workers: None for auto (ProcessOptions counts the CPUs), else N >= 1."""
    if text == "auto":
        return None
    try:
        number = int(text)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"auto or a whole number >= 1, not {text!r}")
    return number


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mailrelay", description="A Kubernetes-native mail relay, MX backup and spam filter."
    )
    parser.add_argument("--version", action="version", version=f"mailrelay {relay_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def manifests(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "-f",
            "--file",
            action="append",
            required=True,
            metavar="PATH",
            help="manifest file or folder (repeatable)",
        )

    def strict(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--strict",
            action="store_true",
            help="exit 1 on warnings too (values the relay would ignore)",
        )

    def output(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "-o",
            "--output",
            choices=["table", "json", "yaml"],
            default="table",
            help="table for people, json or yaml for scripts",
        )

    def relay_opts(p: argparse.ArgumentParser) -> None:
        p.add_argument("--metrics-listen", default=None, help="HOST:PORT for /metrics")
        p.add_argument("--tls-dir", default=None, help="folder with tls.crt and tls.key")
        p.add_argument(
            "--workers",
            type=workers_arg,
            default=None,
            metavar="auto|N",
            help="worker processes (default auto: the CPUs this process may use)",
        )
        p.add_argument(
            "--log-format",
            choices=S.values(S.LogFormat),
            default=None,
            help="text (Postfix-like lines) or json (one object a line); default spec.logging",
        )
        p.add_argument(
            "--log-level",
            choices=S.values(S.LogLevel),
            default=None,
            help="least severe lines written; default $MAILRELAY_LOG_LEVEL, else spec.logging",
        )

    p = sub.add_parser("run", help="run one relay locally from manifests")
    manifests(p)
    p.add_argument("--relay", help="which MailRelay, when the manifests hold several")
    p.add_argument("--listen", help=f"HOST:PORT to listen on (default {DEFAULT_LOCAL_LISTEN})")
    p.add_argument(
        "--queue-dir", help="queue folder (default $MAILRELAY_QUEUE_DIR, else .mailrelay/queue)"
    )
    p.add_argument("--config-dir", help="where to render the configuration (default: a temp dir)")
    relay_opts(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("render", help="print the relay configuration the operator would write")
    manifests(p)
    p.add_argument("--relay", help="which MailRelay, when the manifests hold several")
    p.add_argument("--out", help="write the files to this folder instead of printing them")
    output(p)
    strict(p)
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("validate", help="check manifests against the CRD schemas")
    manifests(p)
    output(p)
    strict(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("relay", help="the relay pod's entrypoint")
    p.add_argument("--config-dir", required=True)
    p.add_argument("--listen", default="0.0.0.0:2525")
    p.add_argument("--proxy-listen", default=None, help="HOST:PORT expecting PROXY headers")
    p.add_argument("--queue-dir", default=None, help="queue folder (default $MAILRELAY_QUEUE_DIR)")
    p.add_argument(
        "--handover-listen",
        default=None,
        help="HOST:PORT where peer pods hand their queue over (needs --handover-secret-file)",
    )
    p.add_argument(
        "--handover-secret-file",
        default=None,
        help="the relay's shared secret: authenticates handovers and drain requests",
    )
    relay_opts(p)
    p.set_defaults(func=cmd_relay)

    add_queue_parser(sub).set_defaults(func=cmd_queue)

    p = sub.add_parser("probe", help="SMTP health check of a relay pod (EHLO/QUIT)")
    p.add_argument("--address", default="127.0.0.1:2525", help="HOST:PORT of the relay")
    p.add_argument("--timeout", type=float, default=15.0, help="seconds for the whole dialogue")
    p.add_argument("--liveness", action="store_true", help="any SMTP greeting is enough")
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("operator", help="the operator's entrypoint (Kopf)")
    p.add_argument("--namespace", action="append", default=[], help="watch only these namespaces")
    p.add_argument("--standalone", action="store_true", default=True)
    p.add_argument("--liveness", default="http://0.0.0.0:8080/healthz")
    p.add_argument("--verbose", action="store_true")
    p.set_defaults(func=cmd_operator)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Queue ids may come after options too (`queue delete --queue-dir D ID1 ID2`).
    if (
        extra
        and getattr(args, "ids", None) is not None
        and not any(e.startswith("-") and e != "-" for e in extra)
    ):
        args.ids += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
