"""Concurrent and killed runs, a full disk, a restart before the first checkpoint, and data
changed under a resumed run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_OVERRIDES
from fedsynth.config import load_config
from fedsynth.core.errors import RunDirError
from fedsynth.core.rundir import LOCK_ENV, RunDir
from fedsynth.pipeline import run_all
from fedsynth.stages.checkpoint import save_checkpoint
from fedsynth.stages.prepare import prepare

ROOT = Path(__file__).parents[1]
CENTRAL = ROOT / "configs" / "digits-centralized.toml"
FEDERATED = ROOT / "configs" / "digits-federated.toml"
QUICK = [*TINY_OVERRIDES, "eval.enabled=false", "sample.per_class=0"]


def _cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("fedsynth")
    return subprocess.run([str(exe), *args], cwd=ROOT, capture_output=True, text=True, timeout=600, **kwargs)


def _sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


@pytest.mark.slow
def test_a_second_writer_is_refused_with_the_holders_pid(tmp_path):
    cfg = load_config(CENTRAL, QUICK)
    run = run_all(cfg, tmp_path / "run")
    with run.writer_lock():
        other = {k: v for k, v in os.environ.items() if k != LOCK_ENV}  # another terminal's process
        for args in (("run", "--resume", str(run.root)), ("report", str(run.root))):
            res = _cli(*args, env=other)
            lines = res.stderr.strip().splitlines()
            assert res.returncode == 2 and len(lines) == 1, res.stderr
            assert f"in use by another fedsynth process (PID {os.getpid()})" in lines[0]
        os.environ.pop(LOCK_ENV)  # as for another thread of this process that did not take it
        with pytest.raises(RunDirError, match="one writer per run directory"):
            run_all(cfg, run.root, resume=True)
        os.environ[LOCK_ENV] = str(run.root.resolve())
    assert _cli("report", str(run.root)).returncode == 0  # released


@pytest.mark.slow
def test_a_run_that_stopped_before_its_first_checkpoint_can_start_again(tmp_path):
    cfg = load_config(CENTRAL, [*QUICK, "federation.checkpoint_every=5"])
    run = RunDir(tmp_path / "run").create()
    run.write_config(cfg)
    prepare(cfg, run)
    run.append_metrics({"round": 1, "train_loss": 1.0})  # then killed: no checkpoint
    res = _cli("run", "--resume", str(run.root))
    assert res.returncode == 2 and "nothing to resume" in res.stderr
    done = run_all(cfg, run.root)
    assert [m["round"] for m in done.read_metrics()] == [1, 2]
    with pytest.raises(RunDirError, match="already holds a run"):  # now there is one to resume
        run_all(cfg, run.root)


def test_a_full_disk_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from diffusers import DDPMScheduler

    from fedsynth.config import ModelConfig
    from fedsynth.diffusion.training import make_ema
    from fedsynth.diffusion.unet import build_unet

    run = RunDir(tmp_path / "run").create()
    unet = build_unet(ModelConfig(preset="tiny"), 8, 1, 2)
    ema = make_ema(unet, 0.9999)
    first = save_checkpoint(run, 1, unet, ema, DDPMScheduler(), {})
    before = sorted(p.name for p in first.rglob("*"))

    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 8 vs 4")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(RunDirError, match=r"^no space left on device writing .*round-0001"):
        save_checkpoint(run, 1, unet, ema, DDPMScheduler(), {})
    assert sorted(p.name for p in first.rglob("*")) == before and run.latest_checkpoint() == first


def _folder(root: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(12):
            Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(root / cls / f"{i}.png")
    return root


@pytest.mark.slow
def test_resume_refuses_other_training_images_with_the_same_classes_and_counts(tmp_path):
    data = _folder(tmp_path / "images", 0)
    sets = [*QUICK, 'data.dataset="imagefolder"', f"data.path='{data}'", "federation.rounds=1"]
    run = run_all(load_config(CENTRAL, sets), tmp_path / "run")
    _folder(data, 1)  # the same classes and counts, other pixels
    res = _cli("run", "--resume", str(run.root), "--set", "federation.rounds=2")
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert "the training images are not the ones this run trained on" in lines[0]
    _folder(data, 0)
    assert _cli("run", "--resume", str(run.root), "--set", "federation.rounds=2").returncode == 0


def _tree(pid: int) -> set[int]:
    """``pid``'s descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z":
            alive.add(pid)
    return alive


@pytest.mark.slow
def test_kill_9_of_a_superlink_run_takes_its_superlink_and_simulation_with_it(tmp_path):
    exe = Path(sys.executable).with_name("fedsynth")
    sets = _sets([*QUICK, "federation.rounds=50", "federation.checkpoint_every=1"])
    cli = subprocess.Popen(
        [str(exe), "run", str(FEDERATED), "--out", str(tmp_path / "run"), *sets],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    while not (tmp_path / "run" / "metrics.jsonl").is_file() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert (tmp_path / "run" / "metrics.jsonl").is_file(), "the run never started its rounds"
    below = _tree(cli.pid)
    homes = {h for pid in below if (h := _flwr_home(pid))}
    assert below and homes, "no SuperLink under the CLI"
    os.kill(cli.pid, signal.SIGKILL)
    cli.wait()
    deadline = time.monotonic() + 30
    while _alive(below) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _alive(below), f"left running: {sorted(_alive(below))}"
    assert not any(h.exists() for h in homes)  # its temporary folder went with it
    rounds = len(RunDir(tmp_path / "run").read_metrics())
    time.sleep(2)
    assert len(RunDir(tmp_path / "run").read_metrics()) == rounds  # nothing finishes it unattended


def _flwr_home(pid: int) -> Path | None:
    """The FLWR_HOME a process runs with (a private SuperLink's temporary folder)."""
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    home = next((v.split(b"=", 1)[1] for v in env if v.startswith(b"FLWR_HOME=")), None)
    return Path(home.decode()) if home else None


@pytest.mark.slow
def test_a_synthetic_set_that_cannot_fit_is_refused_before_anything_is_generated(tmp_path):
    """A run evaluates its set in memory: one that cannot be held is refused before training."""
    huge = [*QUICK, "sample.per_class=100000000", "eval.enabled=true"]
    res = _cli("run", str(CENTRAL), "--out", str(tmp_path / "run"), *_sets(huge))
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert "1,000,000,000 images of (1, 16, 16) need ~1280.0 GB of memory to be evaluated" in lines[0]
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before training


def test_a_nodes_own_data_error_reaches_the_servers_error(monkeypatch):
    """A SuperNode whose data is wrong answers the server's query with Flower's error reply;
    the run's one-line error carries that node's message, not only "no node answered"."""
    from types import SimpleNamespace

    from flwr.app import ConfigRecord

    from fedsynth.core.protocol import INFO, PARTITION_ID
    from fedsynth.server.messages import FederationError, discover_nodes

    def reply(node: int, pid: int | None) -> SimpleNamespace:
        meta = SimpleNamespace(src_node_id=node)
        if pid is None:  # what flwr/supernode/runtime/run_clientapp.py sends for an exception
            reason = (
                "<class 'fedsynth.core.errors.DataError'>:<'class folders [a, b] do not match [0, 1]\nmore'>"
            )
            return SimpleNamespace(
                has_error=lambda: True, error=SimpleNamespace(reason=reason), metadata=meta
            )
        content = {INFO: {PARTITION_ID: pid, "histogram": [1, 2]}}
        return SimpleNamespace(has_error=lambda: False, content=content, metadata=meta)

    grid = SimpleNamespace(
        get_node_ids=lambda: [11, 12], send_and_receive=lambda msgs, timeout: [reply(11, 0), reply(12, None)]
    )
    monkeypatch.setattr("fedsynth.server.messages._to_all", lambda nodes, records, kind: list(nodes))
    with pytest.raises(FederationError) as err:
        discover_nodes(grid, 2, ConfigRecord({}), timeout=5)
    assert str(err.value) == (
        "no node answered for partition-id(s) [1]; "
        "node 12: DataError: class folders [a, b] do not match [0, 1]"
    )
