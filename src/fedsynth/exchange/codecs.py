"""Codecs for a list of tensors (one group selection, in key order), flattened into one
vector so a message carries a few arrays, not one per tensor.

fp32:  the values as they are (exact). Used for weights, not deltas.
fp16:  half precision; |error| ≤ 2⁻¹¹·|x| in the normal range (≈ 6e-8 absolute below it).
bf16:  bfloat16 bits sent as int16; |error| ≤ 2⁻⁸·|x|.
int8:  per-tensor symmetric scale s = max|x| / 127, q = round(x / s); |error| ≤ s / 2.
topk:  per tensor the k = ⌈keep·n⌉ largest-magnitude entries (float32 values, int32 flat
       indices); kept entries exact, the rest 0 — the error is what error feedback carries.

Lossy codecs are applied to update deltas (see ``exchange.transfer``), with the part a
codec dropped carried into the next message (error feedback).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from fedsynth.config import CODECS

Payload = dict[str, np.ndarray]


class CodecError(ValueError):
    """A payload that does not decode to the expected tensors."""


@dataclass(frozen=True)
class Codec:
    name: str = "fp32"
    keep: float = 0.05  # topk keep ratio

    def __post_init__(self) -> None:
        if self.name not in CODECS:
            raise CodecError(f"unknown codec {self.name!r}; choose one of {', '.join(CODECS)}")

    @property
    def lossless(self) -> bool:
        return self.name == "fp32"


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).to(torch.float32).cpu() for t in tensors])


def _sizes(shapes: list[tuple[int, ...]]) -> list[int]:
    return [math.prod(s) for s in shapes]


def encode(codec: Codec, tensors: list[torch.Tensor]) -> Payload:
    flat = _flat(tensors)
    if codec.name == "fp32":
        return {"values": flat.numpy()}
    if codec.name == "fp16":
        return {"values": flat.half().numpy()}
    if codec.name == "bf16":
        return {"values": flat.bfloat16().view(torch.int16).numpy()}
    sizes = [t.numel() for t in tensors]
    parts = torch.split(flat, sizes)
    if codec.name == "int8":
        scales = torch.stack([p.abs().max() / 127 if p.numel() else torch.zeros(()) for p in parts])
        safe = torch.where(scales > 0, scales, torch.ones_like(scales))
        q = [torch.round(p / s).clamp(-127, 127) for p, s in zip(parts, safe, strict=True)]
        return {"values": torch.cat(q).to(torch.int8).numpy(), "scales": scales.numpy()}
    values, indices, offset = [], [], 0
    for p in parts:
        k = min(p.numel(), max(1, math.ceil(codec.keep * p.numel())))
        idx = p.abs().topk(k, sorted=False).indices.sort().values
        values.append(p[idx])
        indices.append(idx + offset)
        offset += p.numel()
    return {"values": torch.cat(values).numpy(), "indices": torch.cat(indices).to(torch.int32).numpy()}


def decode(codec: Codec, payload: Payload, shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
    sizes = _sizes(shapes)
    total = sum(sizes)
    if "values" not in payload:
        raise CodecError(f"{codec.name} payload without 'values'")
    values = torch.from_numpy(np.ascontiguousarray(payload["values"]))
    if codec.name in ("fp32", "fp16", "bf16"):
        flat = values.view(torch.bfloat16) if codec.name == "bf16" else values
        _expect(flat.numel() == total, f"{codec.name} payload has {flat.numel()} values, expected {total}")
        flat = flat.to(torch.float32)
    elif codec.name == "int8":
        scales = torch.from_numpy(np.asarray(payload.get("scales", np.zeros(0)), dtype=np.float32))
        _expect(values.numel() == total, f"int8 payload has {values.numel()} values, expected {total}")
        _expect(scales.numel() == len(sizes), f"int8 payload has {scales.numel()} scales, not {len(sizes)}")
        flat = values.to(torch.float32) * torch.repeat_interleave(scales, torch.tensor(sizes))
    else:
        indices = torch.from_numpy(np.asarray(payload.get("indices", np.zeros(0)), dtype=np.int64))
        _expect(indices.numel() == values.numel(), "topk payload: indices and values differ in length")
        _expect(bool(((indices >= 0) & (indices < total)).all()), "topk payload: index out of range")
        flat = torch.zeros(total, dtype=torch.float32)
        flat[indices] = values.to(torch.float32)
    return [p.reshape(s) for p, s in zip(torch.split(flat, sizes), shapes, strict=True)]


def _expect(ok: bool, reason: str) -> None:
    if not ok:
        raise CodecError(reason)


def compress(
    codec: Codec, delta: list[torch.Tensor], residual: list[torch.Tensor] | None
) -> tuple[Payload, list[torch.Tensor], list[torch.Tensor]]:
    """Error feedback: send C(Δ + e); keep e' = (Δ + e) − D(C(Δ + e)) for next time.

    Returns (payload, decoded, new residual)."""
    target = delta if residual is None else [d + e for d, e in zip(delta, residual, strict=True)]
    payload = encode(codec, target)
    decoded = decode(codec, payload, [tuple(t.shape) for t in target])
    return payload, decoded, [t - d for t, d in zip(target, decoded, strict=True)]
