"""The status writer's queue holds references, not objects (status_writer.py)."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from mailrelay_operator.cluster import Key
from mailrelay_operator.status_writer import StatusWriter


class Api:
    writes = 0

    def __init__(self) -> None:
        self.patched: list[tuple[str, dict[str, Any]]] = []

    async def patch_status(self, path: str, status: dict[str, Any]) -> dict[str, Any]:
        self.patched.append((path, status))
        return {}


def domain(uid: str, resource_version: str) -> dict[str, Any]:
    meta = {"name": "d", "namespace": "mail", "uid": uid, "resourceVersion": resource_version}
    return {"apiVersion": "mailrelay.io/v1alpha1", "kind": "RelayDomain", "metadata": meta}


def test_a_queued_status_goes_to_the_object_as_it_is_now() -> None:
    async def scenario() -> None:
        cache: dict[Key, dict[str, Any]] = {}
        api = Api()
        writer = StatusWriter(cast(Any, api), current=lambda kind, key: cache.get(key))
        queued = domain("u1", "1")
        writer.queue(queued, {"recipients": 1})
        writer.queue(domain("u2", "1"), {"recipients": 2})  # an older object of that name
        assert len(writer.pending) == 2
        cache[("mail", "d")] = domain("u1", "2")  # a newer version since
        task = asyncio.create_task(writer.run())
        for _ in range(100):
            if writer.idle:
                break
            await asyncio.sleep(0.01)
        task.cancel()
        # Written once, for the object the cache has; the one of another uid is dropped.
        assert api.patched == [
            ("/apis/mailrelay.io/v1alpha1/namespaces/mail/relaydomains/d", {"recipients": 1})
        ]
        writer.queue(cache[("mail", "d")], {"recipients": 1})  # what was written: nothing queued
        assert not writer.pending

    asyncio.run(scenario())


def test_the_written_hook_sees_writes_only() -> None:
    """What the Event recorder hangs on: a status written, not one found unchanged."""

    async def scenario() -> None:
        seen: list[dict[str, Any]] = []
        writer = StatusWriter(cast(Any, Api()), written_hook=lambda obj, new: seen.append(new))
        obj = {**domain("u1", "1"), "status": {"recipients": 1}}
        await writer.write(obj, {"recipients": 1})  # what the object has
        await writer.write(obj, {"recipients": 2})
        await writer.write(obj, {"recipients": 2})  # what was written
        writer.resync()
        await writer.write({**obj, "status": {"recipients": 2}}, {"recipients": 2})
        assert seen == [{"recipients": 2}]

    asyncio.run(scenario())


def test_equal_digests_are_held_once() -> None:
    """100,000 objects with the same status: one digest object, not one each."""
    writer = StatusWriter(cast(Any, Api()))
    new = {"recipients": 1}
    for uid in ("u1", "u2", "u3"):
        obj = domain(uid, "1")
        obj["status"] = dict(new)
        writer.queue(obj, new)  # what the object has: remembered, not queued
    assert not writer.pending
    first, *rest = writer.written.values()
    assert len(writer.written) == 3 and all(d is first for d in rest)


class FlakyApi(Api):
    """Refuses the first write; runs `during` inside the next one."""

    def __init__(self) -> None:
        super().__init__()
        self.refused = False
        self.during: list[Any] = []  # called once, inside the next write

    async def patch_status(self, path: str, status: dict[str, Any]) -> dict[str, Any]:
        if not self.refused:
            self.refused = True
            raise RuntimeError("API server gone")
        while self.during:
            self.during.pop()()
        return await super().patch_status(path, status)


def test_a_round_takes_each_status_as_its_write_starts() -> None:
    """No copy of a round: a failed write goes back to the queue, and a
    status queued during a round for an object not taken yet replaces the
    one waiting (the newest is written, once)."""

    async def scenario() -> None:
        objs = {
            ("mail", n): {**domain(n, "1"), "metadata": {"name": n, "namespace": "mail", "uid": n}}
            for n in "abc"
        }
        api = FlakyApi()
        writer = StatusWriter(
            cast(Any, api), retry_seconds=0.01, current=lambda kind, key: objs.get(key)
        )
        for n in "abc":
            writer.queue(objs[("mail", n)], {"recipients": 1})
        api.during.append(lambda: writer.queue(objs[("mail", "c")], {"recipients": 3}))
        task = asyncio.create_task(writer.run())
        for _ in range(300):
            if writer.idle and len(api.patched) >= 3:
                break
            await asyncio.sleep(0.01)
        task.cancel()
        written = {path.rsplit("/", 1)[1]: st["recipients"] for path, st in api.patched}
        assert written == {"a": 1, "b": 1, "c": 3}
        assert writer.idle and not writer.pending

    asyncio.run(scenario())
