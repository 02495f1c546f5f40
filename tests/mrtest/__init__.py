"""Shared test helpers: processes, peers and waiting, used by every test area."""
