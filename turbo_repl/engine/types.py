"""Values that cross the engine boundary."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


class Cancelled(Exception):
    """A generation was cancelled between steps; the engine is unharmed."""


class Progress(Protocol):
    def __call__(self, stage: str, done: int, total: int) -> None: ...


@dataclass(frozen=True)
class Request:
    prompt: str
    settings: Any        # turbo_repl.settings.Settings
    seed: int            # the concrete seed (never "random")


@dataclass
class Video:
    """Decoded frames of every sample, plus what is needed to record the run."""

    frames: Any                       # torch.uint8 [N, F, H, W, 3], one clip per sample
    seed: int
    fps: int
    timings: dict[str, float] = field(default_factory=dict)   # stage -> seconds
    info: dict[str, Any] = field(default_factory=dict)         # model, checkpoints, backends, size, ...
