"""Progress reporting shared by the core's long-running entry points (torch-free)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Progress:
    """One progress report.

    ``fraction`` is the share of the whole job done (0 to 1); ``eta_seconds`` is None until
    there is enough history to estimate it. A callback may raise to stop the job: the core
    lets the exception propagate after the last checkpoint was written.
    """

    phase: str
    fraction: float
    message: str = ""
    epoch: int | None = None
    epochs: int | None = None
    step: int | None = None
    steps: int | None = None
    loss: float | None = None
    accuracy: float | None = None
    eta_seconds: float | None = None


ProgressCallback = Callable[[Progress], None]


def ignore_progress(_: Progress) -> None:
    """The default callback: reports go nowhere."""
