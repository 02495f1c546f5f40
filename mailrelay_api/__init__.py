"""The user-facing resources: their schema, offline validation, and the renderer."""
