"""Messages between the federated server and its nodes, and the screening of replies.

Pure functions over Flower records (no round state): discovering which node holds which
partition, building one TRAIN message per selected client, decoding and screening the
replies (client errors, timeouts, undecodable or invalid weights and metrics), and the
one-off broadcasts (FedDDPM's local models, personal-model export). Byte counts are of
the serialized payloads, as they travel.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedsynth.config import Config
from fedsynth.core.errors import FedsynthError, one_line
from fedsynth.core.protocol import (
    ARRAYS,
    BASE_KEY,
    CLASSES_KEY,
    CONFIG,
    CONFIG_KEY,
    INFO,
    METRICS,
    MODE_KEY,
    PARTITION_ID,
    ROUND_KEY,
    UPLOAD_KEY,
    UpdateInfo,
    config_text,
)
from fedsynth.core.records import numpy_record, record_numpy
from fedsynth.core.validate import Expected, check_arrays, check_metrics
from fedsynth.exchange.codecs import CodecError
from fedsynth.exchange.transfer import Layout, ServerExchange
from fedsynth.strategies.adapter import Update
from fedsynth.strategies.scaffold import CONTROL_KEY
from fedsynth.training.round_loop import Dropped

log = logging.getLogger("fedsynth.server")
Weights = dict[str, torch.Tensor]
Nodes = dict[int, int]  # partition id → node id


class FederationError(FedsynthError):
    """The federation cannot continue (too few valid clients, no nodes)."""


def payload_bytes(content: RecordDict) -> int:
    """Bytes of a message's payload: serialized arrays plus config/metric values."""
    total = 0
    for record in content.values():
        if isinstance(record, ArrayRecord):
            total += sum(len(array.data) for array in record.values())
        else:
            total += sum(len(str(k)) + len(str(v)) for k, v in record.items())
    return total


def base_config(cfg: Config, class_names: tuple[str, ...], base_digest: str = "") -> ConfigRecord:
    """What every message carries: the resolved config (TOML), the class names and, when some
    weights never travel, the SHA-256 of the server's copy of them."""
    record = ConfigRecord({CONFIG_KEY: config_text(cfg), CLASSES_KEY: list(class_names)})
    if base_digest:
        record[BASE_KEY] = base_digest
    return record


def discover_nodes(grid: Grid, num_clients: int, base: ConfigRecord, timeout: float) -> tuple[Nodes, dict]:
    """(partition id → node id, partition id → class histogram), asking every node who it is."""
    deadline = time.monotonic() + timeout
    while len(nodes := list(grid.get_node_ids())) < num_clients:
        if time.monotonic() > deadline:
            raise FederationError(
                f"only {len(nodes)} of partition.num_clients = {num_clients} nodes "
                f"connected within {timeout:.0f} s"
            )
        time.sleep(0.5)
    mapping: Nodes = {}
    histograms: dict[int, list[int]] = {}
    failed: list[str] = []
    for reply in grid.send_and_receive(_to_all(nodes, {CONFIG: base}, MessageType.QUERY), timeout=timeout):
        if reply.has_error():
            failed.append(f"node {reply.metadata.src_node_id}: {_node_error(reply.error.reason)}")
            log.warning("%s", failed[-1])
            continue
        pid = int(reply.content[INFO][PARTITION_ID])
        if pid in mapping:
            raise FederationError(f"two nodes claim partition-id {pid}; give each a distinct one")
        mapping[pid] = reply.metadata.src_node_id
        histograms[pid] = [int(x) for x in reply.content[INFO]["histogram"]]
    missing = sorted(set(range(num_clients)) - set(mapping))
    if missing:
        why = f"; {'; '.join(failed)}" if failed else ""
        raise FederationError(f"no node answered for partition-id(s) {missing}{why}")
    return mapping, histograms


def _node_error(reason: str) -> str:
    """A node's error as one line: a SuperNode reports its ClientApp's exception as
    ``<class 'pkg.Type'>:<'message'>``."""
    found = re.search(r"(\w+)'>:<'(.*)'>\s*$", reason, re.S)
    return one_line(f"{found.group(1)}: {found.group(2)}" if found else reason, "failed without a message")


def _to_all(nodes, records: dict, kind: str) -> list[Message]:
    return [Message(content=RecordDict(records), dst_node_id=n, message_type=kind) for n in nodes]


def train_message(
    node: int,
    base: ConfigRecord,
    arrays: dict[str, np.ndarray],
    round_: int,
    mode: str,
    groups: tuple[str, ...],
    extras: dict[str, ArrayRecord],
) -> Message:
    """One client's TRAIN message: its download, the run config and the strategy's extras."""
    config = ConfigRecord({**base, ROUND_KEY: round_, MODE_KEY: mode, UPLOAD_KEY: list(groups)})
    content = RecordDict({ARRAYS: numpy_record(arrays), CONFIG: config, **extras})
    return Message(content=content, dst_node_id=node, message_type=MessageType.TRAIN)


def decode_reply(
    reply: Message,
    keys: list[str],
    layout: Layout,
    exchange: ServerExchange,
    global_w: Weights,
    weight_key: str,
) -> Update | str:
    """The reply as a typed update, or the reason it cannot be used."""
    if ARRAYS not in reply.content or METRICS not in reply.content:
        return "reply without arrays or metrics"
    arrays = record_numpy(reply.content[ARRAYS])
    expected = Expected({k: layout.shapes[k] for k in keys})
    if exchange.codec.lossless and (reason := check_arrays(arrays, expected)):
        return reason
    try:
        weights = exchange.upload(arrays, keys, global_w)
    except CodecError as err:
        return f"undecodable update: {err}"
    metrics = dict(reply.content[METRICS])
    reason = check_arrays({k: v.numpy() for k, v in weights.items()}, expected) or check_metrics(
        metrics, weight_key
    )
    if reason:
        return reason
    try:
        info = UpdateInfo.from_mapping(metrics)
    except (KeyError, TypeError, ValueError) as err:
        return f"malformed metrics: {err}"
    control = None
    if CONTROL_KEY in reply.content:
        control = {k: torch.from_numpy(np.array(a.numpy())) for k, a in reply.content[CONTROL_KEY].items()}
    return Update(info, weights, control)


@dataclass
class Screened:
    """One attempt's replies, screened: the usable updates, who was dropped, bytes moved."""

    valid: list[Update]
    dropped: list[Dropped] = field(default_factory=list)
    bytes_up: dict[int, int] = field(default_factory=dict)
    bytes_down: dict[int, int] = field(default_factory=dict)
    params_up: int = 0
    params_down: int = 0


def screen(replies: list[Message], nodes: Nodes, expected: set[int], timeout: float, decode) -> Screened:
    """Screen ``replies`` (``decode(pid, reply) -> Update | reason``); a client in ``expected``
    that did not answer is dropped for the timeout."""
    pid_of = {n: p for p, n in nodes.items()}
    out, answered = Screened(valid=[]), set()
    for reply in replies:
        pid = pid_of.get(reply.metadata.src_node_id, -1)
        answered.add(pid)
        if reply.has_error():
            out.dropped.append(Dropped(pid, f"client error: {reply.error.reason}"))
            continue
        out.bytes_up[pid] = payload_bytes(reply.content)
        result = decode(pid, reply)
        if isinstance(result, str):
            out.dropped.append(Dropped(pid, result))
        else:
            out.valid.append(result)
            out.params_up += sum(int(v.numel()) for v in result.weights.values())
    for pid in sorted(expected - answered):
        out.dropped.append(Dropped(pid, f"no reply within federation.round_timeout = {timeout} s"))
    return out


def broadcast(
    grid: Grid, nodes: Nodes, records: dict, kind: str, timeout: float
) -> tuple[dict[int, Message], dict[int, str], int, int]:
    """Send one message to every node: (replies by partition id, errors by partition id,
    bytes down, bytes up)."""
    messages = _to_all(nodes.values(), records, kind)
    pid_of = {n: p for p, n in nodes.items()}
    replies, errors, bytes_up = {}, {}, 0
    for reply in grid.send_and_receive(messages, timeout=timeout):
        pid = pid_of.get(reply.metadata.src_node_id, -1)
        if reply.has_error():
            errors[pid] = reply.error.reason
            continue
        bytes_up += payload_bytes(reply.content)
        replies[pid] = reply
    return replies, errors, sum(payload_bytes(m.content) for m in messages), bytes_up
