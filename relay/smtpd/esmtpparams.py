"""The parameters of MAIL FROM and RCPT TO, checked as Postfix's smtpd
(smtputf8_enable=yes, DSN on) checks them, with its replies:

  MAIL  SIZE=  BODY=7BIT|8BITMIME  SMTPUTF8  RET=FULL|HDRS  ENVID=xtext  (AUTH= ignored)
  RCPT  NOTIFY=NEVER|SUCCESS,FAILURE,DELAY  ORCPT=addr-type;xtext

A parameter given twice (RET, ENVID, NOTIFY, ORCPT), an unknown NOTIFY
keyword or NEVER with others, bad xtext: 501 with Postfix's text; a
parameter this server does not know, and a BODY other than 7BIT and
8BITMIME (BINARYMIME included): 555, as Postfix 3.7 answers. Stricter than Postfix, which
takes any ORCPT and sanitizes it later: a decoded ENVID or ORCPT holding a
control character, an ENVID over 100 characters or an ORCPT over 500
(RFC 3461's limits) is refused with the same 501, so nothing of the kind
reaches the queue, a next hop, or a DSN we write.
"""

from __future__ import annotations

from relay.queue.mailparams import (
    BODY_VALUES,
    RET_VALUES,
    MailParams,
    RecipientParams,
    parse_envid,
    parse_notify,
    parse_orcpt,
)
from relay.smtpd import hygiene
from relay.smtpd.hygiene import printable
from relay.smtpd.session import Reply

BAD_SIZE = Reply(501, "5.5.4", "Bad message size syntax")
BAD_RET = Reply(501, "5.5.4", "Bad RET parameter syntax")
BAD_ENVID = Reply(501, "5.5.4", "Bad ENVID parameter syntax")
BAD_NOTIFY = Reply(501, "5.5.4", "Error: Bad NOTIFY parameter syntax")
BAD_ORCPT = Reply(501, "5.5.4", "Error: Bad ORCPT parameter syntax")

Items = list[tuple[str, str, str]]  # (KEYWORD, value, as sent): addresses.esmtp_param_items


def unsupported(raw: str) -> Reply:
    return Reply(555, "5.5.4", f"Unsupported option: {printable(raw)}")


def mail_params(items: Items) -> tuple[int | None, MailParams] | Reply:
    """MAIL FROM's parameters: the SIZE= hint (None without one) and the
    parameters to queue, or the reply to the first bad one."""
    size: int | None = None
    smtputf8 = False
    body = ret = envid = ""
    for key, value, raw in items:
        if key == "SIZE":
            size = hygiene.ascii_number(value)
            if size is None:
                return BAD_SIZE
        elif key == "BODY":
            if value.upper() not in BODY_VALUES:  # Postfix: "555 ... Unsupported option"
                return unsupported(raw)
            body = value.upper()
        elif key == "SMTPUTF8" and raw.upper() == "SMTPUTF8":
            smtputf8 = True
        elif key == "RET":
            if ret or value.upper() not in RET_VALUES:
                return BAD_RET
            ret = value.upper()
        elif key == "ENVID":
            decoded = None if envid else parse_envid(value)
            if decoded is None:
                return BAD_ENVID
            envid = decoded
        elif key != "AUTH":  # no AUTH here; RFC 4954 says to ignore it then
            return unsupported(raw)
    return size, MailParams(smtputf8=smtputf8, body=body, ret=ret, envid=envid)


def rcpt_params(items: Items) -> RecipientParams | Reply:
    """RCPT TO's parameters, or the reply to the first bad one."""
    notify: tuple[str, ...] = ()
    orcpt: tuple[str, str] | None = None
    for key, value, raw in items:
        if key == "NOTIFY":
            parsed = None if notify else parse_notify(value)
            if parsed is None:
                return BAD_NOTIFY
            notify = parsed
        elif key == "ORCPT":
            orcpt = None if orcpt else parse_orcpt(value)
            if orcpt is None:
                return BAD_ORCPT
        else:
            return unsupported(raw)
    orcpt_type, address = orcpt or ("", "")
    return RecipientParams(notify, orcpt_type, address)
