"""The test zones served by the real DNS server (mrtest.dnsserver) to the spam tests.

Clients by address (each test binds its client to one of these):
  127.0.0.10  listed in bl.test as 127.0.0.2 (an SBL-like code), with a TXT reason
  127.0.0.11  listed in bl.test as 127.0.0.10 (a PBL-like code), with a TXT reason
  127.0.0.12  bl.test answers 127.255.255.254 (Spamhaus "public resolver" error)
  127.0.0.13  listed only in the second list, bl2.test
  127.0.0.14  listed in the allowlist allow.test (127.0.5.1) and nowhere else
  127.0.0.15  listed in bl.test (127.0.0.2) and in allow.test
  127.0.0.20  clean, with a PTR record
  127.0.0.21  clean, without a PTR record
  127.0.0.22  clean, its PTR lookup times out (silent name)
  127.0.0.23  clean, with a PTR record (spare for end-to-end tests)
broken.test lists everything (a wildcard), including the 127.0.0.1 test entry.
"""

from __future__ import annotations

LISTED_TXT = "Listed by bl.test, see http://bl.test/lookup?127.0.0.10"

RECORDS: dict[str, list[tuple[str, str]]] = {
    # --- DNSBL bl.test ---
    "10.0.0.127.bl.test": [("A", "127.0.0.2"), ("TXT", f'"{LISTED_TXT}"')],
    "11.0.0.127.bl.test": [("A", "127.0.0.10"), ("TXT", '"PBL listed" " (dynamic range)"')],
    "12.0.0.127.bl.test": [("A", "127.255.255.254")],
    "15.0.0.127.bl.test": [("A", "127.0.0.2")],
    "2.0.0.127.bl.test": [("A", "127.0.0.2")],  # RFC 5782 test entry
    # --- a second DNSBL ---
    "13.0.0.127.bl2.test": [("A", "127.0.0.3"), ("TXT", '"bl2 says no"')],
    # --- an allowlist (dnswl-style codes 127.0.X.Y) ---
    "14.0.0.127.allow.test": [("A", "127.0.5.1")],
    "15.0.0.127.allow.test": [("A", "127.0.5.1")],
    # --- a broken list: answers everything ---
    "*.broken.test": [("A", "127.0.0.2")],
    # --- PTR ---
    "20.0.0.127.in-addr.arpa": [("PTR", "mail.good.test.")],
    "23.0.0.127.in-addr.arpa": [("PTR", "mail2.good.test.")],
    "10.0.0.127.in-addr.arpa": [("PTR", "spam.bad.test.")],
    "11.0.0.127.in-addr.arpa": [("PTR", "dyn.bad.test.")],
    "13.0.0.127.in-addr.arpa": [("PTR", "other.bad.test.")],
    # --- SPF ---
    "pass.test": [("TXT", '"v=spf1 ip4:127.0.0.0/24 -all"'), ("MX", "10 mail.pass.test.")],
    "fail.test": [("TXT", '"v=spf1 -all"')],
    "softfail.test": [("TXT", '"v=spf1 ~all"')],
    "neutral.test": [("TXT", '"v=spf1 ?all"')],
    "perm.test": [("TXT", '"v=spf1 foo:bar -all"')],
    "include.test": [("TXT", '"v=spf1 include:pass.test mx:mx.include.test -all"')],
    "mx.include.test": [("MX", "10 mail.pass.test.")],
    "mail.pass.test": [("A", "127.0.0.99")],
    "nospf.test": [("TXT", '"not an spf record"'), ("A", "127.0.0.98")],
    "helo-fail.test": [("TXT", '"v=spf1 -all"'), ("A", "127.0.0.97")],
    "helo-pass.test": [("TXT", '"v=spf1 ip4:127.0.0.0/24 -all"')],
    # --- recipient domains ---
    "example.com": [("MX", "10 mx.example.com.")],
    "mx.example.com": [("A", "127.0.0.2")],
    "aonly.test": [("A", "127.0.0.2")],
    "nullmx.test": [("MX", "0 .")],
    "nodata.test": [("TXT", '"no address here"')],
}

# Names that never answer (timeouts) and names that answer slowly.
SILENT = {"22.0.0.127.in-addr.arpa", "timeout.test", "slowdomain.test"}
SLOW: dict[str, float] = {}
