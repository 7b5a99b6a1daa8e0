"""Evaluation pipeline pieces: the cached domain classifier, CAS, synthetic folders."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedsynth.config import DataConfig, DiffusionConfig, ModelConfig, config_from_dict
from fedsynth.data.datasets import load_dataset, load_images
from fedsynth.diffusion.schedule import build_train_scheduler
from fedsynth.diffusion.unet import seeded_unet
from fedsynth.evaluation.classifier import train_classifier
from fedsynth.evaluation.domain import domain_classifier
from fedsynth.evaluation.evaluate import evaluate_synthetic
from fedsynth.stages.synthesize import SampleSpec, synthesize


def test_domain_classifier_is_trained_once_and_cached(tmp_path):
    train = load_dataset(DataConfig()).train.subset(np.arange(200))
    a = domain_classifier(train, epochs=1, device=torch.device("cpu"), cache_dir=str(tmp_path))
    files = list(tmp_path.glob("domain-*.pt"))
    assert len(files) == 1
    b = domain_classifier(train, epochs=1, device=torch.device("cpu"), cache_dir=str(tmp_path))
    assert all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )
    domain_classifier(
        train.subset(np.arange(100)), epochs=1, device=torch.device("cpu"), cache_dir=str(tmp_path)
    )
    assert len(list(tmp_path.glob("domain-*.pt"))) == 2  # a different split is a different key


def test_classifier_training_ignores_the_global_rng():
    """Same data and seed, different global RNG state (dropout used to draw from it): same CAS
    model, and the caller's RNG stream is left where it was."""
    train = load_dataset(DataConfig()).train.subset(np.arange(128))
    models = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        models.append(train_classifier(train, epochs=1, seed=7, device=torch.device("cpu")))
        after = torch.rand(1)
        torch.manual_seed(global_seed)
        assert torch.equal(after, torch.rand(1))  # as if no training had happened
    a, b = (m.state_dict() for m in models)
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = train_classifier(train, epochs=1, seed=8, device=torch.device("cpu")).state_dict()
    assert not all(torch.equal(a[k], other[k]) for k in a)


@pytest.mark.slow
def test_cas_on_real_data_is_high_and_metrics_are_complete(tmp_path):
    split = load_dataset(DataConfig())
    cfg = config_from_dict({"eval": {"classifier_epochs": 10, "cas_epochs": 10, "cache_dir": str(tmp_path)}})
    fake = split.train.subset(np.arange(0, len(split.train), 2))  # "synthetic" = real images
    metrics, figures = evaluate_synthetic(cfg, split.train, split.test, fake, torch.device("cpu"))
    # 10 epochs on half the real training split: well above chance (0.10), below the 99% ceiling
    assert metrics["cas_accuracy"] > 0.85 and metrics["real_accuracy"] > 0.9
    assert metrics["label_fidelity"] > 0.9  # real images are judged as their own labels
    assert set(metrics["label_fidelity_per_class"]) == set(split.full.class_names)
    assert metrics["precision"] > 0.8 and metrics["recall"] > 0.8
    assert metrics["near_copy_fraction"] == 1.0  # they are training images
    assert set(metrics["fd_per_class"]) == set(split.full.class_names)
    assert metrics["class_tv_from_uniform"] < 0.1
    assert figures["fake_feats"].shape == (len(fake), 128)


def test_synthesize_is_deterministic_balanced_and_reloads(tmp_path):
    unet = seeded_unet(ModelConfig(preset="tiny"), 0, 8, 1, 3).eval()
    sched = build_train_scheduler(DiffusionConfig(num_train_timesteps=20))
    names = ["cat", "dog", "eel"]
    spec = SampleSpec(per_class=4, sampler="ddim", steps=2, batch_size=5, seed=3)
    manifest = synthesize(unet, sched, names, spec, tmp_path / "a")
    synthesize(unet, sched, names, spec, tmp_path / "b")
    assert manifest["counts"] == {"cat": 4, "dog": 4, "eel": 4} and manifest["total"] == 12
    for p in sorted((tmp_path / "a").rglob("*.png")):
        assert p.read_bytes() == (tmp_path / "b" / p.relative_to(tmp_path / "a")).read_bytes()
    ours = load_images(DataConfig(dataset="imagefolder", path=str(tmp_path / "a"), image_size=8))
    assert ours.class_names == tuple(names) and ours.class_counts().tolist() == [4, 4, 4]
    from datasets import load_dataset as hf_load

    hf = hf_load("imagefolder", data_dir=str(tmp_path / "a"), split="train")
    assert sorted(hf.features["label"].names) == names and len(hf) == 12
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["sampler"] == "ddim"
    synthesize(unet, sched, names, spec, tmp_path / "npz", fmt="npz")
    arr = np.load(tmp_path / "npz" / "synthetic.npz")
    assert arr["images"].shape == (12, 8, 8) and arr["labels"].tolist() == [0] * 4 + [1] * 4 + [2] * 4


def _random_inception_weights(path, monkeypatch):
    """A weights file in torch-fidelity's format, from a seeded random Inception-v3
    (the real file cannot be downloaded in tests)."""
    from fedsynth.evaluation.inception import _inception_class

    cls = _inception_class()
    with monkeypatch.context() as m:
        m.setattr(cls, "load_state_dict", lambda self, state: None)
        m.setattr(torch, "load", lambda *a, **k: {})
        torch.manual_seed(0)
        model = cls("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
    for module in model.modules():  # keep activations O(1) through 90+ layers
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    torch.save(model.state_dict(), path)
    return path


@pytest.mark.slow
def test_inception_fid_is_from_a_local_weights_file(tmp_path, monkeypatch):
    from fedsynth.evaluation.inception import inception_metrics

    weights = _random_inception_weights(tmp_path / "inception.pth", monkeypatch)
    gen = torch.Generator().manual_seed(0)
    real = torch.rand(8, 1, 16, 16, generator=gen) * 2 - 1
    other = -torch.ones(8, 1, 16, 16)
    other[:, :, 4:12, 4:12] = 1  # a square: nothing like uniform noise
    same = inception_metrics(weights, real, real, torch.device("cpu"))
    diff = inception_metrics(weights, real, other, torch.device("cpu"))
    assert abs(same["fid"]) < 1e-3
    assert diff["fid"] > 1.0
    assert 1.0 <= diff["inception_is_mean"] <= 1008


def test_inception_weights_missing_or_wrong_is_one_line_error(tmp_path):
    from fedsynth.core.errors import ConfigError
    from fedsynth.evaluation.inception import load_inception

    with pytest.raises(ConfigError, match=r"no file at .*never downloaded"):
        load_inception(tmp_path / "nope.pth", torch.device("cpu"))
    bad = tmp_path / "bad.pth"
    torch.save({"conv.weight": torch.zeros(1)}, bad)
    with pytest.raises(ConfigError, match="is not Inception-v3 weights") as err:
        load_inception(bad, torch.device("cpu"))
    assert "\n" not in str(err.value)


class _Payload:
    """Unpickling this runs code: it writes a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "code ran"))


def test_inception_weights_that_are_a_code_pickle_are_refused_without_running_it(tmp_path, monkeypatch):
    import pickle

    from fedsynth.core.errors import ConfigError
    from fedsynth.evaluation.inception import load_inception

    marker = tmp_path / "pwned"
    evil = tmp_path / "inception.pth"
    evil.write_bytes(pickle.dumps({"fc.weight": _Payload(marker)}))
    with pytest.raises(ConfigError, match="is not Inception-v3 weights"):
        load_inception(evil, torch.device("cpu"))
    assert not marker.exists()
    weights = _random_inception_weights(tmp_path / "good.pth", monkeypatch)  # tensors: still loads
    from safetensors.torch import save_file

    save_file(torch.load(weights, weights_only=True), tmp_path / "good.safetensors")
    assert load_inception(tmp_path / "good.safetensors", torch.device("cpu")) is not None


def test_a_set_is_generated_and_written_batch_by_batch_whatever_its_size(tmp_path, monkeypatch):
    """Generating and writing alternate, so a set takes the memory of one batch: a set larger
    than the memory available is written (png and npz alike). Only a set to be loaded whole
    (a run's evaluation) is refused for memory, and any set that cannot fit on disk."""
    from fedsynth.core.errors import ConfigError, RunDirError
    from fedsynth.stages import synthesize as synth
    from fedsynth.stages import synthetic_set

    unet = seeded_unet(ModelConfig(preset="tiny"), 0, 8, 1, 3).eval()
    sched = build_train_scheduler(DiffusionConfig(num_train_timesteps=20))
    events: list = []
    generate, add = synth.generate, synthetic_set.SetWriter.add
    monkeypatch.setattr(synth, "generate", lambda *a, **k: events.append("generate") or generate(*a, **k))
    monkeypatch.setattr(synthetic_set.SetWriter, "add", lambda w, x, y: events.append(len(x)) or add(w, x, y))
    monkeypatch.setattr(synthetic_set, "_memory_available", lambda: 1000)  # bytes; the set is 12 x 64 px
    spec = SampleSpec(per_class=4, sampler="ddim", steps=2, batch_size=5)
    for fmt in ("png", "npz"):
        events.clear()
        manifest = synthesize(unet, sched, ["a", "b", "c"], spec, tmp_path / fmt, fmt=fmt)
        assert events == ["generate", 5, "generate", 5, "generate", 2] and manifest["total"] == 12
    arr = np.load(tmp_path / "npz" / "synthetic.npz")
    assert arr["images"].shape == (12, 8, 8) and arr["labels"].tolist() == [0] * 4 + [1] * 4 + [2] * 4
    pngs = sorted((tmp_path / "png").rglob("*.png"))
    assert [np.asarray(Image.open(p)).tolist() for p in pngs] == arr["images"].tolist()
    with pytest.raises(ConfigError, match=r"12 images of \(1, 8, 8\) need ~0.0 GB of memory to be evaluated"):
        synthetic_set.check_fits(12, (1, 8, 8), tmp_path, loaded=True)
    with pytest.raises(RunDirError, match=r"1,000,000,000,000 images need up to 320000\.0 GB on disk"):
        synthetic_set.check_fits(10**12, (1, 8, 8), tmp_path)


def test_sampling_again_replaces_the_set_and_never_writes_into_a_foreign_folder(tmp_path):
    from fedsynth.core.errors import ConfigError, RunDirError

    unet = seeded_unet(ModelConfig(preset="tiny"), 0, 8, 1, 3).eval()
    sched = build_train_scheduler(DiffusionConfig(num_train_timesteps=20))
    names = ["cat", "dog", "eel"]
    out = tmp_path / "set"
    synthesize(unet, sched, names, SampleSpec(per_class=5, sampler="ddim", steps=2), out)
    manifest = synthesize(unet, sched, names, SampleSpec(per_class=2, sampler="ddim", steps=2), out)
    assert len(list(out.rglob("*.png"))) == manifest["total"] == 6  # no stale images from the first set
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("keep me")
    spec = SampleSpec(per_class=1, sampler="ddim", steps=2)
    with pytest.raises(RunDirError, match="is not empty and holds no synthetic set"):
        synthesize(unet, sched, names, spec, foreign)
    with pytest.raises(RunDirError, match="is a file"):
        synthesize(unet, sched, names, spec, foreign / "thesis.tex")
    with pytest.raises(ConfigError, match="format 'jpg' is not valid; choose one of: png, npz"):
        synthesize(unet, sched, names, spec, tmp_path / "new", fmt="jpg")
    assert (foreign / "thesis.tex").read_text() == "keep me" and not (tmp_path / "new").exists()
