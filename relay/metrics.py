"""Prometheus metrics of the relay (served on --metrics-listen at /metrics).

Names follow Prometheus conventions with the `mailrelay_` prefix; every stage
counts what it decides here, so the alerts in the Helm chart have one source.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

CONNECTIONS = Counter("mailrelay_connections_total", "Client connections accepted.")
SCREEN = Counter(
    "mailrelay_screen_total", "Postscreen verdicts.", ["result"]
)  # pass_new, pass_old, pregreet, dnsbl, access, allowlisted
ACCEPTED = Counter("mailrelay_messages_accepted_total", "Messages queued (250 after DATA).")
ACCEPTED_BYTES = Counter("mailrelay_accepted_bytes_total", "Bytes of accepted messages.")
REJECTED = Counter(
    "mailrelay_rejected_total", "Rejected commands or messages, by reason.", ["reason"]
)
DELIVERED = Counter("mailrelay_delivered_total", "Recipients delivered to the next hop.")
DEFERRED = Counter("mailrelay_deferred_total", "Delivery attempts deferred (4xx, no connection).")
BOUNCED = Counter("mailrelay_bounced_total", "Recipients returned to the sender (5xx).")
EXPIRED = Counter("mailrelay_expired_total", "Messages expired after the queue lifetime.")
DSN = Counter(
    "mailrelay_dsn_total",
    "Non-delivery notifications: sent (accepted by the sender's mail server) or dropped.",
    ["result", "reason"],
)  # sent: mx | relay_domain; dropped: null_sender | disabled | not_relay_domain |
#    bad_sender | rejected | expired
QUEUE_SIZE = Gauge("mailrelay_queue_messages", "Messages in the queue.", ["state"])
QUEUE_OLDEST_AGE = Gauge("mailrelay_queue_oldest_age_seconds", "Age of the oldest queued message.")
DELIVERY_SECONDS = Histogram(
    "mailrelay_delivery_seconds", "Time of one delivery attempt to a next hop."
)
CONFIG_RELOADS = Counter("mailrelay_config_reloads_total", "Configuration reloads.", ["result"])
DNSBL_ERRORS = Counter(
    "mailrelay_dnsbl_errors_total",
    "DNSBL answers not obeyed: error codes (127.255.255.x) or a list that lists everything.",
    ["zone", "kind"],
)
HANDOVER = Counter(
    "mailrelay_handover_total",
    "Messages handed over between pods of a relay (scale-down), by direction and result.",
    ["direction", "result"],
)  # direction: sent | received; result: ok | error | too_big
MILTER_VERDICTS = Counter(
    "mailrelay_milter_verdicts_total",
    "Milter answers, per milter (smtpd_milters) and verdict.",
    ["milter", "verdict"],
)  # continue, accept, reject, tempfail, discard, reply, skip; error: its defaultAction applied
MILTER_SECONDS = Histogram(
    "mailrelay_milter_seconds",
    "Time from sending an event to a milter to its answer (connect: negotiation).",
    ["milter"],
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0),
)
AUTH_RESULTS = Counter(
    "mailrelay_authentication_results_total",
    "Results written in the relay's Authentication-Results header (contentFilters.authentication).",
    ["method", "result"],
)  # method: dkim (one per signature) | arc | spf | dmarc; result: pass, fail, none, ...
DMARC_POLICY = Counter(
    "mailrelay_dmarc_policy_total",
    "DMARC fails, by what the relay did about them (dmarc.enforce).",
    ["action"],
)  # none (reported only) | quarantine (held) | reject (550)
