"""The mailrelay Kopf operator (imported as mailrelay_operator; lives in operator/)."""
