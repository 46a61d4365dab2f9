"""Exceptions with messages a user can act on."""
from __future__ import annotations

from pathlib import Path


class CheckpointError(ValueError):
    """A model folder or file that cannot be loaded: names the file and the problem."""

    def __init__(self, path: Path | str, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class HubUnavailableError(ValueError):
    """The name given looks like a Hugging Face hub id; the hub cannot be reached from here."""


class Overloaded(RuntimeError):
    """The engine's queue of waiting requests is full: the request was refused, nothing else was
    affected. Retry later (the server answers HTTP 429)."""
