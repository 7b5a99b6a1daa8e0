"""End-to-end: the CLI on a tiny config, resume, and one-line errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DModel

from conftest import TINY_OVERRIDES
from fedsynth.config import load_config
from fedsynth.pipeline import run_all

ROOT = Path(__file__).parents[1]
CENTRAL = ROOT / "configs" / "digits-centralized.toml"
FEDERATED = ROOT / "configs" / "digits-federated.toml"


def _cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("fedsynth")
    return subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def flower_processes() -> set[int]:
    """Processes of a SuperLink simulation (SuperLink, its executor, the simulation, Ray)."""
    marks = (b"flower-superlink", b"flower-superexec", b"flwr-simulation", b"ray::", b"raylet")
    found = set()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if any(mark in cmdline.read_bytes() for mark in marks):
                found.add(int(cmdline.parent.name))
        except OSError:
            continue
    return found


def _sets(overrides):
    return [a for o in overrides for a in ("--set", o)]


@pytest.mark.slow
def test_cli_smoke_run_writes_the_run_directory(tmp_path):
    out = tmp_path / "run"
    res = _cli("run", str(CENTRAL), "--out", str(out), *_sets(TINY_OVERRIDES))
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"report: {out / 'report.md'}" in res.stdout
    for name in (
        "config.toml",
        "partitions.json",
        "partitions.png",
        "metrics.jsonl",
        "samples.png",
        "eval.json",
        "summary.json",
        "report.md",
        "model/unet",
        "model/scheduler",
        "checkpoints/round-0002/unet",
    ):
        assert (out / name).exists(), name
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [1, 2]
    assert {"round", "train_loss", "wall_s", "bytes_up", "bytes_down", "clients"} <= metrics[0].keys()
    summary = json.loads((out / "summary.json").read_text())
    for key in (
        "paradigm",
        "strategy",
        "rounds",
        "wall_s",
        "bytes_up",
        "bytes_down",
        "fd",
        "precision",
        "recall",
        "cas_accuracy",
        "cas_precision",
        "cas_recall",
        "cas_f1",
        "cas_real_accuracy",
        "real_accuracy",
    ):
        assert key in summary, key
    judged = json.loads((out / "eval.json").read_text())
    # the real-data reference of CAS: as many real training images, the same class counts
    assert judged["cas_real_size"] == judged["num_synthetic"] == 30
    assert summary["paradigm"] == "centralized" and summary["rounds"] == 2
    counts = {p.name: len(list(p.glob("*.png"))) for p in (out / "synthetic").iterdir() if p.is_dir()}
    assert counts == {str(d): 3 for d in range(10)}
    unet = UNet2DModel.from_pretrained(out / "model", subfolder="unet")
    assert unet.config.num_class_embeds == 11
    parts = json.loads((out / "partitions.json").read_text())
    # per class round(0.2 * count) over digits' class counts: 36+36+35+37+36+36+36+36+35+36
    assert len(parts["clients"]) == 2 and len(parts["test_indices"]) == 359
    resolved = load_config(out / "config.toml")
    assert resolved.model.preset == "tiny"
    # a stage re-run alone: sample at another size into another folder, as npz too
    res = _cli("sample", str(out), "--per-class", "2", "--steps", "2", "--out", str(tmp_path / "more"))
    assert res.returncode == 0, res.stderr[-2000:]
    manifest = json.loads((tmp_path / "more" / "manifest.json").read_text())
    assert manifest["total"] == 20 and manifest["counts"]["7"] == 2 and manifest["model_round"] == 2
    res = _cli(
        "sample",
        str(out),
        "--per-class",
        "1",
        "--steps",
        "2",
        "--format",
        "npz",
        "--out",
        str(tmp_path / "npz"),
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "npz" / "synthetic.npz").is_file()
    res = _cli("compare", str(out), "--out", str(tmp_path / "cmp.md"))
    assert res.returncode == 0, res.stderr[-2000:]
    table = (tmp_path / "cmp.md").read_text()
    assert "run (centralized)" in table and "CAS accuracy" in table and (tmp_path / "cmp.png").is_file()
    # the same run directory refuses a second fresh run
    res = _cli("run", str(CENTRAL), "--out", str(out), *_sets(TINY_OVERRIDES))
    assert res.returncode == 2 and "already holds a run" in res.stderr


@pytest.mark.slow
def test_resume_after_kill_matches_uninterrupted(tmp_path):
    overrides = [*TINY_OVERRIDES, "federation.rounds=3", "sample.per_class=0"]
    cfg = load_config(CENTRAL, overrides)
    full = run_all(cfg, tmp_path / "full")
    # simulate a kill after round 2: the run stopped there (checkpoint 2 complete)
    partial_cfg = load_config(CENTRAL, [*TINY_OVERRIDES, "federation.rounds=2", "sample.per_class=0"])
    part = run_all(partial_cfg, tmp_path / "part")
    (part.root / "config.toml").write_text((full.root / "config.toml").read_text())
    # a half-written newer checkpoint must be ignored
    (part.checkpoints / ".round-0003.xyz.tmp").mkdir()
    res = _cli("run", "--resume", str(part.root))
    assert res.returncode == 0, res.stderr[-2000:]
    a = UNet2DModel.from_pretrained(full.model, subfolder="unet").state_dict()
    b = UNet2DModel.from_pretrained(part.model, subfolder="unet").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    rounds = [json.loads(x)["round"] for x in (part.root / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [1, 2, 3]


def test_bad_key_is_one_line_error(tmp_path):
    res = _cli("run", str(CENTRAL), "--out", str(tmp_path / "r"), "--set", "train.lrr=1")
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown config key 'train.lrr'" in lines[0]


@pytest.mark.slow
def test_missing_dataset_path_is_one_line_error(tmp_path):
    res = _cli(
        "run",
        str(CENTRAL),
        "--out",
        str(tmp_path / "r"),
        "--set",
        "data.dataset=imagefolder",
        "--set",
        f"data.path={json.dumps(str(tmp_path / 'nowhere'))}",
    )
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "image folder not found" in lines[0], res.stderr


@pytest.mark.slow
def test_missing_inception_weights_fail_before_training(tmp_path):
    weights = json.dumps(str(tmp_path / "inception.pth"))
    out = str(tmp_path / "r")
    res = _cli("run", str(CENTRAL), "--out", out, "--set", f"eval.inception_weights={weights}")
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "eval.inception_weights: no file at" in lines[0], res.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_resume_without_checkpoint_is_clear(tmp_path):
    from fedsynth.core.rundir import RunDir
    from fedsynth.stages.prepare import prepare

    cfg = load_config(CENTRAL, TINY_OVERRIDES)
    run = RunDir(tmp_path / "r").create()
    run.write_config(cfg)
    prepare(cfg, run)
    res = _cli("run", "--resume", str(run.root))
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"error: nothing to resume: no checkpoint in {run.checkpoints}"
    ]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sig", "code", "config"),
    [("SIGINT", 130, CENTRAL), ("SIGTERM", 143, CENTRAL), ("SIGTERM", 143, FEDERATED)],
    ids=["sigint", "sigterm", "sigterm-simulation"],
)
def test_interrupted_run_exits_non_zero_says_how_to_resume_and_resumes(tmp_path, sig, code, config):
    import signal
    import time

    out = tmp_path / "run"
    long_run = ["model.preset=tiny", "federation.rounds=400", "federation.checkpoint_every=1"]
    long_run += ["train.local_steps=2", "train.batch_size=8", "sample.per_class=0", "eval.enabled=false"]
    long_run += ["partition.num_clients=2", "federation.clients_per_round=2"]
    exe = Path(sys.executable).with_name("fedsynth")
    args = [str(exe), "run", str(config), "--out", str(out), *_sets(long_run)]
    before = flower_processes()
    # a shell that starts the suite in the background ignores SIGINT for it, and children
    # inherit that: the CLI under test gets the default disposition, as in a terminal
    proc = subprocess.Popen(
        args,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 300  # a simulation starts Ray first; slow on a busy machine
    while not (out / "checkpoints" / "round-0002").is_dir() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert (out / "checkpoints" / "round-0002").is_dir(), "no checkpoint within 300 s"
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err[-2000:]
    assert "interrupted: completed checkpoints are kept; continue with `fedsynth run --resume" in err
    assert "Traceback" not in err and "SIGTERM received" not in err  # no stack dumps on the way out
    # the federated run went through a local SuperLink: nothing of it outlives the CLI
    assert flower_processes() - before == set()
    done = len(list((out / "checkpoints").glob("round-*")))
    res = _cli("run", "--resume", str(out), "--set", "train.lr=0.01")
    trained = load_config(config).train.lr
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        f"error: --resume cannot change train.lr (the run was trained with {trained!r}); start a new run "
        "with --out for that"
    ], res.stderr[-2000:]
    res = _cli("run", "--resume", str(out), "--set", f"federation.rounds={done + 1}")
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"rounds = {done + 1}\n" in (out / "config.toml").read_text()  # the change is recorded


def test_a_new_run_never_goes_into_a_foreign_folder_or_a_file(tmp_path):
    from fedsynth.core.errors import RunDirError

    cfg = load_config(CENTRAL, TINY_OVERRIDES)
    foreign = tmp_path / "project"
    (foreign / "synthetic").mkdir(parents=True)
    (foreign / "config.toml").write_text("mine = true\n")
    (foreign / "eval.json").write_text("{}")
    with pytest.raises(
        RunDirError, match=r"project is not empty and holds no fedsynth run: choose a new --out"
    ):
        run_all(cfg, foreign)
    assert (foreign / "config.toml").read_text() == "mine = true\n" and (foreign / "synthetic").is_dir()
    with pytest.raises(RunDirError, match=r"--out .*eval\.json is a file, not a folder"):
        run_all(cfg, foreign / "eval.json")


def test_too_few_images_to_evaluate_fail_before_training(tmp_path):
    import numpy as np

    from fedsynth.core.errors import ConfigError

    path = tmp_path / "small.npz"
    np.savez(path, images=np.zeros((6, 8, 8), np.uint8), labels=np.array([0, 0, 0, 1, 1, 1]))
    small = ["data.dataset=npz", f"data.path={json.dumps(str(path))}", "partition.num_clients=2"]
    small += ["federation.clients_per_round=2", "sample.per_class=1", 'partition.scheme="iid"']
    cfg = load_config(CENTRAL, [*TINY_OVERRIDES, *small])
    with pytest.raises(ConfigError, match=r"would have 2 \(sample.per_class\) and 2 \(data.test_fraction\)"):
        run_all(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_files_that_are_not_what_they_claim_are_one_line_errors(tmp_path):
    """Sibling inputs of the hardening probe: each gives one line naming the file."""
    import numpy as np
    from PIL import Image

    from fedsynth.config import DataConfig
    from fedsynth.core.errors import DataError, RunDirError
    from fedsynth.core.rundir import RunDir
    from fedsynth.data.datasets import load_images
    from fedsynth.report.compare import write_comparison
    from fedsynth.report.markdown import write_report

    def npz_error(name, **arrays):
        path = tmp_path / name
        np.savez(path, **arrays)
        with pytest.raises(DataError) as err:
            load_images(DataConfig(dataset="npz", path=str(path)))
        assert name in str(err.value) and "\n" not in str(err.value)
        return str(err.value)

    objects = np.array([np.zeros(2), np.zeros(3)], dtype=object)
    assert "unreadable npz" in npz_error("obj.npz", images=objects, labels=np.array([0, 1]))
    assert "'images' is empty" in npz_error("empty.npz", images=np.zeros((0, 8, 8)), labels=np.zeros(0, int))
    npy = tmp_path / "arr.npz"
    with npy.open("wb") as fh:
        np.save(fh, np.zeros((4, 8, 8)))
    with pytest.raises(DataError, match=r"arr\.npz is a single \.npy array"):
        load_images(DataConfig(dataset="npz", path=str(npy)))
    bomb = tmp_path / "folder" / "a" / "bomb.png"
    bomb.parent.mkdir(parents=True)
    Image.new("L", (8, 8)).save(bomb)
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = 16  # an 8×8 image is now over twice the limit: a "bomb"
    try:
        with pytest.raises(DataError, match=r"unreadable image .*bomb\.png"):
            load_images(DataConfig(dataset="imagefolder", path=str(tmp_path / "folder")))
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    with pytest.raises(RunDirError, match="is not a fedsynth run"):
        write_report(RunDir(tmp_path / "folder"))
    assert not (tmp_path / "folder" / "report.md").exists()
    with pytest.raises(RunDirError, match="is a folder: give the markdown file"):
        write_comparison([tmp_path], tmp_path)
    with pytest.raises(RunDirError, match="does not exist"):
        write_comparison([tmp_path], tmp_path / "missing" / "cmp.md")


def test_a_damaged_domain_classifier_cache_is_trained_again(tmp_path):
    from fedsynth.config import DataConfig
    from fedsynth.data.datasets import load_images
    from fedsynth.evaluation.domain import dataset_key, domain_classifier

    data = load_images(DataConfig()).subset(torch.arange(0, 1797, 9).numpy())
    (tmp_path / f"domain-{dataset_key(data, 1)}.pt").write_bytes(b"not a model")
    model = domain_classifier(data, epochs=1, device=torch.device("cpu"), cache_dir=str(tmp_path))
    assert model(data.images[:2]).shape == (2, 10)


@pytest.mark.slow
def test_unexpected_and_os_errors_are_one_line_and_debug_shows_the_traceback(tmp_path):
    import os

    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = _cli("run", str(CENTRAL), "--out", str(blocker / "run"))
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and "Not a directory" in lines[0], res.stderr
    res = _cli("sample", str(tmp_path), "--out", str(tmp_path / "s"), "--format", "jpg")
    assert res.returncode == 2
    assert res.stderr.strip() == "error: format 'jpg' is not valid; choose one of: png, npz"
    env = {**os.environ, "FEDSYNTH_DEBUG": "1"}
    exe = Path(sys.executable).with_name("fedsynth")
    args = [str(exe), "run", str(CENTRAL), "--out", str(blocker / "run")]
    res = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode != 0 and "Traceback" in res.stderr


def test_datasets_lists_the_built_in_datasets_and_where_they_come_from():
    import os

    res = subprocess.run(
        [str(Path(sys.executable).with_name("fedsynth")), "datasets"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert res.returncode == 0, res.stderr
    for name in ("digits", "fashion-mnist", "idx", "imagefolder", "npz", "present"):
        assert name in res.stdout


def test_keys_writes_a_ca_a_server_certificate_for_the_host_and_node_key_pairs(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    fedsynth = [sys.executable, "-m", "fedsynth.cli", "keys"]
    res = subprocess.run(
        [*fedsynth, str(tmp_path / "k"), "--host", "10.1.2.3", "--host", "fed.example", "--nodes", "2"],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    ca = x509.load_pem_x509_certificate((tmp_path / "k/ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((tmp_path / "k/server.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["10.1.2.3"]
    assert names.get_values_for_type(x509.DNSName) == ["fed.example"]
    for i in (0, 1):
        key = load_ssh_private_key((tmp_path / f"k/node-{i}.key").read_bytes(), None)
        public = load_ssh_public_key((tmp_path / f"k/node-{i}.pub").read_bytes())
        assert key.public_key().public_numbers() == public.public_numbers()
        assert (tmp_path / f"k/node-{i}.key").stat().st_mode & 0o777 == 0o600
    again = subprocess.run(
        [*fedsynth, str(tmp_path / "k"), "--host", "h", "--nodes", "1"], capture_output=True, text=True
    )
    assert again.returncode == 2 and "never overwritten" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
