"""A module that raises while it is imported (``ucxrpc serve`` shows these frames only)."""

from __future__ import annotations


def load_settings() -> dict[str, str]:
    """Fail like a user's configuration loader."""
    raise RuntimeError("settings file missing: /nonexistent/app.toml")


SETTINGS = load_settings()
