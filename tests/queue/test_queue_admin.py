"""`mailrelay queue list|show|flush|hold|release|delete` on a real queue folder."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from relay.process.cli import main
from relay.queue.store import ACTIVE, DEFERRED, FLUSH_MARKER, HOLD, Queue


@pytest.fixture
async def filled(tmp_path: Path) -> tuple[Path, list[str]]:
    """Three messages: one active, one deferred (with a reason), one held."""
    q = Queue(tmp_path / "q")
    ids = []
    for i in range(3):
        msg = q.incoming()
        msg.write(f"Subject: number {i}\r\nFrom: a@example.org\r\n\r\nbody\r\n".encode())
        ids.append(await msg.commit("a@example.org", [f"r{i}@example.com", "x@example.com"]))
    for qid in ids:
        claim = q.take_fresh(qid)
        assert claim is not None
        if qid == ids[1]:
            claim.progress.attempts = 2
            claim.progress.done["x@example.com"] = "sent"
            claim.progress.last_reason = "451 4.3.0 try later"
            q.defer_sync(claim, 4_000_000_000.0)
        else:
            q.release_sync(claim)
    q.move_sync(ids[2], HOLD)
    await q.close()
    return tmp_path / "q", ids


def run(capsys: Any, *argv: str) -> tuple[int, str, str]:
    code = main(["queue", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_list_table_and_json(filled: tuple[Path, list[str]], capsys: Any) -> None:
    qdir, ids = filled
    code, out, _ = run(capsys, "list", "--queue-dir", str(qdir))
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["ID", "SIZE", "ARRIVAL", "SENDER", "RECIPIENTS", "STATE"]
    assert [line.split()[0] for line in lines[1:]] == ids
    assert "deferred (451 4.3.0 try later)" in lines[2]
    assert lines[3].endswith("hold")
    code, out, _ = run(capsys, "list", "--queue-dir", str(qdir), "-o", "json")
    data = json.loads(out)
    assert [d["state"] for d in data] == [ACTIVE, DEFERRED, HOLD]
    assert data[1]["recipients"] == ["r1@example.com"] and data[1]["attempts"] == 2
    code, out, _ = run(capsys, "list", "--queue-dir", str(qdir), "-o", "yaml")
    assert f"id: {ids[0]}" in out


def test_show_envelope_and_headers(filled: tuple[Path, list[str]], capsys: Any) -> None:
    qdir, ids = filled
    code, out, _ = run(capsys, "show", ids[1].lower(), "--queue-dir", str(qdir))
    assert code == 0
    assert f"*** ENVELOPE {ids[1]} (deferred) ***" in out
    assert "recipient: x@example.com  (sent)" in out and "Subject: number 1" in out
    assert "body" not in out
    code, _, err = run(capsys, "show", "NOSUCHID0000", "--queue-dir", str(qdir))
    assert code == 1 and "no such message" in err


def test_hold_release_delete(filled: tuple[Path, list[str]], capsys: Any) -> None:
    qdir, ids = filled
    code, out, _ = run(capsys, "hold", ids[0], "--queue-dir", str(qdir))
    assert code == 0 and "Placed on hold: 1 message" in out
    assert (qdir / HOLD / ids[0]).exists()
    code, out, _ = run(capsys, "release", "ALL", "--queue-dir", str(qdir))
    assert "Released from hold: 2 messages" in out
    assert sorted(os.listdir(qdir / DEFERRED)) == sorted(ids)
    assert os.stat(qdir / DEFERRED / ids[0]).st_mtime < 4_000_000_000.0  # due now
    code, out, _ = run(capsys, "delete", ids[1], "--queue-dir", str(qdir), "-o", "json")
    assert json.loads(out) == {"action": "delete", "ids": [ids[1]], "unknown": []}
    code, out, _ = run(capsys, "delete", "ALL", "--queue-dir", str(qdir))
    assert "Deleted: 2 messages" in out
    code, out, _ = run(capsys, "list", "--queue-dir", str(qdir))
    assert out == "Mail queue is empty\n"
    assert os.listdir(qdir / "state") == []


def test_flush_makes_deferred_due_and_touches_the_marker(
    filled: tuple[Path, list[str]], capsys: Any
) -> None:
    qdir, ids = filled
    code, out, _ = run(capsys, "flush", "--queue-dir", str(qdir))
    assert code == 0 and "flushed: 1 deferred message" in out
    assert os.stat(qdir / DEFERRED / ids[1]).st_mtime < 4_000_000_000.0
    assert (qdir / FLUSH_MARKER).exists()


def test_not_a_queue_folder(tmp_path: Path, capsys: Any) -> None:
    code, _, err = run(capsys, "list", "--queue-dir", str(tmp_path / "nope"))
    assert code == 1 and "not a mailrelay queue folder" in err
