import json
import math

import pytest
import torch
from diffusers import UNet2DModel
from opacus import GradSampleModule

from conftest import TINY_OVERRIDES
from fedsynth.config import DiffusionConfig, ModelConfig, PrivacyConfig, config_from_dict, load_config
from fedsynth.core.errors import ConfigError
from fedsynth.diffusion.schedule import build_train_scheduler
from fedsynth.diffusion.unet import init_folder, seeded_unet
from fedsynth.privacy.accounting import PrivacyBudgetError, PrivacyLedger, calibrate, epsilon
from fedsynth.privacy.dpsgd import ClipGroups, clip_and_noise, clip_groups, poisson_batch

DP = ['privacy.mode="dp-sgd"', "privacy.target_epsilon=5"]


def _attn_unet() -> UNet2DModel:
    """A tiny UNet with attention blocks, as in the `base` preset."""
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=8,
        num_class_embeds=3,
    )


def _draws(multiplicity: int):
    """Three examples, their K (t, ε) draws from seed 2 (rows k·B + i), and the scheduler."""
    scheduler = build_train_scheduler(DiffusionConfig(num_train_timesteps=50))
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2])
    gen = torch.Generator().manual_seed(2)
    xs = x.repeat(multiplicity, 1, 1, 1)
    t = torch.randint(0, 50, (3 * multiplicity,), generator=gen)
    noise = torch.randn(xs.shape, generator=gen)
    return scheduler, x, y, scheduler.add_noise(xs, noise, t), t, noise


def _reference(unet, multiplicity: int) -> list[torch.Tensor]:
    """Per-example gradients of ℓ_i = (1/K) Σ_k ‖ε − ε_θ‖², one row at a time."""
    _, _, y, noisy, t, noise = _draws(multiplicity)
    params = list(unet.parameters())
    want = [torch.zeros(3, *p.shape) for p in params]
    for row in range(3 * multiplicity):
        unet.zero_grad()
        pred = unet(
            noisy[row : row + 1], t[row : row + 1], class_labels=y.repeat(multiplicity)[row : row + 1]
        )
        (((pred.sample - noise[row : row + 1]) ** 2).mean() / multiplicity).backward()
        for w, p in zip(want, params, strict=True):
            w[row % 3] += p.grad
    return want


def _ours(unet, multiplicity: int) -> list[torch.Tensor]:
    from fedsynth.config import TrainConfig
    from fedsynth.data.datasets import ImageData
    from fedsynth.privacy.dpsgd import PrivateGradients

    scheduler, x, y, *_ = _draws(multiplicity)
    privacy = PrivacyConfig(mode="dp-sgd", noise_multiplier=1.0, noise_multiplicity=multiplicity)
    private = PrivateGradients(
        unet, scheduler, ImageData(x, y, ("a", "b", "c")), train=TrainConfig(batch_size=3),
        diffusion=DiffusionConfig(num_train_timesteps=50, cfg_dropout=0.0), privacy=privacy,
        generator=torch.Generator().manual_seed(2),
    )  # fmt: skip
    grads, _ = private.per_example(torch.arange(3))
    return grads


def _opacus_hooks(unet) -> list[torch.Tensor]:
    """Opacus' default per-example gradients (``hooks`` mode) of the same losses, K = 1."""
    _, _, y, noisy, t, noise = _draws(1)
    params = list(unet.parameters())
    model = GradSampleModule(unet, batch_first=True, loss_reduction="sum")
    ((model(noisy, t, class_labels=y).sample - noise) ** 2).flatten(1).mean(1).sum().backward()
    got = [p.grad_sample.clone() for p in params]
    model._close()
    return got


def _mismatched(got, want) -> list[int]:
    """Parameters whose per-example gradients differ (atol: key biases have a zero gradient)."""
    pairs = enumerate(zip(got, want, strict=True))
    return [i for i, (g, w) in pairs if not torch.allclose(g, w, rtol=1e-3, atol=1e-6)]


@pytest.mark.parametrize(("multiplicity", "rows_per_pass"), [(1, 128), (2, 128), (2, 2)])
def test_per_example_gradients_match_one_example_at_a_time(multiplicity, rows_per_pass, monkeypatch):
    """K = 2 and two rows a pass: three passes of one example's two rows each."""
    monkeypatch.setattr("fedsynth.privacy.dpsgd.ROWS_PER_PASS", rows_per_pass)
    unet = _attn_unet()
    assert _mismatched(_ours(unet, multiplicity), _reference(unet, multiplicity)) == []


def test_opacus_hooks_mode_gets_the_convolutions_after_attention_wrong():
    """Why dpsgd.py does not use Opacus' default: it fails the same comparison."""
    unet = _attn_unet()
    got, want = _opacus_hooks(unet), _reference(unet, 1)
    wrong = _mismatched(got, want)
    names = [n for n, _ in _attn_unet().named_parameters()]
    assert wrong and all(got[i].abs().max() == 0 for i in wrong), [names[i] for i in wrong]


def test_clip_and_noise_by_hand():
    # two examples, two parameters: g_1 = ([3], [4]) has norm 5, g_2 = ([0.3], [0.4]) norm 0.5
    per_example = [torch.tensor([[3.0], [0.3]]), torch.tensor([[4.0], [0.4]])]
    out = clip_and_noise(
        per_example, groups=ClipGroups.whole(2, 1.0), noise_multiplier=0.0, expected_batch=2.0,
        generator=torch.Generator(),
    )  # fmt: skip
    # g_1 scaled by 1/5 → (0.6, 0.8); g_2 kept; sum (0.9, 1.2) / 2
    assert torch.allclose(out[0], torch.tensor([0.45]), atol=1e-5)
    assert torch.allclose(out[1], torch.tensor([0.6]), atol=1e-5)


def _privatise(per_example, groups, sigma=0.0, batch=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return clip_and_noise(
        per_example, groups=groups, noise_multiplier=sigma, expected_batch=batch, generator=gen
    )


def test_clipped_sum_is_bounded_and_the_noise_has_std_sigma_c_over_qn():
    gen = torch.Generator().manual_seed(0)
    big = [torch.randn(50, 1000, generator=gen) * 100]
    assert _privatise(big, ClipGroups.whole(1, 2.0))[0].norm() <= 50 * 2.0 + 1e-3  # Σ of 50 clipped
    noisy = _privatise([torch.zeros(0, 200_000)], ClipGroups.whole(1, 2.0), sigma=1.5, batch=4.0)
    assert float(noisy[0].std()) == pytest.approx(1.5 * 2.0 / 4.0, rel=0.01)


def test_projection_onto_the_public_subspace_by_hand():
    """Step 5 over the flattened gradients (1, 2, 3): V = [e1, (e2 + e3)/√2] gives (1, 2.5, 2.5)."""
    from fedsynth.privacy.dpsgd import project

    basis = torch.tensor([[1.0, 0.0], [0.0, 0.5**0.5], [0.0, 0.5**0.5]])
    got = project([torch.tensor([1.0, 2.0]), torch.tensor([[3.0]])], basis)
    assert torch.allclose(got[0], torch.tensor([1.0, 2.5])) and torch.allclose(got[1], torch.tensor([[2.5]]))


def _private(unet, privacy: PrivacyConfig):
    from fedsynth.config import TrainConfig
    from fedsynth.data.datasets import ImageData
    from fedsynth.privacy.dpsgd import PrivateGradients

    gen = torch.Generator().manual_seed(3)
    data = ImageData(torch.rand(40, 1, 8, 8, generator=gen) * 2 - 1, torch.arange(40) % 3, ("a", "b", "c"))
    return PrivateGradients(
        unet, build_train_scheduler(DiffusionConfig(num_train_timesteps=50)), data,
        train=TrainConfig(batch_size=8), diffusion=DiffusionConfig(num_train_timesteps=50), privacy=privacy,
        generator=gen,
    )  # fmt: skip


def test_public_subspace_is_orthonormal_and_every_step_stays_in_it():
    from fedsynth.diffusion.unet import build_unet

    unet = build_unet(ModelConfig(preset="tiny"), 8, 1, 10)
    privacy = PrivacyConfig(
        mode="dp-sgd", noise_multiplier=1.0, public_subspace="digits", subspace_dim=5, subspace_examples=12
    )
    private = _private(unet, privacy)
    v = private.basis
    assert v.shape == (sum(p.numel() for p in unet.parameters()), 5)
    assert torch.allclose(v.T @ v, torch.eye(5), atol=1e-4)  # float32 SVD over 165k coordinates
    private.step()
    g = torch.cat([p.grad.flatten() for p in private.params])
    assert g.norm() > 0 and (v @ (v.T @ g) - g).norm() < 1e-3 * g.norm()  # not in V: ~1
    with pytest.raises(ConfigError, match=r"'digits' has 10 classes, the model 2"):
        _private(_attn_unet(), privacy)  # public labels the model has no embedding for


def test_clip_groups_by_hand():
    names = ["class_embedding.weight", "conv.weight", "conv.bias", "class_embedding_extra.weight"]
    groups = clip_groups(names, 2.0, "class_embedding=0.01:0.2")
    assert groups.of == [0, 1, 1, 1]  # a module's name, not the start of any name
    unet_names = ["class_embedding.weight", "down_blocks.0.resnets.0.time_emb_proj.weight", "conv_in.bias"]
    assert clip_groups(unet_names, 1.0, "*.time_emb_proj=0.03").of == [1, 0, 1]  # shell wildcards
    assert groups.norms == [0.01, 2.0]
    # noise std per unit σ: C_G / √s_G, the rest taking the share left (0.8)
    assert groups.noise == pytest.approx([0.01 / math.sqrt(0.2), 2.0 / math.sqrt(0.8)])
    # no share given: the embedding and the rest split the budget evenly
    assert clip_groups(names, 2.0, "class_embedding=0.01").noise == pytest.approx(
        [0.01 * math.sqrt(2), 2.0 * math.sqrt(2)]
    )
    assert clip_groups(names, 2.0) == ClipGroups.whole(4, 2.0)  # no groups: C, noise σC
    # every parameter in a listed group: the empty rest takes no share
    covered = clip_groups(["emb", "conv"], 1.0, "emb=0.1,conv=0.5:0.75")
    assert covered.noise == pytest.approx([0.1 / math.sqrt(0.25), 0.5 / math.sqrt(0.75), 0.0])


def test_group_clipping_by_hand():
    # one example: embedding gradient (0.03, 0.04) (norm 0.05), the rest (6, 8) (norm 10)
    per_example = [torch.tensor([[0.03, 0.04]]), torch.tensor([[6.0, 8.0]])]
    grouped = _privatise(per_example, clip_groups(["emb", "rest"], 1.0, "emb=0.01:0.5"))
    # each group to its own norm: the embedding to 0.01 → (0.006, 0.008), the rest to 1 → (0.6, 0.8)
    assert torch.allclose(grouped[0], torch.tensor([0.006, 0.008]), atol=1e-6)
    assert torch.allclose(grouped[1], torch.tensor([0.6, 0.8]), atol=1e-5)
    # whole-gradient clipping at 1 scales both by 1 / ‖(0.03, 0.04, 6, 8)‖ ≈ 1/10
    whole = _privatise(per_example, ClipGroups.whole(2, 1.0))
    assert torch.allclose(whole[0], torch.tensor([0.03, 0.04]) / math.sqrt(100.0025), atol=1e-6)


def test_group_clipping_is_the_unit_gaussian_mechanism_rescaled():
    """Each example's clipped groups scaled by √s_G / C_G lie in the unit ball, and the noise
    of group G is σ C_G / √s_G: the Gaussian mechanism with sensitivity 1, noise σ, rescaled."""
    gen = torch.Generator().manual_seed(0)
    groups = clip_groups(["emb", "a", "b"], 2.0, "emb=0.01:0.1,b=0.5")
    shares = [0.1, 0.45, 0.45]  # emb's own; b and the rest ("a") split 0.9
    for _ in range(20):
        one = [torch.randn(1, 7, generator=gen) * 10 ** torch.randint(-3, 3, (1,)).item() for _ in range(3)]
        clipped = _privatise(one, groups)
        scaled = [c * math.sqrt(shares[k]) / groups.norms[k] for c, k in zip(clipped, groups.of, strict=True)]
        assert torch.cat(scaled).norm() <= 1.0 + 1e-5
    zero = [torch.zeros(0, 100_000) for _ in range(3)]
    for g, k in zip(_privatise(zero, groups, sigma=1.5, batch=4.0), groups.of, strict=True):
        assert float(g.std()) == pytest.approx(1.5 * groups.norms[k] / math.sqrt(shares[k]) / 4.0, rel=0.02)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("class_embedding", "module=norm"),
        ("class_embedding=0", "module=norm"),
        ("class_embedding=x", "module=norm"),
        ("class_embedding=0.1:1", "module=norm"),
        ("emb=0.1,emb=0.2", "module=norm"),
        ("emb=0.1:0.7,conv=1:0.6", "sum to 1.3"),
        ("nothing=0.5", "no trainable parameter"),
    ],
)
def test_clip_groups_errors(text, message):
    with pytest.raises(ConfigError, match=message):
        clip_groups(["emb.weight", "conv.weight"], 1.0, text)


def test_clip_groups_need_dp_sgd():
    with pytest.raises(ConfigError, match="applies to privacy"):
        load_config(
            "configs/digits-centralized.toml", [*TINY_OVERRIDES, 'privacy.clip_groups="class_embedding=0.5"']
        )
    with pytest.raises(ConfigError, match="module=norm"):  # checked when the config is read
        load_config(
            "configs/digits-centralized.toml",
            [
                *TINY_OVERRIDES,
                'privacy.mode="dp-sgd"',
                "privacy.target_epsilon=5",
                'privacy.clip_groups="x=-2"',
            ],
        )


def test_poisson_batch_rate():
    sizes = [len(poisson_batch(1000, 0.05, torch.Generator().manual_seed(s))) for s in range(200)]
    assert sum(sizes) / len(sizes) == pytest.approx(50, rel=0.05)
    assert len(set(sizes)) > 5  # the batch size varies


def test_epsilon_matches_the_published_setting():
    # σ = 1, q = 0.01, 10,000 steps, δ = 1e-5: RDP ε = 6.71, PRV ε = 6.20 (reference.md)
    assert epsilon([(1.0, 0.01, 10_000)], 1e-5, "rdp") == pytest.approx(6.71, abs=0.01)
    assert epsilon([(1.0, 0.01, 10_000)], 1e-5, "prv") == pytest.approx(6.20, abs=0.02)
    assert epsilon([], 1e-5) == 0.0


def test_calibrated_noise_meets_the_target_and_epsilon_grows_with_steps():
    sigma = calibrate(10.0, 1e-5, 0.05, 2000)
    assert epsilon([(sigma, 0.05, 2000)], 1e-5) <= 10.0 + 0.01
    assert epsilon([(sigma * 0.9, 0.05, 2000)], 1e-5) > 10.0
    eps = [epsilon([(sigma, 0.05, s)], 1e-5) for s in (10, 100, 1000, 2000)]
    assert eps == sorted(eps) and len(set(eps)) == 4


def test_ledger_reports_per_party_and_stops_before_the_budget():
    p = PrivacyConfig(mode="dp-sgd", noise_multiplier=1.0, target_epsilon=3.0)
    ledger = PrivacyLedger(p, batch_size=10)
    ledger.record("client 0", 100, 1000)
    ledger.record("client 1", 300, 1000)
    report = ledger.report()
    delta = 1 / (10 * 1000)
    assert report["epsilon"]["client 0"] == pytest.approx(epsilon([(1.0, 0.01, 100)], delta), abs=1e-4)
    assert report["epsilon_max"] == report["epsilon"]["client 1"] > report["epsilon"]["client 0"]
    ledger.check_next("client 0", 100, round_=3)  # well within
    with pytest.raises(
        PrivacyBudgetError, match=r"round 7 would take client 1 to ε = .* > privacy\.target_epsilon = 3\.0"
    ):
        ledger.check_next("client 1", 100_000, round_=7)
    restored = PrivacyLedger(p, batch_size=10)
    restored.load_state_dict(ledger.state_dict())
    assert restored.report() == report


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (['privacy.mode="dp-sgd"'], "needs privacy.target_epsilon"),
        (
            ['privacy.mode="dp-sgd"', "privacy.target_epsilon=5", 'paradigm="decentralized"'],
            "centralized and federated",
        ),
        (
            [
                'privacy.mode="dp-sgd"',
                "privacy.target_epsilon=5",
                'paradigm="federated"',
                'strategy.name="scaffold"',
            ],
            "scaffold",
        ),
        (['privacy.mode="dp-sgd"', "privacy.target_epsilon=5", "privacy.delta=1"], "below 1"),
        (['privacy.public_subspace="fashion-mnist"'], "applies to privacy.mode = 'dp-sgd', not 'none'"),
        ([*DP, 'privacy.public_subspace="digits"'], "the training data's own dataset"),
        ([*DP, 'privacy.public_subspace="mnist"'], "privacy.public_subspace"),
        (
            [
                *DP,
                'privacy.public_subspace="fashion-mnist"',
                "privacy.subspace_dim=65",
                "privacy.subspace_examples=64",
            ],
            "subspace_dim = 65 exceeds privacy.subspace_examples = 64",
        ),
    ],
)
def test_privacy_config_errors(sets, message):
    with pytest.raises(ConfigError, match=message):
        load_config("configs/digits-centralized.toml", [*TINY_OVERRIDES, *sets])


def test_math_isfinite_guard():
    assert math.isfinite(epsilon([(0.8, 0.1, 50)], 1e-5))


@pytest.mark.slow
def test_centralized_dp_run_states_epsilon_grows_it_and_stops_before_the_budget(tmp_path):
    from fedsynth.pipeline import run_all

    groups = 'privacy.clip_groups="class_embedding=0.005:0.2"'
    cfg = load_config(
        "configs/digits-centralized.toml", [*TINY_OVERRIDES, *DP, groups, "federation.rounds=3"]
    )
    run = run_all(cfg, tmp_path / "r")
    assert 'group-wise clipping `privacy.clip_groups = "class_embedding=0.005:0.2"`' in run.report.read_text()
    lines = run.read_metrics()
    eps = [line["epsilon_max"] for line in lines]
    assert eps == sorted(eps) and len(set(eps)) == 3 and eps[-1] <= 5.0 + 0.01
    saved = load_config(run.config)
    assert saved.privacy.noise_multiplier > 0  # the calibrated σ is recorded for resume
    summary = json.loads(run.summary.read_text())
    assert summary["epsilon"] == eps[-1] and summary["privacy"] == "dp-sgd"
    assert summary["delta"] == pytest.approx(1 / (10 * 1438))  # the union of the digits' training split
    with pytest.raises(PrivacyBudgetError, match="round 4 would take central"):
        run_all(load_config(run.config, ["federation.rounds=4"]), tmp_path / "r", resume=True)


@pytest.mark.slow
def test_federated_dp_run_reports_each_clients_epsilon_fine_tuning_steps_included(tmp_path):
    """DP fine-tuning of a public model's decoder: ε per client, rounds and fine-tuning steps
    counted; only the decoder moves, and only it is ever exchanged."""
    from fedsynth.pipeline import run_all

    public = tmp_path / "public"  # DP fine-tuning of a model trained elsewhere (model.init)
    seeded_unet(ModelConfig(preset="tiny"), 7, 16, 1, 10).save_pretrained(public / "unet")
    tiny = [*TINY_OVERRIDES, *DP, "eval.enabled=false", "federation.finetune_steps=2"]
    tiny += [f"model.init='{public}'", "train.trainable='up_blocks,conv_out'"]  # fine-tune the decoder only
    tiny += [
        'privacy.public_subspace="fashion-mnist"',
        "privacy.subspace_dim=8",
        "privacy.subspace_examples=32",
    ]
    run = run_all(load_config("configs/digits-federated.toml", tiny), tmp_path / "r")
    report = (run.root / "report.md").read_text()
    assert (
        f"Training started from the model at `{public}`" in report
        and "Only `up_blocks,conv_out` trained (`train.trainable`); every other parameter kept its "
        "initial weights; they never travelled: every client built them itself"
        in report
        and "projected onto the top 8 directions of 32 public `fashion-mnist` images' gradients" in report
    )
    start, final = (UNet2DModel.from_pretrained(init_folder(p)).state_dict() for p in (public, run.root))
    moved = {k for k in start if not torch.allclose(start[k], final[k], rtol=0, atol=1e-6)}
    assert moved and all(k.startswith(("up_blocks.", "conv_out.")) for k in moved)
    *rounds, finetune = run.read_metrics()
    # the frozen weights never travel: each client builds them from model.init itself
    trained = sum(v.numel() for k, v in start.items() if k.startswith(("up_blocks.", "conv_out.")))
    assert all(r["params_up"] == r["params_down"] == 2 * trained for r in rounds)
    assert set(rounds[-1]["epsilon"]) == set(finetune["epsilon"]) == {"client 0", "client 1"}
    assert 0 < rounds[0]["epsilon_max"] < rounds[-1]["epsilon_max"] < finetune["epsilon_max"]
    # both clients take every round's 3 steps and 2 fine-tuning steps: σ was calibrated for
    # those 8 steps, so the smaller client ends at the target, not past it
    assert finetune["phase"] == "finetune" and finetune["epsilon_max"] == pytest.approx(5.0, abs=0.02)
    assert json.loads(run.summary.read_text())["epsilon"] == finetune["epsilon_max"]


def test_planned_steps_count_every_round_and_the_fine_tuning_steps():
    from fedsynth.privacy.accounting import planned_steps

    fed = {"rounds": 7, "finetune_steps": 11}
    cfg = config_from_dict({"paradigm": "federated", "federation": fed, "train": {"local_steps": 5}})
    assert planned_steps(cfg, central_steps_per_round=99) == 7 * 5 + 11
    central = config_from_dict({"paradigm": "centralized", "federation": {"rounds": 7}})
    assert planned_steps(central, central_steps_per_round=20) == 7 * 20


def test_membership_attack_scores_by_hand():
    import numpy as np

    from fedsynth.evaluation.membership import attack_scores

    # lower loss ⇒ "member"; pairs (member, non-member) ranked right: 0.1<0.3, 0.1<0.4, 0.35<0.4 → 3/4
    got = attack_scores(np.array([0.1, 0.35]), np.array([0.3, 0.4]))
    assert got["mia_auc"] == pytest.approx(0.75)
    perfect = attack_scores(np.array([0.1, 0.2]), np.array([0.3, 0.4]))
    assert perfect == {"mia_auc": 1.0, "mia_tpr_at_1pct_fpr": 1.0}
    same = attack_scores(np.full(50, 0.2), np.full(50, 0.2))
    assert same["mia_auc"] == pytest.approx(0.5)


@pytest.mark.slow
def test_membership_audit_is_in_eval_json_and_the_summary(tmp_path):
    from fedsynth.pipeline import run_all

    cfg = load_config("configs/digits-centralized.toml", [*TINY_OVERRIDES, "eval.membership_samples=40"])
    run = run_all(cfg, tmp_path / "r")
    audit = json.loads(run.eval.read_text())["membership"]
    summary = json.loads(run.summary.read_text())
    assert audit["mia_samples"] == 40 and 0.0 <= audit["mia_auc"] <= 1.0
    assert summary["mia_auc"] == audit["mia_auc"]
    assert "membership attack AUC" in run.report.read_text()


def test_client_update_clipping_by_hand():
    from fedsynth.privacy.client_level import clip_update

    ref = {"a": torch.zeros(2), "b": torch.zeros(1)}
    # Δ = (3, 0, 4): norm 5 → scaled to norm 1
    got = clip_update({"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([4.0])}, ref, clip=1.0)
    assert torch.allclose(got["a"], torch.tensor([0.6, 0.0]))
    assert torch.allclose(got["b"], torch.tensor([0.8]))
    small = clip_update({"a": torch.tensor([0.3, 0.0]), "b": torch.tensor([0.4])}, ref, clip=1.0)
    assert torch.allclose(small["a"], torch.tensor([0.3, 0.0]))  # norm 0.5 ≤ C: unchanged


def test_noised_mean_centre_and_noise_scale():
    from fedsynth.privacy.client_level import noised_mean

    ref = {"w": torch.ones(200_000)}
    ups = [{"w": torch.ones(200_000) + 1e-4}, {"w": torch.ones(200_000) - 1e-4}]  # clipped norms ≈ 0.045 < 1
    out = noised_mean(ups, ref, clip=1.0, noise_multiplier=2.0, generator=torch.Generator().manual_seed(0))
    assert float(out["w"].mean()) == pytest.approx(1.0, abs=0.01)
    assert float(out["w"].std()) == pytest.approx(2.0 * 1.0 / 2, rel=0.01)  # σC/m


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (['strategy.name="krum"'], "mean-based strategy"),
        (['paradigm="centralized"'], "federated paradigm"),
        (["strategy.class_aware=true"], "class_aware"),
    ],
)
def test_dp_fedavg_config_errors(sets, message):
    base = ['privacy.mode="dp-fedavg"', "privacy.target_epsilon=5", 'strategy.name="fedavgm"']
    with pytest.raises(ConfigError, match=message):
        load_config("configs/digits-federated.toml", [*TINY_OVERRIDES, *base, *sets])


@pytest.mark.slow
def test_dp_fedavg_run_reports_user_level_epsilon(tmp_path):
    from fedsynth.pipeline import run_all

    sets = ['privacy.mode="dp-fedavg"', "privacy.target_epsilon=5", "eval.enabled=false"]
    run = run_all(load_config("configs/digits-federated.toml", [*TINY_OVERRIDES, *sets]), tmp_path / "r")
    lines = run.read_metrics()
    assert [list(line["epsilon"]) for line in lines] == [["clients (user-level)"]] * 2
    assert 0 < lines[0]["epsilon_max"] < lines[1]["epsilon_max"] <= 5.01
    saved = load_config(run.config)
    assert saved.privacy.noise_multiplier > 0
    assert json.loads(run.summary.read_text())["delta"] == pytest.approx(1 / (10 * 2))
    assert "**Client-level DP-FedAvg**: (ε, δ) = (" in run.report.read_text()


def test_client_level_ledger_counts_one_release_per_round_and_stops_at_the_budget():
    from fedsynth.privacy.accounting import ClientLevelLedger

    p = PrivacyConfig(mode="dp-fedavg", noise_multiplier=2.0, target_epsilon=4.0)
    ledger = ClientLevelLedger(p, num_clients=10)
    for round_ in (1, 2, 3):
        ledger.check_round(round_, [0, 1], steps=50)  # local steps do not count: one release a round
        report = ledger.after_aggregate(round_, [])
    # three Gaussian releases with σ = 2 at sampling rate 1, δ = 1/(10 · 10)
    assert report["epsilon_max"] == pytest.approx(epsilon([(2.0, 1.0, 3)], 1e-2), abs=1e-4)
    with pytest.raises(
        PrivacyBudgetError, match=r"round \d+ would take clients \(user-level\) to ε = 4\.\d+"
    ):
        for round_ in range(4, 41):
            ledger.check_round(round_, [0], steps=50)
            ledger.after_aggregate(round_, [])
    assert ledger.report()["epsilon_max"] <= 4.0 + 0.01  # stopped before the budget, not after


def test_class_matched_nonmembers_have_the_members_class_counts():
    """Members 6 × class 0 and 2 × class 1; the pool has 3 of class 0, 5 of class 1, 4 of class 2:
    s = min(1, 3/6, 5/2) = 0.5 → 3 of class 0 and 1 of class 1 on each side, none of class 2."""
    from fedsynth.data.datasets import ImageData
    from fedsynth.evaluation.membership import class_matched

    def data(labels: list[int]) -> ImageData:
        return ImageData(torch.zeros(len(labels), 1, 4, 4), torch.tensor(labels), ("a", "b", "c"))

    members, nonmembers = class_matched(data([0] * 6 + [1] * 2), data([0] * 3 + [1] * 5 + [2] * 4), seed=0)
    for side in (members, nonmembers):
        assert torch.bincount(side.labels, minlength=3).tolist() == [3, 1, 0]
