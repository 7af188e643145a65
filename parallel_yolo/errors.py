"""The errors a user's mistake raises. A leaf: every module may import it, it imports nothing of the package."""

from __future__ import annotations

__all__ = ["ConfigError", "Unanimous"]


class ConfigError(ValueError):
    """A user mistake in the command or the recipe: reported as one line, exit code 2."""


class Unanimous(ConfigError):
    """A mistake every rank finds alike (the same inputs, or rank 0's finding broadcast): only rank 0 reports it."""
