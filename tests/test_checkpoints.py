"""Checkpoints are verified before they are trusted: a damaged newest checkpoint is skipped
for the one before, and the resumed run still ends where an uninterrupted one does."""

import json
import logging

import pytest
import torch

from conftest import TINY_OVERRIDES
from fedsynth.config import load_config
from fedsynth.core.errors import RunDirError
from fedsynth.core.rundir import RunDir
from fedsynth.paradigms.centralized import train_centralized
from fedsynth.stages.prepare import prepare
from test_cli import CENTRAL

WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


def _run(tmp_path, name, rounds, resume=False):
    cfg = load_config(CENTRAL, [*TINY_OVERRIDES, f"federation.rounds={rounds}", "sample.per_class=0"])
    run = RunDir(tmp_path / name).create()
    train_centralized(cfg, run, prepare(cfg, None if resume else run), resume=resume)
    return run


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _zero(path):
    path.write_bytes(bytes(path.stat().st_size))


DAMAGE = {
    "weights truncated": lambda c: _truncate(c / WEIGHTS),
    "weights zeroed": lambda c: _zero(c / WEIGHTS),
    "state truncated": lambda c: _truncate(c / "state.pt"),
    "state missing": lambda c: (c / "state.pt").unlink(),
    "meta unreadable": lambda c: (c / "meta.json").write_text("{"),
}


@pytest.mark.slow
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path, damage, caplog):
    full = _run(tmp_path, "full", 3)
    part = _run(tmp_path, "part", 2)
    DAMAGE[damage](part.checkpoint_dir(2))
    with caplog.at_level(logging.WARNING, logger="fedsynth.stages.checkpoint"):
        _run(tmp_path, "part", 3, resume=True)
    assert "checkpoint round-0002 is damaged, resuming from the one before" in caplog.text
    assert [r["round"] for r in part.read_metrics()] == [1, 2, 3]
    assert (part.checkpoint_dir(3) / WEIGHTS).read_bytes() == (full.checkpoint_dir(3) / WEIGHTS).read_bytes()


def test_every_checkpoint_damaged_is_one_clear_error(tmp_path):
    run = _run(tmp_path, "run", 2)
    for c in run.checkpoints_newest_first():
        _zero(c / WEIGHTS)
    with pytest.raises(RunDirError, match=r"nothing to resume: every checkpoint in .* is damaged"):
        _run(tmp_path, "run", 3, resume=True)


def test_checkpoint_lists_its_files_with_sizes_and_hashes(tmp_path):
    run = _run(tmp_path, "run", 1)
    meta = json.loads((run.checkpoint_dir(1) / "meta.json").read_text())
    assert {"unet/config.json", WEIGHTS, "ema/config.json", "state.pt"} <= set(meta["files"])
    size = (run.checkpoint_dir(1) / "state.pt").stat().st_size
    assert meta["files"]["state.pt"]["bytes"] == size and len(meta["files"]["state.pt"]["sha256"]) == 64
    assert torch.load(run.checkpoint_dir(1) / "state.pt", weights_only=True)["round"] == 1


def test_a_partly_frozen_model_checkpoints_only_what_trains_and_comes_back_whole(tmp_path):
    from diffusers import DDPMScheduler

    from fedsynth.diffusion.training import make_ema
    from fedsynth.diffusion.unet import seeded_unet
    from fedsynth.stages.checkpoint import changing_keys, load_checkpoint, save_checkpoint

    cfg = load_config(CENTRAL, TINY_OVERRIDES)
    start = seeded_unet(cfg.model, 0, 16, 1, 10)
    trained = seeded_unet(cfg.model, 0, 16, 1, 10)
    keep = changing_keys(trained, ["class_embedding.weight", "conv_out.bias"])
    ema = make_ema(trained, 0.5)
    with torch.no_grad():
        trained.class_embedding.weight.add_(1.0)
        trained.conv_out.bias.sub_(2.0)
    ema.step(trained.parameters())  # the trained tensors move their average; the frozen ones keep theirs
    run = RunDir(tmp_path / "r").create()
    path = save_checkpoint(run, 1, trained, ema, DDPMScheduler(), {"x": torch.ones(1)}, keep=keep)
    assert sorted(p.name for p in (path / "unet").iterdir()) == ["trained.safetensors"]
    back = load_checkpoint(path, lambda m: make_ema(m, 0.5), torch.device("cpu"), start)
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in back.unet.state_dict().items())
    names = [n for n, _ in trained.named_parameters()]
    for name, mine, theirs in zip(names, back.ema.shadow_params, ema.shadow_params, strict=True):
        assert torch.equal(mine, theirs), name
    assert back.ema.optimization_step == ema.optimization_step and torch.equal(back.state["x"], torch.ones(1))
    with pytest.raises(RunDirError, match="holds only the trained tensors"):
        load_checkpoint(path, lambda m: make_ema(m, 0.5), torch.device("cpu"), type(start))
    other = seeded_unet(
        load_config(CENTRAL, [*TINY_OVERRIDES, "model.conditional=false"]).model, 0, 16, 1, 10
    )
    with pytest.raises(RunDirError, match=r"class_embedding.weight is not a tensor of this run's model"):
        load_checkpoint(path, lambda m: make_ema(m, 0.5), torch.device("cpu"), other)


def test_the_ema_holds_and_steps_only_what_trains_and_its_checkpoints_come_back(tmp_path):
    """An EMA over what trains (``ModelEMA``): it holds only those parameters (a LoRA model's:
    the adapters), its averages equal those of an EMA over every parameter, and checkpoints,
    trained-only or whole, come back to it by name."""
    import copy

    from diffusers import DDPMScheduler

    from fedsynth.diffusion.training import make_ema
    from fedsynth.diffusion.unet import seeded_unet
    from fedsynth.stages.checkpoint import changing_keys, load_checkpoint, save_checkpoint

    cfg = load_config(CENTRAL, [*TINY_OVERRIDES, "lora.rank=2"])
    lora_net = seeded_unet(cfg.model, 0, 16, 1, 10, cfg.lora)
    lora_ema = make_ema(lora_net, 0.5, cfg.trained_modules)
    assert lora_ema.names and all(".lora_" in n for n in lora_ema.names)
    assert len(lora_ema.names) == sum(".lora_" in n for n, _ in lora_net.named_parameters())

    spec = "class_embedding,conv_out"
    net = seeded_unet(load_config(CENTRAL, TINY_OVERRIDES).model, 0, 16, 1, 10)
    every, part = make_ema(net, 0.5), make_ema(net, 0.5, spec)
    under = [n for n, _ in net.named_parameters() if n.startswith(("class_embedding.", "conv_out."))]
    assert part.names == under
    for shift in (1.0, -3.0):
        with torch.no_grad():
            net.class_embedding.weight.add_(shift)
            net.conv_out.bias.add_(shift)
        every.step_with(net)
        part.step_with(net)
    assert all(torch.equal(w, every.named_shadow()[n]) for n, w in part.named_shadow().items())
    mine, theirs = copy.deepcopy(net), copy.deepcopy(net)
    part.copy_into(mine)
    every.copy_into(theirs)
    assert all(torch.equal(v, theirs.state_dict()[k]) for k, v in mine.state_dict().items())

    start = seeded_unet(load_config(CENTRAL, TINY_OVERRIDES).model, 0, 16, 1, 10)
    run = RunDir(tmp_path / "r").create()
    keep = changing_keys(net, part.names)
    for round_, ema, kept in ((1, part, keep), (2, every, None)):  # trained-only; whole, every parameter's
        path = save_checkpoint(run, round_, net, ema, DDPMScheduler(), {}, keep=kept)
        back = load_checkpoint(path, lambda m: make_ema(m, 0.5, spec), torch.device("cpu"), start)
        assert back.ema.names == part.names and back.ema.optimization_step == 2
        assert all(torch.equal(w, part.named_shadow()[n]) for n, w in back.ema.named_shadow().items())
