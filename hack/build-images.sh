#!/usr/bin/env bash
# Builds both images from Dockerfile.relay and Dockerfile.operator with Debian's
# Docker engine (hack/docker-up.sh starts it), without any registry:
#
#   1. the base image (BASE_IMAGE, default mailrelay-base:bookworm): Debian
#      bookworm minbase with python3, python3-venv, ca-certificates and publicsuffix
#      (the public-suffix list, for DMARC), made
#      with mmdebstrap from the machine's apt sources and `docker import`ed;
#      built once, reused while it exists;
#   2. the wheels: `pip wheel` on the host (the host's pip settings reach PyPI;
#      nothing does inside `docker build`), this checkout plus every dependency
#      at the versions of hack/image-constraints.txt, into .tools/wheels/;
#   3. `docker build --network=none` of both Dockerfiles, which install the
#      wheels with `pip install --no-index`.
#
# Then prints each image's size.
#
# Usage: hack/build-images.sh [--tag TAG] [--revision TEXT]
#        hack/build-images.sh --update-constraints   re-pin hack/image-constraints.txt
#                                                    to the newest versions, and exit
#   --tag       image tag (default: $MAILRELAY_IMAGE_TAG or "dev"): mailrelay:TAG,
#               mailrelay-operator:TAG
#   --revision  stored as the label org.opencontainers.image.revision (default:
#               the git commit); a new revision gives a new image id even when
#               nothing else changed (the cluster suite's rolling upgrade)
# Environment: BASE_IMAGE (default mailrelay-base:bookworm), PIP (default .venv/bin/pip)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

log() { printf 'build-images: %s\n' "$*" >&2; }
die() { printf 'build-images: error: %s\n' "$*" >&2; exit 1; }

TAG=${MAILRELAY_IMAGE_TAG:-dev}
REVISION=""
UPDATE=0
while (($#)); do
  case "$1" in
    --tag) TAG=${2:?--tag needs a value}; shift 2 ;;
    --revision) REVISION=${2:?--revision needs a value}; shift 2 ;;
    --update-constraints) UPDATE=1; shift ;;
    -h | --help) sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument: $1 (try --help)" ;;
  esac
done
BASE_IMAGE=${BASE_IMAGE:-mailrelay-base:bookworm}
PIP=${PIP:-$REPO/.venv/bin/pip}
[ -x "$PIP" ] || die "$PIP not found; run hack/setup.sh"
WHEELS="$REPO/.tools/wheels"
CONSTRAINTS="$REPO/hack/image-constraints.txt"

build_wheels() { # [constraints args...]
  rm -rf "$WHEELS"
  mkdir -p "$WHEELS"
  # --no-build-isolation is not used: pyspf and this checkout build from source
  # with setuptools from PyPI, on the host.
  "$PIP" wheel -q --disable-pip-version-check --wheel-dir "$WHEELS" "$@" "${REPO}[operator]"
}

if ((UPDATE)); then
  log "resolving the newest versions of the dependencies"
  build_wheels
  {
    sed -n '1,/^$/p' "$CONSTRAINTS" | grep '^#'
    for w in "$WHEELS"/*.whl; do
      w=$(basename "$w")
      name=${w%%-*}
      rest=${w#*-}
      [ "$name" = mailrelay ] && continue
      printf '%s==%s\n' "$(echo "$name" | tr '[:upper:]_' '[:lower:]-')" "${rest%%-*}"
    done | sort
  } >"$CONSTRAINTS.tmp"
  mv -f "$CONSTRAINTS.tmp" "$CONSTRAINTS"
  log "wrote $CONSTRAINTS; commit it"
  exit 0
fi

bash hack/docker-up.sh
DOCKER=(docker -H unix:///var/run/docker.sock)
total=$SECONDS

# ---- 1. base image -------------------------------------------------------------
if "${DOCKER[@]}" image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
  log "base image $BASE_IMAGE exists"
elif [ "$BASE_IMAGE" != mailrelay-base:bookworm ]; then
  # Another base (python:3.11.14-slim-bookworm with a registry): pulled.
  "${DOCKER[@]}" pull "$BASE_IMAGE" >/dev/null || die "cannot pull $BASE_IMAGE"
else
  command -v mmdebstrap >/dev/null || die "mmdebstrap is missing (apt-get install mmdebstrap)"
  start=$SECONDS
  log "making $BASE_IMAGE with mmdebstrap (Debian bookworm, python3)"
  tarball=$(mktemp "${TMPDIR:-/tmp}/mailrelay-base.XXXXXX.tar")
  trap 'rm -f "$tarball"' EXIT
  # No documentation, man pages or translations; no apt lists.
  # shellcheck disable=SC2016 # "$1" in the hook is expanded by mmdebstrap
  mmdebstrap --quiet --variant=minbase \
    --include=python3,python3-venv,ca-certificates,passwd,publicsuffix \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' \
    bookworm "$tarball" || die "mmdebstrap failed"
  "${DOCKER[@]}" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' \
    --message "Debian bookworm minbase + python3 (mailrelay hack/build-images.sh)" \
    "$tarball" "$BASE_IMAGE" >/dev/null || die "docker import failed"
  rm -f "$tarball"
  log "made $BASE_IMAGE in $((SECONDS - start))s"
fi

# ---- 2. wheels --------------------------------------------------------------------
start=$SECONDS
log "building wheels into .tools/wheels/ (host pip, pinned by hack/image-constraints.txt)"
build_wheels --constraint "$CONSTRAINTS"
shopt -s nullglob
mine=("$WHEELS"/mailrelay-*.whl)
((${#mine[@]} == 1)) || die "expected one mailrelay wheel in $WHEELS, found ${#mine[@]}"
version=$(basename "${mine[0]}" | cut -d- -f2)
# deps/: every dependency, pinned (relay.txt: the relay's; operator.txt: with the
# operator extra). mailrelay/: the wheel of this checkout.
mkdir -p "$WHEELS/deps" "$WHEELS/mailrelay"
mv "${mine[0]}" "$WHEELS/mailrelay/"
mv "$WHEELS"/*.whl "$WHEELS/deps/"
pins() { # the constraints lines of the given distributions (and their dependencies)
  "$PIP" install --dry-run --quiet --no-index --find-links "$WHEELS/deps" \
    --find-links "$WHEELS/mailrelay" --ignore-installed --report - "$1" 2>/dev/null |
    python3 -c 'import json, sys
for item in json.load(sys.stdin)["install"]:
    meta = item["metadata"]
    if meta["name"] != "mailrelay":
        print(meta["name"].lower().replace("_", "-") + "==" + meta["version"])' | sort
}
pins "mailrelay==$version" >"$WHEELS/deps/relay.txt"
pins "mailrelay[operator]==$version" >"$WHEELS/deps/operator.txt"
for f in relay operator; do [ -s "$WHEELS/deps/$f.txt" ] || die "could not list the dependencies ($f)"; done
echo "mailrelay==$version" >"$WHEELS/mailrelay/relay.txt"
echo "mailrelay[operator]==$version" >"$WHEELS/mailrelay/operator.txt"
# Rebuilt wheels carry new timestamps; a fixed mtime keeps docker's layer cache valid.
find "$WHEELS" -exec touch -h -d '2000-01-01 00:00:00 UTC' {} +
log "wheels ready in $((SECONDS - start))s"

# ---- 3. images ----------------------------------------------------------------------
[ -n "$REVISION" ] || REVISION=$(git rev-parse HEAD 2>/dev/null || echo unknown)
for image in relay operator; do
  case $image in
    relay) name=mailrelay ;;
    operator) name=mailrelay-operator ;;
  esac
  start=$SECONDS
  log "building $name:$TAG from Dockerfile.$image"
  "${DOCKER[@]}" build --network=none --quiet \
    --build-arg "BASE_IMAGE=$BASE_IMAGE" \
    --label "org.opencontainers.image.version=$version" \
    --label "org.opencontainers.image.revision=$REVISION" \
    -f "Dockerfile.$image" -t "$name:$TAG" . >/dev/null
  log "built $name:$TAG in $((SECONDS - start))s"
done

log "done in $((SECONDS - total))s; image sizes:"
"${DOCKER[@]}" image ls --format '{{.Repository}}:{{.Tag}}\t{{.Size}}' |
  grep -E "^(mailrelay:$TAG|mailrelay-operator:$TAG|$BASE_IMAGE)"$'\t'
