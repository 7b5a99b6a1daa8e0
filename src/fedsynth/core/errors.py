"""Errors raised by fedsynth. Each carries a one-line message meant for the user."""


class FedsynthError(Exception):
    """Base class: the CLI prints these as one line and exits non-zero."""


class ConfigError(FedsynthError, ValueError):
    """An unknown key, a bad value, or an inconsistent combination in the config."""


class DataError(FedsynthError):
    """A dataset that cannot be read: missing path, empty class, bad file."""


class RunDirError(FedsynthError):
    """A run directory that is missing a stage's inputs or cannot be resumed."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none)."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__
