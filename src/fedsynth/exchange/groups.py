"""The UNet's parameters in three groups, by top-level module (FedDiffuse's split).

down: ``conv_in``, ``time_embedding``, ``class_embedding``, ``down_blocks``
mid:  ``mid_block``
up:   ``up_blocks``, ``conv_norm_out``, ``conv_out``

The class embedding goes with the time embedding in *down*: it is added to the time
embedding at the input, and the sum conditions every block. Under UDEC / ULATDEC it
therefore stays with the client, like the rest of the input side.
"""

from __future__ import annotations

from collections.abc import Iterable

from fedsynth.config import keys_under, module_list, trained_keys
from fedsynth.core.errors import ConfigError

GROUPS = ("down", "mid", "up")
MODULE_GROUP = {
    "conv_in": "down",
    "time_embedding": "down",
    "class_embedding": "down",
    "down_blocks": "down",
    "mid_block": "mid",
    "up_blocks": "up",
    "conv_norm_out": "up",
    "conv_out": "up",
    # task classifier's CNN (exchanged whole: plan "full" only)
    "features": "down",
    "head": "up",
}


def group_of(key: str) -> str:
    module = key.split(".", 1)[0]
    if module not in MODULE_GROUP:
        raise ConfigError(f"parameter {key!r} belongs to no exchange group (module {module!r} is unknown)")
    return MODULE_GROUP[module]


def group_keys(keys: Iterable[str], groups: Iterable[str]) -> list[str]:
    """The keys of ``keys`` in ``groups``, in the given key order; an empty selection is an error."""
    wanted = set(groups)
    unknown = wanted - set(GROUPS)
    if unknown:
        raise ConfigError(f"unknown exchange group(s) {sorted(unknown)}; groups are {', '.join(GROUPS)}")
    keys = list(keys)
    selected = [k for k in keys if group_of(k) in wanted]
    if not selected:
        raise ConfigError(f"exchange groups {sorted(wanted)} match no parameter of the model")
    return selected


LAST_BLOCK = "last-block"


def personal_keys(spec: str, keys: Iterable[str]) -> frozenset[str]:
    """Keys that never leave a client (Phoenix's personalization layers).

    ``spec``: "" (none), "last-block" (the last decoder block and the output layers
    after it: ``up_blocks.<last>``, ``conv_norm_out``, ``conv_out``) or comma-separated
    module names such as ``"up_blocks.2,conv_out"``. A name matching no parameter is an error."""
    keys = list(keys)
    names = module_list(spec)
    if names == [LAST_BLOCK]:
        last = max(int(k.split(".")[1]) for k in keys if k.startswith("up_blocks."))
        names = [f"up_blocks.{last}", "conv_norm_out", "conv_out"]
    return frozenset(keys_under(keys, names, "exchange.personal"))


def frozen_keys(trainable: str, keys: Iterable[str]) -> frozenset[str]:
    """Keys that never change (``train.trainable`` set: every key outside its modules keeps the
    weights all nodes start from), so they are sent once, with the full model, and never again."""
    keys = list(keys)
    return frozenset(keys) - frozenset(trained_keys(trainable, keys))
