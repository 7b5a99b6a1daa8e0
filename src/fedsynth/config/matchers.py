"""Settings that name model parameters (``train.trainable``, ``exchange.personal``,
``feddiff.subset``, ``privacy.clip_groups``): module lists and shell-style patterns matched
against state-dict keys."""

from __future__ import annotations

import math
from collections.abc import Iterable
from fnmatch import fnmatchcase

from fedsynth.core.errors import ConfigError


def under_module(key: str, pattern: str) -> bool:
    """Whether parameter ``key`` is, or lies under, the module a name setting gives
    (``exchange.personal``, ``feddiff.subset``, ``privacy.clip_groups``, ``train.trainable``):
    ``pattern`` or ``pattern.…``, where ``pattern`` may hold shell wildcards (``*.time_emb_proj``)."""
    return fnmatchcase(key, pattern) or fnmatchcase(key, pattern + ".*")


def module_list(text: str) -> list[str]:
    """A comma-separated setting of module names or patterns as a list, blanks dropped."""
    return [part.strip() for part in text.split(",") if part.strip()]


def keys_under(keys: Iterable[str], patterns: list[str], setting: str) -> list[str]:
    """The parameter keys under any of ``patterns`` (``under_module``), in their order; a
    pattern matching none is a ConfigError naming ``setting``."""
    keys = list(keys)
    for pattern in patterns:
        if not any(under_module(k, pattern) for k in keys):
            raise ConfigError(f"{setting}: {pattern!r} matches no parameter of the model")
    return [k for k in keys if any(under_module(k, p) for p in patterns)]


def trained_keys(trainable: str, keys: Iterable[str]) -> list[str]:
    """``train.trainable``: the keys that train, those under its modules (``keys_under``), or
    every key when it names none."""
    keys = list(keys)
    patterns = module_list(trainable)
    return keys_under(keys, patterns, "train.trainable") if patterns else keys


def parse_clip_groups(text: str) -> dict[str, tuple[float, float | None]]:
    """``privacy.clip_groups`` ("class_embedding=0.005:0.2,*.time_emb_proj=0.03") as
    {module pattern: (clipping norm C_G, share s_G of the noise budget or None)}: norms positive, shares
    in (0, 1) summing below 1 (the groups without one, the other parameters' included, split
    what is left evenly; checked against the model in ``privacy.dpsgd.clip_groups``)."""
    groups: dict[str, tuple[float, float | None]] = {}
    for item in module_list(text):
        pattern, _, value = (s.strip() for s in item.partition("="))
        norm_text, _, share_text = value.partition(":")
        norm, share = _float_or_nan(norm_text), _float_or_nan(share_text) if share_text else None
        bad_share = share is not None and not 0 < share < 1
        if not pattern or pattern in groups or not 0 < norm < math.inf or bad_share:
            raise ConfigError(
                f"privacy.clip_groups: {item!r} is not valid; write distinct module=norm or "
                "module=norm:share items (norm > 0, share in (0, 1)), e.g. 'class_embedding=0.005:0.2'"
            )
        groups[pattern] = (norm, share)
    total = sum(share for _, share in groups.values() if share is not None)
    if total >= 1:
        raise ConfigError(f"privacy.clip_groups: the shares sum to {total:g}; leave some to the rest")
    return groups


def _float_or_nan(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan
