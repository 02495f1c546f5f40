"""Fixtures of the operator's builder tests."""
