"""RCPT restrictions that ask DNS: unknown recipient domain, reverse client
hostname, RBL clients (Postfix smtpd_check.c semantics and reply codes).

Each returns None (no opinion) or a Reply; a temporary DNS failure of the
recipient-domain check returns a Reply with defer_if_permit=True (Postfix
reject_tempfail_action). Every reply is logged with its DNS detail; the caller sends it (or, for
defer_if_permit, keeps it) and counts it in metrics.REJECTED.
"""

from __future__ import annotations

import logging

from relay.config import RelayConfig
from relay.dns import DnsTempError, Resolver, ptr_name, reverse_ip, txt_text
from relay.smtpd import dnsbl
from relay.smtpd.session import Reply, Session

log = logging.getLogger("mailrelay.restrictions")

RBL_REASON_MAX = 500  # Postfix smtpd_rbl_txt... keep the reply line short


def _no_ptr(ip: str) -> Reply:
    """reject_unknown_reverse_client_hostname's reply (450 also on a DNS failure)."""
    return Reply(450, "4.7.1", f"Client host rejected: cannot find your reverse hostname, [{ip}]")


def _is_ip_literal(domain: str) -> bool:
    return domain.startswith("[") and domain.endswith("]")


class DnsChecks:
    def __init__(self, config: RelayConfig, resolver: Resolver) -> None:
        self.config = config
        self.resolver = resolver
        self._rbl = self._rbl_entries(config)

    def update_config(self, config: RelayConfig) -> None:
        self.config = config
        self._rbl = self._rbl_entries(config)

    @staticmethod
    def _rbl_entries(config: RelayConfig) -> list[tuple[str, list[dnsbl.ReplyFilter | None]]]:
        out: list[tuple[str, list[dnsbl.ReplyFilter | None]]] = []
        for c in config.restrictions.rbl_clients:
            filters: list[dnsbl.ReplyFilter | None] = []
            for code in c.return_codes:
                try:
                    filters.append(dnsbl.parse_filter(code))
                except dnsbl.FilterError as e:
                    log.warning("rblClients %s: ignoring bad return code: %s", c.zone, e)
            if c.return_codes and not filters:
                continue  # every code was bad: never match everything instead
            out.append((c.zone.lower().rstrip("."), filters or [None]))
        return out

    def _reject(self, reason: str, reply: Reply, session: Session | None, what: str) -> Reply:
        # Logged here with the DNS detail; relay.smtpd.server logs the reply it sends and
        # counts it in metrics.REJECTED under the restriction's name.
        client = f" from [{session.client_ip}]" if session else ""
        log.info("%s%s: %s (%s)", reason, client, reply, what)
        return reply

    # --- reject_unknown_recipient_domain --------------------------------------------
    async def unknown_recipient_domain(self, recipient: str, domain: str) -> Reply | None:
        """No MX and no A/AAAA: 450 4.1.2; a null MX: 556 5.1.10; DNS trouble: defer_if_permit."""
        if not self.config.restrictions.reject_unknown_recipient_domain:
            return None
        domain = domain.lower().rstrip(".")
        if not domain or _is_ip_literal(domain):
            return None
        not_found = Reply(
            450, "4.1.2", f"<{recipient}>: Recipient address rejected: Domain not found"
        )
        try:
            mx = await self.resolver.query(domain, "MX")
            if mx.records:
                exchanges = [r.split()[-1] for r in mx.records]
                if all(x == "." for x in exchanges):
                    return self._reject(
                        "unknown_recipient_domain",
                        Reply(
                            556,
                            "5.1.10",
                            f"<{recipient}>: Recipient address rejected: "
                            f"Domain {domain} does not accept mail (nullMX)",
                        ),
                        None,
                        f"nullMX for {domain}",
                    )
                return None
            if mx.nxdomain:
                return self._reject(
                    "unknown_recipient_domain", not_found, None, f"{domain}: NXDOMAIN"
                )
            for rdtype in ("A", "AAAA"):
                if (await self.resolver.query(domain, rdtype)).records:
                    return None
        except DnsTempError as e:
            return self._reject(
                "unknown_recipient_domain_tempfail",
                Reply(not_found.code, not_found.status, not_found.text, defer_if_permit=True),
                None,
                f"DNS: {e}",
            )
        return self._reject(
            "unknown_recipient_domain", not_found, None, f"{domain}: no MX, A or AAAA"
        )

    # --- reject_unknown_reverse_client_hostname -------------------------------------
    async def unknown_reverse_client_hostname(self, session: Session) -> Reply | None:
        """No PTR for the client IP: 450 4.7.1 (always 450, also on a DNS temp failure)."""
        if not self.config.restrictions.reject_unknown_reverse_client_hostname:
            return None
        if session.reverse_name:
            return None
        ip = session.client_ip
        try:
            answer = await self.resolver.query(ptr_name(ip), "PTR")
        except ValueError:
            return None  # not an IP address (a unix socket): nothing to check
        except DnsTempError as e:
            return self._reject(
                "unknown_reverse_client_hostname", _no_ptr(ip), session, f"DNS: {e}"
            )
        if answer.records:
            session.reverse_name = answer.records[0].rstrip(".")
            return None
        return self._reject("unknown_reverse_client_hostname", _no_ptr(ip), session, "no PTR")

    # --- reject_rbl_client ------------------------------------------------------------
    async def rbl_client(self, session: Session) -> Reply | None:
        """The first rblClients entry that lists the client: 554 5.7.1 with the list's TXT."""
        ip = session.client_ip
        try:
            reverse_ip(ip)  # (memoized) whether it is an address at all
        except ValueError:
            return None
        for zone, filters in self._rbl:
            for reply_filter in filters:
                hits = await dnsbl.listed(self.resolver, zone, ip, reply_filter)
                if not hits:
                    continue
                reason = await self._rbl_reason(zone, ip)
                text = f"Service unavailable; Client host [{ip}] blocked using {zone}"
                if reason:
                    text += f"; {reason}"
                return self._reject(
                    "rbl_client",
                    Reply(554, "5.7.1", text),
                    session,
                    f"{zone} answered {', '.join(hits)}",
                )
        return None

    async def _rbl_reason(self, zone: str, ip: str) -> str:
        try:
            answer = await self.resolver.query(f"{reverse_ip(ip)}.{zone}", "TXT")
        except DnsTempError:
            return ""
        texts = [txt_text(r) for r in answer.records]
        return "; ".join(t for t in texts if t)[:RBL_REASON_MAX]
