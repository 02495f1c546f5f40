"""The SMTPUTF8/BODY/DSN parameters as the queue keeps them: xtext, the
parsers, and queue files with and without them (old files still load)."""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

import pytest

from relay.queue.format import Envelope, read_envelope, trailer
from relay.queue.mailparams import (
    NO_PARAMS,
    MailParams,
    RecipientParams,
    parse_envid,
    parse_notify,
    parse_orcpt,
    unitext_encode,
    uxtext_decode,
    uxtext_encode,
    xtext_decode,
    xtext_encode,
)


def test_xtext_round_trip() -> None:
    assert xtext_decode("a+2Bb+3Dc") == "a+b=c"
    assert xtext_decode("a+2bb") == "a+b"  # Postfix takes lower-case hex too
    assert xtext_encode("a+b=c d") == "a+2Bb+3Dc+20d"
    assert xtext_decode(xtext_encode("x y+z=")) == "x y+z="
    for bad in ("a+2", "a+zz", "a b", "a=b", "aü", "a+0A", "a+00", "+7F"):
        assert xtext_decode(bad) is None, bad


def test_uxtext() -> None:
    assert uxtext_decode("\\x{FC}b@example.com") == "üb@example.com"
    assert uxtext_decode("ü@example.com") == "ü@example.com"
    assert uxtext_encode("ü b@x") == "\\x{FC}\\x{20}b@x"
    assert uxtext_decode(uxtext_encode("Grüße@例え.jp")) == "Grüße@例え.jp"
    for bad in ("\\x{D800}", "\\x{110000}", "\\x{A}", "a\\b", "\\x{}", "a\udcff"):
        assert uxtext_decode(bad) is None, bad


def test_parsers() -> None:
    assert parse_notify("failure,Success") == ("SUCCESS", "FAILURE")
    assert parse_notify("never") == ("NEVER",)
    assert parse_notify("NEVER,DELAY") is None
    assert parse_notify("") is None and parse_notify("SUCCESS,") is None
    assert parse_orcpt("RFC822;b+40x") == ("rfc822", "b@x")
    assert parse_orcpt("rfc822;") is None and parse_orcpt("rfc822") is None
    assert parse_envid("x" * 100) == "x" * 100 and parse_envid("x" * 101) is None


def test_what_a_recipient_wants() -> None:
    default = RecipientParams()
    assert default.wants("FAILURE") and default.wants("DELAY") and not default.wants("SUCCESS")
    never = RecipientParams(("NEVER",))
    assert not any(never.wants(e) for e in ("SUCCESS", "FAILURE", "DELAY"))
    success = RecipientParams(("SUCCESS",), "utf-8", "ü@x")
    assert success.wants("SUCCESS") and not success.wants("FAILURE")
    assert success.esmtp() == "NOTIFY=SUCCESS ORCPT=utf-8;\\x{FC}@x"
    assert success.original_recipient() == "utf-8;\\x{FC}@x"
    # message/global-delivery-status: unitext, UTF-8 as it is, "+" "=" "\\" escaped
    assert success.original_recipient(unitext=True) == "utf-8;ü@x"
    assert unitext_encode("ü+a=b\\c d") == "ü\\x{2B}a\\x{3D}b\\x{5C}c\\x{20}d"
    assert MailParams(ret="FULL", envid="a b").esmtp_mail() == "RET=FULL ENVID=a+20b"


def test_next_hop_orcpt_is_the_clients_or_postfixs_own() -> None:
    """Postfix's smtp client (checked against 3.7): ORCPT before NOTIFY, and
    rfc822;<recipient> in xtext when the client gave none."""
    given = RecipientParams(("SUCCESS", "FAILURE"), "rfc822", "o+p@example.net")
    assert given.next_hop_esmtp("b@x") == "ORCPT=rfc822;o+2Bp@example.net NOTIFY=SUCCESS,FAILURE"
    assert RecipientParams().next_hop_esmtp("c+x=y@x") == "ORCPT=rfc822;c+2Bx+3Dy@x"
    assert RecipientParams(("NEVER",)).next_hop_esmtp("d@x") == "ORCPT=rfc822;d@x NOTIFY=NEVER"
    # UTF-8: RFC 6533's utf-8 type (Postfix sends rfc822;+C3+BC@x, which we would refuse).
    assert RecipientParams().next_hop_esmtp("ü@x") == "ORCPT=utf-8;\\x{FC}@x"
    orcpt = RecipientParams().next_hop_esmtp("ü@x").removeprefix("ORCPT=")
    assert parse_orcpt(orcpt) == ("utf-8", "ü@x")


def _file(tmp_path: Path, raw_trailer: bytes) -> int:
    path = tmp_path / "q"
    data = b"Subject: x\r\n\r\nbody\r\n"
    footer = b"\nMRQ1 " + b"%010d %08x\n" % (len(raw_trailer), zlib.crc32(raw_trailer))
    path.write_bytes(data + raw_trailer + footer)
    return os.open(path, os.O_RDONLY)


def test_a_queue_file_without_params_still_loads(tmp_path: Path) -> None:
    # The trailer exactly as versions before the parameters wrote it.
    old = {
        "v": 1,
        "id": "0ABCDEFGHJKM",
        "sender": "a@example.org",
        "recipients": ["b@example.com"],
        "arrival": 1.0,
        "client": "127.0.0.2",
        "size": 20,
    }
    fd = _file(tmp_path, json.dumps(old).encode())
    try:
        env = read_envelope(fd)
    finally:
        os.close(fd)
    assert env.params is NO_PARAMS and env.recipients == ["b@example.com"]
    # ... and a file without parameters is written as before: no new key.
    assert "params" not in json.loads(env.to_json())


def test_params_round_trip_through_the_trailer(tmp_path: Path) -> None:
    params = MailParams(
        smtputf8=True,
        body="8BITMIME",
        ret="HDRS",
        envid="id 1",
        recipients={
            "ü@example.com": RecipientParams(("SUCCESS",), "rfc822", "x@y"),
            "c@example.com": RecipientParams(("NEVER",)),
        },
    )
    env = Envelope("0ABCDEFGHJKM", "a@x", ["ü@example.com", "c@example.com"], 1.0, "c", 20, params)
    raw = trailer(env)
    fd = _file(tmp_path, raw[: raw.rindex(b"\nMRQ1 ")])
    try:
        assert read_envelope(fd) == env
    finally:
        os.close(fd)
    assert params.only(["c@example.com"]).recipients == {
        "c@example.com": RecipientParams(("NEVER",))
    }


@pytest.mark.parametrize(
    "bad",
    [
        {"rcpt": [1]},
        {"rcpt": {"a": {"orcpt": 5}}},
        {"rcpt": {"a": 1}},
        # Values the server never queues (a handover peer could send them):
        # nothing of the kind may reach a command line to a next hop or a DSN.
        {"rcpt": {"a": {"notify": ["SUCCESS\r\nRSET"]}}},
        {"rcpt": {"a": {"notify": ["NEVER", "SUCCESS"]}}},
        {"rcpt": {"a": {"orcpt": ["rfc822", "x\r\ny"]}}},
        {"rcpt": {"a": {"orcpt": ["rfc 822", "x"]}}},
        {"envid": "a\nb"},
        {"ret": "HDRS\r\n"},
        {"body": "BINARYMIME"},
    ],
)
def test_damaged_params_are_a_value_error(bad: object) -> None:
    with pytest.raises(ValueError):
        MailParams.from_dict(bad)  # type: ignore[arg-type]
