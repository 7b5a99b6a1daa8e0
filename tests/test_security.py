"""A run directory or an output folder from someone else: nothing written outside it, no
markdown injected through its JSON, no foreign folder deleted; outputs follow the umask."""

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY_OVERRIDES
from fedsynth.config import load_config
from fedsynth.core.errors import RunDirError
from fedsynth.core.rundir import DIR_MODE, FILE_MODE, RunDir, write_text_atomic
from fedsynth.pipeline import run_all
from fedsynth.report.markdown import code, md, write_report

ROOT = Path(__file__).parents[1]
CENTRAL = ROOT / "configs" / "digits-centralized.toml"
PAYLOAD = "x\nimport os; os.system('touch /tmp/PWNED')\n"


def _cli(*args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("fedsynth")
    return subprocess.run([str(exe), *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    cfg = load_config(CENTRAL, [*TINY_OVERRIDES, "eval.membership_samples=0", "eval.tsne_points=0"])
    return run_all(cfg, tmp_path_factory.mktemp("finished") / "run").root


@pytest.fixture
def received(finished, tmp_path) -> Path:
    """A copy of a finished run, as if received from someone else."""
    return Path(shutil.copytree(finished, tmp_path / "received", symlinks=True))


@pytest.mark.slow
def test_a_link_in_a_received_run_is_refused_and_nothing_is_written_through_it(received, tmp_path):
    outside = tmp_path / "venv" / "site-packages"
    outside.mkdir(parents=True)
    (received / "report.md").unlink()
    (received / "report.md").symlink_to(outside / "zz.pth")  # dangling is enough
    summary = json.loads((received / "summary.json").read_text())
    (received / "summary.json").write_text(json.dumps({**summary, "strategy": PAYLOAD}))
    for args in (("report", str(received)), ("evaluate", str(received)), ("run", "--resume", str(received))):
        res = _cli(*args)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2, (args, res.stderr)
        assert len(lines) == 1 and "report.md is a link leading outside the run directory" in lines[0]
    assert not (outside / "zz.pth").exists() and list(outside.iterdir()) == []


def test_a_link_to_a_folder_outside_is_refused(received, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.rmtree(received / "synthetic")
    (received / "synthetic").symlink_to(elsewhere)
    with pytest.raises(RunDirError, match="synthetic is a link leading outside"):
        write_report(RunDir(received))
    assert list(elsewhere.iterdir()) == []


def test_a_link_inside_the_run_is_accepted(received):
    (received / "latest-samples.png").symlink_to(received / "samples.png")
    assert "## Samples" in write_report(RunDir(received))


def test_files_are_replaced_never_written_through_a_link(tmp_path):
    target = tmp_path / "target.txt"
    target.write_text("theirs")
    link = tmp_path / "report.md"
    link.symlink_to(target)
    write_text_atomic(link, "ours")
    assert target.read_text() == "theirs"
    assert not link.is_symlink() and link.read_text() == "ours"
    metrics = tmp_path / "run" / "metrics.jsonl"
    metrics.parent.mkdir()
    metrics.symlink_to(target)
    with pytest.raises(RunDirError, match="is a link"):
        RunDir(metrics.parent).append_metrics({"round": 1})
    assert target.read_text() == "theirs"


def test_values_from_a_runs_json_reach_the_report_as_one_line_of_data(received):
    summary = json.loads((received / "summary.json").read_text())
    injected = {**summary, "strategy": PAYLOAD, "fd": "<img src=x onerror=alert(1)>|"}
    (received / "summary.json").write_text(json.dumps(injected))
    text = write_report(RunDir(received))
    assert not any(line.startswith("import os") for line in text.splitlines())
    row = next(line for line in text.splitlines() if line.startswith("| strategy |"))
    assert "import os; os.system" in row and "\n" not in row
    fd_row = next(line for line in text.splitlines() if line.startswith("| FD"))
    assert re.search(r"(?<!\\)[<>|]", fd_row.removeprefix("| FD ↓ |").removesuffix(" |")) is None


def test_markdown_escaping_by_hand():
    assert md("a\nb\r\tc") == "a b c"
    assert md("[x](http://e)|`y`") == "\\[x\\]\\(http://e\\)\\|\\`y\\`"
    assert md("x" * 400).endswith("…") and len(md("x" * 400)) == 300
    assert code("conv_out") == "`conv_out`"
    assert code("a\nb") == "`a b`"
    assert code("a`b") == "a\\`b"


def _webapp(root: Path) -> Path:
    (root / "src").mkdir(parents=True)
    (root / "manifest.json").write_text('{"name": "app"}')
    (root / "index.html").write_text("<html></html>")
    (root / "src" / "main.js").write_text("main()")
    return root


@pytest.mark.slow
def test_sample_never_replaces_a_folder_that_is_not_exactly_a_synthetic_set(finished, tmp_path):
    webapp = _webapp(tmp_path / "webapp")
    res = _cli("sample", str(finished), "--out", str(webapp), "--per-class", "1", "--steps", "1")
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "is not empty and holds no synthetic set" in res.stderr
    assert sorted(str(p.relative_to(webapp)) for p in webapp.rglob("*")) == [
        "index.html",
        "manifest.json",
        "src",
        "src/main.js",
    ]
    # a synthetic set with one stranger's file added is refused too
    theirs = tmp_path / "theirs"
    shutil.copytree(finished / "synthetic", theirs)
    (theirs / "notes.txt").write_text("mine")
    res = _cli("sample", str(finished), "--out", str(theirs), "--per-class", "1", "--steps", "1")
    assert res.returncode == 2 and (theirs / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_sample_replaces_an_earlier_synthetic_set(finished, tmp_path):
    out = tmp_path / "set"
    for per_class in ("2", "1"):
        res = _cli("sample", str(finished), "--out", str(out), "--per-class", per_class, "--steps", "1")
        assert res.returncode == 0, res.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["total"] == len(list(out.rglob("*.png"))) == len(manifest["class_names"])


def test_outputs_follow_the_umask(finished):
    """mkstemp / mkdtemp make 0600 files and 0700 folders; a run's outputs are created as
    open() and mkdir() would under the process's umask (0644 / 0755 under umask 022)."""
    mask = os.umask(0)
    os.umask(mask)
    assert (0o666 & ~mask, 0o777 & ~mask) == (FILE_MODE, DIR_MODE)
    for name in ("summary.json", "eval.json", "partitions.json", "config.toml", "report.md", "samples.png"):
        assert stat.S_IMODE((finished / name).stat().st_mode) == FILE_MODE, name
    for name in ("synthetic", "model", "checkpoints", "checkpoints/round-0002"):
        assert stat.S_IMODE((finished / name).stat().st_mode) == DIR_MODE, name
    if mask == 0o022:
        assert stat.S_IMODE((finished / "summary.json").stat().st_mode) == 0o644
