"""Reading a config: TOML (+ ``--set`` overrides) into the typed schema, checked field by
field (unknown keys, types, choices, bounds), and the resume policy (what a resumed run may
change)."""

from __future__ import annotations

import dataclasses
import math
import tomllib
import typing
from pathlib import Path
from typing import Any

import tomli_w

from fedsynth.config.schema import NATIVE_SIZE, Config
from fedsynth.core.errors import ConfigError


def _check_value(name: str, f: dataclasses.Field, hint: Any, value: Any) -> Any:
    value = _coerce(name, hint, value)
    choices = f.metadata.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{name} = {value!r} is not valid; choose one of: {', '.join(choices)}")
    low = f.metadata.get("min")
    if low is not None:
        bad = value <= low if f.metadata.get("exclusive") else value < low
        if bad or (isinstance(value, float) and not math.isfinite(value)):
            op = ">" if f.metadata.get("exclusive") else ">="
            raise ConfigError(f"{name} = {value!r} is not valid; it must be {op} {low}")
    return value


def _coerce(name: str, hint: Any, value: Any) -> Any:
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
    }
    check = ok.get(hint)
    if check is None:
        raise ConfigError(f"{name}: unsupported field type {hint!r}")
    if not check(value):
        raise ConfigError(f"{name} = {value!r} is not valid; expected {hint.__name__}")
    return float(value) if hint is float else value


def _build(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        where = f"[{prefix}]" if prefix else "top level"
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"unknown config key {key!r} in {where}; valid keys: {', '.join(fields)}")
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        name = f"{prefix}.{key}" if prefix else key
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"{name} must be a table [{name}], got {value!r}")
            kwargs[key] = _build(hint, value, name)
        else:
            kwargs[key] = _check_value(name, fields[key], hint, value)
    return cls(**kwargs)


# Strategy settings that once sat directly in [strategy]: old key -> where each lives now.
# Configs and run directories written with the old keys keep loading.
MOVED: dict[str, tuple[str, ...]] = {
    "server_lr": ("fedavgm.server_learning_rate", "scaffold.server_lr"),
    "momentum": ("fedavgm.server_momentum",),
    "eta": ("fedopt.eta",),
    "eta_l": ("fedopt.eta_l",),
    "beta_1": ("fedopt.beta_1",),
    "beta_2": ("fedopt.beta_2",),
    "tau": ("fedopt.tau",),
    "proximal_mu": ("fedprox.proximal_mu",),
    "trim_beta": ("fedtrimmedavg.beta",),
    "num_malicious": ("krum.num_malicious_nodes",),
    "num_keep": ("krum.num_nodes_to_select",),
    "fedexp_eps": ("fedexp.eps",),
}


def _moved_strategy_keys(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` with ``[strategy]``'s old flat keys moved into their sections; one key set both
    ways with different values is a one-line error."""
    strategy = raw.get("strategy")
    if not isinstance(strategy, dict) or not set(strategy) & set(MOVED):
        return raw
    strategy = _deep_copy(strategy)
    for old in set(strategy) & set(MOVED):
        value = strategy.pop(old)
        for new in MOVED[old]:
            section, key = new.split(".")
            table = strategy.setdefault(section, {})
            if not isinstance(table, dict):
                raise ConfigError(f"strategy.{section} must be a table [strategy.{section}], got {table!r}")
            if table.setdefault(key, value) != value:
                raise ConfigError(f"strategy.{old} and strategy.{new} disagree; keep strategy.{new} only")
    return {**raw, "strategy": strategy}


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``section.key=value``; the value is read as TOML, else as a plain string."""
    if "=" not in text:
        raise ConfigError(f"--set expects section.key=value, got {text!r}")
    path, value_text = text.split("=", 1)
    keys = [k.strip() for k in path.strip().split(".")]
    if not all(keys):
        raise ConfigError(f"--set expects section.key=value, got {text!r}")
    try:
        value = tomllib.loads(f"v = {value_text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = value_text.strip()
    return keys, value


def _override_paths(keys: list[str]) -> list[list[str]]:
    """Where an override lands: an old strategy key names its new places."""
    if len(keys) == 2 and keys[0] == "strategy" and keys[1] in MOVED:
        return [["strategy", *new.split(".")] for new in MOVED[keys[1]]]
    return [keys]


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    merged = _deep_copy(raw)
    for text in overrides:
        keys, value = parse_override(text)
        for path in _override_paths(keys):
            node = merged
            for key in path[:-1]:
                node = node.setdefault(key, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"--set {text!r}: {key!r} is not a section")
            node[path[-1]] = value
    return merged


def _deep_copy(raw: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in raw.items()}


def config_from_dict(raw: dict[str, Any]) -> Config:
    data = raw.get("data", {})
    if isinstance(data, dict) and "image_size" not in data and data.get("dataset") in NATIVE_SIZE:
        raw = {**raw, "data": {**data, "image_size": NATIVE_SIZE[data["dataset"]]}}
    return _build(Config, _moved_strategy_keys(raw), "")


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a TOML file (or nothing: all defaults), apply overrides, validate once."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = tomllib.loads(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    return config_from_dict(apply_overrides(_moved_strategy_keys(raw), overrides or []))


# Keys a resumed run may change: how long it runs and how it is run, sampled and judged —
# never what defines the training so far (data, model, optimiser, strategy, seed, …).
RESUMABLE = (
    "federation.rounds",
    "federation.checkpoint_every",
    "federation.round_timeout",
    "federation.min_clients",
    "federation.max_retries",
    "federation.client_cpus",
    "federation.client_gpus",
    "federation.engine",
    "train.device",
    "train.threads",
    "ledger.rpc_url",
    "ledger.join_timeout",
    "ledger.update_timeout",
    "ledger.aggregation_timeout",
    "ledger.trainer_workers",
    "sample.",
    "eval.",
    "track",
    "mlflow.",
)


def flat_items(cfg: Config) -> dict[str, Any]:
    """``section.key`` (``section.sub.key`` in nested sections) → value for every setting."""
    return _flat(config_to_dict(cfg), "")


def _flat(table: dict[str, Any], prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_resume_changes(saved: Config, wanted: Config) -> list[str]:
    """The keys ``wanted`` changes; a one-line error when one of them may not change on resume."""
    old, new = flat_items(saved), flat_items(wanted)
    changed = [k for k in new if new[k] != old.get(k)]
    for key in changed:
        if not any(key == r or (r.endswith(".") and key.startswith(r)) for r in RESUMABLE):
            raise ConfigError(
                f"--resume cannot change {key} (the run was trained with {old.get(key)!r}); "
                "start a new run with --out for that"
            )
    return changed


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_toml(cfg: Config) -> str:
    """The resolved config as TOML text (``config.toml``; written by ``RunDir.write_config``)."""
    return tomli_w.dumps(config_to_dict(cfg))
