"""Suite-wide pytest setup. Area fixtures live in each area's own conftest.py."""
