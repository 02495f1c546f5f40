#!/usr/bin/env python3
"""Writes a one-file container image (docker-archive tar, as `docker save` writes
it) holding a static binary as its entrypoint, without Docker: the node's pause
image and CoreDNS (hack/cluster-up.sh), imported with `ctr images import`.

    hack/oci-image.py --binary PATH --name REPO:TAG --out image.tar [--user 65532]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import tarfile
from pathlib import Path


def layer(binary: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tar.gettarinfo(str(binary), arcname=binary.name)
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mtime = 0
        info.mode = 0o755
        with binary.open("rb") as f:
            tar.addfile(info, f)
    return buf.getvalue()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--binary", type=Path, required=True)
    parser.add_argument("--name", required=True, help="REPO:TAG")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--user", default="65532:65532")
    args = parser.parse_args()

    data = layer(args.binary)
    diff_id = "sha256:" + hashlib.sha256(data).hexdigest()
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Entrypoint": [f"/{args.binary.name}"], "User": args.user},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created_by": "mailrelay hack/oci-image.py"}],
    }
    config_bytes = json.dumps(config, sort_keys=True).encode()
    config_name = hashlib.sha256(config_bytes).hexdigest() + ".json"
    layer_name = diff_id.split(":")[1] + "/layer.tar"
    manifest = [{"Config": config_name, "RepoTags": [args.name], "Layers": [layer_name]}]

    with tarfile.open(args.out, "w") as tar:
        for name, content in [
            (config_name, config_bytes),
            (layer_name, data),
            ("manifest.json", json.dumps(manifest).encode()),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
