"""Run directories written by an earlier fedsynth (tests/data/legacy-runs: one round done,
checkpoint state in that version's layout: ``strategy`` on a ledger, FedDDPM and Phoenix
state at the top level) still resume, report, and resume exactly as the same checkpoint
rewritten in today's layout."""

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from fedsynth.config import load_config
from fedsynth.core.rundir import RunDir
from fedsynth.report.markdown import write_report
from fedsynth.stages.prepare import check_partitions, prepare

pytestmark = pytest.mark.slow

LEGACY = Path(__file__).parent / "data" / "legacy-runs"


def _resume(cfg, run: RunDir) -> None:
    check_partitions(run, prepare(cfg))
    if cfg.paradigm == "federated":
        from fedsynth.paradigms.federated import train_federated

        train_federated(cfg, run, prepare(cfg), resume=True)
    else:
        from fedsynth.paradigms.decentralized import train_decentralized

        with ThreadPoolExecutor(2) as pool:
            train_decentralized(cfg, run, prepare(cfg), resume=True, executor=pool)


def _today(state: dict) -> dict:
    """The legacy state.pt in today's layout."""
    if "strategy" in state:
        return {"round": state["round"], "ema": state["ema"], "strategies": {"flat": state["strategy"]}}
    hooks = {"calibration": state["calibration"], "filtering": {k: state[k] for k in ("strikes", "excluded")}}
    return {"round": state["round"], "ema": state["ema"], "strategies": state["strategies"], "hooks": hooks}


@pytest.mark.parametrize("paradigm", ["federated", "decentralized"])
def test_run_written_by_previous_version_resumes_as_in_todays_layout(tmp_path, paradigm):
    runs = [RunDir(tmp_path / name) for name in ("legacy", "today")]
    for run in runs:
        shutil.copytree(LEGACY / paradigm, run.root)
    state_file = runs[1].checkpoint_dir(1) / "state.pt"
    torch.save(_today(torch.load(state_file, weights_only=True)), state_file)
    cfg = load_config(runs[0].config, ["federation.rounds=2"])
    for run in runs:
        _resume(cfg, run)
        assert [r["round"] for r in run.read_metrics()] == [1, 2]
        write_report(run)
        assert (run.root / "report.md").stat().st_size > 0
    a, b = (run.checkpoint_dir(2) for run in runs)
    ua = (a / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    ub = (b / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert ua == ub
    sa = torch.load(a / "state.pt", weights_only=True)
    sb = torch.load(b / "state.pt", weights_only=True)
    assert sa["round"] == sb["round"] == 2
    assert sa["strategies"] and repr(sa["strategies"]) == repr(sb["strategies"])
