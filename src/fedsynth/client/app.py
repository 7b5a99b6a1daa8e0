"""The Flower ClientApp: a thin adapter around :func:`fedsynth.client.local.local_train`.

Every training message carries the run's resolved config (TOML) in its ConfigRecord,
so simulated and deployed clients need no config of their own. A client's data is
its partition of the built-in/partitioned dataset (``partition-id`` in the node config,
set by the simulation engine or ``flower-supernode --node-config``), or, on a real
SuperNode, its own folder / ``.npz`` given by ``data-path`` in the node config.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedsynth.client.local import local_train
from fedsynth.client.selfcheck import self_check
from fedsynth.config import Config, DataConfig
from fedsynth.core.errors import DataError
from fedsynth.core.protocol import (
    ARRAYS,
    BASE_KEY,
    CLASSES_KEY,
    CONFIG,
    CONFIG_KEY,
    COUNTS_KEY,
    DATA_PATH,
    IMAGES,
    INFO,
    LABELS,
    METRICS,
    MODE_KEY,
    NUM_EXAMPLES,
    PARTITION_ID,
    ROUND_KEY,
    STATE_KEY,
    STEPS_KEY,
    TASK_KEY,
    UPLOAD_KEY,
    UpdateInfo,
    parse_config,
)
from fedsynth.core.records import numpy_record, record_numpy, record_torch
from fedsynth.data.datasets import ImageData, load_images
from fedsynth.diffusion.schedule import build_train_scheduler
from fedsynth.diffusion.unet import build_unet
from fedsynth.exchange.codecs import CodecError
from fedsynth.exchange.groups import GROUPS
from fedsynth.exchange.transfer import WEIGHTS, Layout, check_base, client_reply, client_start
from fedsynth.report.plots import to_uint8
from fedsynth.runtime.processes import quiet_flower
from fedsynth.stages.prepare import prepare
from fedsynth.stages.synthesize import SampleSpec, generate_share
from fedsynth.strategies.scaffold import CONTROL_KEY
from fedsynth.training.tasks import seeded_model

# Flower's simulation workers import this module before they run a client; their actors' normal
# shutdown at the end of a run ("Manually terminating ClientAppActor") is not news to a user.
quiet_flower(level=None)


@functools.lru_cache(maxsize=2)
def _prepared(config_text: str):
    """The federation's data and partitions, prepared once per process: a simulation worker
    serves many partitions (100 clients on 2 workers: 50 each), and preparing is the costly part."""
    return prepare(parse_config(config_text))


@functools.lru_cache(maxsize=8)
def _partition_data(config_text: str, partition_id: int) -> ImageData:
    return _prepared(config_text).client_data(partition_id)


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
    partition_id = int(node_config.get(PARTITION_ID, 0))
    path = node_config.get(DATA_PATH)
    if path:
        return partition_id, _local_data(config_text, str(Path(str(path)).expanduser()), class_names)
    return partition_id, _partition_data(config_text, partition_id)


def set_threads(cfg: Config) -> None:
    """Torch threads of a client's local round: ``federation.client_cpus``."""
    threads = max(1, int(cfg.federation.client_cpus))
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


STATE_PARTS = ("scaffold_c_i", "local", "ref", "residual", "optimizer")


def _load_state(context: Context) -> dict[str, dict[str, torch.Tensor]]:
    """This node's persistent tensors: SCAFFOLD's c_i, personal groups, exchange copies."""
    state = {}
    for part in STATE_PARTS:
        record = context.state.get(f"{STATE_KEY}-{part}")
        if record is not None:
            state[part] = record_torch(record)
    return state


def _save_state(context: Context, state: dict) -> None:
    for part in STATE_PARTS:
        if state.get(part):
            tensors = {k: v.contiguous() for k, v in state[part].items()}
            context.state[f"{STATE_KEY}-{part}"] = ArrayRecord(tensors)


@functools.lru_cache(maxsize=4)
def _layout(config_text: str, image_size: int, channels: int, names: tuple[str, ...]) -> tuple[Layout, dict]:
    """The model's layout and this node's own copy of the weights no one trains (from the seed
    or ``model.init``): built once per process and kept across rounds."""
    cfg = parse_config(config_text)
    weights = seeded_model(cfg, cfg.seed, image_size, channels, len(names), names).state_dict()
    layout = Layout.of(weights, cfg.exchange.personal, cfg.trained_modules)
    return layout, {k: weights[k] for k in layout.frozen}


def update_info(update, client_id: int, **extra) -> UpdateInfo:
    """What a client reports with its weights (both transports)."""
    return UpdateInfo(
        client=client_id,
        num_examples=update.num_examples,
        num_steps=update.num_steps,
        train_loss=update.train_loss,
        compute_s=update.compute_s,
        **extra,
    )


def handle_pretrain(msg: Message, cfg: Config, client_id: int, data: ImageData) -> Message:
    """A local model trained from the received weights for ``STEPS_KEY`` steps, uploaded once
    (FedDDPM's one-off models, paradigm ``local``); the client's exchange state is untouched."""
    layout, base = _layout(
        str(msg.content[CONFIG][CONFIG_KEY]), data.shape[1], data.shape[0], data.class_names
    )
    check_base(str(msg.content[CONFIG].get(BASE_KEY, "")), layout)
    weights = {**base, **msg.content[ARRAYS].to_torch_state_dict()}  # the frozen part is our own
    steps = int(msg.content[CONFIG].get(STEPS_KEY, cfg.calibration.pretrain_steps))
    ema = cfg.local.ema_decay
    update = local_train(
        cfg, data, weights, round_=0, client_id=client_id, state={}, steps=steps, ema_decay=ema
    )
    counts = msg.content[CONFIG].get(COUNTS_KEY)
    if counts is None:
        arrays = ArrayRecord({k: update.weights[k] for k in layout.sent})
    else:  # paradigm local, local.upload = "samples": the model never leaves
        arrays = numpy_record(own_share(cfg, data, update.weights, [int(c) for c in counts], client_id))
    content = RecordDict({ARRAYS: arrays, METRICS: update_info(update, client_id).to_record()})
    return Message(content=content, reply_to=msg)


@torch.no_grad()
def own_share(cfg: Config, data: ImageData, weights, counts: list[int], client_id: int) -> dict:
    """This client's share of a mixture, generated here: uint8 images and their labels."""
    unet = build_unet(cfg.model, data.shape[1], data.shape[0], data.num_classes, cfg.lora, data.class_names)
    unet.load_state_dict(weights)
    scheduler = build_train_scheduler(cfg.diffusion)
    images, labels = generate_share(unet, scheduler, counts, SampleSpec.of(cfg), client_id)
    return {IMAGES: to_uint8(images), LABELS: labels.numpy()}


def handle_train(msg: Message, context: Context) -> Message:
    config = msg.content[CONFIG]
    text = str(config[CONFIG_KEY])
    cfg = parse_config(text)
    set_threads(cfg)
    client_id, data = client_data(text, dict(context.node_config), tuple(config[CLASSES_KEY]))
    if str(config.get(TASK_KEY, "train")) == "pretrain":
        return handle_pretrain(msg, cfg, client_id, data)
    layout, base = _layout(text, data.shape[1], data.shape[0], tuple(data.class_names))
    check_base(str(config.get(BASE_KEY, "")), layout)
    upload = tuple(str(g) for g in config.get(UPLOAD_KEY, GROUPS))
    state = _load_state(context)
    mode = str(config.get(MODE_KEY, WEIGHTS))
    start = client_start(cfg.exchange, layout, record_numpy(msg.content[ARRAYS]), mode, state, base)
    control = None
    if CONTROL_KEY in msg.content:
        sent = set(layout.keys(upload))
        control = {k: v for k, v in record_torch(msg.content[CONTROL_KEY]).items() if k in sent}
    round_ = int(config[ROUND_KEY])
    update = local_train(cfg, data, start, round_=round_, client_id=client_id, state=state, control=control)
    arrays = client_reply(cfg.exchange, layout, start, update.weights, upload, state)
    _save_state(context, state)
    check = {}
    if cfg.phoenix.filter_from and round_ >= cfg.phoenix.filter_from:
        unet = build_unet(
            cfg.model, data.shape[1], data.shape[0], data.num_classes, cfg.lora, data.class_names
        )
        unet.load_state_dict(update.weights)
        precision, recall = self_check(cfg, unet, data, round_, client_id)
        check = {"filter_precision": precision, "filter_recall": recall}
    metrics = update_info(update, client_id, **check).to_record()
    content = RecordDict({ARRAYS: numpy_record(arrays), METRICS: metrics})
    if update.control_delta is not None:
        content[CONTROL_KEY] = ArrayRecord(update.control_delta)
    return Message(content=content, reply_to=msg)


def handle_export(msg: Message, context: Context) -> Message:
    """The groups this client never uploads (plans udec / ulatdec): its personal part,
    which with the global groups makes its own model. Used to evaluate personal models."""
    state = _load_state(context)
    if not state.get("local"):
        raise CodecError("this client holds no personal weights (never trained in this run)")
    return Message(content=RecordDict({ARRAYS: ArrayRecord(state["local"])}), reply_to=msg)


def handle_query(msg: Message, context: Context) -> Message:
    """Who am I: partition id, sample count and class histogram (no images leave)."""
    config = msg.content[CONFIG]
    text = str(config[CONFIG_KEY])
    names = tuple(config[CLASSES_KEY])
    client_id, data = client_data(text, dict(context.node_config), names)
    hist = np.bincount(data.labels.numpy(), minlength=len(names)).tolist()
    reply = ConfigRecord({PARTITION_ID: client_id, NUM_EXAMPLES: len(data), "histogram": hist})
    return Message(content=RecordDict({INFO: reply}), reply_to=msg)


app = ClientApp()
app.train()(handle_train)
app.query()(handle_query)
app.evaluate()(handle_export)
