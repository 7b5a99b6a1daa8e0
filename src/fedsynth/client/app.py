"""The Flower ClientApp: a thin adapter around :func:`fedsynth.client.local.local_train`.

Every training message carries the run's resolved config (TOML) in its ConfigRecord,
so simulated and deployed clients need no config of their own. A client's data is
its partition of the built-in/partitioned dataset (``partition-id`` in the node config,
set by the simulation engine or ``flower-supernode --node-config``), or, on a real
SuperNode, its own folder / ``.npz`` given by ``data-path`` in the node config.
"""

from __future__ import annotations

import functools
import tomllib
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedsynth.client.local import local_train
from fedsynth.config import Config, DataConfig, config_from_dict
from fedsynth.data.datasets import ImageData, load_images
from fedsynth.errors import DataError
from fedsynth.strategies.scaffold import CONTROL_KEY

CONFIG_KEY = "fedsynth-config"
CLASSES_KEY = "class-names"
STATE_KEY = "fedsynth-state"


@functools.lru_cache(maxsize=4)
def parse_config(text: str) -> Config:
    return config_from_dict(tomllib.loads(text))


@functools.lru_cache(maxsize=8)
def _partition_data(config_text: str, partition_id: int) -> ImageData:
    from fedsynth.prepare import prepare

    cfg = parse_config(config_text)
    return prepare(cfg).client_data(partition_id)


@functools.lru_cache(maxsize=8)
def _local_data(config_text: str, path: str, class_names: tuple[str, ...]) -> ImageData:
    cfg = parse_config(config_text)
    kind = "npz" if path.endswith(".npz") else "imagefolder"
    local = load_images(
        DataConfig(dataset=kind, path=path, image_size=cfg.data.image_size, channels=cfg.data.channels)
    )
    unknown = sorted(set(local.class_names) - set(class_names))
    if unknown:
        raise DataError(f"{path}: classes {unknown} are not among the federation's {list(class_names)}")
    remap = torch.tensor([class_names.index(n) for n in local.class_names])
    return ImageData(local.images, remap[local.labels], class_names)


def client_data(config_text: str, node_config: dict, class_names: tuple[str, ...]) -> tuple[int, ImageData]:
    """(client id, this client's training data)."""
    partition_id = int(node_config.get("partition-id", 0))
    path = node_config.get("data-path")
    if path:
        return partition_id, _local_data(config_text, str(Path(str(path)).expanduser()), class_names)
    return partition_id, _partition_data(config_text, partition_id)


def _set_threads(cfg: Config) -> None:
    threads = max(1, int(cfg.federation.client_cpus))
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def _load_state(context: Context) -> dict[str, dict[str, torch.Tensor]]:
    record = context.state.get(STATE_KEY)
    if record is None:
        return {}
    return {"scaffold_c_i": record.to_torch_state_dict()}


def _save_state(context: Context, state: dict) -> None:
    if "scaffold_c_i" in state:
        context.state[STATE_KEY] = ArrayRecord(state["scaffold_c_i"])


def handle_train(msg: Message, context: Context) -> Message:
    config = msg.content["config"]
    text = str(config[CONFIG_KEY])
    cfg = parse_config(text)
    _set_threads(cfg)
    client_id, data = client_data(text, dict(context.node_config), tuple(config[CLASSES_KEY]))
    control = msg.content[CONTROL_KEY].to_torch_state_dict() if CONTROL_KEY in msg.content else None
    state = _load_state(context)
    update = local_train(
        cfg,
        data,
        msg.content["arrays"].to_torch_state_dict(),
        round_=int(config["server-round"]),
        client_id=client_id,
        state=state,
        control=control,
    )
    _save_state(context, state)
    content = RecordDict(
        {
            "arrays": ArrayRecord(update.weights),
            "metrics": MetricRecord(
                {
                    "num-examples": update.num_examples,
                    "num-steps": update.num_steps,
                    "train-loss": update.train_loss,
                    "compute-s": update.compute_s,
                    "partition-id": client_id,
                }
            ),
        }
    )
    if update.control_delta is not None:
        content[CONTROL_KEY] = ArrayRecord(update.control_delta)
    return Message(content=content, reply_to=msg)


def handle_query(msg: Message, context: Context) -> Message:
    """Who am I: partition id, sample count and class histogram (no images leave)."""
    config = msg.content["config"]
    text = str(config[CONFIG_KEY])
    names = tuple(config[CLASSES_KEY])
    client_id, data = client_data(text, dict(context.node_config), names)
    hist = np.bincount(data.labels.numpy(), minlength=len(names)).tolist()
    reply = ConfigRecord({"partition-id": client_id, "num-examples": len(data), "histogram": hist})
    return Message(content=RecordDict({"info": reply}), reply_to=msg)


app = ClientApp()
app.train()(handle_train)
app.query()(handle_query)
