# Shared by hack/cluster-up.sh, hack/cluster-down.sh and hack/cluster-load.sh:
# where the single-node cluster keeps its state and which addresses it uses.
# shellcheck shell=bash
# shellcheck disable=SC2034 # used by the scripts that source this file
NODE_NAME=mailrelay-node
NODE_DIR=/var/lib/mailrelay-node
RUN_DIR=/run/mailrelay-node
LOG_DIR=$NODE_DIR/logs
PKI=$NODE_DIR/pki
LOCK_FILE=/run/mailrelay-node.lock
ADMIN_KUBECONFIG=$NODE_DIR/kubeconfig
CONTAINERD_SOCK=$RUN_DIR/containerd/containerd.sock
CNI_BIN_DIR=/usr/lib/cni
CNI_CONF_DIR=$NODE_DIR/cni
# Private ranges that nothing else on these machines uses.
BRIDGE=mrbr0
POD_CIDR=10.213.0.0/24
POD_RANGE_START=10.213.0.10
NODE_IP=10.213.0.1
SERVICE_CIDR=10.214.0.0/24
API_SERVICE_IP=10.214.0.1
DNS_SERVICE_IP=10.214.0.10
FWD_CHAIN=MAILRELAY-NODE-FWD
API_PORT=6443
ETCD_PORT=12379
ETCD_PEER_PORT=12380
KUBELET_PORT=10250
KUBELET_HEALTHZ_PORT=10248
CONTROLLER_MANAGER_PORT=10257
SCHEDULER_PORT=10259
KUBE_PROXY_HEALTHZ_PORT=10256
KUBE_PROXY_METRICS_PORT=10249
PAUSE_IMAGE=registry.k8s.io/pause:3.10
COREDNS_IMAGE=mailrelay.local/coredns:node
