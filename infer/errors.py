"""Error types raised where bad input enters the program.

Each message follows one shape, ``<what>, <where>, <how to fix>``, so the CLI can print it
as a single line. The exit code travels with the class, so a caller never has to map
exception types to codes by hand (DESIGN.md exit-code table).
"""

from __future__ import annotations


class LoracraftError(Exception):
    """Base class: a problem the user can fix. Exit code 1 (data/runtime)."""

    exit_code = 1

    def __init__(self, message: str, problems: list[str] | None = None):
        self.problems = list(problems) if problems else [message]
        super().__init__(message)


class UsageError(LoracraftError):
    """Bad command line or configuration. Exit code 2."""

    exit_code = 2


class ConfigError(UsageError):
    """A config file or override is invalid (one entry per problem in ``problems``)."""


class ModelError(LoracraftError):
    """A base model path/id that cannot be loaded as a diffusers model."""

    exit_code = 2


class AdapterError(LoracraftError):
    """An adapter file that is missing, corrupt, pickled, or does not fit the base."""

    exit_code = 2


class DataError(LoracraftError):
    """A dataset that cannot be trained on (missing, empty, unreadable)."""

    exit_code = 1
