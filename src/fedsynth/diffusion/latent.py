"""Latent denoisers from a Stable-Diffusion-layout pipeline folder (``model.init``).

A folder with ``model_index.json``, ``unet/`` (``UNet2DConditionModel``), ``vae/``
(``AutoencoderKL``), ``text_encoder/`` + ``tokenizer/`` (CLIP) and ``scheduler/`` — as a user
holds Stable Diffusion v1.5 — is read offline, once per process. Only the UNet trains; the
frozen parts are used once per party:

1. each class's prompt (``model.prompt``, ``{label}`` = the class name) and the empty prompt
   (the unconditional branch of classifier-free guidance) are encoded by the text encoder
   once: :class:`PromptUNet` looks the embedding up by class label, so the denoiser keeps the
   one call every stage makes, ``model(x_t, t, class_labels=y).sample``;
2. each party's images are encoded by the VAE once (the posterior mean, times the VAE's
   scaling factor) and cached by content (:func:`model_space`);
3. generated latents are decoded by the VAE (:func:`to_images`).

Code name → symbol: ``latents`` → z = s·E(x) (s: ``scaling_factor``), ``prompt_embeds`` → c_y
(c_∅ for the empty prompt), the denoiser → ε_θ(z_t, t, c_y).
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from peft.utils import set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from fedsynth.config import LoraConfig as LoraSettings
from fedsynth.config import is_pipeline_folder
from fedsynth.core.errors import ConfigError
from fedsynth.diffusion.lora import LORA_WEIGHTS, add_lora, has_lora, save_adapter

PARTS = {  # folder: (library, class) as model_index.json names them
    "unet": "UNet2DConditionModel",
    "vae": "AutoencoderKL",
    "text_encoder": "CLIPTextModel",
    "tokenizer": "CLIPTokenizer",
    "scheduler": None,  # any diffusers scheduler: its β's must match diffusion.*
}
ENCODE_BATCH = 64


def check_pipeline(path: Path) -> dict:
    """``model_index.json`` of a Stable-Diffusion-layout folder, every part present and of the
    expected class; a one-line ConfigError naming the first that is not."""
    try:
        index = json.loads((path / "model_index.json").read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.init = {str(path)!r}: model_index.json is unreadable ({err})") from None
    for part, expected in PARTS.items():
        entry = index.get(part)
        found = entry[1] if isinstance(entry, list) and len(entry) == 2 else None
        if found is None or not (path / part).is_dir():
            raise ConfigError(
                f"model.init = {str(path)!r} is not a Stable-Diffusion pipeline folder: no {part}/ "
                f"({expected or 'a scheduler'}) in it"
            )
        if expected is not None and found != expected:
            raise ConfigError(f"model.init = {str(path)!r}: {part} is a {found}, fedsynth needs a {expected}")
    return index


@dataclass(eq=False)
class FrozenParts:
    """What no one trains, shared by every copy of a model (``deepcopy`` keeps the reference)."""

    vae: AutoencoderKL
    scaling: float
    factor: int  # image side / latent side
    digest: str  # SHA-256 of the folder's weight files
    path: str  # the pipeline folder (resolved)

    def __deepcopy__(self, memo) -> FrozenParts:
        return self

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (gray ones as RGB) → z = s · mean of the VAE posterior."""
        vae = self.vae
        device = next(vae.parameters()).device
        chunks = []
        for start in range(0, len(images), ENCODE_BATCH):
            x = images[start : start + ENCODE_BATCH].to(device)
            x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
            chunks.append(vae.encode(x).latent_dist.mean.cpu() * self.scaling)
        return torch.cat(chunks)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, channels: int) -> torch.Tensor:
        """z → images in [-1, 1] with ``channels`` channels (gray: the mean of R, G and B)."""
        device = next(self.vae.parameters()).device
        chunks = []
        for start in range(0, len(latents), ENCODE_BATCH):
            z = latents[start : start + ENCODE_BATCH].to(device) / self.scaling
            x = self.vae.decode(z).sample.clamp(-1.0, 1.0)
            chunks.append(x.mean(1, keepdim=True) if channels == 1 else x)
        return torch.cat(chunks)


class PromptUNet(UNet2DConditionModel):
    """A text-conditioned UNet that takes class labels: label y selects the cached prompt
    embedding c_y (the last index: the empty prompt, c_∅). Its parameters and state dict are
    the UNet's own; the embeddings and the frozen parts are not weights."""

    null_index: int
    autocast: torch.dtype | None = None  # a half-precision base: forward under torch.autocast
    frozen: FrozenParts
    data_channels: int
    class_names: tuple[str, ...]
    template: str

    def condition_on(
        self, base: Base, class_names: tuple[str, ...], template: str, data_channels: int
    ) -> PromptUNet:
        """Cache c_y for each class's prompt and c_∅ (the last index) from ``base``'s text encoder."""
        embeds = prompt_embeddings(base, class_prompts(template, class_names))
        self.register_buffer("prompt_embeds", embeds, persistent=False)
        self.null_index = len(embeds) - 1
        self.frozen, self.data_channels = base.frozen, data_channels
        self.class_names, self.template = tuple(class_names), template
        return self

    def forward(self, sample, timestep, class_labels=None, encoder_hidden_states=None, **kwargs):
        if encoder_hidden_states is None:
            if class_labels is None:
                class_labels = torch.full((sample.shape[0],), self.null_index, device=sample.device)
            encoder_hidden_states = self.prompt_embeds[class_labels]
        if self.autocast is None:
            return super().forward(sample, timestep, encoder_hidden_states, **kwargs)
        with torch.autocast(sample.device.type, dtype=self.autocast):
            out = super().forward(sample, timestep, encoder_hidden_states, **kwargs)
        return UNet2DConditionOutput(sample=out.sample.float())

    def hold_in(self, dtype: str) -> PromptUNet:
        """The (frozen) weights in ``dtype`` ("float32": as they are); forward under autocast."""
        if dtype != "float32":
            self.autocast = getattr(torch, dtype)
            for p in self.parameters():
                p.data = p.data.to(self.autocast)
        return self


def _folder_digest(path: Path) -> str:
    """SHA-256 over the weight files of the pipeline's trained parts (names and bytes)."""
    h = hashlib.sha256()
    for part in ("unet", "vae", "text_encoder"):
        for f in sorted((path / part).glob("*.safetensors")) + sorted((path / part).glob("*.bin")):
            h.update(f"{part}/{f.name}|".encode())
            with f.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()


@dataclass(eq=False)
class Base:
    """A pipeline folder, read once: the UNet's weights and config, the frozen parts, the
    text encoder and tokenizer (for prompts), the scheduler's config."""

    unet_config: dict
    unet_weights: dict[str, torch.Tensor]
    frozen: FrozenParts
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler_config: dict


@functools.lru_cache(maxsize=2)
def load_base(path: str) -> Base:
    """The pipeline at ``path``, loaded offline (``local_files_only``) once per process."""
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = Path(path)
    check_pipeline(folder)
    offline = {"local_files_only": True}
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", low_cpu_mem_usage=False, **offline)
    vae = AutoencoderKL.from_pretrained(folder / "vae", local_files_only=True).eval().requires_grad_(False)
    text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", local_files_only=True).eval()
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    frozen = FrozenParts(vae, float(vae.config.scaling_factor), factor, _folder_digest(folder), str(folder))
    weights = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    return Base(dict(unet.config), weights, frozen, text_encoder, tokenizer, scheduler)


@torch.no_grad()
def prompt_embeddings(base: Base, prompts: list[str]) -> torch.Tensor:
    """c for each prompt: the text encoder's last hidden states, (n, tokens, width)."""
    tok = base.tokenizer
    ids = tok(
        prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
    )
    return base.text_encoder(ids.input_ids)[0].detach()


def class_prompts(template: str, class_names: tuple[str, ...]) -> list[str]:
    """One prompt per class, then the empty prompt (the unconditional branch)."""
    return [template.replace("{label}", name) for name in class_names] + [""]


def build_latent(
    path: str,
    image_size: int,
    channels: int,
    class_names: tuple[str, ...],
    template: str,
    dtype: str = "float32",
) -> PromptUNet:
    """The base's UNet as a :class:`PromptUNet` for ``class_names`` at ``image_size`` pixels,
    its weights held in ``dtype`` (``model.base_dtype``)."""
    base = load_base(str(Path(path).resolve()))
    if image_size % base.frozen.factor:
        raise ConfigError(
            f"data.image_size = {image_size} must be a multiple of the VAE factor {base.frozen.factor} "
            f"of model.init = {path!r}"
        )
    config = {k: v for k, v in base.unet_config.items() if not k.startswith("_")}
    unet = PromptUNet.from_config({**config, "sample_size": image_size // base.frozen.factor})
    unet.load_state_dict(base.unet_weights, strict=True)
    return unet.condition_on(base, class_names, template, channels).hold_in(dtype)


# ----------------------------------------------------------------------------- model/

BASE_JSON = "base.json"
TRAINED_MODULES = "trained_modules.safetensors"  # beside an adapter: the fully trained modules


def save_latent(folder: Path, model: PromptUNet, trained: list[str] | None = None) -> None:
    """A latent run's ``model/``: ``base.json`` (the pipeline's path and SHA-256, prompts, image
    size), then the adapter in diffusers' LoRA file (``pipe.load_lora_weights(folder)``) plus
    the modules ``train.trainable`` trained whole (``trained``'s keys outside the adapter) in
    ``trained_modules.safetensors``, or, without adapters, the fine-tuned UNet (``unet/``). The
    base's weights are not copied."""
    lora = model.peft_config["default"] if has_lora(model) else None  # rank, α, targets
    whole = sorted(k for k in trained or () if ".lora_" not in k) if lora is not None else []
    info = {
        "path": model.frozen.path,
        "sha256": model.frozen.digest,
        "prompt": model.template,
        "class_names": list(model.class_names),
        "image_size": model.config.sample_size * model.frozen.factor,
        "channels": model.data_channels,
        "lora": None
        if lora is None
        else {"rank": lora.r, "alpha": lora.lora_alpha, "targets": sorted(lora.target_modules)},
        "trained_modules": whole,
        "base_dtype": str(model.autocast or torch.float32).removeprefix("torch."),
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / BASE_JSON).write_text(json.dumps(info, indent=2) + "\n")
    if lora is None:
        model.save_pretrained(folder / "unet")
        return
    save_adapter(folder, model)
    if whole:
        state = model.state_dict()
        save_file({k: state[k].contiguous() for k in whole}, folder / TRAINED_MODULES)


def is_latent_model(folder: Path) -> bool:
    return (folder / BASE_JSON).is_file()


def load_latent(folder: Path) -> PromptUNet:
    """:func:`save_latent`'s model back: the base from its folder (its SHA-256 checked), then
    the adapter or the fine-tuned UNet."""
    info = json.loads((folder / BASE_JSON).read_text())
    if not is_pipeline_folder(info["path"]):
        raise ConfigError(f"{folder / BASE_JSON}: the base pipeline {info['path']!r} is not there")
    names = tuple(info["class_names"])
    dtype = info.get("base_dtype", "float32")
    unet = build_latent(info["path"], info["image_size"], info["channels"], names, info["prompt"], dtype)
    if unet.frozen.digest != info["sha256"]:
        raise ConfigError(
            f"the base at {info['path']!r} has SHA-256 {unet.frozen.digest}; this model was trained "
            f"from {info['sha256']}"
        )
    if info["lora"] is None:
        trained = PromptUNet.from_pretrained(folder / "unet", low_cpu_mem_usage=False)
        unet.load_state_dict(trained.state_dict(), strict=True)
        return unet
    lo = info["lora"]
    spec = LoraSettings(rank=lo["rank"], alpha=float(lo["alpha"]), targets=",".join(lo["targets"]))
    add_lora(unet, spec, seed=0)
    state = {k.removeprefix("unet."): v for k, v in load_file(folder / LORA_WEIGHTS).items()}
    result = set_peft_model_state_dict(unet, state)
    if result.unexpected_keys:
        raise ConfigError(
            f"{folder / LORA_WEIGHTS}: {result.unexpected_keys[0]} fits no adapter of the model"
        )
    if info.get("trained_modules"):
        whole = load_file(folder / TRAINED_MODULES)
        unknown = sorted(set(whole) - set(unet.state_dict()))
        if unknown:
            raise ConfigError(f"{folder / TRAINED_MODULES}: {unknown[0]} is no tensor of the model")
        unet.load_state_dict(whole, strict=False)
    return unet


_ENCODED: dict[tuple[str, str], torch.Tensor] = {}


def model_space(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """What ``model`` denoises: ``images`` themselves (pixel models), or their VAE latents
    (latent models), encoded once per process and content."""
    if not isinstance(model, PromptUNet):
        return images
    key = (model.frozen.digest, hashlib.sha256(images.detach().cpu().numpy().tobytes()).hexdigest())
    if key not in _ENCODED:
        _ENCODED[key] = model.frozen.encode(images)
    return _ENCODED[key]


def image_shape(model: torch.nn.Module) -> tuple[int, int, int]:
    """(channels, height, width) of the images ``model`` generates (after decoding)."""
    if isinstance(model, PromptUNet):
        side = model.config.sample_size * model.frozen.factor
        return (model.data_channels, side, side)
    return (model.config.in_channels, model.config.sample_size, model.config.sample_size)


def to_images(model: torch.nn.Module, samples: torch.Tensor) -> torch.Tensor:
    """Generated samples as images in [-1, 1]: decoded by the VAE for latent models."""
    if not isinstance(model, PromptUNet):
        return samples
    return model.frozen.decode(samples, model.data_channels)
