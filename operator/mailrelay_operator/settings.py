"""The operator's settings from its environment (the Helm chart sets them).

One place reads them; builders and the renderer get them as typed values.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from mailrelay_api.claims import ClusterNetworks

OPERATOR_NAMESPACE_ENV = "POD_NAMESPACE"  # the downward API, in the chart
POD_NAME_ENV = "POD_NAME"  # likewise: Events' reportingInstance (k8s_events.py)
# The namespace Prometheus scrapes relay pods from (their metrics port).
METRICS_NAMESPACE_ENV = "MAILRELAY_METRICS_NAMESPACE"
# "false": no NetworkPolicy per relay (a CNI without NetworkPolicy support
# ignores them anyway; this is for clusters whose own policies do it).
NETWORK_POLICY_ENV = "MAILRELAY_NETWORK_POLICY"
# Seconds between resyncs (a pass over every relay from the watch caches).
RESYNC_SECONDS_ENV = "MAILRELAY_OPERATOR_RESYNC_SECONDS"
RESYNC_SECONDS_DEFAULT = 300.0
# Relays reconciled at once (a worker each).
WORKERS_ENV = "MAILRELAY_OPERATOR_WORKERS"
WORKERS_DEFAULT = 4


@dataclass(frozen=True)
class NetworkSettings:
    """What the relay pods' NetworkPolicy and the next-hop policy need."""

    cluster: ClusterNetworks = field(default_factory=ClusterNetworks)
    operator_namespace: str | None = None  # None: not in a pod (tests, by hand)
    metrics_namespace: str | None = None
    network_policy: bool = True

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> NetworkSettings:
        return cls(
            cluster=ClusterNetworks.from_env(env),
            operator_namespace=env.get(OPERATOR_NAMESPACE_ENV) or None,
            metrics_namespace=env.get(METRICS_NAMESPACE_ENV) or None,
            network_policy=env.get(NETWORK_POLICY_ENV, "true").lower() != "false",
        )
