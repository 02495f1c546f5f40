"""mailrelay: the SMTP relay that runs in every relay pod."""
