"""ChildApplier (mailrelay_operator.apply) against a fake API server: what it
sends, what it skips, and the StatefulSet recreation on an immutable change."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import pytest
from mailrelay_operator import naming
from mailrelay_operator.adoption import ForeignObject
from mailrelay_operator.apply import RECREATED, RECREATING, ChildApplier, Recreate
from mailrelay_operator.kubeapi import KubeApi, KubeError, KubeObject, object_path

KEY = ("mail", "edge")


class FakeApi:
    """Records applies and deletes; answers as told."""

    def __init__(self) -> None:
        self.applied: list[str] = []
        self.deleted: list[tuple[str, str]] = []
        self.objects: dict[str, KubeObject] = {}
        self.refuse: dict[str, KubeError] = {}

    async def apply(self, obj: Mapping[str, Any]) -> KubeObject:
        path = object_path(obj)
        if path in self.refuse:
            raise self.refuse.pop(path)
        self.applied.append(path)
        self.objects[path] = dict(obj)
        return dict(obj)

    async def get(self, path: str) -> KubeObject | None:
        return self.objects.get(path)

    async def delete(self, path: str, propagation: str = "Background") -> None:
        self.deleted.append((path, propagation))
        self.objects.pop(path, None)


def child(kind: str, api_version: str = "v1", **spec: Any) -> KubeObject:
    # The relay's labels: an object of that name found before our first apply is ours.
    labels = {naming.LABEL_MANAGED_BY: naming.MANAGED_BY, naming.LABEL_INSTANCE: "edge"}
    meta = {"name": "edge", "namespace": "mail", "labels": labels}
    return {"apiVersion": api_version, "kind": kind, "metadata": meta, "spec": spec}


async def keep(sts: KubeObject, changed: bool) -> KubeObject:
    return sts


def applier() -> tuple[ChildApplier, FakeApi]:
    api = FakeApi()
    return ChildApplier(cast(KubeApi, api)), api


async def test_unchanged_children_are_not_sent_again_until_a_resync() -> None:
    a, api = applier()
    children = [child("ConfigMap"), child("Service", ports=[25])]
    await a.apply(KEY, children, Recreate(), 1, keep)
    await a.apply(KEY, children, Recreate(), 1, keep)
    assert len(api.applied) == 2
    await a.apply(KEY, [child("ConfigMap"), child("Service", ports=[2525])], Recreate(), 1, keep)
    assert len(api.applied) == 3
    a.resync()
    await a.apply(KEY, children, Recreate(), 1, keep)
    assert len(api.applied) == 5


async def test_an_immutable_change_recreates_the_statefulset_with_orphan_deletion() -> None:
    a, api = applier()
    sts = child("StatefulSet", "apps/v1", replicas=2)
    path = object_path(sts)
    api.objects[path] = sts
    api.refuse[path] = KubeError(422, "Invalid", "Forbidden: updates to statefulset spec ...")
    recreate = Recreate()
    outcome = await a.apply(KEY, [sts], recreate, 3, keep)
    assert outcome.again and recreate.recreating == RECREATING
    assert api.deleted == [(path, "Orphan")] and path not in a.applied
    api.objects[path] = sts  # still held by the orphan finalizer
    assert (await a.apply(KEY, [sts], recreate, 3, keep)).again
    del api.objects[path]
    outcome = await a.apply(KEY, [sts], recreate, 3, keep)
    assert not outcome.again and recreate == Recreate("", (3, RECREATED))
    assert path in a.applied


async def test_a_certificate_crd_gone_meanwhile_is_reported() -> None:
    a, api = applier()
    cert = child("Certificate", "cert-manager.io/v1")
    api.refuse[object_path(cert)] = KubeError(404, "NotFound", "the server could not find it")
    a.cert_manager = True
    outcome = await a.apply(KEY, [cert], Recreate(), 1, keep)
    assert outcome.again and outcome.cert_manager_missing and a.cert_manager is False


async def test_an_object_not_ours_under_a_childs_name_is_refused() -> None:

    a, api = applier()
    theirs = {**child("Service"), "metadata": {"name": "edge", "namespace": "mail"}}
    api.objects[object_path(theirs)] = theirs
    with pytest.raises(ForeignObject, match="Service mail/edge exists and is not this MailRelay"):
        await a.apply(KEY, [child("Service")], Recreate(), 1, keep)
    assert api.applied == []
