"""What rsnl reports to a person: one line per problem.

ConfigError, DataError and ModelError are the user's to fix (a key, a file, a model name); every
command prints them as `rsnl: error: <line>` and exits 2, before Ray or a model starts where it can.
NonFiniteError is a run that diverged (exit 3 from `python -m rsnl.train`).
"""

from __future__ import annotations


class UserError(ValueError):
    """A problem the user fixes; the message is one line naming the key or file and what is allowed."""

    def __init__(self, message: str):
        # One line always: messages interpolate paths and library errors that may contain newlines.
        super().__init__(" ".join(str(message).split()))


class ConfigError(UserError):
    """A bad configuration value or command-line argument."""


class DataError(UserError):
    """Data that is missing, unreadable or inconsistent."""


class ModelError(UserError):
    """A model or weights problem: what is missing and how to get it."""


USER_ERRORS = (UserError,)


class NonFiniteError(FloatingPointError):
    """The training loss became NaN or inf; the message names the epoch and the batch."""
