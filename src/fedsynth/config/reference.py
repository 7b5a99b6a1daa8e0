"""The configuration reference page, generated from the config dataclasses (their defaults,
choices and bounds) and :data:`fedsynth.config.help.HELP`.

    python -m fedsynth.config.reference docs/configuration.md
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

from fedsynth.config.help import HELP
from fedsynth.config.schema import Config

INTRO = """\
# Configuration reference

A run is configured by one TOML file (`configs/*.toml` are examples) plus `--set section.key=value`
overrides, parsed once into frozen dataclasses (`src/fedsynth/config/`): an unknown key, a value
out of range or an unsupported combination is a one-line error before anything runs. `--resume`
may change only how a run goes on (rounds, timeouts, devices, sampling, evaluation, tracking).
Strategy settings written directly under `[strategy]` by earlier versions (`strategy.eta`,
`strategy.server_lr`, …) are still read into their sections below.

This page is generated from the code (`python -m fedsynth.config.reference docs/configuration.md`);
a test fails when the two disagree.
"""


def _literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_literal(v) for v in value) + "]"
    return repr(value)


def _valid(f: dataclasses.Field) -> str:
    if "choices" in f.metadata:
        return " \\| ".join(f"`{c}`" for c in f.metadata["choices"])
    if "min" in f.metadata:
        return f"{'>' if f.metadata['exclusive'] else '≥'} {f.metadata['min']}"
    return ""


def _default(f: dataclasses.Field) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def _rows(section: type, prefix: str) -> list[str]:
    rows = []
    for f in dataclasses.fields(section):
        if dataclasses.is_dataclass(_default(f)):
            continue
        key = f"{prefix}{f.name}"
        if key not in HELP:
            raise KeyError(f"{key} has no help text in fedsynth.config.help.HELP")
        default = f"`{_literal(_default(f))}`"
        rows.append(f"| `{key}` | {default} | {_valid(f)} | {HELP[key]} |")
    return rows


HEAD = "| key | default | valid | meaning |\n| --- | --- | --- | --- |"


def _sections(section: type, prefix: str, level: int) -> list[str]:
    """A table per section below ``section``, each followed by its own subsections."""
    parts: list[str] = []
    for f in dataclasses.fields(section):
        sub = _default(f)
        if dataclasses.is_dataclass(sub):
            name = f"{prefix}{f.name}"
            parts += [f"{'#' * level} `[{name}]`\n", HEAD, *_rows(type(sub), f"{name}."), ""]
            parts += _sections(type(sub), f"{name}.", level + 1)
    return parts


def render() -> str:
    """The page's markdown."""
    return "\n".join([INTRO, "## Top level\n", HEAD, *_rows(Config, ""), "", *_sections(Config, "", 2)])


def unused_help() -> list[str]:
    """Help texts naming no setting (a renamed or removed key)."""
    from fedsynth.config.parsing import flat_items

    return sorted(set(HELP) - set(flat_items(Config())))


if __name__ == "__main__":
    Path(sys.argv[1]).write_text(render())
