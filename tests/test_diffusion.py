import pytest
import torch
from diffusers import UNet2DModel

from fedsynth.config import DiffusionConfig, ModelConfig, TrainConfig
from fedsynth.core.errors import ConfigError
from fedsynth.data.datasets import ImageData
from fedsynth.diffusion.objective import diffusion_loss, drop_labels
from fedsynth.diffusion.sampling import generate
from fedsynth.diffusion.schedule import build_sampler, build_train_scheduler
from fedsynth.diffusion.training import make_ema, make_optimizer, steps_for, train_steps
from fedsynth.diffusion.unet import build_unet, count_parameters, null_label, seeded_unet


def _tiny(conditional=True, classes=3):
    torch.manual_seed(0)
    return build_unet(ModelConfig(preset="tiny", conditional=conditional), 8, 1, classes)


def test_presets_build_and_null_label():
    unet = _tiny()
    assert unet.config.num_class_embeds == 4 and null_label(unet) == 3
    assert null_label(_tiny(conditional=False)) is None
    small = build_unet(ModelConfig(preset="small"), 16, 1, 10)
    assert 0.5e6 < count_parameters(small) < 0.8e6  # ~0.65 M as measured in the design


@pytest.mark.parametrize("size", [16, 28])
def test_every_preset_takes_digits_and_fashion_mnist_sizes(size):
    from fedsynth.config import MODEL_PRESETS

    for preset in MODEL_PRESETS:
        unet = build_unet(ModelConfig(preset=preset), size, 1, 10)
        out = unet(torch.randn(1, 1, size, size), torch.tensor([3]), class_labels=torch.tensor([2])).sample
        assert out.shape == (1, 1, size, size), preset


def test_cosine_and_linear_schedules_differ():
    lin = build_train_scheduler(DiffusionConfig(schedule="linear"))
    cos = build_train_scheduler(DiffusionConfig(schedule="cosine"))
    assert torch.isclose(lin.betas[0], torch.tensor(1e-4)) and torch.isclose(
        lin.betas[-1], torch.tensor(0.02)
    )
    assert not torch.allclose(lin.alphas_cumprod, cos.alphas_cumprod)


def test_loss_matches_hand_computed_ddpm_objective():
    """L = ‖ε − ε_θ(√ᾱ_t x₀ + √(1−ᾱ_t) ε, t, y)‖², with the same draws of t and ε."""
    unet = _tiny()
    sched = build_train_scheduler(DiffusionConfig(num_train_timesteps=100))
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    y = torch.tensor([0, 1, 2, 0])
    loss = diffusion_loss(unet, sched, x0, y, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    t = torch.randint(0, 100, (4,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    abar = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    xt = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    expected = ((unet(xt, t, class_labels=y).sample - eps) ** 2).mean()
    assert torch.allclose(loss, expected, atol=1e-6)


def test_drop_labels_rate():
    labels = torch.zeros(10000, dtype=torch.long)
    dropped = drop_labels(labels, 0.25, 9, torch.Generator().manual_seed(0))
    assert set(dropped.unique().tolist()) == {0, 9}
    assert abs((dropped == 9).float().mean().item() - 0.25) < 0.02
    assert drop_labels(labels, 0.0, 9, torch.Generator()) is labels


def test_training_lowers_loss_on_fixed_batch():
    unet = _tiny()
    sched = build_train_scheduler(DiffusionConfig(num_train_timesteps=100))
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(16, 1, 8, 8)
    x[:, :, 2:6, 2:6] = 1.0
    data = ImageData(x * 2 - 1, torch.zeros(16, dtype=torch.long), ("a", "b", "c"))
    train = TrainConfig(lr=3e-3, batch_size=16)
    diff = DiffusionConfig(num_train_timesteps=100, cfg_dropout=0.0)
    opt = make_optimizer(unet, train)

    @torch.no_grad()
    def eval_loss():
        return float(diffusion_loss(unet, sched, data.images, data.labels, torch.Generator().manual_seed(1)))

    before = eval_loss()
    ema = make_ema(unet, 0.9)
    losses = train_steps(unet, opt, sched, data, steps=40, train=train, diffusion=diff, generator=g, ema=ema)
    assert len(losses) == 40
    assert eval_loss() < 0.5 * before


def test_penalty_and_after_backward_hooks_are_applied():
    unet = _tiny()
    sched = build_train_scheduler(DiffusionConfig(num_train_timesteps=10))
    data = ImageData(torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.long), ("a", "b", "c"))
    seen = []
    train = TrainConfig(lr=1e-3, batch_size=4, optimizer="sgd", grad_clip=0.0)
    before = [p.detach().clone() for p in unet.parameters()]
    train_steps(
        unet,
        make_optimizer(unet, train),
        sched,
        data,
        steps=2,
        train=train,
        diffusion=DiffusionConfig(num_train_timesteps=10),
        generator=torch.Generator(),
        after_backward=lambda m: [p.grad.zero_() for p in m.parameters()] and seen.append(1),
    )
    assert len(seen) == 2
    assert all(torch.equal(a, b) for a, b in zip(before, unet.parameters(), strict=True))


def test_trainable_modules_train_and_the_rest_keep_their_weights():
    unet = _tiny()
    sched = build_train_scheduler(DiffusionConfig(num_train_timesteps=10))
    data = ImageData(torch.randn(8, 1, 8, 8), torch.arange(8) % 3, ("a", "b", "c"))
    train = TrainConfig(lr=1e-2, batch_size=4, trainable="class_embedding, *.time_emb_proj")
    before = {k: v.detach().clone() for k, v in unet.named_parameters()}
    opt = make_optimizer(unet, train)
    chosen = {k for k in before if k.startswith("class_embedding.") or ".time_emb_proj." in k}
    assert len(chosen) >= 3 and sum(len(g["params"]) for g in opt.param_groups) == len(chosen)
    diffusion = DiffusionConfig(num_train_timesteps=10)
    train_steps(
        unet, opt, sched, data, steps=3, train=train, diffusion=diffusion, generator=torch.Generator()
    )
    moved = {k for k, p in unet.named_parameters() if not torch.equal(p, before[k])}
    assert moved == chosen
    with pytest.raises(ConfigError, match=r"train.trainable: 'mid_block.nothing' matches no parameter"):
        make_optimizer(unet, TrainConfig(trainable="class_embedding,mid_block.nothing"))


def test_steps_for_epochs():
    assert steps_for(TrainConfig(local_steps=7), 1000) == 7
    assert steps_for(TrainConfig(local_epochs=2, batch_size=64), 100) == 4  # ceil(200 / 64)


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpm"])
def test_samplers_shape_and_range(name):
    unet = _tiny().eval()
    train_sched = build_train_scheduler(DiffusionConfig(num_train_timesteps=100))
    sampler = build_sampler(name, train_sched, 5)
    assert len(sampler.timesteps) == 5
    out = generate(
        unet, sampler, torch.tensor([0, 1, 2]), guidance=2.0, generator=torch.Generator().manual_seed(0)
    )
    assert out.shape == (3, 1, 8, 8)
    assert out.min() >= -1 and out.max() <= 1 and torch.isfinite(out).all()


def test_sampling_is_deterministic_for_a_seed():
    unet = _tiny().eval()
    sched = build_train_scheduler(DiffusionConfig(num_train_timesteps=50))

    def draw(seed):
        return generate(
            unet,
            build_sampler("ddpm", sched, 4),
            torch.tensor([0, 1]),
            generator=torch.Generator().manual_seed(seed),
        )

    assert torch.equal(draw(1), draw(1)) and not torch.equal(draw(1), draw(2))


def test_guidance_combines_conditional_and_unconditional():
    """ε̃ = ε(∅) + w (ε(y) − ε(∅)); checked through one DDIM step."""
    unet = _tiny().eval()
    sched = build_train_scheduler(DiffusionConfig(num_train_timesteps=50))
    y = torch.tensor([1, 2])
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    out = generate(
        unet, build_sampler("ddim", sched, 1), y, guidance=3.0, generator=torch.Generator().manual_seed(0)
    )
    s = build_sampler("ddim", sched, 1)
    t = s.timesteps[0]
    with torch.no_grad():
        e_c = unet(x, t.expand(2), class_labels=y).sample
        e_u = unet(x, t.expand(2), class_labels=torch.tensor([3, 3])).sample
        expected = s.step(e_u + 3.0 * (e_c - e_u), t, x).prev_sample.clamp(-1, 1)
    assert torch.allclose(out, expected, atol=1e-5)


def test_unconditional_model_and_label_errors():
    unet = _tiny(conditional=False).eval()
    sched = build_train_scheduler(DiffusionConfig(num_train_timesteps=50))
    out = generate(
        unet, build_sampler("ddim", sched, 2), None, num_images=2, generator=torch.Generator().manual_seed(0)
    )
    assert out.shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match="unconditional"):
        generate(unet, build_sampler("ddim", sched, 2), torch.tensor([0]), generator=torch.Generator())


def test_save_load_roundtrip_is_exact(tmp_path):
    unet = _tiny()
    unet.save_pretrained(tmp_path / "unet")
    back = UNet2DModel.from_pretrained(tmp_path / "unet", low_cpu_mem_usage=False)
    a, b = unet.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_sampler_settings():
    sched = build_train_scheduler(DiffusionConfig(num_train_timesteps=50))
    with pytest.raises(ConfigError, match="choose one of: ddpm, ddim, dpm"):
        build_sampler("euler", sched, 5)
    with pytest.raises(ConfigError, match="between 1 and 50"):
        build_sampler("ddim", sched, 51)


def test_ema_warm_up_is_capped_by_the_decay_and_decay_zero_keeps_the_latest():
    net = torch.nn.Linear(1, 1, bias=False)

    def shadow(decay, weights):
        ema = make_ema(net, decay)
        for w in weights:
            net.weight.data.fill_(w)
            ema.step(net.parameters())
        return ema.shadow_params[0].item()

    # step 1 copies (4); step 2 uses d_2 = min(0.999, 2 / 11)
    assert shadow(0.999, (4.0, 8.0)) == pytest.approx(4 * 2 / 11 + 8 * 9 / 11)
    # step 2 uses min(0.1, 2 / 11) = 0.1, step 3 min(0.1, 3 / 12) = 0.1: the cap binds
    assert shadow(0.1, (4.0, 8.0, 0.0)) == pytest.approx((4 * 0.1 + 8 * 0.9) * 0.1)
    assert shadow(0.0, (4.0, 8.0)) == 8.0  # decay 0: the latest weights


def test_client_optimizer_state_carries_over_rounds_when_kept():
    from flwr.app import ArrayRecord

    from fedsynth.client.local import local_train
    from fedsynth.config import config_from_dict
    from fedsynth.core.records import record_torch

    cfg = config_from_dict({"model": {"preset": "tiny"}, "train": {"keep_optimizer": True, "local_steps": 2}})
    data = ImageData(torch.rand(8, 1, 16, 16) * 2 - 1, torch.arange(8) % 10, tuple("0123456789"))
    weights = build_unet(cfg.model, 16, 1, 10).state_dict()
    state: dict = {}
    update = local_train(cfg, data, weights, round_=1, client_id=0, state=state)
    steps = {k: v for k, v in state["optimizer"].items() if k.endswith("/step")}
    assert steps and all(float(v) == 2.0 for v in steps.values())
    saved = record_torch(ArrayRecord({k: v.contiguous() for k, v in state["optimizer"].items()}))
    state = {"optimizer": saved}  # as a client's context.state keeps it between rounds
    local_train(cfg, data, update.weights, round_=2, client_id=0, state=state)
    assert all(float(v) == 4.0 for k, v in state["optimizer"].items() if k.endswith("/step"))
    fresh: dict = {}
    local_train(
        config_from_dict({"model": {"preset": "tiny"}}), data, weights, round_=1, client_id=0, state=fresh
    )
    assert "optimizer" not in fresh  # off by default: a fresh optimizer every round


def test_model_init_starts_from_a_trained_model_at_any_image_size(tmp_path):
    trained = seeded_unet(ModelConfig(preset="tiny"), 1, 16, 1, 10)
    trained.save_pretrained(tmp_path / "run" / "model" / "unet")
    for path in (tmp_path / "run", tmp_path / "run" / "model", tmp_path / "run" / "model" / "unet"):
        started = seeded_unet(ModelConfig(preset="tiny", init=str(path)), 0, 8, 1, 10)
        assert started.sample_size == 8
        for name, tensor in trained.state_dict().items():
            assert torch.equal(started.state_dict()[name], tensor), name
    assert not torch.equal(
        seeded_unet(ModelConfig(preset="tiny"), 0, 8, 1, 10).conv_in.weight, trained.conv_in.weight
    )
    with pytest.raises(ConfigError, match=r"does not fit this model: conv_in\.weight is shape"):
        seeded_unet(ModelConfig(preset="small", init=str(tmp_path / "run")), 0, 16, 1, 10)
    with pytest.raises(ConfigError, match=r"class_embedding\.weight is shape"):
        seeded_unet(ModelConfig(preset="tiny", init=str(tmp_path / "run")), 0, 16, 1, 5)
    with pytest.raises(ConfigError, match="no trained model there"):
        seeded_unet(ModelConfig(preset="tiny", init=str(tmp_path / "nothing")), 0, 16, 1, 10)
