#!/usr/bin/env bash
# Starts a throw-away Kubernetes control plane on loopback, envtest style:
# etcd (--unsafe-no-fsync, data in a temp folder) plus kube-apiserver, on free
# 127.0.0.1 ports, with a fresh CA, service-account keypair and an admin
# client certificate (CN=admin, O=system:masters). No controller-manager and
# no scheduler: no garbage collection, pods are never scheduled.
#
# Environment:
#   KUBECONFIG          where to write the kubeconfig (a single path);
#                       default: <repo>/.tools/run/kubeconfig
#   KUBEBUILDER_ASSETS  folder holding etcd and kube-apiserver;
#                       default: <repo>/.tools/bin (hack/install-tools.sh)
#   MAILRELAY_KUBE_UP_TIMEOUT  seconds to wait for /readyz (default 120)
#
# Writes "$KUBECONFIG" and the state file "$KUBECONFIG.state" (KEY=VALUE lines:
# STATE_DIR, ETCD_PID, APISERVER_PID, APISERVER_URL, ETCD_URL, CA_FILE, ...),
# and prints the kubeconfig path as the last line of stdout.
# If a healthy control plane from an earlier run is recorded there, it is
# reused; a stale one is cleaned up first. Stop it with hack/kube-down.sh.
set -euo pipefail

HACK=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HACK/.." && pwd)

log() { printf 'kube-up: %s\n' "$*" >&2; }
die() { printf 'kube-up: error: %s\n' "$*" >&2; exit 1; }

KUBECONFIG=${KUBECONFIG:-$REPO/.tools/run/kubeconfig}
case "$KUBECONFIG" in
  *:*) die "KUBECONFIG must be a single file, not a list: $KUBECONFIG" ;;
esac
KUBECONFIG=$(realpath -m "$KUBECONFIG")
export KUBECONFIG
STATE_FILE="$KUBECONFIG.state"
# Not "$KUBECONFIG.lock": client-go uses that name for its own lock file.
LOCK_FILE="$KUBECONFIG.kube-up-lock"
MARKER='# Written by mailrelay hack/kube-up.sh; hack/kube-down.sh removes it.'

ASSETS=${KUBEBUILDER_ASSETS:-$REPO/.tools/bin}
ETCD_BIN="$ASSETS/etcd"
APISERVER_BIN="$ASSETS/kube-apiserver"
for b in "$ETCD_BIN" "$APISERVER_BIN"; do
  [ -x "$b" ] || die "$b not found; run hack/install-tools.sh (or set KUBEBUILDER_ASSETS)"
done
for t in openssl curl setsid; do
  command -v "$t" >/dev/null 2>&1 || die "$t is needed but not installed"
done
TIMEOUT=${MAILRELAY_KUBE_UP_TIMEOUT:-120}

if [ -e "$KUBECONFIG" ] && ! grep -qxF "$MARKER" "$KUBECONFIG"; then
  die "$KUBECONFIG exists and was not written by kube-up.sh; refusing to overwrite it (set KUBECONFIG to another path)"
fi
mkdir -p "$(dirname "$KUBECONFIG")"
exec 9>"$LOCK_FILE"
flock -w 300 9 || die "another kube-up/kube-down holds $LOCK_FILE"

state_get() { sed -n "s/^$1=//p" "$STATE_FILE" 2>/dev/null | head -n1; }

# ours PID: PID is alive (not a zombie) and its command line mentions STATE_DIR.
ours() {
  local pid=$1
  [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF "$STATE_DIR"
}

# ---- reuse or clean up an earlier control plane --------------------------------
if [ -f "$STATE_FILE" ]; then
  STATE_DIR=$(state_get STATE_DIR)
  url=$(state_get APISERVER_URL)
  if [ -n "$STATE_DIR" ] && ours "$(state_get ETCD_PID)" && ours "$(state_get APISERVER_PID)" &&
    [ "$(curl -sS --max-time 5 --cacert "$(state_get CA_FILE)" --cert "$(state_get CLIENT_CERT)" \
      --key "$(state_get CLIENT_KEY)" "$url/readyz" 2>/dev/null)" = ok ]; then
    log "control plane already running at $url"
    echo "$KUBECONFIG"
    exit 0
  fi
  log "cleaning up a stale control plane recorded in $STATE_FILE"
  flock -u 9
  "$HACK/kube-down.sh" >&2 || die "hack/kube-down.sh could not clean up $STATE_FILE"
  flock -w 300 9 || die "another kube-up/kube-down holds $LOCK_FILE"
fi

# The daemons below are started with 9>&- so they do not inherit (and hold
# forever) the lock on fd 9.
# ---- fresh state -----------------------------------------------------------------
STATE_DIR=$(mktemp -d "${TMPDIR:-/tmp}/mailrelay-kube.XXXXXX")
PKI="$STATE_DIR/pki"
mkdir -p "$PKI" "$STATE_DIR/apiserver-certs"
chmod 700 "$STATE_DIR"
{
  echo "# hack/kube-up.sh state; hack/kube-down.sh reads it"
  echo "STATE_DIR=$STATE_DIR"
  echo "KUBECONFIG=$KUBECONFIG"
} >"$STATE_FILE"

done_ok=0
cleanup_on_failure() {
  if ((done_ok == 0)); then
    flock -u 9 2>/dev/null || true
    "$HACK/kube-down.sh" >/dev/null 2>&1 || true
  fi
}
trap cleanup_on_failure EXIT
trap 'exit 130' INT TERM

fail() {
  printf 'kube-up: error: %s\n' "$1" >&2
  local f
  for f in kube-apiserver.log etcd.log; do
    if [ -s "$STATE_DIR/$f" ]; then
      printf -- '---- last lines of %s ----\n' "$f" >&2
      tail -n "$([ "$f" = etcd.log ] && echo 15 || echo 40)" "$STATE_DIR/$f" >&2
    fi
  done
  exit 1
}

# ---- certificates ------------------------------------------------------------------
(
  cd "$PKI"
  umask 077
  ossl() { openssl "$@" >/dev/null 2>openssl.err || { cat openssl.err >&2; exit 1; }; }
  ossl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out ca.key
  ossl req -x509 -new -key ca.key -sha256 -days 3650 -subj "/CN=mailrelay-test-ca" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" -out ca.crt
  sign() { # NAME SUBJECT EXTENSIONS
    ossl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$1.key"
    ossl req -new -key "$1.key" -subj "$2" -out "$1.csr"
    printf '%b' "$3" >"$1.ext"
    ossl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -sha256 -days 3650 \
      -extfile "$1.ext" -out "$1.crt"
  }
  sign serving "/CN=kube-apiserver" \
    "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\n"
  sign admin "/O=system:masters/CN=admin" \
    "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n"
  ossl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out sa.key
  ossl pkey -in sa.key -pubout -out sa.pub
  rm -f ./*.csr ./*.ext ca.srl openssl.err
) || fail "generating certificates with openssl failed"

# ---- ports ----------------------------------------------------------------------------
free_ports() { # prints N distinct free 127.0.0.1 TCP ports
  local n=$1 py
  for py in python3 python; do
    if command -v "$py" >/dev/null 2>&1; then
      "$py" - "$n" <<'EOF' && return 0
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
    fi
  done
  # No Python: random ports that `ss` does not show as listening.
  local ports=() p
  while ((${#ports[@]} < n)); do
    p=$((20000 + RANDOM % 40000))
    [[ " ${ports[*]} " == *" $p "* ]] && continue
    ss -Hltn "sport = :$p" 2>/dev/null | grep -q . && continue
    ports+=("$p")
  done
  echo "${ports[*]}"
}

curl_api() { # PATH -> body on stdout
  curl -sS --max-time 5 --cacert "$PKI/ca.crt" --cert "$PKI/admin.crt" --key "$PKI/admin.key" \
    "$APISERVER_URL$1" 2>/dev/null
}

# alive PID: running and not a zombie (a zombie's cmdline is empty; /proc
# files always show size 0, so read it).
alive() { [ -n "$(tr -d '\0' <"/proc/$1/cmdline" 2>/dev/null)" ]; }

# start_once: 0 = running, 2 = port clash (retry), exits via fail otherwise.
start_once() {
  read -r ETCD_PORT PEER_PORT APISERVER_PORT <<<"$(free_ports 3)"
  ETCD_URL="http://127.0.0.1:$ETCD_PORT"
  APISERVER_URL="https://127.0.0.1:$APISERVER_PORT"
  rm -rf "$STATE_DIR/etcd-data"
  : >"$STATE_DIR/etcd.log"
  : >"$STATE_DIR/kube-apiserver.log"

  setsid "$ETCD_BIN" \
    --name=default \
    --data-dir="$STATE_DIR/etcd-data" \
    --listen-client-urls="$ETCD_URL" \
    --advertise-client-urls="$ETCD_URL" \
    --listen-peer-urls="http://127.0.0.1:$PEER_PORT" \
    --initial-advertise-peer-urls="http://127.0.0.1:$PEER_PORT" \
    --initial-cluster="default=http://127.0.0.1:$PEER_PORT" \
    --unsafe-no-fsync \
    </dev/null >>"$STATE_DIR/etcd.log" 2>&1 9>&- &
  ETCD_PID=$!
  echo "ETCD_PID=$ETCD_PID" >>"$STATE_FILE"

  local deadline=$((SECONDS + TIMEOUT))
  until [[ "$(curl -sS --max-time 2 "$ETCD_URL/health" 2>/dev/null)" == *'"health":"true"'* ]]; do
    if ! alive "$ETCD_PID"; then
      grep -q 'address already in use' "$STATE_DIR/etcd.log" && return 2
      fail "etcd exited during startup"
    fi
    ((SECONDS < deadline)) || fail "etcd was not healthy after ${TIMEOUT}s"
    sleep 0.2
  done

  # envtest's flags, plus --endpoint-reconciler-type=none: the "kubernetes"
  # Endpoints may not point at 127.0.0.1, and the default reconciler would log
  # that error every 10 s (no pods run here, so nothing needs those Endpoints).
  setsid "$APISERVER_BIN" \
    --etcd-servers="$ETCD_URL" \
    --cert-dir="$STATE_DIR/apiserver-certs" \
    --tls-cert-file="$PKI/serving.crt" \
    --tls-private-key-file="$PKI/serving.key" \
    --secure-port="$APISERVER_PORT" \
    --bind-address=127.0.0.1 \
    --advertise-address=127.0.0.1 \
    --service-cluster-ip-range=10.0.0.0/24 \
    --allow-privileged=true \
    --disable-admission-plugins=ServiceAccount \
    --authorization-mode=RBAC \
    --client-ca-file="$PKI/ca.crt" \
    --service-account-issuer="$APISERVER_URL/" \
    --service-account-key-file="$PKI/sa.pub" \
    --service-account-signing-key-file="$PKI/sa.key" \
    --endpoint-reconciler-type=none \
    </dev/null >>"$STATE_DIR/kube-apiserver.log" 2>&1 9>&- &
  APISERVER_PID=$!
  echo "APISERVER_PID=$APISERVER_PID" >>"$STATE_FILE"

  until [ "$(curl_api /readyz)" = ok ]; do
    if ! alive "$APISERVER_PID"; then
      grep -q 'address already in use' "$STATE_DIR/kube-apiserver.log" && return 2
      fail "kube-apiserver exited during startup"
    fi
    alive "$ETCD_PID" || fail "etcd exited while kube-apiserver was starting"
    ((SECONDS < deadline)) || fail "kube-apiserver /readyz did not answer ok within ${TIMEOUT}s"
    sleep 0.25
  done
  # /readyz can answer before the bootstrap controller has created "default".
  until curl_api /api/v1/namespaces/default | grep -q '"name": *"default"'; do
    ((SECONDS < deadline)) || fail "namespace default did not appear within ${TIMEOUT}s"
    sleep 0.25
  done
  return 0
}

log "starting etcd and kube-apiserver (state in $STATE_DIR)"
start=$SECONDS
for attempt in 1 2 3; do
  rc=0
  start_once || rc=$?
  ((rc == 0)) && break
  ((attempt < 3)) || fail "ports kept clashing with other processes"
  log "port clash, retrying with other ports"
  for pid in "${APISERVER_PID:-}" "${ETCD_PID:-}"; do
    if [ -n "$pid" ]; then kill -9 "$pid" 2>/dev/null || true; fi
  done
  sleep 0.5
  sed -i '/^ETCD_PID=\|^APISERVER_PID=/d' "$STATE_FILE"
done

# ---- kubeconfig and state --------------------------------------------------------------
b64() { base64 -w0 <"$1"; }
tmp="$KUBECONFIG.tmp.$$"
(
  umask 077
  cat >"$tmp" <<EOF
$MARKER
apiVersion: v1
kind: Config
clusters:
- name: mailrelay-test
  cluster:
    server: $APISERVER_URL
    certificate-authority-data: $(b64 "$PKI/ca.crt")
users:
- name: admin
  user:
    client-certificate-data: $(b64 "$PKI/admin.crt")
    client-key-data: $(b64 "$PKI/admin.key")
contexts:
- name: mailrelay-test
  context:
    cluster: mailrelay-test
    user: admin
    namespace: default
current-context: mailrelay-test
EOF
)
mv -f "$tmp" "$KUBECONFIG"
{
  echo "APISERVER_URL=$APISERVER_URL"
  echo "ETCD_URL=$ETCD_URL"
  echo "CA_FILE=$PKI/ca.crt"
  echo "CLIENT_CERT=$PKI/admin.crt"
  echo "CLIENT_KEY=$PKI/admin.key"
  echo "APISERVER_LOG=$STATE_DIR/kube-apiserver.log"
  echo "ETCD_LOG=$STATE_DIR/etcd.log"
} >>"$STATE_FILE"

done_ok=1
log "kube-apiserver ready at $APISERVER_URL after $((SECONDS - start))s (etcd pid $ETCD_PID, kube-apiserver pid $APISERVER_PID)"
log "state file: $STATE_FILE; stop with hack/kube-down.sh"
echo "$KUBECONFIG"
