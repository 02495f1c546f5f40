"""`mailrelay queue`: postqueue/postsuper for the relay's queue folder.

Safe while relays run on the same folder: every change is one rename, unlink
or mtime update, which the relays' scans and locks already expect.
- list: every message (id, size, arrival, sender, pending recipients, state/reason)
- show: envelope and headers of the given messages
- flush: every deferred message is due now (running relays watch a marker file)
- hold / release / delete: by id, or ALL
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from relay.process.output import emit, format_table
from relay.queue.store import ACTIVE, DEFERRED, HOLD, Queue, QueuedMessage


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


def _state_text(m: QueuedMessage) -> str:
    if m.state == DEFERRED and m.last_reason:
        return f"deferred ({m.last_reason})"
    return m.state


def cmd_list(queue: Queue, output: str) -> int:
    messages = list(queue.messages())
    rows = [
        [
            m.queue_id,
            m.size,
            _when(m.arrival),
            f"<{m.sender}>",
            ",".join(m.recipients),
            _state_text(m),
        ]
        for m in messages
    ]
    table = format_table(["ID", "SIZE", "ARRIVAL", "SENDER", "RECIPIENTS", "STATE"], rows)
    if not messages:
        table = "Mail queue is empty\n"
    emit([_as_dict(m) for m in messages], output, table)
    return 0


def cmd_show(queue: Queue, ids: list[str], output: str) -> int:
    known, unknown = queue.resolve_ids_sync(ids)
    shown = []
    for qid in known:
        state = queue.locate_sync(qid)
        message = queue.read_message_sync(qid, state) if state else None
        if message is None:
            unknown.append(qid)
            continue
        data = queue.read_message_data_sync(qid, limit=64 * 1024) or b""
        end = data.find(b"\r\n\r\n")
        headers = data[: end + 2] if end >= 0 else data
        item = _as_dict(message)
        item["allRecipients"] = message.all_recipients
        item["headers"] = headers.decode("utf-8", "replace").replace("\r\n", "\n")
        shown.append(item)
    texts = []
    for item in shown:
        lines = [f"*** ENVELOPE {item['id']} ({item['state']}) ***"]
        for key in ("size", "arrival", "sender", "client", "attempts", "nextAttempt", "reason"):
            if item[key] not in (None, ""):
                lines.append(f"{key}: {item[key]}")
        for r in item["allRecipients"]:
            lines.append(
                f"recipient: {r}{'  (' + item['done'][r] + ')' if r in item['done'] else ''}"
            )
        lines.append("*** HEADERS ***")
        texts.append("\n".join(lines) + "\n" + item["headers"])
    emit(shown, output, "\n".join(texts))
    for qid in unknown:
        print(f"mailrelay queue: {qid}: no such message", file=sys.stderr)
    return 1 if unknown else 0


def cmd_change(queue: Queue, action: str, ids: list[str], output: str) -> int:
    if not ids:
        print(f"mailrelay queue {action}: give queue ids or ALL", file=sys.stderr)
        return 2
    known, unknown = queue.resolve_ids_sync(ids)
    done = []
    now = time.time()
    for qid in known:
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
    for qid in unknown:
        print(f"mailrelay queue: {qid}: no such message", file=sys.stderr)
    return 1 if unknown and not done else 0


def run_queue_command(args: argparse.Namespace) -> int:
    directory = Path(args.queue_dir)
    if not (directory / ACTIVE).is_dir():
        print(f"mailrelay queue: {directory} is not a mailrelay queue folder", file=sys.stderr)
        return 1
    queue = Queue(directory)
    output = getattr(args, "output", "table")
    ids = list(getattr(args, "ids", []) or [])
    if args.action == "list":
        return cmd_list(queue, output)
    if args.action == "show":
        if not ids:
            print("mailrelay queue show: give queue ids or ALL", file=sys.stderr)
            return 2
        return cmd_show(queue, ids, output)
    if args.action == "flush":
        count = queue.flush_sync()
        plural = "s" if count != 1 else ""
        text = f"mailrelay queue: flushed: {count} deferred message{plural} due now\n"
        emit({"action": "flush", "deferred": count}, output, text)
        return 0
    return cmd_change(queue, args.action, ids, output)
