"""The one error type a bad configuration raises: its message starts with the dotted field name."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration that cannot work, found at start-up (before any compute is spent)."""
