"""Both ends of one exchange, without Flower: what the server sends each client and how
it reads the replies, and what a client does with them.

Download. A client that holds no model yet (first selection, or after it was dropped)
gets every exchanged weight as float32 — the initial broadcast, counted like any other
message. What no one trains (``train.trainable``, LoRA's base) never travels: every node
builds it itself (from the seed, or from its own copy of ``model.init``), and the server's
SHA-256 of it (:attr:`Layout.base_digest`) lets a client whose copy differs refuse.
After that it gets the plan's download groups: as float32 weights with the ``fp32``
codec; with a lossy codec as the encoded difference between the global weights and the
client's copy of them, which the server tracks exactly (it applies the same decoded
delta), so what a codec drops now is sent later (server-side error feedback).

Upload. ``fp32`` sends the upload groups' weights. Lossy codecs send the encoded
update Δ = w_new − w_start with client-side error feedback; the server applies each
decoded Δ to the current global weights before the strategy aggregates.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch

from fedsynth.config import ExchangeConfig
from fedsynth.core.errors import ConfigError
from fedsynth.exchange.codecs import Codec, CodecError, compress, decode
from fedsynth.exchange.groups import frozen_keys, group_keys, personal_keys
from fedsynth.exchange.plans import DOWNLOAD, is_personal

Weights = dict[str, torch.Tensor]
WEIGHTS, DELTA = "weights", "delta"


def codec_of(ex: ExchangeConfig) -> Codec:
    return Codec(ex.codec, ex.topk_ratio)


def has_personal_models(ex: ExchangeConfig) -> bool:
    """True when some weights never leave the clients: plans udec / ulatdec or personal layers."""
    return is_personal(ex.plan) or bool(ex.personal.strip())


@dataclass
class Layout:
    """The model's keys (state-dict order) and shapes, identical on every node, the keys that
    stay with each client (``exchange.personal``) and those no one trains (``train.trainable``):
    neither is exchanged after the full model a client starts from."""

    shapes: dict[str, tuple[int, ...]]
    personal: frozenset[str] = frozenset()
    frozen: frozenset[str] = frozenset()
    base_digest: str = ""  # SHA-256 of the frozen weights ("" when every weight trains)

    @classmethod
    def of(cls, weights: Weights, personal: str = "", trainable: str = "") -> Layout:
        shapes = {k: tuple(v.shape) for k, v in weights.items()}
        frozen = frozen_keys(trainable, weights)
        digest = weights_digest({k: weights[k] for k in frozen}) if frozen else ""
        return cls(shapes, personal_keys(personal, weights), frozen, digest)

    @property
    def sent(self) -> list[str]:
        """Every key that ever travels (the full model a client starts from): not the frozen ones."""
        return [k for k in self.shapes if k not in self.frozen]

    def keys(self, groups: tuple[str, ...] | list[str]) -> list[str]:
        """The exchanged keys of ``groups`` (personal and frozen keys excluded); none is an error."""
        kept = self.personal | self.frozen
        keys = [k for k in group_keys(self.shapes, groups) if k not in kept]
        if not keys:
            raise ConfigError(f"exchange groups {list(groups)} hold only personal or frozen parameters")
        return keys

    def download(self, plan: str) -> list[str]:
        return self.keys(DOWNLOAD[plan])

    def shapes_of(self, keys: list[str]) -> list[tuple[int, ...]]:
        return [self.shapes[k] for k in keys]


def weights_digest(weights: Weights) -> str:
    """SHA-256 over the tensors in key order (names, dtypes, shapes and bytes)."""
    h = hashlib.sha256()
    for key in sorted(weights):
        t = weights[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def check_base(server_digest: str, layout: Layout) -> None:
    """A client refuses to train when its own copy of the frozen base is not the server's."""
    if server_digest != layout.base_digest:
        raise CodecError(
            f"this client's base model is not the server's: SHA-256 {layout.base_digest or 'none'} here, "
            f"{server_digest or 'none'} on the server (every node needs the same model.init weights)"
        )


def _payload_to_weights(
    codec: Codec, payload: dict[str, np.ndarray], keys: list[str], layout: Layout
) -> Weights:
    return dict(zip(keys, decode(codec, payload, layout.shapes_of(keys)), strict=True))


# ---------------------------------------------------------------------------- server


@dataclass
class ServerExchange:
    ex: ExchangeConfig
    layout: Layout
    has_model: set[int] = field(default_factory=set)
    refs: dict[int, Weights] = field(default_factory=dict)  # lossy codecs: each client's copy

    @property
    def codec(self) -> Codec:
        return codec_of(self.ex)

    def _tracks_clients(self) -> bool:
        """Whether a client needs the full model once before the plan's groups suffice."""
        return has_personal_models(self.ex) or not self.codec.lossless

    def download(self, pid: int, global_w: Weights) -> tuple[dict[str, np.ndarray], str, int]:
        """(arrays, mode, parameters covered) for client ``pid``."""
        if self._tracks_clients() and pid not in self.has_model:
            keys = self.layout.sent
            self.has_model.add(pid)
            if not self.codec.lossless:
                self.refs[pid] = {k: global_w[k].detach().cpu().float().clone() for k in self.download_keys}
            return {k: global_w[k].detach().cpu().numpy() for k in keys}, WEIGHTS, self._count(keys)
        keys = self.download_keys
        if self.codec.lossless:
            return {k: global_w[k].detach().cpu().numpy() for k in keys}, WEIGHTS, self._count(keys)
        ref = self.refs[pid]
        delta = [global_w[k].detach().cpu().float() - ref[k] for k in keys]
        payload, decoded, _ = compress(self.codec, delta, None)
        for k, d in zip(keys, decoded, strict=True):
            ref[k] = ref[k] + d
        return payload, DELTA, self._count(keys)

    def upload(self, arrays: dict[str, np.ndarray], keys: list[str], global_w: Weights) -> Weights:
        """The client's weights for ``keys``, reconstructed; raises CodecError when undecodable."""
        if self.codec.lossless:
            return {k: torch.from_numpy(np.asarray(v)) for k, v in arrays.items()}
        delta = _payload_to_weights(self.codec, arrays, keys, self.layout)
        return {k: global_w[k].detach().cpu().float() + delta[k] for k in keys}

    def forget(self, pid: int) -> None:
        """After a failed round trip the client may not hold what we think: start it afresh."""
        self.has_model.discard(pid)
        self.refs.pop(pid, None)

    @property
    def download_keys(self) -> list[str]:
        return self.layout.download(self.ex.plan)

    def _count(self, keys: list[str]) -> int:
        return int(sum(np.prod(self.layout.shapes[k]) for k in keys))


# ---------------------------------------------------------------------------- client


def client_start(
    ex: ExchangeConfig,
    layout: Layout,
    arrays: dict[str, np.ndarray],
    mode: str,
    state: dict[str, Weights],
    base: Weights | None = None,
) -> Weights:
    """The weights this client trains from; updates ``state`` (``ref``, ``local``, ``residual``).
    ``base``: this node's own frozen weights (``layout.frozen``), which never travel."""
    codec, download = codec_of(ex), layout.download(ex.plan)
    if mode == WEIGHTS:
        received = {k: torch.from_numpy(np.array(v, copy=True)) for k, v in arrays.items()}
        if set(received) == set(layout.sent):  # the full model: the server (re)starts us
            state.pop("residual", None)
            kept = state.get("local", {})  # personal weights we already trained are kept
            state["local"] = {k: kept.get(k, v) for k, v in received.items() if k not in download}
        if not codec.lossless:
            state["ref"] = {k: received[k].float() for k in download}
    elif mode == DELTA:
        if "ref" not in state:
            raise CodecError("client holds no copy of the global weights (restarted?): needs the full model")
        delta = _payload_to_weights(codec, arrays, download, layout)
        state["ref"] = {k: state["ref"][k] + delta[k] for k in download}
        received = dict(state["ref"])
    else:
        raise CodecError(f"unknown exchange mode {mode!r}")
    frozen = {k: v for k, v in (base or {}).items() if k in layout.frozen}
    start = {**frozen, **received, **state.get("local", {})}  # "local" never holds exchanged keys
    missing = [k for k in layout.shapes if k not in start]
    if missing:
        raise CodecError(f"client holds no local weights for {missing[0]} … (restarted?): needs a full model")
    return {k: start[k] for k in layout.shapes}


def client_reply(
    ex: ExchangeConfig,
    layout: Layout,
    start: Weights,
    new: Weights,
    upload_groups: tuple[str, ...],
    state: dict[str, Weights],
) -> dict[str, np.ndarray]:
    """What to upload; keeps the personal groups and the error-feedback residual in ``state``."""
    codec = codec_of(ex)
    download = set(layout.download(ex.plan))
    state["local"] = {
        k: v.detach().cpu().clone() for k, v in new.items() if k not in download and k not in layout.frozen
    }
    keys = layout.keys(upload_groups)
    if codec.lossless:
        return {k: new[k].detach().cpu().numpy() for k in keys}
    residual = state.setdefault("residual", {})
    delta = [new[k].detach().cpu().float() - start[k].float() for k in keys]
    old = [residual.get(k, torch.zeros(layout.shapes[k])) for k in keys]
    payload, _, rest = compress(codec, delta, old)
    residual.update(zip(keys, rest, strict=True))
    return payload
