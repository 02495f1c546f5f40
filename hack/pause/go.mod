module mailrelay.local/hack/pause

go 1.22
