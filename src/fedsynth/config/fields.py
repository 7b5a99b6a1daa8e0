"""Field makers of the config dataclasses: a default plus what the parser checks (``choices``,
a lower bound ``min``)."""

from __future__ import annotations

from dataclasses import field
from typing import Any


def choice(default: str, choices: tuple[str, ...]) -> Any:
    return field(default=default, metadata={"choices": choices})


def at_least(default: float | int, low: float | int, *, exclusive: bool = False) -> Any:
    return field(default=default, metadata={"min": low, "exclusive": exclusive})
