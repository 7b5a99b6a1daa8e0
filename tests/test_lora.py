"""LoRA adapters: the maths by hand, the adapter reaching every client, only adapters
travelling, and every paradigm, DP-SGD, resume and the saved model."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel
from safetensors.torch import load_file

from conftest import TINY_OVERRIDES
from fedsynth.config import (
    ConfigError,
    ExchangeConfig,
    LoraConfig,
    ModelConfig,
    config_from_dict,
    load_config,
)
from fedsynth.diffusion.lora import merged_unet, resolve_targets
from fedsynth.diffusion.training import trainable_parameters
from fedsynth.diffusion.unet import build_unet, seeded_unet
from fedsynth.exchange.transfer import WEIGHTS, Layout, ServerExchange, client_start
from fedsynth.pipeline import run_all

ROOT = Path(__file__).parents[1]
CENTRAL = ROOT / "configs" / "digits-centralized.toml"
FEDERATED = ROOT / "configs" / "digits-federated.toml"
LORA = ["lora.rank=2", "lora.alpha=4.0"]


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 1, 16, 16, generator=g), torch.tensor([5, 100, 900]), torch.tensor([0, 3, 9])


def _tiny(lora: LoraConfig, seed: int = 0) -> UNet2DModel:
    return seeded_unet(ModelConfig(preset="tiny"), seed, 16, 1, 10, lora)


def test_an_adapted_model_starts_as_its_base_and_merges_exactly():
    base = _tiny(LoraConfig())
    adapted = _tiny(LoraConfig(rank=2, alpha=4.0))
    x, t, y = _inputs()
    with torch.no_grad():
        assert torch.equal(base(x, t, class_labels=y).sample, adapted(x, t, class_labels=y).sample)  # B = 0
        for name, p in adapted.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.1)
        out = adapted(x, t, class_labels=y).sample
        merged = merged_unet(adapted)
        assert type(merged) is UNet2DModel and not torch.equal(out, base(x, t, class_labels=y).sample)
        torch.testing.assert_close(merged(x, t, class_labels=y).sample, out, atol=1e-5, rtol=1e-4)


def test_one_conv_layer_by_hand():
    """W' = W + α/r · B·A for a 3×3 convolution: B (out × r × 1 × 1), A (r × in × 3 × 3)."""
    adapted = _tiny(LoraConfig(rank=2, alpha=4.0))
    layer = adapted.down_blocks[0].resnets[0].conv1
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        B.normal_()
    delta = (B.flatten(1) @ A.flatten(1)).reshape(layer.base_layer.weight.shape) * (4.0 / 2)
    expected = layer.base_layer.weight + delta
    merged = merged_unet(adapted).state_dict()["down_blocks.0.resnets.0.conv1.weight"]
    torch.testing.assert_close(merged, expected)


def test_targets_default_to_the_layers_the_model_has_and_a_stray_name_is_an_error():
    plain = build_unet(ModelConfig(preset="tiny"), 16, 1, 10)  # attention only in its mid block
    assert resolve_targets(plain, LoraConfig(rank=1)) == [
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "conv1",
        "conv2",
    ]
    assert resolve_targets(plain, LoraConfig(rank=1, targets="conv1, time_emb_proj")) == [
        "conv1",
        "time_emb_proj",
    ]
    no_attention = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Linear(2, 2))
    with pytest.raises(ConfigError, match="none of the default target layers"):
        resolve_targets(no_attention, LoraConfig(rank=1))
    with pytest.raises(ConfigError, match=r"lora\.targets: 'to_nothing' matches no linear or convolution"):
        resolve_targets(plain, LoraConfig(rank=1, targets="conv1,to_nothing"))


def test_every_node_draws_the_same_A_and_only_the_adapters_train():
    one, two = _tiny(LoraConfig(rank=2)), _tiny(LoraConfig(rank=2))
    a_keys = [k for k in one.state_dict() if ".lora_A." in k]
    assert a_keys and all(torch.equal(one.state_dict()[k], two.state_dict()[k]) for k in a_keys)
    assert not torch.equal(
        _tiny(LoraConfig(rank=2), seed=1).state_dict()[a_keys[0]], one.state_dict()[a_keys[0]]
    )
    cfg = config_from_dict({"lora": {"rank": 2}})
    ffa = config_from_dict(
        {"lora": {"rank": 2, "aggregation": "ffa"}, "train": {"trainable": "class_embedding"}}
    )
    names = lambda model: {n for n, p in model.named_parameters() if p.requires_grad}  # noqa: E731
    trainable_parameters(one, cfg.trained_modules)
    assert names(one) == {k for k in one.state_dict() if ".lora_" in k}
    trainable_parameters(two, ffa.trained_modules)
    assert names(two) == {k for k in two.state_dict() if ".lora_B." in k or k.startswith("class_embedding.")}


def test_ffa_aggregate_is_the_mean_of_the_clients_updates_and_fedavg_of_factors_is_not():
    """FFA-LoRA: with A shared, mean_i(B_i)·A = mean_i(B_i·A) exactly. FedAvg of both factors:
    mean(B)·mean(A) differs from mean(B_i·A_i) (here by hand: 1.5·1.5 = 2.25 vs (1·1 + 2·2)/2 = 2.5)."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(2, 6, generator=g)
    B = [torch.randn(5, 2, generator=g) for _ in range(3)]
    n = [10, 30, 60]
    mean_b = sum(w * b for w, b in zip(n, B, strict=True)) / sum(n)  # FedAvg of the uploaded B
    exact = sum(w * (b @ A) for w, b in zip(n, B, strict=True)) / sum(n)
    torch.testing.assert_close(mean_b @ A, exact)
    a = [torch.tensor([[1.0]]), torch.tensor([[2.0]])]
    b = [torch.tensor([[1.0]]), torch.tensor([[2.0]])]
    mean_a, mean_b2 = (sum(x) / 2 for x in (a, b))
    assert (
        float(mean_b2 @ mean_a) == 2.25
        and float(sum(bi @ ai for ai, bi in zip(a, b, strict=True)) / 2) == 2.5
    )


def test_the_aggregated_adapter_reaches_the_client_and_changes_its_weights():
    """The classic federated-LoRA bug restores the global adapter by names that match nothing
    (peft strips ``.default``) and trains on from the client's old adapter. Here the server's
    adapter, sent by the model's own keys, is what the client's model holds and computes with."""
    cfg = config_from_dict({"lora": {"rank": 2}})
    server_model = _tiny(cfg.lora)
    with torch.no_grad():
        for name, p in server_model.named_parameters():
            if ".lora_B." in name:
                p.fill_(0.05)  # an aggregated adapter, far from the initial B = 0
    weights = server_model.state_dict()
    layout = Layout.of(weights, trainable=cfg.trained_modules)
    assert set(layout.sent) == {k for k in weights if ".lora_" in k}
    arrays, mode, _ = ServerExchange(ExchangeConfig(), layout).download(0, weights)
    assert mode == WEIGHTS and set(arrays) == set(layout.sent)  # the adapter only
    client_model = _tiny(cfg.lora)  # the client's own base (and initial adapter)
    base = {k: v for k, v in client_model.state_dict().items() if k in layout.frozen}
    start = client_start(ExchangeConfig(), layout, arrays, mode, {}, base)
    before = client_model(*_inputs()[:2], class_labels=_inputs()[2]).sample
    client_model.load_state_dict(start, strict=True)
    b_keys = [k for k in weights if ".lora_B." in k]
    assert all(torch.equal(client_model.state_dict()[k], torch.full_like(weights[k], 0.05)) for k in b_keys)
    after = client_model(*_inputs()[:2], class_labels=_inputs()[2]).sample
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, server_model(*_inputs()[:2], class_labels=_inputs()[2]).sample)


def test_lora_settings_without_a_rank_and_lora_with_the_classifier_task_are_refused():
    with pytest.raises(ConfigError, match=r"need lora\.rank > 0"):
        config_from_dict({"lora": {"aggregation": "ffa"}})
    with pytest.raises(ConfigError, match="not available with task = 'classifier'"):
        config_from_dict({"paradigm": "federated", "task": "classifier", "lora": {"rank": 2}})


def _adapter_numel(cfg) -> tuple[int, int]:
    """(parameters, tensors) of the adapter."""
    adapter = [
        v
        for k, v in seeded_unet(cfg.model, cfg.seed, 16, 1, 10, cfg.lora).state_dict().items()
        if ".lora_" in k
    ]
    return sum(v.numel() for v in adapter), len(adapter)


@pytest.mark.slow
def test_a_federated_lora_run_sends_only_the_adapter_and_saves_a_loadable_model(tmp_path):
    overrides = [*TINY_OVERRIDES, *LORA, 'federation.engine="in-process"', "federation.round_timeout=120.0"]
    overrides += ["eval.tsne_points=0", "eval.membership_samples=0", 'strategy.name="fedavgm"']
    cfg = load_config(FEDERATED, [*overrides, "federation.finetune_steps=2"])
    run = run_all(cfg, tmp_path / "run")
    adapter, tensors = _adapter_numel(cfg)
    *rounds, finetune = run.read_metrics()
    assert finetune["phase"] == "finetune" and len(run.client_runs()) == 2
    # the fine-tuned models come back as adapters too: the base stays with every client
    assert 2 * adapter * 4 <= finetune["bytes_up"] < 2 * (adapter * 4 + tensors * 200 + 2048)
    assert 2 * adapter * 4 <= finetune["bytes_down"] < 2 * (adapter * 4 + tensors * 200 + 8192)
    for record in rounds:  # every download and upload: the adapter, float32
        clients = len(record["clients"])
        assert record["params_up"] == record["params_down"] == clients * adapter
        # + per tensor its name, dtype and shape; + the client's report
        assert clients * adapter * 4 <= record["bytes_up"] < clients * (adapter * 4 + tensors * 200 + 2048)
    plain = UNet2DModel.from_pretrained(run.model, subfolder="unet")  # merged: a plain model
    assert not any("lora" in k or "base_layer" in k for k in plain.state_dict())
    saved = load_file(run.model / "pytorch_lora_weights.safetensors")
    assert sum(v.numel() for v in saved.values()) == adapter and all(k.startswith("unet.") for k in saved)
    assert json.loads(run.summary.read_text())["cas_accuracy"] >= 0.0
    assert "(`lora.rank`" in run.report.read_text()


@pytest.mark.slow
def test_centralized_lora_with_dp_sgd_trains_only_the_adapter_and_resumes_exactly(tmp_path):
    overrides = [*TINY_OVERRIDES, *LORA, "sample.per_class=0", "train.trainable=class_embedding"]
    dp = ['privacy.mode="dp-sgd"', "privacy.noise_multiplier=0.5", "privacy.max_grad_norm=0.1"]
    three = load_config(CENTRAL, [*overrides, *dp, "federation.rounds=3"])
    straight = run_all(three, tmp_path / "straight")
    run_all(load_config(CENTRAL, [*overrides, *dp, "federation.rounds=2"]), tmp_path / "resumed")
    # the checkpoints hold what trains, nothing of the frozen start
    checkpoint = tmp_path / "resumed" / "checkpoints" / "round-0002"
    saved = load_file(checkpoint / "unet" / "trained.safetensors")
    assert saved and all(".lora_" in k or k.startswith("class_embedding.") for k in saved)
    assert sorted(p.name for p in (checkpoint / "unet").iterdir()) == ["trained.safetensors"]
    assert not (checkpoint / "ema").exists()
    resumed = run_all(three, tmp_path / "resumed", resume=True)
    a = UNet2DModel.from_pretrained(straight.model, subfolder="unet").state_dict()
    b = UNet2DModel.from_pretrained(resumed.model, subfolder="unet").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    base = seeded_unet(three.model, three.seed, 16, 1, 10)  # no adapter: the frozen start
    moved = {k for k, v in base.state_dict().items() if not torch.equal(v, a[k])}
    adapted = tuple(f".{t}" for t in ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"))
    assert "class_embedding.weight" in moved and any(k.endswith(".conv1.weight") for k in moved)
    assert moved <= {
        k for k in a if k.startswith("class_embedding.") or k.rsplit(".", 1)[0].endswith(adapted)
    }
    assert json.loads(straight.summary.read_text())["epsilon"] > 0


def test_a_decentralized_trainer_uploads_only_the_adapter(tmp_path):
    from fedsynth.core.protocol import config_text
    from fedsynth.ledger.store import open_store
    from fedsynth.runtime.ledger_node import train_update

    over = [*TINY_OVERRIDES, 'paradigm="decentralized"', "ledger.aggregators=2", *LORA]
    cfg = load_config(CENTRAL, over)
    weights = seeded_unet(cfg.model, cfg.seed, 16, 1, 10, cfg.lora).state_dict()
    store = open_store("", tmp_path)
    result = train_update(config_text(cfg), "", str(tmp_path), 0, 1, store.put_weights(weights))
    uploaded = store.get_weights(result.cid)
    assert sorted(uploaded) == sorted(k for k in weights if ".lora_" in k)
    assert any(not torch.equal(uploaded[k], weights[k]) for k in uploaded if ".lora_B." in k)


def test_ffa_keeps_a_at_its_shared_start_in_a_trained_client(tmp_path):
    from fedsynth.client.local import local_train
    from fedsynth.stages.prepare import prepare

    cfg = load_config(FEDERATED, [*TINY_OVERRIDES, *LORA, 'lora.aggregation="ffa"'])
    data = prepare(cfg).client_data(0)
    start = seeded_unet(cfg.model, cfg.seed, 16, 1, 10, cfg.lora).state_dict()
    update = local_train(cfg, data, start, round_=1, client_id=0, state={})
    a_keys = [k for k in start if ".lora_A." in k]
    b_keys = [k for k in start if ".lora_B." in k]
    assert all(torch.equal(update.weights[k], start[k]) for k in a_keys)
    assert all(not torch.equal(update.weights[k], start[k]) for k in b_keys)
    others = [k for k in start if ".lora_" not in k]
    assert all(torch.equal(update.weights[k], start[k]) for k in others)


@pytest.mark.slow
def test_a_decentralized_lora_run_moves_only_the_adapter_through_the_ledger(tmp_path):
    over = [*TINY_OVERRIDES, *LORA, 'paradigm="decentralized"', "ledger.aggregators=2"]
    over += ["ledger.trainer_workers=2", "sample.per_class=0", "eval.enabled=false"]
    cfg = load_config(CENTRAL, over)
    run = run_all(cfg, tmp_path / "run")
    start = seeded_unet(cfg.model, cfg.seed, 16, 1, 10, cfg.lora).state_dict()
    whole = sum(v.numel() * 4 for v in start.values())
    adapter = sum(v.numel() * 4 for k, v in start.items() if ".lora_" in k)
    for record in run.read_metrics():
        # per round: 2 trainers and 2 aggregators fetch the round model, the aggregators the
        # 2 updates, the owner the agreed model — 9 adapter-sized downloads, no whole model
        assert 9 * adapter <= record["bytes_down"] < min(whole, 9 * (adapter + 64 * 1024))
    checkpoint = load_file(run.latest_checkpoint() / "unet" / "trained.safetensors")
    assert sorted(checkpoint) == sorted(k for k in start if ".lora_" in k)
    assert any(not torch.equal(checkpoint[k], start[k]) for k in checkpoint if ".lora_B." in k)


@pytest.mark.parametrize("codec", ["fp32", "fp16", "bf16", "int8", "topk"])
def test_every_codec_carries_the_adapter_and_nothing_of_the_base(codec):
    from fedsynth.config import ExchangeConfig as Exchange
    from fedsynth.exchange.groups import GROUPS
    from fedsynth.exchange.transfer import client_reply

    cfg = config_from_dict({"lora": {"rank": 2}})
    server_w = _tiny(cfg.lora).state_dict()
    layout = Layout.of(server_w, trainable=cfg.trained_modules)
    adapter = {k for k in server_w if ".lora_" in k}
    numel, whole = (sum(server_w[k].numel() for k in keys) for keys in (adapter, server_w))
    ex = Exchange(codec=codec, topk_ratio=1.0)  # top-k keeping every entry: exact but for its own rounding
    server, state = ServerExchange(ex, layout), {}
    base = {k: v for k, v in _tiny(cfg.lora).state_dict().items() if k in layout.frozen}
    for round_ in range(2):
        arrays, mode, _ = server.download(0, server_w)
        if mode == WEIGHTS:
            assert set(arrays) <= adapter  # the base never travels, whatever the codec
        else:  # a codec's packed delta (values, indices or scales): the adapter's size, not the model's
            assert sum(np.asarray(v).size for v in arrays.values()) <= 2 * numel + 64 < whole
        start = client_start(ex, layout, arrays, mode, state, base)
        for k in adapter:  # the client starts from the server's adapter, to the codec's precision
            torch.testing.assert_close(start[k].float(), server_w[k].float(), atol=0.02, rtol=0.02)
        new = {k: v + 0.01 * (round_ + 1) if k in adapter else v for k, v in start.items()}
        reply = client_reply(ex, layout, start, new, GROUPS, state)
        back = server.upload(reply, layout.keys(GROUPS), server_w)
        assert set(back) == adapter
        for k in adapter:
            torch.testing.assert_close(back[k].float(), new[k].float(), atol=0.02, rtol=0.02)
        server_w = {**server_w, **back}
