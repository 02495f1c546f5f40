// The node's sandbox ("pause") image: the process that holds a pod's namespaces.
// It waits for SIGTERM or SIGINT and exits 0. Built as a static binary by
// hack/cluster-up.sh and imported into containerd as the CRI sandbox_image,
// because no registry is reachable to pull registry.k8s.io/pause.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	// Reap children, as PID 1 of the pod must when namespaces are shared.
	signal.Ignore(syscall.SIGCHLD)
	<-sig
	os.Exit(0)
}
