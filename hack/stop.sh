# Sourced by hack/cluster-down.sh and hack/docker-down.sh: stopping one of our
# own daemons. The caller defines log.
# shellcheck shell=bash

# stop_pid NAME PID SECONDS CHECK...: if `CHECK... PID` holds (PID is alive and
# ours), SIGTERM, and SIGKILL if it still holds after SECONDS. 1: not ours.
stop_pid() {
  local name=$1 pid=$2 seconds=$3 i
  shift 3
  "$@" "$pid" || return 1
  kill -TERM "$pid" 2>/dev/null
  for ((i = 0; i < seconds * 10; i++)); do
    "$@" "$pid" || return 0
    sleep 0.1
  done
  log "$name (pid $pid) ignored SIGTERM for ${seconds}s; SIGKILL"
  kill -KILL "$pid" 2>/dev/null
  sleep 0.5
  return 0
}
