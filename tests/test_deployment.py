"""The same apps on a real SuperLink + two SuperNodes on 127.0.0.1, deployed as
docs/real-federation.md says (TLS, node authentication), through `fedsynth submit` and `flwr run .`."""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedsynth.runtime.processes import free_port

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parents[1]
BIN = Path(sys.executable).parent


def _pids_using(ports: list[int]) -> list[int]:
    """Processes whose command line names one of our ports (SuperLink, SuperNodes, SuperExecs)."""
    marks = [f"127.0.0.1:{p}".encode() for p in ports] + [f"--port\x00{p}\x00".encode() for p in ports]
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if any(m in cmd for m in marks) and b"flower" in cmd:
                found.append(int(entry.name))
    return found


def _stop(ports: list[int]) -> list[int]:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _pids_using(ports):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 10
        while _pids_using(ports) and time.monotonic() < deadline:
            time.sleep(0.2)
    return _pids_using(ports)


def _node_folder(root: Path, classes: range, per_class: int = 15) -> Path:
    """A data holder's own image folder (one sub-folder per class), cut from digits."""
    from PIL import Image

    from fedsynth.config import DataConfig
    from fedsynth.data.datasets import load_images
    from fedsynth.report.plots import to_uint8

    data = load_images(DataConfig())
    for c in classes:
        (root / str(c)).mkdir(parents=True)
        pics = to_uint8(data.images[data.labels == c][:per_class])
        for i, pic in enumerate(pics):
            Image.fromarray(pic[..., 0]).save(root / str(c) / f"{i}.png")
    return root


def _overrides(paradigm: str) -> str:
    return ";".join(
        [
            "model.preset=tiny",
            "partition.num_clients=2",
            "federation.clients_per_round=2",
            "federation.min_clients=1",
            "federation.rounds=1",  # multi-round behaviour: the simulation tests (same loop)
            "train.local_steps=3",
            "sample.per_class=2",
            "sample.steps=2",
            "eval.enabled=false",
            "diffusion.num_train_timesteps=50",
            f"paradigm={paradigm}",
            "local.steps=3",
        ]
    )


def _check_run(out: Path, paradigm: str, stdout: str) -> None:
    deadline = time.monotonic() + 60
    while not (out / "report.md").is_file() and time.monotonic() < deadline:
        time.sleep(1)
    model = out / ("model" if paradigm == "federated" else "clients/client-01/model")
    assert (model / "unet" / "config.json").is_file(), stdout[-3000:]
    rounds = [json.loads(x)["round"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [1]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["paradigm"] == paradigm and summary["bytes_up"] > 0
    # each node trained on its own folder: 5 classes x 15 images
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["clients"] == [0, 1]
    assert last["examples_per_client"] == {"0": 75, "1": 75}
    if paradigm == "local":  # each class drawn from the node that holds it
        mixture = json.loads((out / "synthetic" / "manifest.json").read_text())["mixture"]
        assert mixture == {"0": [2] * 5 + [0] * 5, "1": [0] * 5 + [2] * 5}


def _documented(title: str) -> str:
    """A block of docs/real-federation.md, as a user copies it."""
    page = (ROOT / "docs" / "real-federation.md").read_text()
    blocks = dict(re.findall(r'```bash title="([^"]+)"\n(.*?)```', page, re.S))
    return blocks[title]


def _bash(script: str, env: dict, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_the_documented_deployment_with_tls_and_node_authentication(tmp_path):
    """docs/real-federation.md's blocks, run as written on 127.0.0.1: keys, a SuperLink with TLS
    and node authentication, registration, two SuperNodes with their own folders, and
    `fedsynth submit`; then a run that fails on the SuperLink exits 2 with its one line."""
    from fedsynth.config import config_toml, load_config

    link, nodes = free_port(), [free_port(), free_port()]
    config = tmp_path / "tiny.toml"
    config.write_text(
        config_toml(load_config(ROOT / "configs/digits-federated.toml", _overrides("federated").split(";")))
    )
    env = {
        **os.environ,
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "FLWR_HOME": str(tmp_path / "flwr-home"),
        "SERVER": "127.0.0.1",
        "PORT": str(link),
        "CONFIG": str(config),
    }
    try:
        server = _bash(_documented("server"), env, tmp_path)
        assert server.returncode == 0, server.stdout[-3000:] + server.stderr[-3000:]
        assert (tmp_path / "fed-keys" / "node-1.key").stat().st_mode & 0o777 == 0o600
        for i, port in enumerate(nodes):
            folder = _node_folder(tmp_path / f"holder{i}", range(5 * i, 5 * i + 5))
            holder = {**env, "I": str(i), "KEYS": str(tmp_path / "fed-keys"), "NODE_DATA": str(folder)}
            started = _bash(_documented("data holder"), {**holder, "NODE_PORT": str(port)}, tmp_path)
            assert started.returncode == 0, started.stderr
        res = _bash(_documented("submit"), env, tmp_path, timeout=480)
        logs = "".join(p.read_text() for p in tmp_path.glob("super*.log"))
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:] + logs[-3000:]
        assert f"report: {tmp_path / 'runs/fed-1/report.md'}" in res.stdout
        _check_run(tmp_path / "runs/fed-1", "federated", res.stdout)
        # the package's own app (pyproject's [tool.flwr.app]) on the same federation: paradigm local
        out = tmp_path / "runs" / "local"
        run_config = (
            f'config="{ROOT}/configs/digits-federated.toml" out="{out}" overrides="{_overrides("local")}"'
        )
        local = subprocess.run(
            [str(BIN / "flwr"), "run", str(ROOT), "fed", "--stream", "--run-config", run_config],
            env=env,
            capture_output=True,
            text=True,
            timeout=480,
        )
        assert local.returncode == 0, local.stdout[-3000:] + local.stderr[-3000:]
        _check_run(out, "local", local.stdout)
        # a node whose key was not registered is turned away
        assert _bash("fedsynth keys stranger --host 127.0.0.1 --nodes 1", env, tmp_path).returncode == 0
        stranger = [str(BIN / "flower-supernode"), "--root-certificates", "fed-keys/ca.crt"]
        stranger += [
            "--superlink",
            f"127.0.0.1:{link}",
            "--auth-supernode-private-key",
            "stranger/node-0.key",
        ]
        log = tmp_path / "stranger.log"
        with log.open("w") as sink:  # the node's own children keep a pipe open: a file instead
            refused = subprocess.Popen(
                [*stranger, "--port", str(free_port()), "--max-retries", "0"],
                env=env,
                cwd=tmp_path,
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
            assert refused.wait(timeout=120) != 0
        assert "Failed to activate SuperNode" in log.read_text(), log.read_text()[-2000:]
        failed = _bash(f'fedsynth submit fed missing.toml --out "{tmp_path}/runs/fed-2"', env, tmp_path)
        assert failed.returncode == 2, failed.stdout[-3000:] + failed.stderr[-3000:]
        lines = [x for x in failed.stderr.splitlines() if x.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and "missing.toml" in lines[0], failed.stderr
    finally:
        leftover = _stop([link, *nodes])
    assert leftover == [], f"processes still running: {leftover}"
