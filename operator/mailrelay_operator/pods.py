"""Talking to the relay pods: their queue state and drain orders (relay.handover.control).

The operator reaches each pod on its control port through the headless
Service (`<relay>-N.<relay>-pods.<ns>.svc:9125`); the address of a pod is a
pluggable function, so tests without a kubelet map pods to 127.0.0.x
processes. Drain requests (mailrelay_api.drain_protocol) are signed with the relay's
handover key.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from mailrelay_api.drain_protocol import DrainRequest
from mailrelay_operator import naming

TIMEOUT = aiohttp.ClientTimeout(total=5, connect=3)


@dataclass(frozen=True)
class PodAddress:
    control: str  # base URL of the control port, e.g. http://edge-1.edge-pods.mail.svc:9125
    handover: str  # HOST:PORT of the handover listener, as the other pods reach it


PodAddresser = Callable[[dict[str, Any], int], PodAddress]


def cluster_address(relay: dict[str, Any], ordinal: int) -> PodAddress:
    host = naming.pod_host(relay, ordinal)
    return PodAddress(
        control=f"http://{host}:{naming.METRICS_PORT}",
        handover=f"{host}:{naming.HANDOVER_PORT}",
    )


class PodError(Exception):
    """The pod did not answer (or not as expected)."""


class PodClient:
    def __init__(self, timeout: aiohttp.ClientTimeout = TIMEOUT) -> None:
        self._session: aiohttp.ClientSession | None = None
        self.timeout = timeout  # a pod that never answers holds a reconcile this long

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self.timeout)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def queue_state(self, pod: PodAddress) -> dict[str, Any]:
        try:
            async with self._http().get(f"{pod.control}/queue") as resp:
                if resp.status != 200:
                    raise PodError(f"/queue answered {resp.status}")
                return dict(await resp.json(content_type=None))
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            raise PodError(str(e) or type(e).__name__) from None

    async def drain(
        self, pod: PodAddress, key: str, peers: list[str] | None, ttl: float
    ) -> dict[str, Any]:
        """Starts or renews a drain towards peers; peers None ends it. Returns /queue's state."""
        request = DrainRequest.start(peers, ttl) if peers is not None else DrainRequest.end()
        body, headers = request.signed(key.encode())
        try:
            async with self._http().post(
                f"{pod.control}/drain", data=body, headers=headers
            ) as resp:
                if resp.status != 200:
                    raise PodError(f"/drain answered {resp.status}: {(await resp.text())[:200]}")
                return dict(await resp.json(content_type=None))
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            raise PodError(str(e) or type(e).__name__) from None
