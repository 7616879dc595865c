"""`CheckpointError`: a Hugging Face checkpoint that cannot be converted."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint directory, tensor or config field that `jmoe.convert` cannot use.

    The message names the file, tensor or config field, what was found and what is supported.
    """
