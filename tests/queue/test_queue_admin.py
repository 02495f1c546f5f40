"""`mailrelay queue list|show|flush|hold|release|delete|shape` on a real queue folder."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from relay.process.cli import main
from relay.queue.format import ACTIVE, DEFERRED, FLUSH_MARKER, HOLD
from relay.queue.mailparams import MailParams, RecipientParams
from relay.queue.store import Queue


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
    # postqueue -p: a line per message (id, size, arrival, state, sender), the deferral
    # reason in parentheses, a line per pending recipient, the totals last.
    lines = out.splitlines()
    assert lines[0].split()[:2] == ["-Queue", "ID-"]
    heads = [line for line in lines if line[:12] in ids]
    assert [h[:12] for h in heads] == ids
    assert heads[0][12] == "*" and heads[2][12] == "!"  # active, hold
    assert heads[1].split()[-2:] == ["deferred", "a@example.org"]
    assert "(451 4.3.0 try later)" in lines[lines.index(heads[1]) + 1]
    pending = [line.strip() for line in lines if line.startswith(" " * 54)]
    assert pending == [
        *("r0@example.com", "x@example.com"),
        "r1@example.com",  # x@example.com is done
        *("r2@example.com", "x@example.com"),
    ]
    assert lines[-1].startswith("-- ") and lines[-1].endswith(" Kbytes in 3 Requests.")
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


def test_filters_select_messages(filled: tuple[Path, list[str]], capsys: Any) -> None:
    qdir, ids = filled

    def listed(*argv: str) -> list[str]:
        code, out, _ = run(capsys, "list", "--queue-dir", str(qdir), "-o", "json", *argv)
        assert code == 0
        return [d["id"] for d in json.loads(out)]

    assert listed("--state", "deferred") == [ids[1]]
    assert listed("--recipient", "r2@EXAMPLE.com") == [ids[2]]
    assert listed("--recipient", "@example.com") == ids
    assert listed("--domain", "example.com") == ids
    assert listed("--domain", "example.net") == []
    assert listed("--sender", "@example.org") == ids
    assert listed("--sender", "b@example.org") == []
    assert listed("--older-than", "1h") == []
    assert listed("--older-than", "0s") == ids
    # Filters narrow the ids given, and select on their own for the changing actions.
    code, out, _ = run(capsys, "hold", "--queue-dir", str(qdir), "--state", "deferred")
    assert code == 0 and "Placed on hold: 1 message" in out
    assert sorted(os.listdir(qdir / HOLD)) == sorted([ids[1], ids[2]])


def test_changing_actions_need_a_selection(filled: tuple[Path, list[str]], capsys: Any) -> None:
    qdir, _ = filled
    code, _, err = run(capsys, "delete", "--queue-dir", str(qdir))
    assert code == 2 and "give queue ids, ALL, - or a filter" in err
    assert len(os.listdir(qdir / ACTIVE)) == 1


def test_ids_from_stdin_and_options_after_ids(
    filled: tuple[Path, list[str]], capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    qdir, ids = filled
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{ids[0]}\n{ids[1].lower()}\n"))
    code, out, _ = run(capsys, "delete", "-", "--queue-dir", str(qdir))
    assert code == 0 and "Deleted: 2 messages" in out
    code, out, _ = main_args(
        capsys, "queue", "delete", "--queue-dir", str(qdir), ids[2], "-o", "json"
    )
    assert code == 0 and json.loads(out) == {"action": "delete", "ids": [ids[2]], "unknown": []}


def main_args(capsys: Any, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_show_body_like_postcat(filled: tuple[Path, list[str]], capsys: Any) -> None:
    qdir, ids = filled
    code, out, _ = run(capsys, "show", ids[0], "--body", "--queue-dir", str(qdir))
    assert code == 0
    assert "*** HEADERS ***" in out and "Subject: number 0" in out
    assert "*** BODY ***\nbody\n*** END ***" in out
    code, out, _ = run(capsys, "show", ids[0], "--body", "--queue-dir", str(qdir), "-o", "json")
    assert json.loads(out)[0]["body"] == "body\n"


def test_shape_counts_domains_by_age(filled: tuple[Path, list[str]], capsys: Any) -> None:
    qdir, _ = filled
    code, out, _ = run(capsys, "shape", "--queue-dir", str(qdir))
    assert code == 0
    rows = [line.split() for line in out.splitlines()]
    assert rows[0][:3] == ["T", "5", "10"] and rows[0][-1] == "1280+"
    # 5 pending recipients, all in example.com, all younger than 5 minutes.
    assert rows[1][:3] == ["TOTAL", "5", "5"] and rows[2][:3] == ["example.com", "5", "5"]
    code, out, _ = run(capsys, "shape", "--by", "sender", "--queue-dir", str(qdir), "-o", "json")
    assert json.loads(out)[1] == {**json.loads(out)[1], "domain": "example.org", "total": 3}


def test_shape_buckets_old_mail(tmp_path: Path) -> None:
    from relay.process.queue_admin import shape_table
    from relay.queue.store import QueuedMessage

    now = time.time()
    old = QueuedMessage("A", "s@x.test", ["r@a.test"], now - 3 * 3600, now)
    ancient = QueuedMessage("B", "s@x.test", ["r@a.test", "r@b.test"], now - 2 * 86400, now)
    table = shape_table([old, ancient], "recipient", now)
    # Columns: T, then under 5, 10, 20, 40, 80, 160, 320, 640, 1280 minutes, then older.
    assert table[0] == ["TOTAL", 3, 0, 0, 0, 0, 0, 0, 1, 0, 0, 2]  # 180 min: under 320
    assert table[1] == ["a.test", 2, 0, 0, 0, 0, 0, 0, 1, 0, 0, 1]


def test_queue_dir_from_the_environment(filled: tuple[Path, list[str]]) -> None:
    qdir, ids = filled
    env = {**os.environ, "MAILRELAY_QUEUE_DIR": str(qdir)}
    out = subprocess.run(
        [sys.executable, "-m", "relay.process.cli", "queue", "list", "-o", "json"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd="/",
    ).stdout
    assert [d["id"] for d in json.loads(out)] == ids


def test_version_and_per_action_help(capsys: Any) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("mailrelay ")
    with pytest.raises(SystemExit):
        main(["queue", "show", "--help"])
    assert "--body" in capsys.readouterr().out


async def test_show_has_the_smtputf8_and_dsn_parameters(tmp_path: Path, capsys: Any) -> None:
    q = Queue(tmp_path / "q")
    msg = q.incoming()
    msg.write(b"Subject: x\r\n\r\nbody\r\n")
    params = MailParams(
        smtputf8=True,
        ret="HDRS",
        envid="e 1",
        recipients={"b@example.com": RecipientParams(("NEVER",), "rfc822", "o@example.net")},
    )
    qid = await msg.commit("a@example.org", ["b@example.com", "c@example.com"], params=params)
    claim = q.take_fresh(qid)
    assert claim is not None
    q.release_sync(claim)
    await q.close()
    code, out, _ = run(capsys, "show", qid, "--queue-dir", str(tmp_path / "q"))
    assert code == 0
    assert "smtputf8: True\nret: HDRS\nenvid: e 1\n" in out
    assert "recipient: b@example.com  NOTIFY=NEVER ORCPT=rfc822;o@example.net\n" in out
    assert "recipient: c@example.com\n" in out
    code, out, _ = run(capsys, "show", qid, "--queue-dir", str(tmp_path / "q"), "-o", "json")
    [shown] = json.loads(out)
    assert shown["params"]["rcpt"] == {
        "b@example.com": {"notify": ["NEVER"], "orcpt": ["rfc822", "o@example.net"]}
    }
