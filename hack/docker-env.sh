# Shared by hack/docker-up.sh and hack/docker-down.sh: where the Docker engine
# they start keeps its pid, log and state (the tests put it elsewhere).
# shellcheck shell=bash
# shellcheck disable=SC2034 # used by the scripts that source this file
DOCKER_RUN_DIR=${MAILRELAY_DOCKER_RUN_DIR:-/run/mailrelay}
DOCKERD_PIDFILE=$DOCKER_RUN_DIR/dockerd.pid
DOCKERD_LOG=$DOCKER_RUN_DIR/dockerd.log
# Named on dockerd's command line: what tells our engine from any other.
DOCKER_EXEC_ROOT=$DOCKER_RUN_DIR/docker
DOCKER_SOCK=/var/run/docker.sock
