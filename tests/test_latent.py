"""Starting from a Stable-Diffusion-layout pipeline folder: the exact code path a real SD-1.5
folder takes, on a tiny random pipeline built offline (``sd_tiny.py``)."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from conftest import TINY_OVERRIDES
from fedsynth.config import ConfigError, load_config
from fedsynth.core.rundir import RunDir
from fedsynth.diffusion.latent import PromptUNet, load_base, model_space, to_images
from fedsynth.diffusion.unet import seeded_unet
from fedsynth.pipeline import run_all
from fedsynth.stages.checkpoint import load_model
from sd_tiny import LATENT_SETTINGS, build_tiny_pipeline

ROOT = Path(__file__).parents[1]
CENTRAL = ROOT / "configs" / "digits-centralized.toml"
FEDERATED = ROOT / "configs" / "digits-federated.toml"
NAMES = tuple(str(i) for i in range(10))


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    return build_tiny_pipeline(tmp_path_factory.mktemp("sd") / "tiny-sd")


def _settings(pipeline: Path, *more: str) -> list[str]:
    return [
        *TINY_OVERRIDES,
        *LATENT_SETTINGS,
        f"model.init='{pipeline}'",
        "eval.tsne_points=0",
        "eval.membership_samples=8",
        *more,
    ]


def _latent(pipeline: Path, lora=None) -> PromptUNet:
    cfg = load_config(CENTRAL, _settings(pipeline, *(lora or [])))
    return seeded_unet(cfg.model, 0, 16, 1, 10, cfg.lora, class_names=NAMES)


def test_class_labels_select_their_prompts_and_the_null_label_the_empty_prompt(pipeline):
    unet = _latent(pipeline)
    assert isinstance(unet, PromptUNet) and unet.null_index == 10 and unet.config.sample_size == 8
    base = load_base(str(pipeline.resolve()))
    z, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([3, 3])
    with torch.no_grad():
        by_label = unet(z, t, class_labels=torch.tensor([3, 10])).sample
        embeds = base.text_encoder(
            base.tokenizer(
                ["a photo of a 3", ""], padding="max_length", max_length=16, return_tensors="pt"
            ).input_ids
        )[0]
        by_text = unet(z, t, encoder_hidden_states=embeds).sample
    torch.testing.assert_close(by_label, by_text)


def test_images_are_encoded_once_and_decoded_to_the_datas_channels(pipeline):
    unet = _latent(pipeline)
    images = torch.rand(5, 1, 16, 16) * 2 - 1
    z = model_space(unet, images)
    assert z.shape == (5, 4, 8, 8) and model_space(unet, images) is z  # cached
    back = to_images(unet, z)
    assert back.shape == (5, 1, 16, 16) and back.min() >= -1 and back.max() <= 1


def test_bad_pipeline_folders_and_sizes_are_one_line_errors(pipeline, tmp_path):
    no_vae = Path(shutil.copytree(pipeline, tmp_path / "no-vae"))
    shutil.rmtree(no_vae / "vae")
    with pytest.raises(
        ConfigError, match=r"not a Stable-Diffusion pipeline folder: no vae/ \(AutoencoderKL\)"
    ):
        _latent(no_vae)
    other = Path(shutil.copytree(pipeline, tmp_path / "other"))
    index = json.loads((other / "model_index.json").read_text())
    (other / "model_index.json").write_text(json.dumps({**index, "unet": ["diffusers", "UNet2DModel"]}))
    with pytest.raises(ConfigError, match="unet is a UNet2DModel, fedsynth needs a UNet2DConditionModel"):
        _latent(other)
    cfg = load_config(CENTRAL, _settings(pipeline, "data.image_size=15"))
    with pytest.raises(ConfigError, match=r"data\.image_size = 15 must be a multiple of the VAE factor 2"):
        seeded_unet(cfg.model, 0, 15, 1, 10, class_names=NAMES)
    with pytest.raises(ConfigError, match=r"diffusion.schedule = 'linear' does not match"):
        run_all(load_config(CENTRAL, _settings(pipeline, 'diffusion.schedule="linear"')), tmp_path / "r")
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_federated_lora_from_a_pipeline_sends_only_the_adapter_samples_evaluates_and_resumes(
    pipeline, tmp_path
):
    lora = ["lora.rank=2", 'federation.engine="in-process"', "federation.round_timeout=120.0"]
    cfg = load_config(FEDERATED, _settings(pipeline, *lora))
    run = run_all(cfg, tmp_path / "run")
    adapter = {k: v for k, v in _latent(pipeline, ["lora.rank=2"]).state_dict().items() if ".lora_" in k}
    numel = sum(v.numel() for v in adapter.values())
    for record in run.read_metrics():
        assert record["params_up"] == record["params_down"] == len(record["clients"]) * numel
    summary = json.loads(run.summary.read_text())
    assert {"fd", "cas_accuracy", "mia_auc"} <= set(summary)
    assert len(list(run.synthetic.glob("*/*.png"))) == 30 and (run.root / "samples.png").is_file()
    base = json.loads((run.model / "base.json").read_text())
    assert base["path"] == str(pipeline.resolve()) and len(base["sha256"]) == 64
    assert not (run.model / "unet").exists()  # the base never leaves its folder
    saved = load_file(run.model / "pytorch_lora_weights.safetensors")
    assert sum(v.numel() for v in saved.values()) == numel
    # the run's model in diffusers' own pipeline: base + adapter, as a user loads it
    pipe = StableDiffusionPipeline.from_pretrained(pipeline, local_files_only=True)
    pipe.load_lora_weights(run.model)
    unet, _ = load_model(RunDir(run.root), torch.device("cpu"))
    z, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([7])
    with torch.no_grad():
        ours = unet(z, t, class_labels=torch.tensor([10])).sample  # the empty prompt
        embeds = unet.prompt_embeds[10:11]
        theirs = pipe.unet(z, t, encoder_hidden_states=embeds).sample
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    checkpoint = load_file(run.root / "checkpoints" / "round-0002" / "unet" / "trained.safetensors")
    assert set(checkpoint) == set(adapter)  # not the base: a checkpoint of SD-1.5 is the adapter's size
    resumed = run_all(
        load_config(FEDERATED, _settings(pipeline, *lora, "federation.rounds=3")), run.root, resume=True
    )
    assert [m["round"] for m in resumed.read_metrics()] == [1, 2, 3]


@pytest.mark.slow
def test_dp_sgd_on_the_adapter_of_a_latent_denoiser(pipeline, tmp_path):
    dp = ['privacy.mode="dp-sgd"', "privacy.noise_multiplier=1.0", "lora.rank=2", "sample.per_class=0"]
    run = run_all(load_config(CENTRAL, _settings(pipeline, *dp)), tmp_path / "dp")
    assert json.loads(run.summary.read_text())["epsilon"] > 0
    assert (run.model / "pytorch_lora_weights.safetensors").is_file()


def test_a_client_whose_base_differs_refuses(pipeline, tmp_path):
    from fedsynth.exchange.codecs import CodecError
    from fedsynth.exchange.transfer import Layout, check_base

    cfg = load_config(FEDERATED, _settings(pipeline, "lora.rank=2"))
    ours = Layout.of(_latent(pipeline, ["lora.rank=2"]).state_dict(), trainable=cfg.trained_modules)
    other = build_tiny_pipeline(tmp_path / "their-sd", seed=1)
    theirs = Layout.of(_latent(other, ["lora.rank=2"]).state_dict(), trainable=cfg.trained_modules)
    check_base(ours.base_digest, ours)
    with pytest.raises(
        CodecError, match=f"SHA-256 {theirs.base_digest} here, {ours.base_digest} on the server"
    ):
        check_base(ours.base_digest, theirs)


def test_a_decentralized_trainer_uploads_only_the_adapter_of_a_latent_denoiser(pipeline, tmp_path):
    from fedsynth.core.protocol import config_text
    from fedsynth.ledger.store import open_store
    from fedsynth.runtime.ledger_node import train_update

    over = _settings(pipeline, 'paradigm="decentralized"', "ledger.aggregators=2", "lora.rank=2")
    cfg = load_config(CENTRAL, over)
    weights = seeded_unet(cfg.model, cfg.seed, 16, 1, 10, cfg.lora, class_names=NAMES).state_dict()
    store = open_store("", tmp_path)
    result = train_update(config_text(cfg), "", str(tmp_path), 0, 1, store.put_weights(weights))
    uploaded = store.get_weights(result.cid)
    assert sorted(uploaded) == sorted(k for k in weights if ".lora_" in k)


@pytest.mark.slow
def test_a_latent_adapter_with_trainable_modules_saves_and_reloads_both(pipeline, tmp_path):
    from fedsynth.diffusion.training import make_ema
    from fedsynth.stages.checkpoint import ema_unet, load_checkpoint

    more = ["lora.rank=2", "train.trainable='conv_in'", "sample.per_class=0", "eval.enabled=false"]
    run = run_all(load_config(CENTRAL, _settings(pipeline, *more)), tmp_path / "r")
    whole = load_file(run.model / "trained_modules.safetensors")
    assert sorted(whole) == ["conv_in.bias", "conv_in.weight"]
    assert json.loads((run.model / "base.json").read_text())["trained_modules"] == sorted(whole)
    loaded, _ = load_model(RunDir(run.root), torch.device("cpu"))
    start = _latent(pipeline, more)
    assert not torch.equal(loaded.state_dict()["conv_in.weight"], start.state_dict()["conv_in.weight"])
    # model/ gives back exactly the last checkpoint's EMA model: adapter and conv_in alike
    last = load_checkpoint(run.latest_checkpoint(), lambda m: make_ema(m, 0.999), torch.device("cpu"), start)
    expected = ema_unet(last.unet, last.ema).state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in loaded.state_dict().items())


def test_a_half_precision_base_keeps_adapters_in_float32_and_predicts_like_the_full_one(pipeline):
    full = _latent(pipeline, ["lora.rank=2"])
    z, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([3, 9])
    with torch.no_grad():
        reference = full(z, t, class_labels=torch.tensor([1, 10])).sample
    for dtype in ("bfloat16", "float16"):
        half = _latent(pipeline, ["lora.rank=2", f"model.base_dtype='{dtype}'"])
        kinds = {n: p.dtype for n, p in half.named_parameters()}
        assert {d for n, d in kinds.items() if ".lora_" in n} == {torch.float32}
        assert {d for n, d in kinds.items() if ".lora_" not in n} == {getattr(torch, dtype)}
        pred = half(z, t, class_labels=torch.tensor([1, 10])).sample
        assert pred.dtype == torch.float32
        torch.testing.assert_close(pred.detach(), reference, atol=0.05, rtol=0.05)
        pred.pow(2).mean().backward()  # gradients reach the float32 adapters
        assert all(p.grad is not None for n, p in half.named_parameters() if ".lora_B" in n)


@pytest.mark.parametrize(
    ("more", "message"),
    [
        ([], "needs lora.rank > 0 and no train.trainable"),
        (["lora.rank=2", "train.trainable='conv_in'"], "needs lora.rank > 0 and no train.trainable"),
        (
            ["lora.rank=2", 'privacy.mode="dp-sgd"', "privacy.noise_multiplier=1.0"],
            "not available with privacy",
        ),
    ],
)
def test_a_half_precision_base_is_refused_where_it_cannot_hold(pipeline, more, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CENTRAL, _settings(pipeline, "model.base_dtype='bfloat16'", *more))
    with pytest.raises(
        ConfigError, match=r"model.base_dtype = 'float16' needs a pipeline folder in model.init"
    ):
        load_config(CENTRAL, [*TINY_OVERRIDES, "model.base_dtype='float16'", "lora.rank=2"])


@pytest.mark.slow
def test_a_bfloat16_base_trains_its_adapter_saves_and_reloads(pipeline, tmp_path):
    more = ["lora.rank=2", "model.base_dtype='bfloat16'", "sample.per_class=1", "eval.enabled=false"]
    run = run_all(load_config(CENTRAL, _settings(pipeline, *more)), tmp_path / "r")
    assert all(math.isfinite(m["train_loss"]) for m in run.read_metrics())
    assert json.loads((run.model / "base.json").read_text())["base_dtype"] == "bfloat16"
    loaded, _ = load_model(RunDir(run.root), torch.device("cpu"))
    assert loaded.autocast == torch.bfloat16 and loaded.conv_in.weight.dtype == torch.bfloat16
    saved = load_file(run.model / "pytorch_lora_weights.safetensors")
    assert {v.dtype for v in saved.values()} == {torch.float32}
    assert len(list(run.synthetic.glob("*/*.png"))) == 10
