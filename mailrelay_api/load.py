"""Reading MailRelay, RelayDomain and RecipientList manifests from files and folders."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mailrelay_api import schema as S
from mailrelay_api.validate import ManifestError, validate_object, with_defaults

MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")
SOURCE_ANNOTATION = S.SOURCE_ANNOTATION
# libyaml's loader when PyYAML has it (the PyPI wheels do): about 10x faster
# than the pure-Python one on a RecipientList of 200,000 addresses
# (docs/benchmarks.md); the same documents either way.
YAML_LOADER: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass
class Inventory:
    """Every object the renderer reads, defaults applied, each with its source."""

    relays: list[dict[str, Any]] = field(default_factory=list)
    # Dicts, or the operator's input cache records (read-only mappings).
    domains: list[Mapping[str, Any]] = field(default_factory=list)
    recipient_lists: list[Mapping[str, Any]] = field(default_factory=list)
    namespace_labels: dict[str, dict[str, str]] = field(default_factory=dict)
    errors: list[ManifestError] = field(default_factory=list)

    def add(self, obj: dict[str, Any]) -> None:
        kind = obj.get("kind")
        if kind == "MailRelay":
            self.relays.append(obj)
        elif kind == "RelayDomain":
            self.domains.append(obj)
        elif kind == "RecipientList":
            self.recipient_lists.append(obj)


def manifest_files(paths: Sequence[str | Path]) -> list[Path]:
    """The manifest files named, folders walked recursively in sorted order."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.suffix in MANIFEST_SUFFIXES))
        else:
            out.append(p)
    return out


def load_manifests(paths: Sequence[str | Path], default_namespace: str = "default") -> Inventory:
    """Reads every document, checks it against the schemas, applies defaults.

    Objects of other API groups are skipped, except Namespaces, whose labels
    feed `allowedDomains.namespaces.from: Selector`.
    """
    inv = Inventory()
    for path in manifest_files(paths):
        try:
            docs = list(yaml.load_all(path.read_text(), Loader=YAML_LOADER))
        except FileNotFoundError:
            inv.errors.append(ManifestError(str(path), "", "no such file or folder"))
            continue
        except yaml.YAMLError as e:
            inv.errors.append(ManifestError(str(path), "", f"not valid YAML: {e}"))
            continue
        for index, doc in enumerate(docs):
            source = str(path) if len(docs) == 1 else f"{path}#{index + 1}"
            if doc is None:
                continue
            if not isinstance(doc, dict):
                inv.errors.append(ManifestError(source, "", "a manifest must be a mapping"))
                continue
            if doc.get("kind") == "List" and isinstance(doc.get("items"), list):
                items = doc["items"]
            else:
                items = [doc]
            for obj in items:
                _add(inv, obj, source, default_namespace)
    return inv


def _add(inv: Inventory, obj: Any, source: str, default_namespace: str) -> None:
    if not isinstance(obj, dict):
        inv.errors.append(ManifestError(source, "", "a manifest must be a mapping"))
        return
    if obj.get("apiVersion") == "v1" and obj.get("kind") == "Namespace":
        meta = obj.get("metadata") or {}
        inv.namespace_labels[str(meta.get("name"))] = dict(meta.get("labels") or {})
        return
    if not str(obj.get("apiVersion", "")).startswith(S.GROUP + "/"):
        return
    errors = validate_object(obj, source)
    if errors:
        inv.errors.extend(errors)
        return
    obj = with_defaults(obj)
    obj["metadata"].setdefault("namespace", default_namespace)
    obj["metadata"].setdefault("annotations", {})[SOURCE_ANNOTATION] = source
    inv.add(obj)
