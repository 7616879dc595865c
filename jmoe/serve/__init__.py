"""Serving: a continuous-batching generation engine and its OpenAI-compatible HTTP app."""

from jmoe.serve.engine import Engine
from jmoe.serve.outputs import ClosedError, Completion, QueueFullError, TokenLogprob, Update
from jmoe.serve.runs import Run, load_run
from jmoe.serve.sampling import InvalidRequestError, SamplingParams

__all__ = [
    "ClosedError",
    "Completion",
    "Engine",
    "InvalidRequestError",
    "QueueFullError",
    "Run",
    "SamplingParams",
    "TokenLogprob",
    "Update",
    "load_run",
]
