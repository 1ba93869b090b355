"""Errors that end a command with a one-line message instead of a traceback."""

from __future__ import annotations


class GuestagentError(Exception):
    """A failure the user can act on; str(err) is the whole message."""


class ConfigError(GuestagentError):
    """The configuration file is unreadable or invalid."""
