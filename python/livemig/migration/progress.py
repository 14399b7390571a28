"""Where an orchestrator reports progress (the CLI's display implements it)."""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    """Progress of one migration; called from the orchestrating thread."""

    def phase(self, name: str) -> None:
        """A new phase: connect, precopy, switchover, postcopy, paused (recovery), complete, verify."""

    def update(self, *, round: int, remaining_pages: int, total_pages: int, bandwidth_bps: float) -> None:
        """Progress within a phase."""


class NoProgress:
    """A Progress that shows nothing."""

    def phase(self, name: str) -> None:
        pass

    def update(self, *, round: int, remaining_pages: int, total_pages: int, bandwidth_bps: float) -> None:
        pass


__all__ = ["NoProgress", "Progress"]
