"""One-shot rounds: every client trains once from weights the server sends and uploads its
model, or only its share of a per-class mixture of samples (``local.upload``).

Paradigm ``local`` (the mixture of local models, :mod:`fedsynth.paradigms.local_models`) starts the clients
from the seeded initial weights; a federated run with ``federation.finetune_steps`` starts them
from its final global model (:func:`finetune_round`). The synthetic set draws class c from the
clients that hold class c, in proportion to their counts (:func:`mixture_counts`). Both
uploads draw client k's share with the noise stream ``derive(seed, "mixture", k)``, so they
give the same images. Bytes counted: the weights sent down, and one model (or one share of
images) up per client.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedsynth.config import Config
from fedsynth.core.protocol import (
    ARRAYS,
    CLASSES_KEY,
    CONFIG,
    COUNTS_KEY,
    IMAGES,
    LABELS,
    METRICS,
    ROUND_KEY,
    STEPS_KEY,
    TASK_KEY,
    UpdateInfo,
)
from fedsynth.core.records import record_numpy
from fedsynth.core.rundir import RunDir
from fedsynth.diffusion.schedule import build_train_scheduler
from fedsynth.diffusion.training import make_ema, resolve_device, steps_for
from fedsynth.diffusion.unet import seeded_unet
from fedsynth.exchange.transfer import Layout
from fedsynth.privacy.accounting import PrivacyLedger
from fedsynth.server.calibration import auxiliary_counts
from fedsynth.server.hooks import local_models
from fedsynth.server.messages import FederationError, base_config, discover_nodes, payload_bytes
from fedsynth.stages.checkpoint import ema_unet, save_personal_model
from fedsynth.stages.prepare import Prepared
from fedsynth.stages.synthesize import SampleSpec, mixture_labels, write_mixture
from fedsynth.stages.tracking import record_round
from fedsynth.training.round_loop import Dropped, Model, RoundRecord

log = logging.getLogger("fedsynth.server")


def local_steps(cfg: Config, prepared: Prepared) -> int:
    """Each client's budget: ``local.steps``, or the federated run's total client steps
    spread evenly over all clients (equal total compute)."""
    if cfg.local.steps:
        return cfg.local.steps
    per_client = float(np.mean([steps_for(cfg.train, len(c)) for c in prepared.clients]))
    fed = cfg.federation
    return max(1, round(fed.rounds * fed.clients_per_round * per_client / cfg.partition.num_clients))


def mixture_counts(histograms: np.ndarray, per_class: int) -> np.ndarray:
    """(clients × classes) images to draw: class c's ``per_class`` images split over the clients
    in proportion to their counts n_kc — FedDDPM's auxiliary-set split, one class at a time
    (largest remainder, ties to the lower client id); a class no client holds gets none."""
    hist = np.asarray(histograms)
    counts = np.zeros(hist.shape, dtype=int)
    for c in np.flatnonzero(hist.sum(axis=0)):
        counts[:, [c]] = auxiliary_counts(hist[:, [c]], per_class)
    return counts


def initial_model(cfg: Config, prepared: Prepared) -> Model:
    """The seeded initial weights every local model starts from."""
    full = prepared.data.full
    unet = seeded_unet(
        cfg.model, cfg.seed, full.shape[1], full.shape[0], full.num_classes, cfg.lora, full.class_names
    )
    unet = unet.to(resolve_device(cfg.train.device))
    return Model(unet, make_ema(unet, 0.0, cfg.trained_modules), build_train_scheduler(cfg.diffusion))


def finetune_round(
    cfg: Config,
    run: RunDir,
    prepared: Prepared,
    grid: Grid,
    trained: Model,
    ledger: PrivacyLedger | None = None,
) -> None:
    """``federation.finetune_steps``: after the last federated round every client fine-tunes the
    global model (its server-EMA weights, the ones sampled otherwise) on its own data and
    uploads it once (or its share of samples, ``local.upload``); the synthetic set is their
    per-class mixture, as in paradigm ``local``. With DP-SGD the fine-tuning steps are DP-SGD
    steps too: ``ledger`` (the rounds' privacy ledger) stops the run before they would pass
    ``privacy.target_epsilon`` and records them."""
    start = Model(
        ema_unet(trained.net, trained.ema), make_ema(trained.net, 0.0, cfg.trained_modules), trained.scheduler
    )
    one_shot(cfg, run, prepared, grid, start=start, ledger=ledger)


def one_shot(
    cfg: Config,
    run: RunDir,
    prepared: Prepared,
    grid: Grid,
    start: Model | None = None,
    ledger: PrivacyLedger | None = None,
) -> None:
    """One round in which every client trains once from ``start`` (default: the seeded initial
    weights, paradigm ``local``) and uploads its model or its samples."""
    began, round_ = time.perf_counter(), len(run.read_metrics()) + 1
    model = start or initial_model(cfg, prepared)
    unet = model.net
    layout = Layout.of(unet.state_dict(), trainable=cfg.trained_modules)
    base = base_config(cfg, tuple(prepared.data.full.class_names), layout.base_digest)
    fed = cfg.federation
    nodes, histograms = discover_nodes(grid, cfg.partition.num_clients, base, max(60.0, fed.round_timeout))
    if start is None:
        steps = local_steps(cfg, prepared)
        timeout = fed.rounds * fed.round_timeout  # the whole run's time, once
    else:
        steps = fed.finetune_steps
        timeout = -(-steps // max(1, cfg.train.local_steps)) * fed.round_timeout  # as many rounds' time
    if ledger is not None:
        ledger.check_round(round_, sorted(nodes), steps)
    if cfg.local.upload == "model":
        models, infos, down, up = local_models(cfg, model, layout, grid, nodes, base, steps, timeout)
        for pid, weights in models.items():
            client = run.client(pid).create()
            client.write_config(cfg)
            save_personal_model(client, unet, weights, model.scheduler)
    else:
        models, infos, down, up = collect_shares(
            cfg, run, model, layout.sent, grid, nodes, histograms, base, steps, timeout
        )
    dropped = [Dropped(p, f"no local {cfg.local.upload}") for p in sorted(set(nodes) - set(models))]
    n = np.array([infos[p].num_examples for p in sorted(infos)], float)
    losses = np.array([infos[p].train_loss for p in sorted(infos)])
    extra = {
        **({} if start is None else {"phase": "finetune"}),
        "steps_per_client": steps,
        "train_loss_per_client": {p: i.train_loss for p, i in infos.items()},
        "client_compute_s": {p: i.compute_s for p, i in infos.items()},
        "examples_per_client": {p: i.num_examples for p, i in infos.items()},
        "class_counts_per_client": {p: histograms[p] for p in sorted(models)},  # as the nodes report
        **({} if ledger is None else ledger.after_steps(infos.values())),
    }
    wall = time.perf_counter() - began
    loss = float((n * losses).sum() / n.sum())
    record = RoundRecord(round_, loss, wall, up, down, sorted(models), dropped, extra)
    record_round(run, record.to_json())
    run.update_summary(**{"local_steps" if start is None else "finetune_steps": steps})


def collect_shares(
    cfg: Config,
    run: RunDir,
    model: Model,
    sent: list[str],
    grid: Grid,
    nodes: dict[int, int],
    histograms: dict[int, list[int]],
    base: ConfigRecord,
    steps: int,
    timeout: float,
) -> tuple[dict, dict[int, UpdateInfo], int, int]:
    """``local.upload = "samples"``: every client trains, generates its share of the mixture
    and uploads only the images; ``synthetic/`` is written from them here."""
    order = sorted(nodes)
    counts = mixture_counts(np.array([histograms[p] for p in order]), cfg.sample.per_class)
    state = model.net.state_dict()
    global_w = ArrayRecord({k: state[k].detach().cpu() for k in sent})  # the frozen part never travels
    messages = {}
    for pid, row in zip(order, counts, strict=True):
        config = ConfigRecord(
            {**base, ROUND_KEY: 0, TASK_KEY: "pretrain", STEPS_KEY: steps, COUNTS_KEY: row.tolist()}
        )
        content = RecordDict({ARRAYS: global_w, CONFIG: config})
        messages[pid] = Message(content=content, dst_node_id=nodes[pid], message_type=MessageType.TRAIN)
    pid_of = {n: p for p, n in nodes.items()}
    shares, infos, up = {}, {}, 0
    for reply in grid.send_and_receive(list(messages.values()), timeout=timeout):
        pid = pid_of.get(reply.metadata.src_node_id, -1)
        share = _share(reply, counts[order.index(pid)] if pid in nodes else None, model.net)
        if isinstance(share, str):
            log.warning("client %s: no usable samples: %s", pid, share)
            continue
        up += payload_bytes(reply.content)
        shares[pid], infos[pid] = share
    if not shares:
        raise FederationError("no client returned its samples")
    s = cfg.sample
    write_mixture(
        {p: shares[p] for p in sorted(shares)},
        list(base[CLASSES_KEY]),
        SampleSpec.of(cfg),
        run.synthetic,
        grid=run.root / "samples.png",
        grid_per_row=s.grid_per_class,
        grid_title=f"local mixture of {len(shares)} clients' samples · {s.sampler}-{s.steps}",
        extra={"uploaded": "samples"},
    )
    return shares, infos, sum(payload_bytes(m.content) for m in messages.values()), up


def _share(reply: Message, row, template) -> tuple[tuple[torch.Tensor, torch.Tensor], UpdateInfo] | str:
    """A client's uploaded share as ((images in [-1, 1], labels), report), or why it is unusable."""
    if reply.has_error():
        return f"client error: {reply.error.reason}"
    if row is None:
        return "unknown node"
    try:
        info = UpdateInfo.from_mapping(dict(reply.content[METRICS]))
        arrays = record_numpy(reply.content[ARRAYS])
        images, labels = arrays[IMAGES], arrays[LABELS]
    except (KeyError, TypeError, ValueError) as err:
        return f"malformed reply: {err}"
    c, size = template.config.in_channels, template.config.sample_size
    if images.dtype != np.uint8 or images.shape != (int(row.sum()), size, size, c):
        return f"images {images.dtype} {images.shape}, expected uint8 {(int(row.sum()), size, size, c)}"
    if labels.tolist() != mixture_labels(row).tolist():
        return "labels differ from the requested counts"
    floats = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return (floats, torch.from_numpy(labels).long()), info
