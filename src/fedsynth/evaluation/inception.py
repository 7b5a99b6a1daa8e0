"""Standard Inception-v3 FID and IS, from a local weights file (``eval.inception_weights``).

The network is torch-fidelity's ``FeatureExtractorInceptionV3`` (the TF-compatible
FID Inception, the same one torchmetrics wraps), loaded from the user's file — never
downloaded. The usual file is torch-fidelity's ``pt_inception-2015-12-05-6726825d.pth``.
FID uses its 2048-d pool features and our ``fd_between``; IS uses its 1008-way
``logits_unbiased`` with the usual 10 splits.
"""

from __future__ import annotations

import importlib
import importlib.util
import pickle
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import safetensors.torch
import torch

from fedsynth.core.errors import ConfigError, first_line
from fedsynth.evaluation.metrics import fd_between, inception_style_score

FEATURES = ("2048", "logits_unbiased")


def _inception_class() -> type[torch.nn.Module]:
    """torch-fidelity's Inception-v3 class.

    torch-fidelity's package ``__init__`` imports torchvision for its dataset helpers,
    which fails where torchvision does not match the installed torch build (CPU-only
    torch with the CUDA torchvision wheel); the Inception module itself needs only torch.
    In that case the package is registered without running its ``__init__``."""
    name = "torch_fidelity.feature_extractor_inceptionv3"
    try:
        return importlib.import_module(name).FeatureExtractorInceptionV3
    except (ImportError, RuntimeError, OSError):
        spec = importlib.util.find_spec("torch_fidelity")
        if spec is None or spec.submodule_search_locations is None:
            raise ConfigError(
                "eval.inception_weights needs torch-fidelity (pip install torch-fidelity==0.4.0)"
            ) from None
        for key in [k for k in sys.modules if k.startswith("torch_fidelity")]:
            del sys.modules[key]
        package = types.ModuleType("torch_fidelity")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["torch_fidelity"] = package
        return importlib.import_module(name).FeatureExtractorInceptionV3


def check_weights_file(weights: str | Path) -> Path:
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ConfigError(f"eval.inception_weights: no file at {path} (weights are never downloaded)")
    return path


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors only, never code: safetensors, or ``torch.load(weights_only=True)`` (which
    refuses a pickle that would build anything but tensors and plain containers)."""
    if path.suffix == ".safetensors":
        state = safetensors.torch.load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError("not a state dict of tensors")
    return state


def load_inception(weights: str | Path, device: torch.device) -> torch.nn.Module:
    """The network with the user's weights, read safely (a file from a config or a run
    directory someone sent is never unpickled as code). torch-fidelity loads its weights
    file itself with ``weights_only=False``, so it is given a copy that holds only the
    tensors read here."""
    path = check_weights_file(weights)
    cls = _inception_class()
    try:
        state = read_state_dict(path)
        with tempfile.TemporaryDirectory(prefix="fedsynth-inception-") as tmp:
            copy = Path(tmp) / "weights.pt"
            torch.save(state, copy)
            model = cls("inception-v3-compat", list(FEATURES), feature_extractor_weights_path=str(copy))
    except (RuntimeError, KeyError, OSError, EOFError, ValueError, pickle.UnpicklingError) as err:
        reason = first_line(err)
        raise ConfigError(f"eval.inception_weights: {path} is not Inception-v3 weights ({reason})") from None
    return model.to(device).eval()


def to_uint8_rgb(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images (1 or 3 channels) → uint8 RGB, as the network expects."""
    x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


@torch.no_grad()
def inception_outputs(
    model: torch.nn.Module, images: torch.Tensor, batch_size: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """(2048-d pool features, 1008-way unbiased logits) for every image."""
    device = next(model.parameters()).device
    pools, logits = [], []
    for start in range(0, len(images), batch_size):
        pool, logit = model(to_uint8_rgb(images[start : start + batch_size]).to(device))
        pools.append(pool.double().cpu())
        logits.append(logit.double().cpu())
    return torch.cat(pools).numpy(), torch.cat(logits).numpy()


def inception_metrics(
    weights: str | Path, real: torch.Tensor, fake: torch.Tensor, device: torch.device
) -> dict[str, float]:
    """``fid`` (real vs fake pool features), ``inception_is_mean``/``_std`` of the fakes."""
    model = load_inception(weights, device)
    real_pool, _ = inception_outputs(model, real)
    fake_pool, fake_logits = inception_outputs(model, fake)
    probs = torch.softmax(torch.from_numpy(fake_logits), dim=1).numpy()
    is_mean, is_std = inception_style_score(probs, splits=10)
    return {"fid": fd_between(real_pool, fake_pool), "inception_is_mean": is_mean, "inception_is_std": is_std}
