"""Exchange plans, parameter groups, codecs and both ends of a transfer (no Flower)."""

import numpy as np
import pytest
import torch

from fedsynth.config import ExchangeConfig, ModelConfig
from fedsynth.core.errors import ConfigError
from fedsynth.diffusion.unet import build_unet
from fedsynth.exchange.codecs import Codec, CodecError, compress, decode, encode
from fedsynth.exchange.groups import GROUPS, group_keys, group_of
from fedsynth.exchange.plans import DOWNLOAD, is_personal, upload_groups, usplit_assignment
from fedsynth.exchange.transfer import (
    DELTA,
    WEIGHTS,
    Layout,
    ServerExchange,
    check_base,
    client_reply,
    client_start,
)


@pytest.fixture(scope="module")
def weights():
    return build_unet(ModelConfig(preset="tiny"), 16, 1, 10).state_dict()


def test_groups_partition_every_parameter(weights):
    keys = list(weights)
    parts = [group_keys(keys, (g,)) for g in GROUPS]
    assert sorted(k for p in parts for k in p) == sorted(keys)
    assert all(parts) and not set(parts[0]) & set(parts[1]) and not set(parts[1]) & set(parts[2])
    assert group_of("class_embedding.weight") == "down"
    assert group_of("conv_out.bias") == "up" and group_of("mid_block.resnets.0.conv1.weight") == "mid"


def test_group_selection_errors(weights):
    with pytest.raises(ConfigError, match="match no parameter"):
        group_keys(["conv_in.weight"], ("up",))
    with pytest.raises(ConfigError, match="unknown exchange group"):
        group_keys(list(weights), ("middle",))
    with pytest.raises(ConfigError, match="belongs to no exchange group"):
        group_of("adapter.weight")


def test_usplit_pairs_split_up_down_and_give_mid_to_one():
    for seed in range(20):
        assign = usplit_assignment([3, 5, 8, 9], np.random.default_rng(seed))
        assert sorted(assign) == [3, 5, 8, 9]
        sent = sorted(assign.values())
        downs = [g for g in sent if "down" in g]
        ups = [g for g in sent if "up" in g]
        assert len(downs) == 2 and len(ups) == 2  # each pair: one down, one up
        assert sum("mid" in g for g in sent) == 2  # mid goes to exactly one of each pair
        assert all(len(g) <= 2 and not ("down" in g and "up" in g) for g in sent)
    odd = usplit_assignment([1, 2, 4], np.random.default_rng(0))
    assert sum(g == GROUPS for g in odd.values()) == 1  # the unpaired client sends everything


def test_usplit_is_seeded_and_both_coins_land_both_ways():
    a = upload_groups("usplit", [0, 1, 2, 3], seed=1, round_=2, attempt=0)
    assert a == upload_groups("usplit", [0, 1, 2, 3], seed=1, round_=2, attempt=0)
    seen = {tuple(sorted(upload_groups("usplit", [0, 1], 0, r, 0)[0])) for r in range(40)}
    assert seen == {("down",), ("down", "mid"), ("up",), ("mid", "up")}
    assert upload_groups("udec", [0, 1], 0, 1, 0) == {0: ("up",), 1: ("up",)}
    assert DOWNLOAD["ulatdec"] == ("mid", "up") and is_personal("udec") and not is_personal("usplit")


def _tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, generator=g), torch.randn(7, generator=g) * 1e-3, torch.zeros(5)]


@pytest.mark.parametrize(
    ("name", "bound"),
    [
        ("fp32", lambda x: torch.zeros_like(x)),
        ("fp16", lambda x: x.abs() * 2**-11 + 6e-8),
        ("bf16", lambda x: x.abs() * 2**-8),
    ],
)
def test_float_codec_round_trip_bounds(name, bound):
    xs = _tensors()
    for x, y in zip(xs, decode(Codec(name), encode(Codec(name), xs), [t.shape for t in xs]), strict=True):
        assert y.dtype == torch.float32 and y.shape == x.shape
        assert ((y - x).abs() <= bound(x)).all()


def test_int8_error_is_at_most_half_a_step_per_tensor():
    xs = _tensors()
    payload = encode(Codec("int8"), xs)
    assert payload["values"].dtype == np.int8 and payload["scales"].shape == (3,)
    for x, y in zip(xs, decode(Codec("int8"), payload, [t.shape for t in xs]), strict=True):
        step = x.abs().max() / 127
        assert ((y - x).abs() <= step / 2 + 1e-9).all()
    assert payload["scales"][2] == 0  # an all-zero tensor decodes to zeros


def test_topk_keeps_the_largest_entries_of_each_tensor_exactly():
    x = [torch.tensor([0.1, -5.0, 0.2, 3.0]), torch.tensor([[1.0, -2.0], [0.5, 0.0]])]
    payload = encode(Codec("topk", keep=0.5), x)
    y = decode(Codec("topk", keep=0.5), payload, [(4,), (2, 2)])
    assert torch.equal(y[0], torch.tensor([0.0, -5.0, 0.0, 3.0]))
    assert torch.equal(y[1], torch.tensor([[1.0, -2.0], [0.0, 0.0]]))
    assert payload["indices"].dtype == np.int32 and list(payload["indices"]) == [1, 3, 4, 5]


def test_error_feedback_carries_the_residual_to_the_next_round():
    codec = Codec("topk", keep=0.25)
    delta = [torch.tensor([4.0, 3.0, 2.0, 1.0])]
    _, sent1, residual = compress(codec, delta, None)
    assert torch.equal(sent1[0], torch.tensor([4.0, 0, 0, 0]))
    assert torch.equal(residual[0], torch.tensor([0.0, 3.0, 2.0, 1.0]))
    _, sent2, residual = compress(codec, [torch.tensor([0.0, 0.0, 0.0, 0.5])], residual)
    assert torch.equal(sent2[0], torch.tensor([0.0, 3.0, 0, 0]))  # last round's 3.0 arrives now
    assert torch.equal(residual[0], torch.tensor([0.0, 0.0, 2.0, 1.5]))


def test_decode_rejects_malformed_payloads():
    with pytest.raises(CodecError, match="expected 12"):
        decode(Codec("fp16"), {"values": np.zeros(5, np.float16)}, [(3, 4)])
    with pytest.raises(CodecError, match="out of range"):
        decode(Codec("topk"), {"values": np.ones(1, np.float32), "indices": np.array([99], np.int32)}, [(3,)])
    with pytest.raises(CodecError, match="scales"):
        decode(Codec("int8"), {"values": np.zeros(3, np.int8)}, [(3,)])


@pytest.mark.parametrize(("plan", "codec"), [("full", "int8"), ("udec", "fp32"), ("ulatdec", "topk")])
def test_round_trip_between_server_and_client(weights, plan, codec):
    ex = ExchangeConfig(plan=plan, codec=codec, topk_ratio=0.1)
    layout = Layout.of(weights)
    server, state = ServerExchange(ex, layout), {}
    arrays, mode, n = server.download(7, weights)
    assert n == sum(v.numel() for v in weights.values())
    assert mode == WEIGHTS and set(arrays) == set(weights)  # initial broadcast: the whole model
    start = client_start(ex, layout, arrays, mode, state)
    new = {k: v + 0.01 for k, v in start.items()}
    upload = layout.keys(DOWNLOAD[plan])
    reply = client_reply(ex, layout, start, new, DOWNLOAD[plan], state)
    got = server.upload(reply, upload, weights)
    assert set(got) == set(upload)
    tol = 0.0 if codec == "fp32" else 0.011
    assert max((got[k] - new[k]).abs().max().item() for k in upload) <= tol
    local = [k for k in weights if k not in upload]
    assert set(state["local"]) == set(local)  # personal groups stay in the client's state
    assert all(torch.equal(state["local"][k], new[k]) for k in local)
    # second round: only the download groups travel, and the client's copy matches the server's
    moved = {k: v + 0.5 for k, v in weights.items()}
    arrays, mode, n2 = server.download(7, moved)
    assert n2 == sum(weights[k].numel() for k in upload) and (mode == DELTA) == (codec != "fp32")
    start2 = client_start(ex, layout, arrays, mode, state)
    if codec != "fp32":
        assert all(torch.equal(state["ref"][k], server.refs[7][k]) for k in upload)
    assert all(torch.equal(start2[k], new[k]) for k in local)


def test_client_without_state_asks_for_the_full_model(weights):
    ex = ExchangeConfig(plan="udec", codec="int8")
    layout = Layout.of(weights)
    server = ServerExchange(ex, layout)
    server.download(1, weights)
    arrays, mode, _ = server.download(1, weights)
    with pytest.raises(CodecError, match="restarted"):
        client_start(ex, layout, arrays, mode, {})
    server.forget(1)
    arrays, mode, _ = server.download(1, weights)
    assert mode == WEIGHTS and set(arrays) == set(weights)


def test_personal_keys_resolve_and_unknown_names_are_errors(weights):
    from fedsynth.exchange.groups import personal_keys

    last = personal_keys("last-block", weights)
    top = max(int(k.split(".")[1]) for k in weights if k.startswith("up_blocks."))
    assert last and all(k.startswith((f"up_blocks.{top}.", "conv_norm_out.", "conv_out.")) for k in last)
    assert {k for k in weights if k.startswith("conv_out.")} <= last
    assert personal_keys("", weights) == frozenset()
    assert personal_keys("conv_in, conv_out", weights) == {
        k for k in weights if k.split(".")[0] in ("conv_in", "conv_out")
    }
    with pytest.raises(ConfigError, match=r"'up_blocks\.9' matches no parameter"):
        personal_keys("up_blocks.9", weights)


def test_personal_layers_never_leave_the_client_and_survive_rounds(weights):
    ex = ExchangeConfig(plan="full", codec="fp32", personal="last-block")
    layout = Layout.of(weights, ex.personal)
    personal = layout.personal
    server, state = ServerExchange(ex, layout), {}
    start = client_start(ex, layout, *server.download(0, weights)[:2], state)
    for round_ in range(3):
        new = {k: v + round_ + 1.0 for k, v in start.items()}
        reply = client_reply(ex, layout, start, new, GROUPS, state)
        assert not personal & set(reply)  # never uploaded
        assert set(reply) == set(weights) - personal
        arrays, mode, _ = server.download(0, {k: v * 0 for k, v in weights.items()})
        assert not personal & set(arrays)  # never sent back either
        start = client_start(ex, layout, arrays, mode, state)
        assert all(torch.equal(start[k], new[k]) for k in personal)  # restored over the global
        assert all(torch.equal(start[k], torch.zeros_like(new[k])) for k in set(weights) - personal)


def test_a_client_sent_the_full_model_again_keeps_its_personal_weights(weights):
    """After a dropped round the server resends everything; trained personal parts survive."""
    ex = ExchangeConfig(plan="udec", codec="fp32")
    layout = Layout.of(weights)
    server, state = ServerExchange(ex, layout), {}
    start = client_start(ex, layout, *server.download(2, weights)[:2], state)
    new = {k: v + 1.0 for k, v in start.items()}
    client_reply(ex, layout, start, new, ("up",), state)
    server.forget(2)
    arrays, mode, _ = server.download(2, weights)
    assert set(arrays) == set(weights)
    again = client_start(ex, layout, arrays, mode, state)
    up = set(layout.download("udec"))
    assert all(torch.equal(again[k], new[k]) for k in weights if k not in up)
    assert all(torch.equal(again[k], weights[k]) for k in up)


def test_frozen_parameters_never_travel_and_the_base_is_checked_by_hash(weights):
    """``train.trainable`` (and LoRA's base): what no one trains is never sent; each client fills
    it from its own copy, and a client whose copy differs from the server's refuses."""
    ex = ExchangeConfig(plan="full", codec="fp32")
    layout = Layout.of(weights, trainable="up_blocks,conv_out")
    trained = {k for k in weights if k.startswith(("up_blocks.", "conv_out."))}
    assert layout.frozen == set(weights) - trained and set(layout.sent) == trained
    base = {k: v.clone() for k, v in weights.items() if k in layout.frozen}
    server, state = ServerExchange(ex, layout), {}
    arrays, mode, n = server.download(0, weights)
    assert mode == WEIGHTS and set(arrays) == trained and n == sum(weights[k].numel() for k in trained)
    start = client_start(ex, layout, arrays, mode, state, base)
    assert set(start) == set(weights) and all(torch.equal(start[k], weights[k]) for k in weights)
    new = {k: v + 1.0 if k in trained else v for k, v in start.items()}
    assert set(client_reply(ex, layout, start, new, GROUPS, state)) == trained
    moved = {k: v + 2.0 if k in trained else v for k, v in weights.items()}
    arrays, mode, n = server.download(0, moved)
    assert set(arrays) == trained and n == sum(weights[k].numel() for k in trained)
    again = client_start(ex, layout, arrays, mode, state, base)
    assert all(torch.equal(again[k], moved[k]) for k in weights)
    with pytest.raises(CodecError, match="needs a full model"):  # a client without its base
        client_start(ex, layout, arrays, mode, {}, None)
    check_base(layout.base_digest, layout)
    other = Layout.of(
        {**weights, "conv_in.bias": weights["conv_in.bias"] + 1e-6}, trainable="up_blocks,conv_out"
    )
    with pytest.raises(
        CodecError, match=f"SHA-256 {other.base_digest} here, {layout.base_digest} on the server"
    ):
        check_base(layout.base_digest, other)
    assert Layout.of(weights).base_digest == ""  # everything trains: nothing to check
    with pytest.raises(ConfigError, match=r"train.trainable: 'nope' matches no parameter"):
        Layout.of(weights, trainable="nope")
    with pytest.raises(ConfigError, match="only personal or frozen"):
        layout.keys(("down",))
