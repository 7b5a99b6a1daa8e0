"""What crosses the wire between the server (or chain owner) and the clients, in one
vocabulary for both transports: Flower messages and the ledger's JSON metrics.

- Record names and config keys of the messages (``ARRAYS``, ``CONFIG_KEY``, …).
- The run's config travels as TOML text (:func:`config_text`, :func:`parse_config`), so
  clients need no config of their own.
- :class:`UpdateInfo` is what a client reports with its weights; it converts to and from
  a Flower ``MetricRecord`` (keys below) and the ledger's JSON string, with the same keys.
"""

from __future__ import annotations

import functools
import json
import tomllib
from dataclasses import dataclass

import tomli_w
from flwr.app import MetricRecord

from fedsynth.config import Config, config_from_dict, config_to_dict

# record names in a message's content
ARRAYS, METRICS, CONFIG, INFO = "arrays", "metrics", "config", "info"
# keys of the CONFIG record
CONFIG_KEY = "fedsynth-config"  # the run's resolved config (TOML text)
CLASSES_KEY = "class-names"
ROUND_KEY = "server-round"
MODE_KEY = "exchange-mode"
UPLOAD_KEY = "upload-groups"
TASK_KEY = "task"  # "train" (default) or "pretrain" (a one-off local model: FedDDPM, paradigm local)
STEPS_KEY = "local-steps"  # "pretrain": the local model's optimizer steps
COUNTS_KEY = "sample-counts"  # "pretrain": send these images per class instead of the model
BASE_KEY = "base-sha256"  # SHA-256 of the weights no one trains (they never travel); absent: none
IMAGES, LABELS = "images", "labels"  # arrays of such a reply: uint8 (N, H, W, C) and int64 (N,)
# keys of a client's node config (simulation engine / flower-supernode --node-config)
PARTITION_ID, DATA_PATH = "partition-id", "data-path"
# a client's persistent records (Flower context.state)
STATE_KEY = "fedsynth-state"
# keys of the METRICS record / the ledger's metrics JSON
NUM_EXAMPLES, NUM_STEPS, TRAIN_LOSS, COMPUTE_S = "num-examples", "num-steps", "train-loss", "compute-s"
FILTER_PRECISION, FILTER_RECALL = "filter-precision", "filter-recall"
BYTES_DOWN, BYTES_UP = "bytes-down", "bytes-up"


def config_text(cfg: Config) -> str:
    return tomli_w.dumps(config_to_dict(cfg))


@functools.lru_cache(maxsize=4)
def parse_config(text: str) -> Config:
    return config_from_dict(tomllib.loads(text))


@dataclass(frozen=True)
class UpdateInfo:
    """A client's report on one local round (its weights travel separately)."""

    client: int
    num_examples: int
    num_steps: int
    train_loss: float
    compute_s: float
    filter_precision: float | None = None  # Phoenix threshold filtering's self-check
    filter_recall: float | None = None
    bytes_down: int = 0  # ledger: the trainer's own store transfers
    bytes_up: int = 0

    def _items(self) -> dict[str, int | float]:
        items: dict[str, int | float] = {
            PARTITION_ID: self.client,
            NUM_EXAMPLES: self.num_examples,
            NUM_STEPS: self.num_steps,
            TRAIN_LOSS: self.train_loss,
            COMPUTE_S: self.compute_s,
        }
        if self.filter_precision is not None:
            items[FILTER_PRECISION] = self.filter_precision
        if self.filter_recall is not None:
            items[FILTER_RECALL] = self.filter_recall
        return items

    def to_record(self) -> MetricRecord:
        return MetricRecord(self._items())

    def to_json(self) -> str:
        return json.dumps({**self._items(), BYTES_DOWN: self.bytes_down, BYTES_UP: self.bytes_up})

    @classmethod
    def from_mapping(cls, m: dict) -> UpdateInfo:
        """From a METRICS record or parsed JSON; a missing required key raises ``KeyError``."""
        precision, recall = m.get(FILTER_PRECISION), m.get(FILTER_RECALL)
        return cls(
            client=int(m[PARTITION_ID]),
            num_examples=int(m[NUM_EXAMPLES]),
            num_steps=int(m[NUM_STEPS]),
            train_loss=float(m[TRAIN_LOSS]),
            compute_s=float(m[COMPUTE_S]),
            filter_precision=None if precision is None else float(precision),
            filter_recall=None if recall is None else float(recall),
            bytes_down=int(m.get(BYTES_DOWN, 0)),
            bytes_up=int(m.get(BYTES_UP, 0)),
        )

    @classmethod
    def from_json(cls, text: str) -> UpdateInfo:
        return cls.from_mapping(json.loads(text))
