"""Errors raised by fedsynth. Each carries a one-line message meant for the user."""


class FedsynthError(Exception):
    """Base class: the CLI prints these as one line and exits non-zero."""


class ConfigError(FedsynthError, ValueError):
    """An unknown key, a bad value, or an inconsistent combination in the config."""


class DataError(FedsynthError):
    """A dataset that cannot be read: missing path, empty class, bad file."""


class RunDirError(FedsynthError):
    """A run directory that is missing a stage's inputs or cannot be resumed."""


def one_line(text: str, default: str) -> str:
    """The first non-blank line of ``text``, or ``default`` when it has none."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else default


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none)."""
    return one_line(str(err), type(err).__name__)
