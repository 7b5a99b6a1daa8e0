"""Decentralized paradigm, pieces: content IDs, the content store, the round contract's rules."""

import http.server
import json
import re
import shutil
import subprocess
import threading
import urllib.parse
from typing import ClassVar

import numpy as np
import pytest
import torch

from fedsynth.ledger.chain import LedgerError, RoundsContract, dev_accounts, in_process_chain
from fedsynth.ledger.cid import content_id
from fedsynth.ledger.store import ContentError, ContentStore, IpfsBackend, LocalBackend, open_store

# --------------------------------------------------------------------------- content IDs

# Reference values: Debian's ipfs_cid (an independent implementation of `ipfs add`'s DAG).
PATTERN = (np.arange(1_024_000) % 251).astype(np.uint8).tobytes()  # 4 chunks, one level
PATTERN_2LEVEL = (np.arange(175 * 262144 + 1) % 251).astype(np.uint8).tobytes()  # 176 chunks: two levels


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"hello\n", "bafybeiffndsajwhk3lwjewwdxqntmjm4b5wxaaanokonsggenkbw6slwk4"),
        (b"", "bafybeif7ztnhq65lumvvtr4ekcwd2ifwgm3awq4zfr3srh462rwyinlb4y"),
        (PATTERN, "bafybeibbws2zx7yvbgkovxtu6j3g7cp6wkeq5rtynmhyr3rzcnbntastpe"),
        (PATTERN_2LEVEL, "bafybeih6bydjnhu4qvxtpeafasmozbs36wxumlx2drlsvbq45ppdozkz4i"),
    ],
    ids=["hello", "empty", "4-chunks", "2-levels"],
)
def test_content_id_matches_ipfs_add(data, expected):
    assert content_id(data) == expected


@pytest.mark.skipif(shutil.which("ipfs_cid") is None, reason="Debian's ipfs-cid is not installed")
@pytest.mark.parametrize("size", [0, 7, 262144, 262145, 3_000_001])
def test_content_id_matches_reference_tool_on_random_bytes(tmp_path, size):
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    path = tmp_path / "blob"
    path.write_bytes(data)
    out = subprocess.run(["ipfs_cid", str(path)], capture_output=True, text=True, check=True).stdout
    assert content_id(data) == json.loads(out)["CIDv1"]


# --------------------------------------------------------------------------- content store


def _weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"b.weight": torch.randn(3, 4, generator=g), "a.bias": torch.randn(5, generator=g)}


def test_store_round_trip_and_same_weights_same_cid(tmp_path):
    store = open_store("", tmp_path / "store")
    w = _weights()
    cid = store.put_weights(w)
    assert cid == store.put_weights(dict(reversed(list(w.items()))))  # key order does not matter
    back = store.get_weights(cid)
    assert list(back) == ["a.bias", "b.weight"]
    assert all(torch.equal(back[k], w[k]) for k in w)
    assert store.bytes_in == 2 * store.bytes_out > 0
    assert store.put_weights(_weights(1)) != cid


def test_store_rejects_tampered_missing_and_malformed(tmp_path):
    backend = LocalBackend(tmp_path)
    store = ContentStore(backend)
    cid = store.put_weights(_weights())
    blob = backend._path(cid)
    data = bytearray(blob.read_bytes())
    data[-1] ^= 1
    blob.write_bytes(bytes(data))
    with pytest.raises(ContentError, match="does not match its CID"):
        store.get(cid)
    with pytest.raises(ContentError, match="not in the store"):
        store.get(content_id(b"never stored"))
    with pytest.raises(ContentError, match="not a content ID"):
        store.get("../../etc/passwd")
    with pytest.raises(ContentError, match="safetensors"):
        store.get_weights(store.put(b"not weights"))


class _FakeIpfs(http.server.BaseHTTPRequestHandler):
    blobs: ClassVar[dict[str, bytes]] = {}

    def do_POST(self):
        url = urllib.parse.urlparse(self.path)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if url.path == "/api/v0/add":
            boundary = re.search(r"boundary=(\S+)", self.headers["Content-Type"]).group(1).encode()
            part = body.split(b"--" + boundary)[1]
            data = part.split(b"\r\n\r\n", 1)[1].removesuffix(b"\r\n")
            cid = content_id(data)
            self.blobs[cid] = data
            answer = json.dumps({"Name": "blob", "Hash": cid, "Size": str(len(data))}).encode()
        elif url.path == "/api/v0/cat":
            answer = self.blobs[urllib.parse.parse_qs(url.query)["arg"][0]]
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args):
        pass


def test_ipfs_http_backend_against_a_loopback_api():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeIpfs)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        store = open_store(url, None)
        assert isinstance(store.backend, IpfsBackend)
        store.backend.timeout = 5.0
        w = _weights()
        cid = store.put_weights(w)
        assert torch.equal(store.get_weights(cid)["b.weight"], w["b.weight"])
        _FakeIpfs.blobs[cid] = b"swapped by a malicious node"
        with pytest.raises(ContentError, match="does not match"):
            store.get(cid)
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(ContentError, match="IPFS API"):
        store.get(cid)  # nobody listens any more


# --------------------------------------------------------------------------- the contract


@pytest.fixture(scope="module")
def chain_and_accounts():
    chain = in_process_chain()
    accounts = dev_accounts("test test test test test test test test test test test junk", 8)
    chain.fund(accounts)
    return chain, accounts


@pytest.fixture
def deployed(chain_and_accounts):
    """(contract, owner, trainers t0..t2, aggregators a0..a2), all registered."""
    chain, acc = chain_and_accounts
    owner, trainers, aggs = acc[0], acc[1:4], acc[4:7]
    c = RoundsContract.deploy(chain, owner, "bafy-initial")
    for t in trainers:
        c.send(t, "registerTrainer")
    for a in aggs:
        c.send(a, "registerAggregator")
    return c, owner, trainers, aggs


def _start(c, owner, trainers, aggs, update_s=3600, agg_s=3600):
    return c.send(
        owner, "startRound", [t.address for t in trainers], [a.address for a in aggs], update_s, agg_s
    )


def _events(receipt):
    return [e["event"] for e in receipt.events]


def test_registration_rules(deployed, chain_and_accounts):
    c, owner, trainers, aggs = deployed
    with pytest.raises(LedgerError, match="already registered as trainer"):
        c.send(trainers[0], "registerTrainer")
    with pytest.raises(LedgerError, match="already registered as aggregator"):
        c.send(aggs[0], "registerAggregator")
    stranger = chain_and_accounts[1][7]
    with pytest.raises(LedgerError, match="not a registered trainer"):
        c.send(owner, "startRound", [stranger.address], [aggs[0].address], 10, 10)
    with pytest.raises(LedgerError, match="not a registered aggregator"):
        c.send(owner, "startRound", [trainers[0].address], [stranger.address], 10, 10)
    with pytest.raises(LedgerError, match="trainer selected twice"):
        c.send(owner, "startRound", [trainers[0].address] * 2, [aggs[0].address], 10, 10)


def test_start_round_rules(deployed):
    c, owner, trainers, aggs = deployed
    with pytest.raises(LedgerError, match="only the owner starts rounds"):
        _start(c, trainers[0], trainers, aggs)
    with pytest.raises(LedgerError, match="no trainers"):
        c.send(owner, "startRound", [], [aggs[0].address], 10, 10)
    receipt = _start(c, owner, trainers[:2], aggs)
    assert _events(receipt) == ["RoundStarted"]
    started = receipt.events[0]
    assert started["round"] == 1 and started["model"] == "bafy-initial"
    assert started["trainers"] == [t.address for t in trainers[:2]]
    assert c.phase() == "WaitingForUpdates"
    with pytest.raises(LedgerError, match="a round is in progress"):
        _start(c, owner, trainers, aggs)


def test_update_rules_and_automatic_close(deployed):
    c, owner, trainers, aggs = deployed
    _start(c, owner, trainers[:2], aggs)
    with pytest.raises(LedgerError, match="not a selected trainer"):
        c.send(trainers[2], "submitUpdate", "bafy-u2", 10, "{}")
    with pytest.raises(LedgerError, match="not accepting aggregations"):
        c.send(aggs[0], "submitAggregation", "bafy-agg")
    with pytest.raises(LedgerError, match="empty cid"):
        c.send(trainers[0], "submitUpdate", "", 10, "{}")
    assert _events(c.send(trainers[0], "submitUpdate", "bafy-u0", 10, '{"loss":1}')) == ["UpdateSubmitted"]
    with pytest.raises(LedgerError, match="update already submitted"):
        c.send(trainers[0], "submitUpdate", "bafy-u0b", 10, "{}")
    receipt = c.send(trainers[1], "submitUpdate", "bafy-u1", 20, "{}")
    assert _events(receipt) == ["UpdateSubmitted", "UpdatesClosed"]  # every selected trainer sent
    assert c.phase() == "WaitingForAggregations"
    assert c.view("updateCid", 1, trainers[1].address) == "bafy-u1"
    assert c.view("updateDataPoints", 1, trainers[1].address) == 20
    with pytest.raises(LedgerError, match="not accepting updates"):
        c.send(trainers[2], "submitUpdate", "bafy-late", 10, "{}")


def test_aggregation_majority_and_termination(deployed):
    c, owner, trainers, aggs = deployed
    _start(c, owner, trainers[:1], aggs)
    c.send(trainers[0], "submitUpdate", "bafy-u0", 10, "{}")
    with pytest.raises(LedgerError, match="not a selected aggregator"):
        c.send(trainers[0], "submitAggregation", "bafy-good")
    assert _events(c.send(aggs[0], "submitAggregation", "bafy-wrong")) == ["AggregationSubmitted"]
    with pytest.raises(LedgerError, match="aggregation already submitted"):
        c.send(aggs[0], "submitAggregation", "bafy-good")
    assert _events(c.send(aggs[1], "submitAggregation", "bafy-good")) == ["AggregationSubmitted"]  # 1 vs 1
    with pytest.raises(LedgerError, match="no agreed aggregation"):
        c.send(owner, "terminateRound")
    receipt = c.send(aggs[2], "submitAggregation", "bafy-good")  # 2 of 3 > half
    assert _events(receipt) == ["AggregationSubmitted", "AggregationAgreed"]
    assert receipt.events[1]["cid"] == "bafy-good" and receipt.events[1]["votes"] == 2
    assert c.phase() == "WaitingForTermination"
    with pytest.raises(LedgerError, match="only the owner terminates rounds"):
        c.send(aggs[0], "terminateRound")
    assert _events(c.send(owner, "terminateRound")) == ["RoundTerminated"]
    assert c.phase() == "Stopped" and c.view("model") == "bafy-good"
    assert c.view("votesFor", 1, "bafy-wrong") == 1


def _time_travel(c, seconds):
    tester = c.chain.w3.provider.ethereum_tester
    tester.time_travel(c.chain.w3.eth.get_block("latest").timestamp + seconds)


def test_deadlines_close_and_cancel(deployed):
    c, owner, trainers, aggs = deployed
    _start(c, owner, trainers, aggs, update_s=100, agg_s=100)
    with pytest.raises(LedgerError, match="update deadline not reached"):
        c.send(owner, "closeUpdates")
    with pytest.raises(LedgerError, match="update deadline not reached"):
        c.send(owner, "cancelRound", "too early")
    c.send(trainers[0], "submitUpdate", "bafy-u0", 10, "{}")
    _time_travel(c, 150)
    with pytest.raises(LedgerError, match="only the owner closes updates"):
        c.send(trainers[0], "closeUpdates")
    assert _events(c.send(owner, "closeUpdates")) == ["UpdatesClosed"]  # proceeds with what arrived
    with pytest.raises(LedgerError, match="aggregation deadline not reached"):
        c.send(owner, "cancelRound", "no majority")
    _time_travel(c, 150)
    with pytest.raises(LedgerError, match="only the owner cancels rounds"):
        c.send(aggs[0], "cancelRound", "x")
    assert _events(c.send(owner, "cancelRound", "no majority")) == ["RoundCancelled"]
    assert c.phase() == "Stopped" and c.view("model") == "bafy-initial"
    with pytest.raises(LedgerError, match="nothing to cancel"):
        c.send(owner, "cancelRound", "again")


def test_close_needs_at_least_one_update(deployed):
    c, owner, trainers, aggs = deployed
    _start(c, owner, trainers, aggs, update_s=10, agg_s=10)
    _time_travel(c, 20)
    with pytest.raises(LedgerError, match="no update arrived"):
        c.send(owner, "closeUpdates")


def test_events_since_replays_history_for_a_rejoining_node(deployed):
    c, owner, trainers, aggs = deployed
    _start(c, owner, trainers[:1], aggs)
    c.send(trainers[0], "submitUpdate", "bafy-u0", 10, "{}")
    kinds = [e["event"] for e in c.events_since(0)]
    assert kinds.count("Registered") == 6
    assert kinds[-3:] == ["RoundStarted", "UpdateSubmitted", "UpdatesClosed"]


# --------------------------------------------------------------------------- flattened aggregation


@pytest.mark.parametrize(
    "name", ["fedavg", "fedavgm", "fedmedian", "fedtrimmedavg", "fedyogi", "krum", "multikrum", "bulyan"]
)
@pytest.mark.slow
def test_flat_aggregation_equals_per_key_aggregation(name):
    from fedsynth.strategies.flower import ensure_run_identity

    ensure_run_identity()  # messages built outside a Flower run, as aggregator nodes do
    _check_flat_equals_per_key(name)


def _check_flat_equals_per_key(name):
    """Aggregators aggregate one flattened vector per update; for every strategy the
    decentralized paradigm allows, that gives Flower's per-key result."""
    from flwr.app import ArrayRecord, Message, MessageType, MetricRecord, RecordDict

    from fedsynth.config import config_from_dict
    from fedsynth.ledger.nodes import FLAT, flatten, unflatten
    from fedsynth.strategies import build_strategy

    cfg = config_from_dict(
        {"partition": {"num_clients": 7}, "federation": {"clients_per_round": 7}, "strategy": {"name": name}}
    )
    g = torch.Generator().manual_seed(3)
    shapes = {"a.weight": (3, 2), "b.bias": (4,), "c.weight": (2, 2, 2)}
    global_w = {k: torch.randn(*s, generator=g) for k, s in sorted(shapes.items())}
    updates = [
        {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in global_w.items()} for _ in range(7)
    ]

    def reply(arrays, n):
        content = RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord({"num-examples": n})})
        return Message(content=content, dst_node_id=n, message_type=MessageType.TRAIN)

    per_key, flat = build_strategy(cfg), build_strategy(cfg)
    for round_ in (1, 2):  # two rounds: server momenta and moments carry over
        per_key.begin_round(ArrayRecord(global_w))
        a, _ = per_key.aggregate_train(round_, [reply(u, 10 + i) for i, u in enumerate(updates)])
        flat.begin_round(ArrayRecord({FLAT: torch.from_numpy(flatten(global_w, global_w))}))
        replies = [
            reply({FLAT: torch.from_numpy(flatten(u, global_w))}, 10 + i) for i, u in enumerate(updates)
        ]
        b, _ = flat.aggregate_train(round_, replies)
        expected, got = a.to_torch_state_dict(), unflatten(b[FLAT].numpy(), global_w)
        for k in global_w:
            assert torch.allclose(got[k], expected[k], atol=1e-6), (name, round_, k)
        global_w = got
        updates = [{k: v + 0.05 for k, v in u.items()} for u in updates]
