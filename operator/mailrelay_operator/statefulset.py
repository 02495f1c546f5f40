"""The relay pods' StatefulSet (pure builder)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from mailrelay_api.spec import MailRelaySpec, relay_spec
from mailrelay_api.units import parse_duration
from mailrelay_operator import naming, scheduling

# Every recipient and domain shard ConfigMap has a slot in the projected
# config volume, marked optional, so a new shard appears in the pod without a
# template change (a restart). The slots are fixed, whatever the shard count
# now: 128 recipient shards hold about 4,000,000 addresses (1 MiB of
# addresses each), 16 domain shards about 200,000 domains. Only an install
# beyond that gets more slots (in steps of SHARD_SLOT_STEP), and a roll.
# The kubelet watches each referenced ConfigMap, present or not (one watch
# per name and node): the price of a template that never moves. The
# alternative, a relay that lists its shards by label through the API,
# would need an API client, a token and RBAC in every relay pod.
RECIPIENT_SHARD_SLOTS = 128
DOMAIN_SHARD_SLOTS = 16
SHARD_SLOT_STEP = 32
# Policy the relay reads only when it starts (listeners); everything else in
# relay.json, domains.json and the recipient shards is reloaded live. A change
# here rolls the pods through the restart-hash annotation.
RESTART_POLICY_KEYS: tuple[str, ...] = ("proxyProtocol",)
# On SIGTERM the relay answers 421 to new sessions, gives open ones
# SHUTDOWN_GRACE_SECONDS to finish, then up to DELIVERY_STOP_SECONDS to the
# deliveries under way (relay.process.worker, relay.delivery.qmgr.stop); mail still queued
# stays on the pod's volume and the next pod on it resumes it. The kubelet's
# grace period covers all of that with a margin, so SIGKILL never cuts it short.
SHUTDOWN_GRACE_SECONDS = 25
DELIVERY_STOP_SECONDS = 10
TERMINATION_GRACE_SECONDS = 60
assert TERMINATION_GRACE_SECONDS >= SHUTDOWN_GRACE_SECONDS + DELIVERY_STOP_SECONDS + 15


@dataclass(frozen=True)
class PodOptions:
    """What the StatefulSet needs beyond the MailRelay itself."""

    image: str
    shards: int = 0  # recipient shards rendered now
    domain_shards: int = 0  # domain shards rendered now
    tls: bool = False  # mount the TLS Secret and pass --tls-dir
    handover_hash: str = ""  # of the handover Secret's key (rolls the pods when it changes)


def shard_slots(shards: int, fixed: int = RECIPIENT_SHARD_SLOTS) -> int:
    """`fixed`, or for more shards than that the next step up."""
    if shards <= fixed:
        return fixed
    return -(-shards // SHARD_SLOT_STEP) * SHARD_SLOT_STEP


def restart_hash(relay: dict[str, Any]) -> str:
    spec = relay["spec"]
    doc = {k: spec[k] for k in RESTART_POLICY_KEYS}  # as written: the hash must not move
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def relay_command(spec: MailRelaySpec, tls: bool) -> list[str]:
    cmd = [
        "mailrelay",
        "relay",
        "--config-dir",
        naming.CONFIG_DIR,
        "--queue-dir",
        naming.QUEUE_DIR,
        "--listen",
        f"0.0.0.0:{naming.SMTP_PORT}",
        "--metrics-listen",
        f"0.0.0.0:{naming.METRICS_PORT}",
        "--handover-listen",
        f"0.0.0.0:{naming.HANDOVER_PORT}",
        "--handover-secret-file",
        f"{naming.HANDOVER_DIR}/{naming.HANDOVER_SECRET_KEY}",
    ]
    if tls:
        cmd += ["--tls-dir", naming.TLS_DIR]
    if spec.proxy_protocol.enabled:
        cmd += ["--proxy-listen", f"0.0.0.0:{naming.PROXY_PORT}"]
    return cmd + scheduling.workers_args(spec)


def probe_timeout(relay: dict[str, Any]) -> int:
    """Long enough to sit out the postscreen greet pause before the banner."""
    return _probe_timeout(relay_spec(relay))


def _probe_timeout(spec: MailRelaySpec) -> int:
    greet = spec.postscreen.greet
    wait = parse_duration(greet.wait) if greet.action != "ignore" else 0
    return max(20, int(wait) + 5)


def _probe(timeout: int, *extra: str) -> dict[str, Any]:
    # EHLO and QUIT on the pod's own loopback after the full banner: no early
    # talk (pregreet), no MAIL/RCPT, so the relay's checks never fire.
    return {
        "exec": {
            "command": [
                "mailrelay",
                "probe",
                "--address",
                f"127.0.0.1:{naming.SMTP_PORT}",
                "--timeout",
                str(timeout - 2),
                *extra,
            ]
        },
        "timeoutSeconds": timeout,
    }


def config_volume(relay: dict[str, Any], shards: int, domain_shards: int = 0) -> dict[str, Any]:
    """The config ConfigMap, then a fixed set of optional shard slots (see above)."""
    sources: list[dict[str, Any]] = [{"configMap": {"name": naming.config_map_name(relay)}}]
    names = [naming.recipients_config_map_name(relay, i) for i in range(shard_slots(shards))] + [
        naming.domains_config_map_name(relay, i)
        for i in range(shard_slots(domain_shards, DOMAIN_SHARD_SLOTS))
    ]
    sources += [{"configMap": {"name": name, "optional": True}} for name in names]
    return {"name": "config", "projected": {"defaultMode": 0o444, "sources": sources}}


def statefulset(relay: dict[str, Any], opts: PodOptions) -> dict[str, Any]:
    spec = relay_spec(relay)
    selector = naming.pod_selector(relay)
    mounts, volumes = _storage(relay, opts)
    claim_spec: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": spec.storage.size}},
    }
    if spec.storage.storage_class_name:
        claim_spec["storageClassName"] = spec.storage.storage_class_name
    container = _container(spec, opts, mounts)
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {
            "name": naming.statefulset_name(relay),
            "namespace": naming.relay_namespace(relay),
            "labels": naming.labels(relay, "relay"),
        },
        "spec": {
            "replicas": spec.replicas,
            "serviceName": naming.headless_service_name(relay),
            "selector": {"matchLabels": selector},
            # Relay pods are peers: start and stop them all at once.
            "podManagementPolicy": "Parallel",
            "updateStrategy": {"type": "RollingUpdate"},
            # Queued mail lives on the claims: keep them when scaling or deleting.
            "persistentVolumeClaimRetentionPolicy": {
                "whenDeleted": "Retain",
                "whenScaled": "Retain",
            },
            "template": {
                "metadata": {
                    "labels": {**selector, naming.LABEL_MANAGED_BY: naming.MANAGED_BY},
                    "annotations": {
                        naming.RESTART_HASH_ANNOTATION: restart_hash(relay),
                        **(
                            {naming.HANDOVER_HASH_ANNOTATION: opts.handover_hash}
                            if opts.handover_hash
                            else {}
                        ),
                    },
                },
                "spec": {
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    # Long enough for the relay's own shutdown (see above).
                    "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS,
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": naming.RELAY_UID,
                        "runAsGroup": naming.RELAY_UID,
                        "fsGroup": naming.RELAY_UID,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    **scheduling.pod_scheduling(spec, selector),
                    "containers": [container],
                    "volumes": volumes,
                },
            },
            "volumeClaimTemplates": [
                {
                    "apiVersion": "v1",
                    "kind": "PersistentVolumeClaim",
                    "metadata": {"name": "queue", "labels": selector},
                    "spec": claim_spec,
                }
            ],
        },
    }


def _storage(
    relay: dict[str, Any], opts: PodOptions
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The relay container's mounts and the pod's volumes (the queue is a claim)."""
    mounts: list[dict[str, Any]] = [
        {"name": "config", "mountPath": naming.CONFIG_DIR, "readOnly": True},
        {"name": "queue", "mountPath": naming.QUEUE_DIR},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "handover", "mountPath": naming.HANDOVER_DIR, "readOnly": True},
    ]
    volumes: list[dict[str, Any]] = [
        config_volume(relay, opts.shards, opts.domain_shards),
        {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}},
        {
            "name": "handover",
            "secret": {"secretName": naming.handover_secret_name(relay), "defaultMode": 0o400},
        },
    ]
    if opts.tls:
        mounts.append({"name": "tls", "mountPath": naming.TLS_DIR, "readOnly": True})
        # optional: the Secret appears once cert-manager has issued it.
        volumes.append(
            {
                "name": "tls",
                "secret": {"secretName": naming.tls_secret_name(relay), "optional": True},
            }
        )
    return mounts, volumes


def _container(
    spec: MailRelaySpec, opts: PodOptions, mounts: list[dict[str, Any]]
) -> dict[str, Any]:
    timeout = _probe_timeout(spec)
    ports = [{"name": "smtp", "containerPort": naming.SMTP_PORT, "protocol": "TCP"}]
    if spec.proxy_protocol.enabled:
        ports.append({"name": "smtp-proxy", "containerPort": naming.PROXY_PORT, "protocol": "TCP"})
    ports.append({"name": "metrics", "containerPort": naming.METRICS_PORT, "protocol": "TCP"})
    ports.append({"name": "handover", "containerPort": naming.HANDOVER_PORT, "protocol": "TCP"})
    return {
        "name": "relay",
        "image": spec.image or opts.image,
        "command": relay_command(spec, opts.tls),
        "ports": ports,
        "env": [
            {"name": "PYTHONUNBUFFERED", "value": "1"},
            {"name": "MAILRELAY_SHUTDOWN_GRACE", "value": str(SHUTDOWN_GRACE_SECONDS)},
            *scheduling.cpu_env(spec),
        ],
        "resources": scheduling.resources(spec),
        "volumeMounts": mounts,
        # The relay may load a large recipient table first: give it time.
        "startupProbe": {**_probe(timeout), "periodSeconds": 5, "failureThreshold": 60},
        "readinessProbe": {**_probe(timeout), "periodSeconds": 15, "failureThreshold": 2},
        "livenessProbe": {
            **_probe(timeout, "--liveness"),
            "periodSeconds": 30,
            "failureThreshold": 4,
        },
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
