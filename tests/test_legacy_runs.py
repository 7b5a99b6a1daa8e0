"""Run directories written by an earlier fedsynth (tests/data/legacy-runs, one round done,
checkpoint state in that version's layout) still resume, and the resumed round gives the
same weights and strategy state as a run made from scratch by this version."""

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from fedsynth.config import load_config
from fedsynth.prepare import check_partitions, prepare
from fedsynth.rundir import RunDir

pytestmark = pytest.mark.slow

LEGACY = Path(__file__).parent / "data" / "legacy-runs"


def _train(cfg, run: RunDir, *, resume: bool) -> None:
    if cfg.paradigm == "federated":
        from fedsynth.federated import train_federated

        train_federated(cfg, run, prepare(cfg), resume=resume)
    else:
        from fedsynth.decentralized import train_decentralized

        with ThreadPoolExecutor(2) as pool:
            train_decentralized(cfg, run, prepare(cfg), resume=resume, executor=pool)


@pytest.mark.parametrize("paradigm", ["federated", "decentralized"])
def test_run_written_by_previous_version_resumes_to_the_same_weights(tmp_path, paradigm):
    old = RunDir(tmp_path / "old")
    shutil.copytree(LEGACY / paradigm, old.root)
    cfg = load_config(old.config, ["federation.rounds=2"])
    check_partitions(old, prepare(cfg))
    _train(cfg, old, resume=True)
    fresh = RunDir(tmp_path / "fresh").create()
    prepare(cfg, fresh)
    _train(cfg, fresh, resume=False)

    assert [r["round"] for r in old.read_metrics()] == [1, 2]
    a, b = (RunDir.checkpoint_dir(r, 2) for r in (old, fresh))
    ua = (a / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    ub = (b / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert ua == ub
    sa = torch.load(a / "state.pt", weights_only=True)
    sb = torch.load(b / "state.pt", weights_only=True)
    assert sa["round"] == sb["round"] == 2
    assert repr(sa.get("strategies", sa.get("strategy"))) == repr(sb.get("strategies", sb.get("strategy")))
