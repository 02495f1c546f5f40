"""The probe of recipients: verify (relay.verify_cache.Probe), an SMTP client.

Like Postfix's verify(8) probes through smtp(8): MAIL FROM:<>, RCPT TO and
RSET over the delivery's connection pool (TLS as the RelayDomain's nextHop
says), never DATA. Only a 5xx to the RCPT is a definite "no"; a refused
MAIL FROM:<> says nothing about the address (a primary that refuses the null
sender must not turn every recipient into a 550), so it is "unreachable".
"""

from __future__ import annotations

from collections.abc import Callable

from relay.config import NextHop
from relay.delivery.connections import ConnectionPool
from relay.delivery.transaction import BOUNCED, RCPT_STAGE, SENT
from relay.verify_cache import ProbeResult, Status


class Prober:
    def __init__(self, pool: ConnectionPool, local_hostname: Callable[[], str]) -> None:
        self.pool = pool
        self.local_hostname = local_hostname  # the EHLO name, from the current config

    async def __call__(self, address: str, hop: NextHop) -> ProbeResult:
        r = await self.pool.probe(hop, address, local_hostname=self.local_hostname())
        if r.kind == SENT:
            return ProbeResult(Status.OK, r.reply)
        reply = r.reply
        if r.smtp_reply and r.relay != "none":
            reply = f"host {r.relay.rsplit(':', 1)[0]} said: {r.reply}"
            if r.in_reply_to:
                reply += f" (in reply to {r.in_reply_to} command)"
        if r.kind == BOUNCED and r.in_reply_to == RCPT_STAGE:
            return ProbeResult(Status.REJECTED, reply)
        return ProbeResult(Status.UNREACHABLE, reply)
