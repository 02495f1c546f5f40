"""`mailrelay queue`: postqueue/postsuper/postcat/qshape for the relay's queue folder.

Safe while relays run on the same folder: every change is one rename, unlink
or mtime update, which the relays' scans and locks already expect.
- list: like `postqueue -p`: a line per message, its deferral reason, a line
  per pending recipient, and the totals (`-- N Kbytes in M Requests.`)
- show: envelope and headers (`--body`: the whole message, like `postcat -q`)
- flush: every deferred message is due now (running relays watch a marker file)
- hold / release / delete: like `postsuper -h/-H/-d`
- shape: like `qshape`: recipient (or sender) domains by age

Which messages: queue ids (any case), ALL, or `-` for ids read from standard
input (`postsuper -d -`), narrowed by the filters --sender, --recipient,
--domain, --older-than and --state; list and shape take every message when
given no ids. The folder is --queue-dir, else $MAILRELAY_QUEUE_DIR (set in the
image and the pods), else .mailrelay/queue (where `mailrelay run` keeps it).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from mailrelay_api.units import parse_duration
from relay.process.output import emit, format_table
from relay.queue.format import ACTIVE, DEFERRED, HOLD, QUEUE_STATES
from relay.queue.store import Queue, QueuedMessage

QUEUE_DIR_ENV = "MAILRELAY_QUEUE_DIR"
LOCAL_QUEUE_DIR = ".mailrelay/queue"
ACTIONS = ("list", "show", "flush", "hold", "release", "delete", "shape")
# qshape's age buckets, in minutes: 0-5, 5-10, ... and older than the last one.
SHAPE_BUCKETS = (5, 10, 20, 40, 80, 160, 320, 640, 1280)
# postqueue -p marks a message by its state after the id.
STATE_MARK = {ACTIVE: "*", HOLD: "!", DEFERRED: " "}


def default_queue_dir() -> str:
    return os.environ.get(QUEUE_DIR_ENV) or LOCAL_QUEUE_DIR


def _when(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _as_dict(m: QueuedMessage) -> dict[str, Any]:
    return {
        "id": m.queue_id,
        "state": m.state,
        "size": m.size,
        "arrival": _when(m.arrival),
        "sender": m.sender,
        "recipients": m.recipients,
        "done": m.done,
        "attempts": m.attempts,
        "nextAttempt": _when(m.next_attempt) if m.state == DEFERRED else None,
        "reason": m.last_reason,
        "client": m.client,
    }


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower() if "@" in address else "(no domain)"


# -- which messages ---------------------------------------------------------------------


@dataclass(frozen=True)
class Filters:
    sender: str | None = None  # address, or @domain
    recipient: str | None = None  # address, or @domain
    domain: str | None = None  # a pending recipient's domain
    older_than: float | None = None  # seconds since arrival
    state: str | None = None

    @property
    def any(self) -> bool:
        return any(v is not None for v in vars(self).values())

    def match(self, m: QueuedMessage, now: float) -> bool:
        if self.state is not None and m.state != self.state:
            return False
        if self.older_than is not None and now - m.arrival < self.older_than:
            return False
        if self.sender is not None and not _address_matches(m.sender, self.sender):
            return False
        if self.recipient is not None and not any(
            _address_matches(r, self.recipient) for r in m.recipients
        ):
            return False
        return self.domain is None or any(_domain(r) == self.domain for r in m.recipients)


def _address_matches(address: str, wanted: str) -> bool:
    wanted = wanted.lower()
    if wanted.startswith("@"):
        return address.lower().endswith(wanted)
    return address.lower() == wanted


def _filters(args: argparse.Namespace) -> Filters:
    older = getattr(args, "older_than", None)
    domain = getattr(args, "domain", None)
    return Filters(
        sender=getattr(args, "sender", None),
        recipient=getattr(args, "recipient", None),
        domain=domain.lower().rstrip(".") if domain else None,
        older_than=parse_duration(older) if older else None,
        state=getattr(args, "state", None),
    )


def _ids(raw: Iterable[str], stdin: TextIO) -> list[str]:
    """The ids given, with `-` replaced by the ids read from standard input."""
    out: list[str] = []
    for item in raw:
        out.extend(stdin.read().split() if item == "-" else [item])
    return out


def select(
    queue: Queue, ids: list[str], filters: Filters, *, default_all: bool
) -> tuple[list[QueuedMessage], list[str]]:
    """The messages named (or all of them) that pass the filters, and the unknown ids."""
    if ids:
        known, unknown = queue.resolve_ids_sync(ids)
        messages = []
        for qid in known:
            state = queue.locate_sync(qid)
            message = queue.read_message_sync(qid, state) if state else None
            if message is None:
                unknown.append(qid)
            else:
                messages.append(message)
    elif default_all or filters.any:
        messages, unknown = list(queue.messages()), []
    else:
        return [], []
    now = time.time()
    return [m for m in messages if filters.match(m, now)], unknown


def _report_unknown(unknown: list[str]) -> None:
    for qid in unknown:
        print(f"mailrelay queue: {qid}: no such message", file=sys.stderr)


# -- the actions ------------------------------------------------------------------------


def postqueue_text(messages: list[QueuedMessage]) -> str:
    """`postqueue -p`'s layout, with the state spelled out after the arrival time."""
    if not messages:
        return "Mail queue is empty\n"
    lines = [
        f"{'-Queue ID-':<14}{'--Size--':>9} {'----Arrival Time----':<20} {'-State-':<9}"
        " -Sender/Recipient-------"
    ]
    indent = " " * 54
    for m in messages:
        arrival = time.strftime("%a %b %d %H:%M:%S", time.localtime(m.arrival))
        lines.append(
            f"{m.queue_id + STATE_MARK.get(m.state, ' '):<14}{m.size:>9} {arrival:<20} "
            f"{m.state:<9} {m.sender or '<>'}"
        )
        if m.last_reason and m.state != ACTIVE:
            lines.append(f"{' ' * 38}({m.last_reason})")
        lines.extend(indent + r for r in m.recipients)
        lines.append("")
    kbytes = (sum(m.size for m in messages) + 1023) // 1024
    count = len(messages)
    lines.append(f"-- {kbytes} Kbytes in {count} Request{'s' if count != 1 else ''}.")
    return "\n".join(lines) + "\n"


def cmd_list(messages: list[QueuedMessage], output: str) -> int:
    emit([_as_dict(m) for m in messages], output, postqueue_text(messages))
    return 0


def cmd_show(queue: Queue, messages: list[QueuedMessage], output: str, body: bool) -> int:
    shown = []
    for message in messages:
        data = queue.read_message_data_sync(message.queue_id, None if body else 64 * 1024) or b""
        end = data.find(b"\r\n\r\n")
        headers = data[: end + 2] if end >= 0 else data
        item = _as_dict(message)
        item["allRecipients"] = message.all_recipients
        item["params"] = message.params.to_dict()  # postcat's DSN and SMTPUTF8 records
        item["headers"] = headers.decode("utf-8", "replace").replace("\r\n", "\n")
        if body:
            item["body"] = data[end + 4 :].decode("utf-8", "replace").replace("\r\n", "\n")
        shown.append(item)
    texts = []
    for message, item in zip(messages, shown, strict=True):
        lines = [f"*** ENVELOPE {item['id']} ({item['state']}) ***"]
        for key in ("size", "arrival", "sender", "client", "attempts", "nextAttempt", "reason"):
            if item[key] not in (None, ""):
                lines.append(f"{key}: {item[key]}")
        lines += [f"{key}: {value}" for key, value in item["params"].items() if key != "rcpt"]
        for r in item["allRecipients"]:
            args = message.params.recipient(r).esmtp()  # NOTIFY=, ORCPT=
            args = f"  {args}" if args else ""
            lines.append(
                f"recipient: {r}{args}{'  (' + item['done'][r] + ')' if r in item['done'] else ''}"
            )
        lines.append("*** HEADERS ***")
        text = "\n".join(lines) + "\n" + item["headers"]
        if body:
            text += "*** BODY ***\n" + item["body"] + "*** END ***\n"
        texts.append(text)
    emit(shown, output, "\n".join(texts))
    return 0


def cmd_change(
    queue: Queue, action: str, messages: list[QueuedMessage], unknown: list[str], output: str
) -> int:
    done = []
    now = time.time()
    for m in messages:
        qid = m.queue_id
        if action == "hold":
            ok = queue.locate_sync(qid) == HOLD or queue.move_sync(qid, HOLD)
        elif action == "release":
            # Postfix: released mail goes to the deferred queue, due now.
            ok = queue.locate_sync(qid) == HOLD and queue.move_sync(qid, DEFERRED, mtime=now)
        else:
            ok = queue.delete_sync(qid)
        if ok:
            done.append(qid)
    verb = {"hold": "Placed on hold", "release": "Released from hold", "delete": "Deleted"}[action]
    emit(
        {"action": action, "ids": done, "unknown": unknown},
        output,
        f"mailrelay queue: {verb}: {len(done)} message{'s' if len(done) != 1 else ''}\n",
    )
    return 0 if done or not messages else 1


def shape_table(messages: list[QueuedMessage], by: str, now: float) -> list[list[Any]]:
    """qshape's table: a row per domain (TOTAL first), a column per age bucket."""
    counts: dict[str, list[int]] = {}
    total = [0] * (len(SHAPE_BUCKETS) + 2)
    for m in messages:
        minutes = (now - m.arrival) / 60
        bucket = next((i for i, b in enumerate(SHAPE_BUCKETS) if minutes < b), len(SHAPE_BUCKETS))
        addresses = [m.sender] if by == "sender" else m.recipients
        for address in addresses:
            row = counts.setdefault(_domain(address), [0] * len(total))
            for r in (row, total):
                r[0] += 1
                r[bucket + 1] += 1
    ordered = sorted(counts.items(), key=lambda kv: (-kv[1][0], kv[0]))
    return [["TOTAL", *total], *([d, *row] for d, row in ordered)]


def cmd_shape(messages: list[QueuedMessage], output: str, by: str) -> int:
    rows = shape_table(messages, by, time.time())
    headers = ["", "T", *(str(b) for b in SHAPE_BUCKETS), f"{SHAPE_BUCKETS[-1]}+"]
    data = [dict(zip(["domain", "total", *headers[2:]], row, strict=True)) for row in rows]
    emit(data, output, format_table(headers, rows))
    return 0


def run_queue_command(args: argparse.Namespace) -> int:
    directory = Path(args.queue_dir or default_queue_dir())
    if not (directory / ACTIVE).is_dir():
        print(f"mailrelay queue: {directory} is not a mailrelay queue folder", file=sys.stderr)
        return 1
    queue = Queue(directory)
    output = args.output
    if args.action == "flush":
        count = queue.flush_sync()
        plural = "s" if count != 1 else ""
        text = f"mailrelay queue: flushed: {count} deferred message{plural} due now\n"
        emit({"action": "flush", "deferred": count}, output, text)
        return 0
    ids = _ids(args.ids, sys.stdin)
    filters = _filters(args)
    listing = args.action in ("list", "shape")
    if not listing and not ids and not filters.any:
        print(f"mailrelay queue {args.action}: give queue ids, ALL, - or a filter", file=sys.stderr)
        return 2
    messages, unknown = select(queue, ids, filters, default_all=listing)
    _report_unknown(unknown)
    if args.action == "list":
        code = cmd_list(messages, output)
    elif args.action == "shape":
        code = cmd_shape(messages, output, args.by)
    elif args.action == "show":
        code = cmd_show(queue, messages, output, args.body)
    else:
        code = cmd_change(queue, args.action, messages, unknown, output)
    return 1 if unknown and not messages else code


# -- the command line -------------------------------------------------------------------


def add_queue_parser(sub: Any) -> argparse.ArgumentParser:
    """`mailrelay queue ACTION`, a sub-command per action with its own --help."""
    queue = sub.add_parser(
        "queue",
        help="queue administration (like postqueue/postsuper/postcat/qshape)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = queue.add_subparsers(dest="action", required=True, metavar="ACTION")
    helps = {
        "list": "every message with its recipients and deferral reason (postqueue -p)",
        "show": "envelope and headers of messages; --body for the whole message (postcat -q)",
        "flush": "every deferred message is due now (postqueue -f)",
        "hold": "put messages on hold (postsuper -h)",
        "release": "release held messages, due now (postsuper -H)",
        "delete": "delete messages (postsuper -d)",
        "shape": "domains by message age (qshape)",
    }
    for action in ACTIONS:
        p = actions.add_parser(action, help=helps[action], description=helps[action])
        p.add_argument(
            "--queue-dir",
            default=None,
            help=f"queue folder (default ${QUEUE_DIR_ENV}, else {LOCAL_QUEUE_DIR})",
        )
        p.add_argument("-o", "--output", choices=["table", "json", "yaml"], default="table")
        if action == "flush":
            continue
        p.add_argument(
            "ids",
            nargs="*",
            metavar="QUEUE_ID",
            help="queue ids, ALL for every message, - to read ids from standard input",
        )
        p.add_argument("--sender", help="only mail from this address (or @domain)")
        p.add_argument("--recipient", help="only mail to this address (or @domain)")
        p.add_argument("--domain", help="only mail with a pending recipient in this domain")
        p.add_argument("--older-than", metavar="DURATION", help="only mail older than (1h, 2d)")
        p.add_argument("--state", choices=QUEUE_STATES, help="only mail in this state")
        if action == "show":
            p.add_argument("--body", action="store_true", help="the whole message")
        if action == "shape":
            p.add_argument("--by", choices=["recipient", "sender"], default="recipient")
    return queue
