#!/usr/bin/env bash
# Starts a real single-node Kubernetes cluster on this machine, as root:
#   etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubelet and
#   kube-proxy (hack/install-tools.sh builds them from Go modules),
#   containerd + runc from Debian's docker.io packages, started with our own
#   config (its own root, state and socket: it does not touch a system containerd),
#   Debian's CNI plugins (bridge, host-local, loopback, portmap) on our bridge,
#   a pause image built here (hack/pause/), cluster DNS (CoreDNS, if
#   hack/install-tools.sh built it) and static local PersistentVolumes.
#
# Addresses: the node is 10.213.0.1 on the bridge mrbr0; pods get 10.213.0.0/24,
# Services 10.214.0.0/24 (DNS at 10.214.0.10). kube-apiserver listens on
# 10.213.0.1:6443 only, the other components on 127.0.0.1. A FORWARD rule drops
# whatever a pod sends to an address outside the pod range, so nothing leaves
# the node: the pods reach each other, the Services and the node, nothing else.
#
# Why these settings (the kernel of these machines runs cgroup v1):
#   kubelet: failCgroupV1: false, cgroupDriver: cgroupfs (kubelet >= 1.35 refuses
#     cgroup v1 unless told), cgroupsPerQOS: false (no QoS cgroup tree on v1);
#   containerd: restrict_oom_score_adj = true (a negative oom_score_adj is refused
#     here even for root; kubelet gives sandboxes -998 and runc then fails with
#     "can't get final child's PID from pipe: EOF");
#   the sandbox image cannot be pulled: hack/pause/ is built and imported as
#     registry.k8s.io/pause:3.10 with `ctr images import`.
#
# Images reach the node with `docker save ... | hack/cluster-load.sh`.
# Writes the admin kubeconfig to /var/lib/mailrelay-node/kubeconfig and prints its
# path as the last line. Stop everything with hack/cluster-down.sh.
#
# Environment: KUBEBUILDER_ASSETS  folder with the binaries (default <repo>/.tools/bin)
#              MAILRELAY_CLUSTER_PVS  how many local PersistentVolumes (default 6)
set -euo pipefail

HACK=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HACK/.." && pwd)
# shellcheck source=hack/cluster-env.sh
. "$HACK/cluster-env.sh"
# shellcheck source=hack/apt.sh
. "$HACK/apt.sh"
# shellcheck source=hack/netfilter.sh
. "$HACK/netfilter.sh"

log() { printf 'cluster-up: %s\n' "$*" >&2; }
die() { printf 'cluster-up: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "needs root (containerd, kubelet, iptables)"
ASSETS=${KUBEBUILDER_ASSETS:-$REPO/.tools/bin}
for b in etcd kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl; do
  [ -x "$ASSETS/$b" ] || die "$ASSETS/$b not found; run hack/install-tools.sh"
done
apt_ensure containerd runc containernetworking-plugins iptables nftables conntrack
for t in openssl curl setsid ip iptables containerd ctr runc go; do
  command -v "$t" >/dev/null 2>&1 || die "$t is needed (apt-get install docker.io containerd runc containernetworking-plugins iptables)"
done
for p in bridge host-local loopback portmap; do
  [ -x "$CNI_BIN_DIR/$p" ] || die "$CNI_BIN_DIR/$p is missing (apt-get install containernetworking-plugins)"
done
PV_COUNT=${MAILRELAY_CLUSTER_PVS:-6}

mkdir -p "$RUN_DIR"
exec 9>"$LOCK_FILE"
flock -w 600 9 || die "another cluster-up/cluster-down holds $LOCK_FILE"

if [ -f "$NODE_DIR/up" ] && KUBECONFIG=$ADMIN_KUBECONFIG "$ASSETS/kubectl" get --raw /readyz >/dev/null 2>&1; then
  log "the cluster is already up"
  echo "$ADMIN_KUBECONFIG"
  exit 0
fi
if [ -e "$NODE_DIR" ]; then
  log "cleaning up what an earlier cluster left"
  flock -u 9
  "$HACK/cluster-down.sh" --keep-docker >&2 # an image build may come just before
  flock -w 600 9 || die "another cluster-up/cluster-down holds $LOCK_FILE"
fi

ok=0
on_exit() { ((ok)) || log "failed; logs in $LOG_DIR (kept until hack/cluster-down.sh)"; }
trap on_exit EXIT
start_all=$SECONDS
mkdir -p "$NODE_DIR" "$LOG_DIR" "$PKI" "$RUN_DIR"
chmod 700 "$NODE_DIR"

# ---- network: our bridge, forwarding, and the guard rule -------------------------
sysctl -n net.ipv4.ip_forward >"$NODE_DIR/ip_forward.before"
# Before any iptables command: cluster-down.sh removes what is new and empty then.
nft_objects >"$NODE_DIR/nft.before"
sysctl -qw net.ipv4.ip_forward=1
if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
  ip link add "$BRIDGE" type bridge
fi
ip addr replace "$NODE_IP/24" dev "$BRIDGE"
ip link set "$BRIDGE" up
# Service addresses without a kube-proxy rule go to the bridge, never to the default route.
ip route replace "$SERVICE_CIDR" dev "$BRIDGE" src "$NODE_IP"
# Bridged pod-to-pod traffic must pass iptables for Services (kube-proxy's DNAT).
# cluster-down.sh puts back what was there before: the setting, or no module.
if [ -w /proc/sys/net/bridge/bridge-nf-call-iptables ]; then
  sysctl -n net.bridge.bridge-nf-call-iptables >"$NODE_DIR/bridge-nf-call-iptables.before"
  sysctl -qw net.bridge.bridge-nf-call-iptables=1
elif modprobe br_netfilter 2>/dev/null; then
  touch "$NODE_DIR/br_netfilter.loaded"
else
  log "warning: br_netfilter is not available"
fi
iptables -N "$FWD_CHAIN" 2>/dev/null || iptables -F "$FWD_CHAIN"
iptables -A "$FWD_CHAIN" -s "$POD_CIDR" -d "$POD_CIDR" -j RETURN
iptables -A "$FWD_CHAIN" -s "$POD_CIDR" -j DROP
iptables -C FORWARD -j "$FWD_CHAIN" 2>/dev/null || iptables -I FORWARD 1 -j "$FWD_CHAIN"

# ---- certificates ----------------------------------------------------------------
cert() { # NAME SUBJECT [SANs]
  local name=$1 subj=$2 san=${3:-}
  openssl genrsa -out "$PKI/$name.key" 2048 2>/dev/null
  openssl req -new -key "$PKI/$name.key" -subj "$subj" -out "$PKI/$name.csr" 2>/dev/null
  {
    echo "basicConstraints=CA:FALSE"
    echo "keyUsage=digitalSignature,keyEncipherment"
    echo "extendedKeyUsage=serverAuth,clientAuth"
    [ -z "$san" ] || echo "subjectAltName=$san"
  } >"$PKI/$name.ext"
  openssl x509 -req -in "$PKI/$name.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" -CAcreateserial \
    -days 30 -sha256 -extfile "$PKI/$name.ext" -out "$PKI/$name.crt" 2>/dev/null
}
openssl req -x509 -newkey rsa:2048 -nodes -keyout "$PKI/ca.key" -out "$PKI/ca.crt" -days 30 \
  -subj "/CN=mailrelay-node-ca" 2>/dev/null
cert apiserver "/CN=kube-apiserver" \
  "IP:$NODE_IP,IP:127.0.0.1,IP:$API_SERVICE_IP,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
cert admin "/O=system:masters/CN=admin"
cert kubelet "/CN=$NODE_NAME" "IP:$NODE_IP,DNS:$NODE_NAME"
openssl genrsa -out "$PKI/sa.key" 2048 2>/dev/null
openssl rsa -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub" 2>/dev/null

b64() { base64 -w0 <"$1"; }
(
  umask 077
  cat >"$ADMIN_KUBECONFIG" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: mailrelay-node
  cluster:
    server: https://$NODE_IP:$API_PORT
    certificate-authority-data: $(b64 "$PKI/ca.crt")
users:
- name: admin
  user:
    client-certificate-data: $(b64 "$PKI/admin.crt")
    client-key-data: $(b64 "$PKI/admin.key")
contexts:
- name: mailrelay-node
  context: {cluster: mailrelay-node, user: admin, namespace: default}
current-context: mailrelay-node
EOF
)
export KUBECONFIG=$ADMIN_KUBECONFIG
KUBECTL=("$ASSETS/kubectl" --request-timeout=20s)

# ---- daemons ---------------------------------------------------------------------
daemon() { # NAME CMD... : started in its own session, pid in $RUN_DIR/NAME.pid
  local name=$1
  shift
  setsid "$@" </dev/null >>"$LOG_DIR/$name.log" 2>&1 9>&- &
  echo $! >"$RUN_DIR/$name.pid"
}
alive() { kill -0 "$(cat "$RUN_DIR/$1.pid")" 2>/dev/null; }
wait_for() { # NAME TIMEOUT CMD... : until CMD succeeds, while NAME lives
  local name=$1 timeout=$2 deadline=$((SECONDS + $2))
  shift 2
  until "$@" >/dev/null 2>&1; do
    alive "$name" || { tail -n 40 "$LOG_DIR/$name.log" >&2; die "$name exited"; }
    ((SECONDS < deadline)) || { tail -n 40 "$LOG_DIR/$name.log" >&2; die "$name not ready within ${timeout}s"; }
    sleep 0.5
  done
}

log "starting containerd"
mkdir -p "$NODE_DIR/containerd" "$RUN_DIR/containerd" "$CNI_CONF_DIR" "$NODE_DIR/cni-ipam"
netns_list() { { find /var/run/netns -maxdepth 1 -name 'cni-*' -printf '%f\n' 2>/dev/null || true; } | sort; }
netns_list >"$NODE_DIR/netns.before"
cat >"$NODE_DIR/containerd.toml" <<EOF
# containerd for the mailrelay node (hack/cluster-up.sh)
version = 2
root = "$NODE_DIR/containerd"
state = "$RUN_DIR/containerd"
oom_score = 0
[grpc]
  address = "$CONTAINERD_SOCK"
[ttrpc]
  address = "$CONTAINERD_SOCK.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "$NODE_DIR/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  restrict_oom_score_adj = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "$(command -v runc)"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "$CNI_BIN_DIR"
    conf_dir = "$CNI_CONF_DIR"
EOF
cat >"$CNI_CONF_DIR/10-mailrelay.conflist" <<EOF
{
  "cniVersion": "0.4.0",
  "name": "mailrelay-node",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$BRIDGE",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "dataDir": "$NODE_DIR/cni-ipam",
        "ranges": [[{"subnet": "$POD_CIDR", "rangeStart": "$POD_RANGE_START", "gateway": "$NODE_IP"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF
daemon containerd containerd --config "$NODE_DIR/containerd.toml"
wait_for containerd 30 ctr --address "$CONTAINERD_SOCK" version

log "importing the pause image"
pause_dir="$NODE_DIR/pause-image"
mkdir -p "$pause_dir"
(cd "$HACK/pause" && CGO_ENABLED=0 GOWORK=off GOFLAGS=-buildvcs=false go build -trimpath -ldflags "-s -w" -o "$pause_dir/pause" .)
"$HACK/oci-image.py" --binary "$pause_dir/pause" --name "$PAUSE_IMAGE" --out "$pause_dir/pause.tar"
ctr --address "$CONTAINERD_SOCK" -n k8s.io images import --no-unpack=false "$pause_dir/pause.tar" >/dev/null

log "starting etcd"
daemon etcd "$ASSETS/etcd" --name mailrelay-node --data-dir "$NODE_DIR/etcd" \
  --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
  --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
  --initial-cluster "mailrelay-node=http://127.0.0.1:$ETCD_PEER_PORT" --unsafe-no-fsync
wait_for etcd 60 curl -sf "http://127.0.0.1:$ETCD_PORT/health"

log "starting kube-apiserver on $NODE_IP:$API_PORT"
daemon kube-apiserver "$ASSETS/kube-apiserver" \
  --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
  --bind-address "$NODE_IP" --advertise-address "$NODE_IP" --secure-port "$API_PORT" \
  --cert-dir "$NODE_DIR/apiserver-certs" \
  --tls-cert-file "$PKI/apiserver.crt" --tls-private-key-file "$PKI/apiserver.key" \
  --client-ca-file "$PKI/ca.crt" \
  --kubelet-client-certificate "$PKI/admin.crt" --kubelet-client-key "$PKI/admin.key" \
  --service-cluster-ip-range "$SERVICE_CIDR" \
  --service-account-issuer https://kubernetes.default.svc \
  --service-account-key-file "$PKI/sa.pub" --service-account-signing-key-file "$PKI/sa.key" \
  --kubelet-preferred-address-types InternalIP \
  --authorization-mode RBAC --allow-privileged=true
wait_for kube-apiserver 120 "${KUBECTL[@]}" get --raw /readyz

log "starting kube-controller-manager and kube-scheduler"
daemon kube-controller-manager "$ASSETS/kube-controller-manager" \
  --kubeconfig "$ADMIN_KUBECONFIG" --authentication-kubeconfig "$ADMIN_KUBECONFIG" \
  --authorization-kubeconfig "$ADMIN_KUBECONFIG" \
  --bind-address 127.0.0.1 --secure-port "$CONTROLLER_MANAGER_PORT" --leader-elect=false \
  --service-account-private-key-file "$PKI/sa.key" --root-ca-file "$PKI/ca.crt" \
  --service-cluster-ip-range "$SERVICE_CIDR" --use-service-account-credentials=false
daemon kube-scheduler "$ASSETS/kube-scheduler" \
  --kubeconfig "$ADMIN_KUBECONFIG" --authentication-kubeconfig "$ADMIN_KUBECONFIG" \
  --authorization-kubeconfig "$ADMIN_KUBECONFIG" \
  --bind-address 127.0.0.1 --secure-port "$SCHEDULER_PORT" --leader-elect=false

log "starting kubelet"
mkdir -p "$NODE_DIR/kubelet"
# Pods get no resolver of the machine: cluster DNS, or one that answers nothing.
echo "nameserver 127.0.0.1" >"$NODE_DIR/resolv.conf"
dns_lines=""
if [ -x "$ASSETS/coredns" ]; then
  dns_lines="clusterDNS: [$DNS_SERVICE_IP]"
fi
cat >"$NODE_DIR/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupsPerQOS: false
enforceNodeAllocatable: []
failSwapOn: false
address: $NODE_IP
port: $KUBELET_PORT
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $KUBELET_HEALTHZ_PORT
tlsCertFile: $PKI/kubelet.crt
tlsPrivateKeyFile: $PKI/kubelet.key
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: false}
  x509: {clientCAFile: $PKI/ca.crt}
authorization: {mode: AlwaysAllow}
containerRuntimeEndpoint: unix://$CONTAINERD_SOCK
resolvConf: $NODE_DIR/resolv.conf
clusterDomain: cluster.local
$dns_lines
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: 100Mi, nodefs.available: 2%, imagefs.available: 2%}
protectKernelDefaults: false
serializeImagePulls: false
syncFrequency: 5s
fileCheckFrequency: 5s
EOF
daemon kubelet "$ASSETS/kubelet" --config "$NODE_DIR/kubelet.yaml" --kubeconfig "$ADMIN_KUBECONFIG" \
  --root-dir "$NODE_DIR/kubelet" --hostname-override "$NODE_NAME" --node-ip "$NODE_IP" --v=1
wait_for kubelet 120 "${KUBECTL[@]}" get node "$NODE_NAME"

log "starting kube-proxy"
cat >"$NODE_DIR/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $ADMIN_KUBECONFIG}
hostnameOverride: $NODE_NAME
mode: iptables
clusterCIDR: $POD_CIDR
nodePortAddresses: ["$NODE_IP/32"]
healthzBindAddress: 127.0.0.1:$KUBE_PROXY_HEALTHZ_PORT
metricsBindAddress: 127.0.0.1:$KUBE_PROXY_METRICS_PORT
conntrack: {maxPerCore: 0, min: 0}
EOF
daemon kube-proxy "$ASSETS/kube-proxy" --config "$NODE_DIR/kube-proxy.yaml"
wait_for kube-proxy 60 curl -sf "http://127.0.0.1:$KUBE_PROXY_HEALTHZ_PORT/healthz"

log "waiting for the node to be Ready"
wait_for kubelet 180 "${KUBECTL[@]}" wait --for=condition=Ready "node/$NODE_NAME" --timeout=5s
# The default ServiceAccount must exist before pods can be created.
wait_for kube-controller-manager 60 "${KUBECTL[@]}" -n default get serviceaccount default

log "local PersistentVolumes ($PV_COUNT) and their StorageClass"
{
  cat <<EOF
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: local
  annotations: {storageclass.kubernetes.io/is-default-class: "true"}
provisioner: kubernetes.io/no-provisioner
volumeBindingMode: WaitForFirstConsumer
reclaimPolicy: Retain
EOF
  for i in $(seq 1 "$PV_COUNT"); do
    mkdir -p "$NODE_DIR/volumes/pv$i"
    cat <<EOF
---
apiVersion: v1
kind: PersistentVolume
metadata:
  name: local-pv$i
spec:
  capacity: {storage: 20Gi}
  accessModes: [ReadWriteOnce]
  persistentVolumeReclaimPolicy: Retain
  storageClassName: local
  local: {path: $NODE_DIR/volumes/pv$i}
  nodeAffinity:
    required:
      nodeSelectorTerms:
      - matchExpressions:
        - {key: kubernetes.io/hostname, operator: In, values: [$NODE_NAME]}
EOF
  done
} | "${KUBECTL[@]}" apply -f - >/dev/null

if [ -x "$ASSETS/coredns" ]; then
  log "cluster DNS (CoreDNS) at $DNS_SERVICE_IP"
  "$HACK/oci-image.py" --binary "$ASSETS/coredns" --name "$COREDNS_IMAGE" --out "$NODE_DIR/coredns.tar"
  ctr --address "$CONTAINERD_SOCK" -n k8s.io images import "$NODE_DIR/coredns.tar" >/dev/null
  sed -e "s|@IMAGE@|$COREDNS_IMAGE|" -e "s|@DNS_IP@|$DNS_SERVICE_IP|" "$HACK/cluster-dns.yaml" |
    "${KUBECTL[@]}" apply -f - >/dev/null
  "${KUBECTL[@]}" -n kube-system rollout status deploy/coredns --timeout=180s >&2
fi

touch "$NODE_DIR/up"
ok=1
log "cluster up in $((SECONDS - start_all))s; KUBECONFIG=$ADMIN_KUBECONFIG; stop with hack/cluster-down.sh"
echo "$ADMIN_KUBECONFIG"
