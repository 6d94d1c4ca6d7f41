"""Error types raised where bad input enters the program.

Each message follows one shape, ``<what>, <where>, <how to fix>``, so the CLI can print it
as a single line. The exit code travels with the class, so a caller never has to map
exception types to codes by hand (the exit-code table in the README).
"""

from __future__ import annotations


class LoracraftError(Exception):
    """Base class: a problem the user can fix. Exit code 1 (data/runtime)."""

    exit_code = 1

    def __init__(self, message: str, problems: list[str] | None = None, *, exit_code: int | None = None):
        self.problems = list(problems) if problems else [message]
        if exit_code is not None:  # a refusal the user lifts with a flag is usage (2), whatever the input
            self.exit_code = exit_code
        super().__init__(message)


class UsageError(LoracraftError):
    """Bad command line or configuration. Exit code 2."""

    exit_code = 2


class ConfigError(UsageError):
    """A config file or override is invalid (one entry per problem in ``problems``)."""


class NotFoundError(UsageError):
    """A path the user named does not exist: a usage error (exit 2), whatever it was meant to be.

    Every kind of input raises its ``...NotFound`` below for a missing path, so the code does
    not depend on which input named it.
    """


class ModelError(LoracraftError):
    """A base model that cannot be loaded as a Stable Diffusion model. Exit code 2."""

    exit_code = 2


class AdapterError(LoracraftError):
    """An adapter file that is corrupt, pickled, or does not fit the base. Exit code 2."""

    exit_code = 2


class DataError(LoracraftError):
    """A dataset that cannot be trained on (empty, unreadable). Exit code 1."""


class ModelNotFound(NotFoundError, ModelError):
    """``model.base`` / ``--base``: no such folder or file (and not a hub id)."""


class AdapterNotFound(NotFoundError, AdapterError):
    """``--lora`` and friends: no such file or folder."""


class DataNotFound(NotFoundError, DataError):
    """``data.path`` / ``check-data DIR``: no such folder (and not a hub dataset id)."""
