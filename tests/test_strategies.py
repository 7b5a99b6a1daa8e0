"""Every strategy: hand-computed expectations, and one conformance suite for all."""

import io

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Message, MessageType, MetricRecord, RecordDict

from fedsynth.config import STRATEGY_NAMES, config_from_dict
from fedsynth.strategies import STRATEGIES, build_strategy
from fedsynth.strategies.feddiff import pretrain_space
from fedsynth.strategies.flower import ensure_run_identity
from fedsynth.strategies.scaffold import CONTROL_KEY, client_control_update, server_update


@pytest.fixture(autouse=True)
def _run_identity():
    ensure_run_identity()  # messages built outside a Flower run, as aggregator nodes do


def _record(values: dict) -> ArrayRecord:
    return ArrayRecord({k: torch.tensor(v, dtype=torch.float32) for k, v in values.items()})


def reply(values: dict, n: int = 1, control: dict | None = None) -> Message:
    content = RecordDict(
        {
            "arrays": _record(values),
            "metrics": MetricRecord(
                {"num-examples": n, "num-steps": 5, "train-loss": 0.5, "partition-id": 0, "compute-s": 0.0}
            ),
        }
    )
    if control is not None:
        content[CONTROL_KEY] = _record(control)
    return Message(content=content, dst_node_id=1, message_type=MessageType.TRAIN)


FEDDIFF_TINY = {"ae_steps": 20, "ldm_steps": 20, "timesteps": 10, "t_final": 5, "encoder_steps": 2}


FAMILY = {
    "fedadam": "fedopt",
    "fedyogi": "fedopt",
    "fedadagrad": "fedopt",
    "multikrum": "krum",
    "bulyan": "krum",
}


def strategy(name: str, **params):
    """Strategy ``name`` with ``params`` in its family's section (``[strategy.fedopt]`` …)."""
    raw = {
        "strategy": {"name": name, **({FAMILY.get(name, name): params} if params else {})},
        "partition": {"num_clients": 8},
        "federation": {"clients_per_round": 4},
    }
    if name == "feddiff":  # a pre-trained weight space for subset "b", scored by closeness to GLOBAL's b
        raw |= {"paradigm": "federated", "phoenix": {"beta": 4}, "feddiff": FEDDIFF_TINY}
    s = build_strategy(config_from_dict(raw))
    if name == "feddiff":
        target = torch.tensor(GLOBAL["b"]).reshape(-1)
        pool = target + 0.1 * torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
        space, _ = pretrain_space(["b"], pool, -((pool - target) ** 2).sum(1), s.cfg, seed=0)
        s.attach(space, lambda w: -float(((w["b"].reshape(-1) - target) ** 2).sum()))
    return s


def aggregate(s, global_w: dict, replies: list, round_: int = 1) -> dict:
    s.begin_round(_record(global_w))
    arrays, _ = s.aggregate_train(round_, replies)
    return {k: a.numpy() for k, a in arrays.items()}


def test_registry_matches_config_choices():
    assert tuple(STRATEGIES) == STRATEGY_NAMES


# ----------------------------------------------------------------- hand-computed


def test_fedavg_weighted_mean():
    out = aggregate(
        strategy("fedavg"), {"a": [0.0, 0.0]}, [reply({"a": [1.0, 2.0]}, 1), reply({"a": [3.0, 6.0]}, 3)]
    )
    assert np.allclose(out["a"], [2.5, 5.0])  # (1·1 + 3·3)/4, (2 + 18)/4


def test_fedmedian_is_coordinatewise():
    out = aggregate(
        strategy("fedmedian"),
        {"a": [0.0, 0.0]},
        [reply({"a": [1.0, 9.0]}), reply({"a": [5.0, 2.0]}), reply({"a": [2.0, 4.0]})],
    )
    assert np.allclose(out["a"], [2.0, 4.0])  # per coordinate, not one client's vector


def test_fedavgm_momentum_two_rounds():
    s = strategy("fedavgm", server_learning_rate=1.0, server_momentum=0.9)
    # round 1: Δ = x − mean = 0 − 1 = −1; v = −1; x = 0 − 1·(−1) = 1
    x1 = aggregate(s, {"a": [0.0]}, [reply({"a": [1.0]})], 1)
    assert np.allclose(x1["a"], [1.0])
    # round 2: Δ = 1 − 1.5 = −0.5; v = 0.9·(−1) − 0.5 = −1.4; x = 1 + 1.4 = 2.4
    x2 = aggregate(s, {"a": [1.0]}, [reply({"a": [1.5]})], 2)
    assert np.allclose(x2["a"], [2.4])


def test_fedyogi_one_step():
    s = strategy("fedyogi", eta=0.1, beta_1=0.9, beta_2=0.99, tau=1e-3)
    # Δ = 1; m = 0.1·1 = 0.1; v = 0 − 0.01·1·sign(0 − 1) = 0.01; x = 0 + 0.1·0.1/(0.1 + 0.001)
    out = aggregate(s, {"a": [0.0]}, [reply({"a": [1.0]})])
    assert np.allclose(out["a"], [0.1 * 0.1 / 0.101])


def test_fedadam_one_step_with_flowers_bias_correction():
    s = strategy("fedadam", eta=0.1, beta_1=0.9, beta_2=0.99, tau=1e-3)
    # m = 0.1, v = 0.01·1 = 0.01; η_t = η·√(1 − β2^(t+1))/(1 − β1^(t+1)) at t = 1
    eta_t = 0.1 * np.sqrt(1 - 0.99**2) / (1 - 0.9**2)
    out = aggregate(s, {"a": [0.0]}, [reply({"a": [1.0]})])
    assert np.allclose(out["a"], [eta_t * 0.1 / (0.1 + 1e-3)])


def test_fedadagrad_one_step():
    s = strategy("fedadagrad", eta=0.1, tau=1e-3)
    # β1 = 0 → m = Δ = 1; v = 0 + 1 = 1; x = 0.1·1/(1 + 0.001)
    out = aggregate(s, {"a": [0.0]}, [reply({"a": [1.0]})])
    assert np.allclose(out["a"], [0.1 / 1.001])


def test_fedtrimmedavg_cuts_each_side():
    out = aggregate(
        strategy("fedtrimmedavg", beta=0.2),
        {"a": [0.0]},
        [reply({"a": [v]}) for v in (1.0, 2.0, 3.0, 4.0, 100.0)],
    )
    assert np.allclose(out["a"], [3.0])  # 20% of 5 = 1 cut per side → mean(2, 3, 4)


def test_krum_keeps_the_smallest_score():
    # squared distances, n − f − 2 = 2 closest: scores 0→1+4=5, 1→1+1=2, 2→5, 10→64+81=145
    out = aggregate(
        strategy("krum", num_malicious_nodes=0),
        {"a": [0.0]},
        [reply({"a": [v]}) for v in (0.0, 1.0, 2.0, 10.0)],
    )
    assert np.allclose(out["a"], [1.0])  # not 10.0 (Senden 2025's box took the largest)


def test_multikrum_mean_of_m_best():
    # scores: 0→1+6.25=7.25, 1→1+2.25=3.25, 2.5→8.5, 10→137.25; m = 2 → mean(1, 0)
    out = aggregate(
        strategy("multikrum", num_malicious_nodes=0, num_nodes_to_select=2),
        {"a": [0.0]},
        [reply({"a": [v]}) for v in (0.0, 1.0, 2.5, 10.0)],
    )
    assert np.allclose(out["a"], [0.5])


def test_bulyan_resists_an_outlier():
    s = build_strategy(
        config_from_dict(
            {
                "strategy": {"name": "bulyan", "krum": {"num_malicious_nodes": 1}},
                "partition": {"num_clients": 8},
                "federation": {"clients_per_round": 7},
            }
        )
    )
    out = aggregate(s, {"a": [0.0]}, [reply({"a": [v]}) for v in (0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 1000.0)])
    assert 1.0 <= out["a"][0] <= 4.0
    with pytest.raises(
        ValueError, match=r"bulyan needs clients_per_round >= 4 \* num_malicious_nodes \+ 3 = 7, got 4"
    ):
        strategy("bulyan", num_malicious_nodes=1)


def test_fedprox_aggregates_like_fedavg():
    out = aggregate(
        strategy("fedprox", proximal_mu=0.1), {"a": [0.0]}, [reply({"a": [1.0]}, 1), reply({"a": [4.0]}, 2)]
    )
    assert np.allclose(out["a"], [3.0])


def test_scaffold_maths_by_hand():
    x, y = {"a": np.array([1.0])}, {"a": np.array([0.5])}
    c, c_i = {"a": np.array([0.2])}, {"a": np.array([0.1])}
    # c_i⁺ = c_i − c + (x − y)/(K η) = 0.1 − 0.2 + 0.5/(5·0.1) = 0.9
    assert np.allclose(client_control_update(c_i, c, x, y, steps=5, lr=0.1)["a"], [0.9])
    # x ← x + η_g·mean(Δy) = 1 + 1·(−0.5 + 0.5)/2... with Δy = −0.5, −0.1: 1 − 0.3 = 0.7
    # c ← c + (|S|/N)·mean(Δc) = 0.2 + (2/8)·(0.8 + 0.4)/2 = 0.35
    new_x, new_c = server_update(
        x,
        c,
        [{"a": np.array([-0.5])}, {"a": np.array([-0.1])}],
        [{"a": np.array([0.8])}, {"a": np.array([0.4])}],
        server_lr=1.0,
        num_clients=8,
    )
    assert np.allclose(new_x["a"], [0.7]) and np.allclose(new_c["a"], [0.35])


def test_scaffold_strategy_updates_control():
    s = strategy("scaffold")
    out = aggregate(
        s,
        {"a": [1.0]},
        [reply({"a": [0.5]}, control={"a": [0.8]}), reply({"a": [0.9]}, control={"a": [0.4]})],
    )
    assert np.allclose(out["a"], [0.7])
    assert np.allclose(s.control["a"], [0.0 + (2 / 8) * 0.6])
    assert np.allclose(s.broadcast()[CONTROL_KEY]["a"].numpy(), [0.15])


# ----------------------------------------------------------------- conformance

AVERAGING = {"fedavg", "fedmedian", "fedprox", "fedtrimmedavg", "krum", "multikrum", "bulyan"}


def _replies(name, values, ns=None, control=None):
    ns = ns or [1] * len(values)
    ctl = (lambda v: {"a": np.zeros_like(v["a"]), "b": np.zeros_like(v["b"])}) if name == "scaffold" else None
    return [reply(v, n, control=ctl(v) if ctl else control) for v, n in zip(values, ns, strict=True)]


GLOBAL = {"a": [0.5, -1.0, 2.0], "b": [[1.0, 2.0], [3.0, 4.0]]}


def _client(i: int) -> dict:
    rng = np.random.default_rng(i)
    return {k: (np.asarray(v) + rng.normal(0, 0.1, np.shape(v))).tolist() for k, v in GLOBAL.items()}


GENERATED = {"feddiff": {"b"}}  # subsets a strategy generates rather than averages: exempt below


@pytest.mark.parametrize("name", STRATEGY_NAMES)
def test_conformance_unchanged_clients_keep_the_global(name):
    out = aggregate(strategy(name), GLOBAL, _replies(name, [GLOBAL] * 4))
    for k, v in GLOBAL.items():
        if k not in GENERATED.get(name, ()):
            assert np.allclose(out[k], v, atol=1e-6), (name, k)


@pytest.mark.parametrize("name", sorted(AVERAGING))
def test_conformance_identical_updates_return_unchanged(name):
    w = _client(0)
    out = aggregate(strategy(name), GLOBAL, _replies(name, [w] * 4))
    for k in w:
        assert np.allclose(out[k], w[k], atol=1e-6), (name, k)


@pytest.mark.parametrize("name", STRATEGY_NAMES)
def test_conformance_weights_are_normalised(name):
    values = [_client(i) for i in range(4)]
    one = aggregate(strategy(name), GLOBAL, _replies(name, values, [1, 2, 3, 4]))
    scaled = aggregate(strategy(name), GLOBAL, _replies(name, values, [7, 14, 21, 28]))
    for k in one:
        assert np.allclose(one[k], scaled[k], atol=1e-6), (name, k)


@pytest.mark.parametrize("name", STRATEGY_NAMES)
def test_conformance_state_round_trips(name):
    first, second = [_client(i) for i in range(4)], [_client(10 + i) for i in range(4)]
    a = strategy(name)
    x1 = aggregate(a, GLOBAL, _replies(name, first), 1)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = strategy(name)
    b.load_state_dict(torch.load(buf, weights_only=True))
    out_a = aggregate(a, x1, _replies(name, second), 2)
    out_b = aggregate(b, x1, _replies(name, second), 2)
    for k in out_a:
        assert np.array_equal(out_a[k], out_b[k]), (name, k)


@pytest.mark.parametrize("name", STRATEGY_NAMES)
def test_conformance_state_keys_are_checked(name):
    with pytest.raises(ValueError, match="state keys"):
        strategy(name).load_state_dict({"bogus": None})


def test_per_key_aggregation_over_the_clients_that_sent_each_group(tmp_path):
    """USPLIT: each group is averaged (by example count) over the replies that carry it;
    a group nobody sent keeps its global value."""
    from fedsynth.core.protocol import UpdateInfo
    from fedsynth.diffusion.unet import seeded_unet
    from fedsynth.exchange.groups import group_of
    from fedsynth.strategies.adapter import Update

    cfg = config_from_dict(
        {
            "paradigm": "federated",
            "model": {"preset": "tiny"},
            "exchange": {"plan": "usplit"},
            "partition": {"num_clients": 3},
            "federation": {"clients_per_round": 3},
        }
    )
    unet = seeded_unet(cfg.model, 0, 16, 1, 10)
    driver = _driver(cfg, unet, tmp_path)
    g = {k: v.clone() for k, v in unet.state_dict().items()}
    driver.begin_round(g)

    def sent(client, groups, shift, n):
        weights = {k: v + shift for k, v in g.items() if group_of(k) in groups}
        return Update(UpdateInfo(client, n, 5, 0.5, 0.0), weights)

    new = driver.aggregate_units(1, [sent(0, ("up",), 1.0, 1), sent(1, ("up", "mid"), 3.0, 3)])
    for k in new:
        expected = {"up": (1 * 1.0 + 3 * 3.0) / 4, "mid": 3.0, "down": 0.0}[group_of(k)]
        torch.testing.assert_close(new[k], g[k] + expected, rtol=0, atol=1e-5)


def _driver(cfg, unet, tmp_path):
    from fedsynth.core.rundir import RunDir
    from fedsynth.diffusion.schedule import build_train_scheduler
    from fedsynth.diffusion.training import make_ema
    from fedsynth.server.driver import FederatedDriver
    from fedsynth.training.round_loop import Model

    model = Model(unet, make_ema(unet, 0.9), build_train_scheduler(cfg.diffusion))
    return FederatedDriver(cfg, RunDir(tmp_path), model, tuple(str(i) for i in range(10)), grid=None)


def test_malformed_or_nan_compressed_updates_are_dropped_with_reasons(tmp_path):
    from flwr.app import Array

    from fedsynth.diffusion.unet import seeded_unet
    from fedsynth.exchange.groups import GROUPS
    from fedsynth.exchange.transfer import Layout, ServerExchange
    from fedsynth.server.messages import decode_reply

    cfg = config_from_dict(
        {"paradigm": "federated", "model": {"preset": "tiny"}, "exchange": {"codec": "int8"}}
    )
    unet = seeded_unet(cfg.model, 0, 16, 1, 10)
    layout = Layout.of(unet.state_dict())
    exchange = ServerExchange(cfg.exchange, layout)
    keys, global_w = layout.keys(GROUPS), unet.state_dict()

    def decode(msg):
        result = decode_reply(msg, keys, layout, exchange, global_w, "num-examples")
        return None if not isinstance(result, str) else result

    n = sum(v.numel() for v in unet.state_dict().values())
    tensors = len(unet.state_dict())

    def reply_with(values, scales):
        msg = reply({"unused": [0.0]}, n=4)
        msg.content["arrays"] = ArrayRecord({"values": Array(values), "scales": Array(scales)})
        return msg

    good = reply_with(np.zeros(n, np.int8), np.ones(tensors, np.float32))
    short = reply_with(np.zeros(n - 1, np.int8), np.ones(tensors, np.float32))
    nan = reply_with(np.ones(n, np.int8), np.full(tensors, np.nan, np.float32))
    assert decode(good) is None
    assert "undecodable update: int8 payload has" in decode(short)
    assert "non-finite" in decode(nan)


def test_screen_keeps_valid_updates_and_drops_errors_rejections_and_silence_with_reasons():
    from flwr.app import ConfigRecord, Error

    from fedsynth.core.protocol import UpdateInfo
    from fedsynth.server.messages import screen
    from fedsynth.strategies.adapter import Update

    def sent(node):
        return Message(
            RecordDict({"config": ConfigRecord({})}), dst_node_id=node, message_type=MessageType.TRAIN
        )

    nodes = {0: 10, 1: 11, 2: 12, 3: 13}  # partition id → node id
    ok = reply({"w": [1.0, 2.0]}, n=4)
    replies = [
        Message(ok.content, reply_to=sent(10)),
        Message(Error(code=0, reason="disk on fire"), reply_to=sent(11)),
        Message(ok.content, reply_to=sent(12)),
    ]

    def decode(pid, msg):
        if pid == 2:
            return "non-finite values (NaN/Inf) in w"
        return Update(UpdateInfo(pid, 4, 5, 0.5, 0.0), {"w": torch.tensor([1.0, 2.0])})

    out = screen(replies, nodes, expected={0, 1, 2, 3}, timeout=30.0, decode=decode)
    assert [u.info.client for u in out.valid] == [0] and out.params_up == 2
    assert {d.client: d.reason for d in out.dropped} == {
        1: "client error: disk on fire",
        2: "non-finite values (NaN/Inf) in w",
        3: "no reply within federation.round_timeout = 30.0 s",
    }
    assert set(out.bytes_up) == {0, 2} and out.bytes_up[0] > 0  # bytes counted as received


def test_aggregation_does_not_depend_on_the_order_updates_arrived_in():
    from fedsynth.core.protocol import UpdateInfo
    from fedsynth.strategies.adapter import Update, aggregate

    g = torch.Generator().manual_seed(0)
    updates = [
        Update(UpdateInfo(c, 10 + c, 5, 0.5, 0.0), {"w": torch.randn(1000, generator=g)}) for c in range(5)
    ]
    results = []
    for order in (updates, updates[::-1], updates[2:] + updates[:2]):
        s = strategy("fedavg")
        s.begin_round(ArrayRecord({"w": torch.zeros(1000)}))
        results.append(aggregate(s, 1, order, ["w"])["w"])
    assert all(torch.equal(results[0], r) for r in results[1:])


def test_class_rows_by_hand():
    from fedsynth.strategies.class_rows import class_rows

    previous = torch.zeros(4, 2)  # 3 classes + the "no label" row
    aggregated = torch.full((4, 2), 9.0)  # what the strategy produced
    sent = {0: torch.full((4, 2), 1.0), 1: torch.full((4, 2), 3.0)}
    counts = {0: [10, 5, 0], 1: [0, 15, 0]}
    out = class_rows(aggregated, previous, sent, counts)
    assert out[0].tolist() == [1.0, 1.0]  # only client 0 holds class 0
    assert out[1].tolist() == [2.5, 2.5]  # (5·1 + 15·3) / 20
    assert out[2].tolist() == [0.0, 0.0]  # nobody selected holds class 2: unchanged
    assert out[3].tolist() == [9.0, 9.0]  # the "no label" row keeps the strategy's aggregate
    with pytest.raises(ValueError, match="does not match"):
        class_rows(aggregated, previous, {0: torch.zeros(3, 2)}, {0: [1, 1, 1]})


def test_class_aware_aggregation_in_the_round(tmp_path):
    from fedsynth.core.protocol import UpdateInfo
    from fedsynth.diffusion.unet import seeded_unet
    from fedsynth.strategies.adapter import Update
    from fedsynth.strategies.class_rows import CLASS_KEY

    raw = {"paradigm": "federated", "model": {"preset": "tiny"}, "strategy": {"class_aware": True}}
    cfg = config_from_dict({**raw, "partition": {"num_clients": 2}, "federation": {"clients_per_round": 2}})
    unet = seeded_unet(cfg.model, 0, 16, 1, 10)
    driver = _driver(cfg, unet, tmp_path)
    driver.histograms = {0: [5] + [0] * 9, 1: [0, 5] + [0] * 8}
    g = {k: v.clone() for k, v in unet.state_dict().items()}
    driver.begin_round(g)
    updates = [Update(UpdateInfo(c, 5, 5, 0.5, 0.0), {k: v + c + 1.0 for k, v in g.items()}) for c in (0, 1)]
    new = driver.aggregate_units(1, updates)
    torch.testing.assert_close(new[CLASS_KEY][0], g[CLASS_KEY][0] + 1.0)  # client 0's row, not the mean
    torch.testing.assert_close(new[CLASS_KEY][1], g[CLASS_KEY][1] + 2.0)
    torch.testing.assert_close(new[CLASS_KEY][2], g[CLASS_KEY][2])  # held by nobody selected
    torch.testing.assert_close(new[CLASS_KEY][10], g[CLASS_KEY][10] + 1.5)  # "no label": FedAvg
    torch.testing.assert_close(new["conv_in.weight"], g["conv_in.weight"] + 1.5)


def test_fedexp_step_by_hand():
    from fedsynth.strategies.fedexp import fedexp_step

    x = {"w": np.ones(4)}
    orthogonal = [{"w": 2.0 * np.eye(4)[i]} for i in range(4)]
    # Δ̄ = (0.5, 0.5, 0.5, 0.5), ‖Δ̄‖² = 1, Σ‖Δ_i‖² = 16, M = 4 → η_g = 16 / (2·4·1) = 2 (= M/2)
    new, eta = fedexp_step(x, orthogonal, eps=0.0)
    assert eta == 2.0 and new["w"].tolist() == [2.0] * 4
    same = [{"w": np.array([1.0, -1.0, 0.0, 0.0])}] * 3  # identical: 3·2 / (2·3·2) = 0.5 → η_g = 1
    new, eta = fedexp_step(x, same, eps=0.0)
    assert eta == 1.0 and new["w"].tolist() == [2.0, 0.0, 1.0, 1.0]
    _, eta = fedexp_step(x, orthogonal, eps=3.0)  # ε damps it: 16 / (2·4·4) = 0.5 → 1
    assert eta == 1.0
