"""Errors a user can fix: a config, a data source, a run directory. Their messages name the
problem and the fix, so `train.py` prints them alone (no traceback) and exits with status 2."""

from __future__ import annotations


class UserError(ValueError):
    """A run cannot start or go on because of its input; the message says what to change."""


class MissingInputError(UserError, FileNotFoundError):
    """A file or directory the run was told to read does not exist."""
