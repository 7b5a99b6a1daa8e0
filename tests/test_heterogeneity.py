"""Phoenix data sharing and personal layers; FedDDPM / FedDDPM+ server calibration."""

import json

import numpy as np
import pytest
import torch

from fedsynth.config import config_from_dict
from fedsynth.core.errors import ConfigError
from fedsynth.data.sharing import share
from fedsynth.server.calibration import auxiliary_counts, stalled


def test_shared_set_sizes_balance_and_disjointness():
    labels = np.repeat(np.arange(4), 50)  # 200 images, 4 classes
    clients = [np.arange(0, 100), np.arange(100, 200)]  # two classes each
    sh = share(clients, labels, beta=10, alpha=50, seed=3)
    assert len(sh.shared) == 20  # β = |G| / |C| = 10 %
    assert np.bincount(labels[sh.shared], minlength=4).tolist() == [5, 5, 5, 5]
    own = np.concatenate(sh.clients)
    assert not set(own) & set(sh.shared)  # G is removed from the clients
    assert sorted([*own, *sh.shared]) == list(range(200))  # nothing lost
    assert [len(m) for m in sh.merged] == [10, 10]  # α = 50 % of G to each client
    assert all(set(m) <= set(sh.shared) for m in sh.merged)
    assert not np.array_equal(sh.merged[0], sh.merged[1])  # each client its own random part
    again = share(clients, labels, beta=10, alpha=50, seed=3)
    assert np.array_equal(again.shared, sh.shared) and np.array_equal(again.merged[1], sh.merged[1])


def test_shared_set_takes_what_small_classes_have():
    labels = np.array([0] * 3 + [1] * 97)
    sh = share([np.arange(100)], labels, beta=20, alpha=100, seed=0)
    assert np.bincount(labels[sh.shared]).tolist() == [3, 17]
    assert share([np.arange(100)], labels, beta=0, alpha=100, seed=0).shared.size == 0


def test_phoenix_config_checks():
    with pytest.raises(ConfigError, match="percentages"):
        config_from_dict({"phoenix": {"beta": 150}})
    with pytest.raises(ConfigError, match="needs a shared set"):
        config_from_dict({"phoenix": {"warmup_steps": 10}})


def test_auxiliary_counts_follow_the_clients_histograms():
    hist = np.array([[30, 10, 0], [10, 0, 50]])  # N = 100
    counts = auxiliary_counts(hist, 10)
    assert counts.tolist() == [[3, 1, 0], [1, 0, 5]]
    odd = auxiliary_counts(np.array([[1, 1, 1]]), 10)  # 3.33 each: largest remainder
    assert odd.sum() == 10 and sorted(odd[0].tolist()) == [3, 3, 4]


def test_feddpm_plus_fires_only_when_progress_stalls():
    losses = [1.0, 0.8, 0.6, 0.59, 0.588, 0.587, 0.5, 0.4, 0.399]
    fired, since = [], 0
    history: list[float] = []
    for t, loss in enumerate(losses):
        history.append(loss)
        if stalled(history, window=2, min_improvement=0.05, since=since):
            fired.append(t)
            since = t
    # t=2: (1.0-0.6)/1.0 = 40 %; t=3: 26 %; t=4: (0.6-0.588)/0.6 = 2 % -> fire; t=5 too soon;
    # t=6: (0.588-0.5)/0.588 = 15 %; t=7: (0.587-0.4)/0.587 = 32 %; t=8: (0.5-0.399)/0.5 = 20 %
    assert fired == [4]
    assert not stalled([1.0, 1.0], window=2, min_improvement=0.05, since=0)  # too early to tell


def test_threshold_filtering_two_strikes_with_a_scripted_sequence():
    from fedsynth.server.filtering import exclusions, strikes_after, warned

    rounds = [  # client -> self-measured precision, per round (client 2 not selected in round 2)
        {0: 0.9, 1: 0.2, 2: 0.5},
        {0: 0.8, 1: 0.7},
        {0: 0.85, 1: 0.1, 2: 0.3},
        {0: 0.9, 1: 0.05, 2: 0.2},
    ]
    assert warned(rounds[0], "lowest", 0.0) == {1}
    assert warned(rounds[0], "threshold", 0.6) == {1, 2}
    assert warned({3: 0.4, 1: 0.4}, "lowest", 0.0) == {1}  # ties: the lower id, deterministically
    strikes, out, history = {}, set(), []
    for precision in rounds:
        strikes = strikes_after(strikes, set(precision), warned(precision, "threshold", 0.6))
        out, spared = exclusions(out, strikes, precision, num_clients=10, floor=3)
        history.append(sorted(out))
        assert spared == []
    # client 1: warned, then fine (reset), then warned twice -> out after round 4;
    # client 2: warned in rounds 1 and 3 (its two consecutive reports) -> out after round 3
    assert history == [[], [], [2], [1, 2]]


def test_exclusion_never_leaves_fewer_eligible_clients_than_a_round_selects():
    from fedsynth.server.filtering import exclusions

    strikes = {0: 2, 1: 2, 2: 2, 3: 1, 4: 2}
    precision = {0: 0.20, 1: 0.05, 2: 0.10, 3: 0.9, 4: 0.30}
    # 6 clients, 3 per round: room for 3 exclusions; the lowest precisions go (1, 2, 0); 4 is spared
    out, spared = exclusions(set(), strikes, precision, num_clients=6, floor=3)
    assert out == {0, 1, 2} and spared == [4]
    # already excluded clients count against the room and are never re-decided
    out, spared = exclusions({5}, strikes, precision, num_clients=6, floor=3)
    assert out == {1, 2, 5} and spared == [0, 4]
    # no room left: everyone with two strikes is spared, the excluded set is unchanged
    assert exclusions({0, 1, 2}, {4: 3}, {4: 0.0}, num_clients=6, floor=3) == ({0, 1, 2}, [4])


@pytest.mark.slow
def test_phoenix_and_feddpm_plus_end_to_end(tmp_path):
    from diffusers import UNet2DModel

    from fedsynth.core.rundir import RunDir, read_json
    from fedsynth.exchange.groups import personal_keys
    from fedsynth.paradigms.federated import train_federated
    from fedsynth.server.calibration import load_auxiliary
    from fedsynth.stages.prepare import prepare

    raw = {
        "paradigm": "federated",
        "model": {"preset": "tiny"},
        "partition": {"scheme": "pathological", "num_clients": 3, "classes_per_client": 2},
        "diffusion": {"num_train_timesteps": 50},
        "train": {"local_steps": 2, "batch_size": 16},
        "federation": {"rounds": 3, "clients_per_round": 2, "checkpoint_every": 1, "round_timeout": 60.0},
        "exchange": {"personal": "last-block"},
        "phoenix": {
            "beta": 10,
            "alpha": 50,
            "warmup_steps": 2,
            "filter_from": 2,
            "filter_mode": "threshold",
            "precision_threshold": 1.01,  # everyone is warned: two reports in a row exclude
            "filter_samples": 8,
        },
        "calibration": {
            "mode": "stall",
            "pretrain_steps": 2,
            "aux_size": 12,
            "server_steps": 2,
            "window": 1,
            "min_improvement": 1.0,
            "sampler_steps": 2,
        },
        "sample": {"per_class": 0},
    }
    cfg = config_from_dict(raw)
    run = RunDir(tmp_path / "run").create()
    prepared = prepare(cfg, run)
    parts = read_json(run.partitions)
    assert len(parts["shared_indices"]) > 0 and all(len(c["shared_received"]) > 0 for c in parts["clients"])
    train_federated(cfg, run, prepared, resume=False)
    summary = read_json(run.summary)
    assert summary["warmup_s"] > 0 and summary["pretrain_bytes_up"] > 0 and summary["aux_images"] == 12
    aux = load_auxiliary(run.root / "auxiliary.pt", ("x",) * 10)  # kept for a resumed run
    assert len(aux) == 12 and aux.images.shape[1:] == (1, 16, 16)
    rows = run.read_metrics()
    # min_improvement 100 % and window 1: no verdict after round 1 (nothing to compare), then
    # every round counts as stalled
    assert [r["calibrated"] for r in rows] == [False, True, True]
    assert rows[1]["server_s"] > 0 and all(np.isfinite(r["aux_loss"]) for r in rows)
    server = UNet2DModel.from_pretrained(run.model, subfolder="unet").state_dict()
    personal = personal_keys("last-block", server)
    for client in run.client_runs():  # personal layers: trained on the client, never sent
        own = UNet2DModel.from_pretrained(client.model, subfolder="unet").state_dict()
        assert any(not torch.equal(own[k], server[k]) for k in personal)
        assert all(torch.equal(own[k], server[k]) for k in server if k not in personal)
    assert json.loads((run.root / "summary.json").read_text())["clients_exported"]
    assert "filter_warned" not in rows[0] and rows[1]["filter_warned"] == rows[1]["clients"]
    twice = sorted(set(rows[1]["clients"]) & set(rows[2]["clients"]))
    assert twice  # warned in both of their reports; 3 clients, 2 per round: room to exclude one
    first = min(twice, key=lambda pid: (rows[2]["filter_precision"][str(pid)], pid))
    assert rows[2]["filter_excluded"] == [first]
    assert rows[2]["filter_spared"] == [pid for pid in twice if pid != first]


def test_excluded_clients_are_never_selected():
    from fedsynth.training.round_loop import RoundError, select_clients

    for round_ in range(1, 30):
        chosen = select_clients(0, round_, 0, 10, 5, frozenset({1, 4}))
        assert len(chosen) == 5 and not {1, 4} & set(chosen)
    assert select_clients(0, 1, 0, 3, 3, frozenset({0})) == [1, 2]  # fewer remain than asked
    with pytest.raises(RoundError, match="every client has been excluded"):
        select_clients(0, 1, 0, 2, 2, frozenset({0, 1}))


def test_hook_state_reads_todays_layout_and_checkpoints_written_before_hooks():
    from fedsynth.config import config_from_dict
    from fedsynth.server.hooks import ThresholdFilter, hook_state

    legacy = {"calibration": {"history": [1.0], "last_fire": 1}, "strikes": {3: 2, 4: 1}, "excluded": [3]}
    assert hook_state(legacy, "calibration") == {"history": [1.0], "last_fire": 1}
    assert hook_state(legacy, "filtering") == {"strikes": {3: 2, 4: 1}, "excluded": [3]}
    today = {"hooks": {"filtering": {"strikes": {5: 2}, "excluded": [5]}}}
    assert hook_state(today, "filtering") == {"strikes": {5: 2}, "excluded": [5]}
    assert hook_state(today, "calibration") is None
    cfg = config_from_dict({"paradigm": "federated", "phoenix": {"filter_from": 2}})
    hook = ThresholdFilter(cfg)
    hook.load_state_dict({"strikes": {"3": 2, "4": 1}})  # oldest layout: no list, two strikes = out
    assert hook.excluded == {3} and hook.state_dict() == {"strikes": {3: 2, 4: 1}, "excluded": [3]}
