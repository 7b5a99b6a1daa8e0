"""Content-addressed weight store: blobs are named by their IPFS-compatible CID.

Only CIDs go on chain; the weights live here. Every fetch recomputes the CID of what came
back and rejects a mismatch (:class:`ContentError`), so a tampered or corrupted blob is
never used. Backends: a local directory (default: ``RUN_DIR/store``; a shared filesystem
in a real deployment) and an IPFS node's HTTP API (``/api/v0/add``, ``/api/v0/cat``).
Weights are serialized with safetensors, keys sorted, so equal weights give equal bytes
and therefore equal CIDs — what lets honest aggregators agree.
"""

from __future__ import annotations

import json
import os
import threading
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from fedsynth.core.errors import FedsynthError
from fedsynth.ledger.cid import content_id, is_content_id

Weights = dict[str, torch.Tensor]


class ContentError(FedsynthError):
    """A blob is missing, or its content does not match its CID."""


def weights_to_bytes(weights: Weights) -> bytes:
    return save_safetensors({k: weights[k].detach().cpu().contiguous() for k in sorted(weights)})


def bytes_to_weights(data: bytes) -> Weights:
    try:
        loaded = load_safetensors(data)
    except Exception as exc:  # safetensors raises its own error types for malformed headers
        raise ContentError(f"not a safetensors weights blob: {exc}") from exc
    return {k: loaded[k] for k in sorted(loaded)}  # a fixed order: strategies zip arrays by position


class Backend(Protocol):
    def write(self, cid: str, data: bytes) -> str: ...
    def read(self, cid: str) -> bytes: ...


@dataclass
class LocalBackend:
    root: Path

    def _path(self, cid: str) -> Path:
        return self.root / cid[-2:] / cid

    def write(self, cid: str, data: bytes) -> str:
        path = self._path(cid)
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{cid}.{uuid.uuid4().hex}")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return cid

    def read(self, cid: str) -> bytes:
        path = self._path(cid)
        if not path.is_file():
            raise ContentError(f"{cid}: not in the store at {self.root}")
        return path.read_bytes()


@dataclass
class IpfsBackend:
    """An IPFS node's HTTP API (kubo's ``/api/v0``), e.g. ``http://127.0.0.1:5001``."""

    url: str
    timeout: float = 120.0

    def _post(self, path: str, body: bytes = b"", headers: dict | None = None) -> bytes:
        request = urllib.request.Request(self.url.rstrip("/") + path, data=body, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.read()
        except OSError as exc:
            raise ContentError(f"IPFS API {self.url}: {exc}") from exc

    def write(self, cid: str, data: bytes) -> str:
        boundary = uuid.uuid4().hex
        body = (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="blob"\r\n'
                f"Content-Type: application/octet-stream\r\n\r\n"
            ).encode()
            + data
            + f"\r\n--{boundary}--\r\n".encode()
        )
        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        answer = json.loads(self._post("/api/v0/add?cid-version=1&raw-leaves=false&pin=true", body, headers))
        if answer.get("Hash") != cid:
            raise ContentError(f"IPFS node named the blob {answer.get('Hash')}, expected {cid}")
        return cid

    def read(self, cid: str) -> bytes:
        return self._post("/api/v0/cat?" + urllib.parse.urlencode({"arg": cid}))


@dataclass
class ContentStore:
    """put/get by CID with verification and byte accounting (``bytes_in`` / ``bytes_out``)."""

    backend: Backend
    bytes_in: int = 0
    bytes_out: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def put(self, data: bytes) -> str:
        cid = self.backend.write(content_id(data), data)
        with self.lock:
            self.bytes_in += len(data)
        return cid

    def get(self, cid: str) -> bytes:
        if not is_content_id(cid):
            raise ContentError(f"{cid!r} is not a content ID")
        data = self.backend.read(cid)
        with self.lock:
            self.bytes_out += len(data)
        if content_id(data) != cid:
            raise ContentError(f"{cid}: content does not match its CID (tampered or corrupted)")
        return data

    def put_weights(self, weights: Weights) -> str:
        return self.put(weights_to_bytes(weights))

    def get_weights(self, cid: str) -> Weights:
        return bytes_to_weights(self.get(cid))


def open_store(spec: str, default_dir: Path) -> ContentStore:
    """``ledger.store``: "" → ``default_dir``; ``http(s)://…`` → IPFS API; else a directory."""
    if spec.startswith(("http://", "https://")):
        return ContentStore(IpfsBackend(spec))
    root = Path(spec).expanduser() if spec else default_dir
    root.mkdir(parents=True, exist_ok=True)
    return ContentStore(LocalBackend(root))
