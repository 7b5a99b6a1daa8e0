import io
import tomllib
from pathlib import Path

import pytest

from fedsynth.config import load_config
from fedsynth.core.errors import FedsynthError
from fedsynth.runtime.superlink import (
    CRASH_MARK,
    ERROR_MARK,
    Relay,
    federation_config,
    run_config,
    split_lines,
)

ROOT = Path(__file__).resolve().parents[1]
FEDERATED = ROOT / "configs" / "digits-federated.toml"

# what `flwr run --stream` printed for a tiny run on Flower 1.41 (abridged, colours kept)
STREAM = [
    "Using SuperLink: local (127.0.0.1:57661)\n",
    "Successfully started run 6107419423649099945\n",
    "\x1b[92mINFO \x1b[0m:      Starting logstream for run_id `6107419423649099945`\n",
    "\x1b[93mWARNING \x1b[0m:   Since flwr 1.32, default simulated SuperNodes changed from 10 to 2.\n",
    "\x1b[92mINFO \x1b[0m:      \tflwr federation simulation-config @none/default <superlink> -n <N>\n",
    "Successfully installed fedsynth-run to /tmp/tmpt8cu8xu2/apps/fedsynth.fedsynth-run.1.0.0.a79178be.\n",
    "11/24/2026 20:20:43:DEBUG:Initialising: RayBackend\n",
    "\x1b[93mWARNING \x1b[0m:   fraction_evaluate is set to 0.0. Federated evaluation will be skipped.\n",
    "/x/ray/_private/worker.py:2051: FutureWarning: Tip: In future versions of Ray, Ray will no longer\n",
    "  warnings.warn(\n",
    "\x1b[92mINFO \x1b[0m:      aggregate_train: Received 2 results and 0 failures\n",
    "\x1b[?25l\r\x1b[2Kfederated fedavgm ━━━━━ 1/2 loss 0.97\r",
    "\x1b[2Kfederated fedavgm ━━━━━━━━━━ 2/2 loss 0.96\x1b[92mINFO \x1b[0m:      aggregate_train: 2\n",
    "\r\x1b[2Kfederated fedavgm ━━━━━━━━━━ 2/2 loss 0.96\n",
    "\x1b[93mWARNING \x1b[0m:   node 3 sent a NaN update: dropped\n",
    "\x1b[92mINFO \x1b[0m:      \n",
    "\x1b[?25hreport: /tmp/out/report.md\n",
]


def _relayed(chunks):
    out = io.StringIO()
    relay = Relay(out)
    for line in split_lines(chunks):
        relay.line(line)
    return out.getvalue(), relay


def test_relay_shows_the_apps_output_and_flowers_warnings_but_not_its_log_or_bookkeeping():
    shown, relay = _relayed(STREAM)
    text = shown.replace("\x1b[?25l", "").replace("\x1b[?25h", "").replace("\x1b[2K", "")
    text = text.replace("\x1b[93m", "").replace("\x1b[92m", "").replace("\x1b[0m", "")
    assert text == (
        "\rfederated fedavgm ━━━━━ 1/2 loss 0.97\r"
        "federated fedavgm ━━━━━━━━━━ 2/2 loss 0.96"  # the log line behind the redraw is dropped
        "\rfederated fedavgm ━━━━━━━━━━ 2/2 loss 0.96\n"
        "WARNING :   node 3 sent a NaN update: dropped\n"
    )
    assert shown.endswith("\x1b[?25h")  # the cursor a progress bar hid is shown again
    assert relay.error is None


def test_lines_split_on_newlines_and_carriage_returns_wherever_the_chunks_are_cut():
    text = "".join(STREAM)
    whole = list(split_lines([text]))
    assert "".join(whole) == text
    for size in (1, 7, 64):
        assert list(split_lines(text[i : i + size] for i in range(0, len(text), size))) == whole
    assert all(line.endswith(("\n", "\r")) for line in whole)


@pytest.mark.parametrize(("mark", "crashed"), [(ERROR_MARK, False), (CRASH_MARK, True)])
def test_the_apps_failure_line_becomes_the_error_and_the_traceback_stays_out(mark, crashed):
    stream = [
        "sampling ━━ 3/30\n",
        "\n",
        f"{mark}image folder not found: /nonexistent\n",
        "Traceback (most recent call last):\n",
        '  File "x.py", line 1\n',
    ]
    shown, relay = _relayed(stream)
    assert shown == "sampling ━━ 3/30\n"  # no blank line left hanging before the error
    assert relay.error == "image folder not found: /nonexistent" and relay.crashed is crashed


def test_the_federation_config_has_one_supernode_per_client_and_whole_cpus(tmp_path):
    cfg = load_config(FEDERATED, ["partition.num_clients=6", "federation.client_gpus=0.5"])
    options = dict(item.split("=") for item in federation_config(cfg).split())
    assert options["num-supernodes"] == "6"
    assert options["client-resources-num-cpus"] == "1"
    assert options["client-resources-num-gpus"] == "0.5"
    with pytest.raises(FedsynthError, match="whole CPUs per client"):
        federation_config(load_config(FEDERATED, ["federation.client_cpus=0.5"]))


def test_the_run_config_carries_absolute_paths_and_every_override(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = run_config(Path("c.toml"), Path("runs/x"), ['sample.sampler="ddpm"', "federation.rounds=3"], True)
    values = tomllib.loads(text)
    assert values == {
        "config": str(tmp_path / "c.toml"),
        "out": str(tmp_path / "runs" / "x"),
        "overrides": 'sample.sampler="ddpm";federation.rounds=3',
        "resume": True,
    }
    with pytest.raises(FedsynthError, match="containing"):
        run_config(Path("c.toml"), Path("x"), ['data.path="a;b"'], False)


@pytest.mark.parametrize(
    ("error", "line"),
    [
        (FedsynthError("image folder not found: /x"), f"{ERROR_MARK}image folder not found: /x"),
        (KeyError("weight"), f"{CRASH_MARK}KeyError: 'weight'"),
    ],
)
def test_the_server_app_prints_its_failure_as_one_marked_line_and_still_fails(
    monkeypatch, capsys, error, line
):
    from fedsynth.runtime import serverapp as serverapp

    def failing(grid, context):
        raise error

    monkeypatch.setattr(serverapp, "run_stages", failing)
    with pytest.raises(type(error)):
        serverapp.main(None, None)
    printed = capsys.readouterr().out
    assert printed.splitlines()[-1] == line and printed.startswith("\n")  # on a line of its own
