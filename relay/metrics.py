"""Prometheus metrics of the relay (served on --metrics-listen at /metrics).

Names follow Prometheus conventions with the `mailrelay_` prefix; every stage
counts what it decides here, so the alerts in the Helm chart have one source.

Units are in the names and help texts: messages, recipients or attempts are
never mixed in one metric. Labels come from fixed sets or from the relay's
configuration (a relay domain, a DNSBL zone, a milter), never from what a
client sends, so the number of series stays bounded.

With several workers every process writes its own values and /metrics sums
them (prometheus_client's multiprocess mode, relay.process.server); a gauge
says how its workers' values combine (`multiprocess_mode`). A value there
checks the process id on every change (it reopens its file after a fork):
the id comes from relay.procid (renewed in the child at fork) instead of a
getpid() system call per increment.
"""

from __future__ import annotations

from typing import TypeVar

from prometheus_client import Counter, Gauge, Histogram, values
from prometheus_client.metrics import MetricWrapperBase

from relay import procid

M = TypeVar("M", bound=MetricWrapperBase)

if getattr(values.ValueClass, "_multiprocess", False):
    # Before any metric exists (the supervisor sets the folder before this
    # import), so every value shares this class's files.
    values.ValueClass = values.MultiProcessValue(process_identifier=procid.current)

_children: dict[tuple[MetricWrapperBase, tuple[str, ...]], MetricWrapperBase] = {}


def child(metric: M, *label_values: str) -> M:
    """metric.labels(*label_values), kept for the next time: labels() takes a
    lock and checks and joins the values on every call (~1% of a worker's CPU
    under load). The one way a stage binds labels on a hot path (no
    module-level children, no per-module caches). The label values are
    bounded (see above), so is this."""
    key = (metric, label_values)
    found = _children.get(key)
    if found is None:
        found = _children[key] = metric.labels(*label_values)
    return found  # type: ignore[return-value]  # labels() of an M is an M


# The `domain` label of delivery metrics for a recipient outside the relay
# domains (a DSN to a sender's MX): one value, however many senders.
OTHER_DOMAIN = "other"

CONNECTIONS = Counter("mailrelay_connections_total", "Client connections accepted.")
SCREEN = Counter(
    "mailrelay_screen_total", "Postscreen verdicts.", ["result"]
)  # pass_new, pass_old, pregreet, dnsbl, access, allowlisted
GREYLIST = Counter(
    "mailrelay_greylist_total", "Greylisting decisions at RCPT (restrictions.greylist).", ["result"]
)  # new, early (both deferred 450), passed (retried after the delay), known, client
# (its network auto-allowlisted: autoAllowlistClients), allowlisted (postscreen's)
ACCEPTED = Counter("mailrelay_messages_accepted_total", "Messages queued (250 after DATA).")
ACCEPTED_BYTES = Counter("mailrelay_accepted_bytes_total", "Bytes of accepted messages.")
REJECTED = Counter(
    "mailrelay_rejected_total", "Rejected commands or messages, by reason.", ["reason"]
)
DELIVERED = Counter(
    "mailrelay_delivered_total", "Recipients delivered to the next hop.", ["domain"]
)  # domain: a relay domain or OTHER_DOMAIN, as for every delivery metric
DEFERRED = Counter(
    "mailrelay_deferred_total",
    "Recipients deferred by one delivery attempt (4xx, no connection): one per attempt.",
    ["domain"],
)
BOUNCED = Counter("mailrelay_bounced_total", "Recipients returned to the sender (5xx).", ["domain"])
EXPIRED = Counter("mailrelay_expired_total", "Messages expired after the queue lifetime.")
DSN = Counter(
    "mailrelay_dsn_total",
    "Non-delivery notifications: sent (accepted by the sender's mail server) or dropped.",
    ["result", "reason"],
)  # sent: mx | relay_domain; dropped: null_sender | disabled | not_relay_domain |
#    bad_sender | rejected | expired
# Every worker scans the same queue folder: the newest scan is the truth.
QUEUE_SIZE = Gauge(
    "mailrelay_queue_messages",
    "Messages in the queue.",
    ["state"],
    multiprocess_mode="livemostrecent",
)  # active | deferred | hold
QUEUE_BYTES = Gauge(
    "mailrelay_queue_bytes",
    "Bytes of the queued messages' files.",
    ["state"],
    multiprocess_mode="livemostrecent",
)
QUEUE_OLDEST_AGE = Gauge(
    "mailrelay_queue_oldest_age_seconds",
    "Age of the oldest message waiting for delivery (active or deferred; held mail waits "
    "for a person, not a next hop, and is not counted).",
    multiprocess_mode="livemostrecent",
)
QUEUE_VOLUME_AVAILABLE = Gauge(
    "mailrelay_queue_volume_available_bytes",
    "Bytes available to the relay on the queue's filesystem.",
    multiprocess_mode="livemostrecent",
)
QUEUE_VOLUME_SIZE = Gauge(
    "mailrelay_queue_volume_size_bytes",
    "Size of the queue's filesystem.",
    multiprocess_mode="livemostrecent",
)
DELIVERY_SECONDS = Histogram(
    "mailrelay_delivery_seconds",
    "Time of one delivery attempt of one message to a next hop (connection included).",
    ["domain"],
)
CONFIG_RELOADS = Counter("mailrelay_config_reloads_total", "Configuration reloads.", ["result"])
# Set by the reload that counts result="incomplete", cleared by the next one
# that loads, fails, or finds the running configuration back: how long an
# incomplete set lasts is what MailRelayConfigIncomplete watches (the counter
# grows once per change, not while it lasts). Any worker waiting: 1.
CONFIG_INCOMPLETE = Gauge(
    "mailrelay_config_incomplete",
    "1 while the relay runs an older configuration because the newest one names shards "
    "that are not all there yet; else 0.",
    multiprocess_mode="livemax",
)
DNSBL_HITS = Counter(
    "mailrelay_dnsbl_hits_total",
    "Clients a DNSBL zone lists (postscreen's score or reject_rbl_client), per zone.",
    ["zone"],
)
SPF = Counter(
    "mailrelay_spf_results_total",
    "SPF results (RFC 7208), per identity checked.",
    ["identity", "result"],
)  # identity: helo | mailfrom; result: pass, fail, softfail, neutral, none, temperror, permerror
TLS = Counter(
    "mailrelay_tls_sessions_total",
    "TLS sessions established: from clients (in) and to next hops (out).",
    ["direction", "protocol", "cipher", "verified"],
)  # protocol and cipher from fixed sets (relay.tlslog); verified: yes | no
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
BUILD_INFO = Gauge(
    "mailrelay_build_info",
    "Always 1; the labels say which relay runs.",
    ["version", "python"],
    multiprocess_mode="livemax",
)
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
