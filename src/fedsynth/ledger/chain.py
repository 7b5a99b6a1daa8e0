"""The EVM chain that coordinates decentralized rounds, and the round contract on it.

Two backends behind one :class:`Chain`: the embedded in-process chain (web3.py over
eth-tester + py-evm; nothing to install or start) and any JSON-RPC node (``ledger.rpc_url``,
e.g. anvil or a private network). Every transaction is signed locally with the sending
node's own key; a reverted call raises :class:`LedgerError` with the contract's reason.
The contract (``rounds.vy``) is compiled from source with vyper and cached by the hash
of the source and the compiler version; its ABI and bytecode are never edited by hand.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from eth_account import Account
from eth_account.signers.local import LocalAccount

from fedsynth.core.errors import FedsynthError

EVM_VERSION = "cancun"
FUNDING_WEI = 10**21  # in-process chain: each node account gets 1,000 ether for gas
GAS_LIMIT = 8_000_000  # per transaction; startRound with 128 trainers and 128 aggregators needs ~6 M
DEPLOY_GAS = 4_000_000


class LedgerError(FedsynthError):
    """A chain call failed or was rejected by the contract."""


@dataclass(frozen=True)
class Compiled:
    abi: list
    bytecode: str


def _cache_dir() -> Path:
    return Path(os.environ.get("FEDSYNTH_CACHE") or Path.home() / ".cache" / "fedsynth") / "contracts"


@functools.cache
def compiled_contract() -> Compiled:
    """ABI and bytecode of ``rounds.vy``, compiled by vyper (cached on disk by source hash)."""
    import vyper
    from vyper.compiler.settings import Settings

    source = resources.files("fedsynth.ledger").joinpath("rounds.vy").read_text()
    key = hashlib.sha256(f"{vyper.__version__}|{EVM_VERSION}|{source}".encode()).hexdigest()[:16]
    path = _cache_dir() / f"rounds-{key}.json"
    if path.is_file():
        data = json.loads(path.read_text())
        return Compiled(data["abi"], data["bytecode"])
    out = vyper.compile_code(
        source, output_formats=["abi", "bytecode"], settings=Settings(evm_version=EVM_VERSION)
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"abi": out["abi"], "bytecode": out["bytecode"]}))
    tmp.replace(path)
    return Compiled(out["abi"], out["bytecode"])


def dev_accounts(mnemonic: str, count: int) -> list[LocalAccount]:
    """Accounts m/44'/60'/0'/0/i of a mnemonic (anvil's and hardhat's default dev keys)."""
    Account.enable_unaudited_hdwallet_features()
    return [Account.from_mnemonic(mnemonic, account_path=f"m/44'/60'/0'/0/{i}") for i in range(count)]


def file_accounts(path: str, count: int) -> list[LocalAccount]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise LedgerError(f"ledger.keys_file: {p} does not exist")
    keys = [line.strip() for line in p.read_text().splitlines() if line.strip() and not line.startswith("#")]
    if len(keys) < count:
        raise LedgerError(f"ledger.keys_file: {p} holds {len(keys)} keys; this federation needs {count}")
    return [Account.from_key(k) for k in keys[:count]]


@dataclass
class Receipt:
    gas_used: int
    events: list[dict]
    block: int
    contract_address: str | None = None


@dataclass
class Chain:
    """A web3 connection plus gas/transaction accounting and event dispatch."""

    w3: Any
    kind: str
    lock: threading.RLock = field(default_factory=threading.RLock)
    gas_used: int = 0
    transactions: int = 0
    listeners: list[Callable[[dict], None]] = field(default_factory=list)

    @functools.cached_property
    def chain_id(self) -> int:
        return self.w3.eth.chain_id

    def _replay_reason(self, call: Any, tx: dict, receipt: Any) -> str:
        try:
            call.call({"from": tx["from"]}, block_identifier=receipt.blockNumber - 1)
        except Exception as exc:  # the revert, now with its reason
            return _revert_reason(exc)
        return f"transaction {receipt.transactionHash.hex()} reverted"

    def fund(self, accounts: list[LocalAccount]) -> None:
        """In-process chain only: give each account ether for gas from the pre-funded coinbase."""
        if self.kind != "in-process":
            return
        for acct in accounts:
            if self.w3.eth.get_balance(acct.address) < FUNDING_WEI // 2:
                tx = {"from": self.w3.eth.accounts[0], "to": acct.address, "value": FUNDING_WEI}
                self.w3.eth.wait_for_transaction_receipt(self.w3.eth.send_transaction(tx))

    def send(self, account: LocalAccount, call: Any, contract: Any = None, gas: int = GAS_LIMIT) -> Receipt:
        """Sign ``call`` (a contract function or constructor) with ``account`` and wait for it.

        A fixed gas limit instead of ``eth_estimateGas`` (py-evm estimates by a binary search
        of ~13 executions); only the gas used is paid. A revert is reported with its reason."""
        with self.lock:
            tx = {"from": account.address, "gas": gas}
            try:
                tx = call.build_transaction(
                    {
                        **tx,
                        "nonce": self.w3.eth.get_transaction_count(account.address, "pending"),
                        "chainId": self.chain_id,
                    }
                )
                signed = account.sign_transaction(tx)
                receipt = self.w3.eth.wait_for_transaction_receipt(
                    self.w3.eth.send_raw_transaction(signed.raw_transaction), timeout=120
                )
            except Exception as exc:  # web3 and eth-tester raise several types for a revert
                raise LedgerError(_revert_reason(exc)) from exc
            if receipt.status != 1:  # a JSON-RPC node mines reverted transactions: replay for the reason
                raise LedgerError(self._replay_reason(call, tx, receipt))
            self.gas_used += receipt.gasUsed
            self.transactions += 1
            events = decode_events(contract, receipt.logs) if contract is not None else []
        for event in events:
            for listener in list(self.listeners):
                listener(event)
        return Receipt(receipt.gasUsed, events, receipt.blockNumber, receipt.contractAddress)


def _revert_reason(exc: Exception) -> str:
    text = str(exc.args[0]) if exc.args else str(exc)
    if isinstance(exc.args[0] if exc.args else None, dict):
        text = str(exc.args[0].get("message", text))
    text = text.removeprefix("execution reverted: ")
    return f"contract rejected the call: {text}"


def decode_events(contract: Any, logs: list) -> list[dict]:
    """Logs of ``contract`` decoded into ``{"event": name, **args, "block": n}`` (by topic)."""
    by_topic = _events_by_topic(contract)
    out = []
    for log in logs:
        event = by_topic.get(bytes(log["topics"][0])) if log["topics"] else None
        if event is None:
            continue
        decoded = event.process_log(log)
        out.append({"event": decoded.event, **dict(decoded.args), "block": decoded.blockNumber})
    return out


def _events_by_topic(contract: Any) -> dict[bytes, Any]:
    from eth_utils import event_abi_to_log_topic

    return {
        bytes(event_abi_to_log_topic(abi)): getattr(contract.events, abi["name"])()
        for abi in contract.abi
        if abi["type"] == "event"
    }


def in_process_chain() -> Chain:
    from eth_tester import EthereumTester, PyEVMBackend
    from web3 import EthereumTesterProvider, Web3

    return Chain(Web3(EthereumTesterProvider(EthereumTester(PyEVMBackend()))), "in-process")


def rpc_chain(url: str) -> Chain:
    from web3 import Web3

    w3 = Web3(Web3.HTTPProvider(url, request_kwargs={"timeout": 60}))
    try:
        connected = w3.eth.chain_id > 0
    except Exception as exc:  # requests/web3 raise many connection error types
        raise LedgerError(f"ledger.rpc_url = {url!r}: no EVM node answers there ({exc})") from exc
    if not connected:
        raise LedgerError(f"ledger.rpc_url = {url!r}: the node reports no chain id")
    return Chain(w3, "rpc")


class RoundsContract:
    """Typed calls on a deployed ``rounds.vy``; each ``send`` is signed by the caller's key."""

    PHASES = ("Stopped", "WaitingForUpdates", "WaitingForAggregations", "WaitingForTermination")

    def __init__(self, chain: Chain, address: str) -> None:
        self.chain, self.address = chain, address
        self.contract = chain.w3.eth.contract(address=address, abi=compiled_contract().abi)

    @classmethod
    def deploy(
        cls, chain: Chain, owner: LocalAccount, initial_model: str, rounds_done: int = 0
    ) -> RoundsContract:
        c = compiled_contract()
        factory = chain.w3.eth.contract(abi=c.abi, bytecode=c.bytecode)
        receipt = chain.send(owner, factory.constructor(initial_model, rounds_done), gas=DEPLOY_GAS)
        assert receipt.contract_address, "a deployment receipt names the new contract"
        return cls(chain, receipt.contract_address)

    def send(self, account: LocalAccount, name: str, *args: Any) -> Receipt:
        return self.chain.send(account, getattr(self.contract.functions, name)(*args), self.contract)

    def view(self, name: str, *args: Any) -> Any:
        with self.chain.lock:  # nodes call from several threads; the in-process chain is not thread-safe
            return getattr(self.contract.functions, name)(*args).call()

    def phase(self) -> str:
        return self.PHASES[self.view("phase")]

    def events_since(self, block: int) -> list[dict]:
        """Every event of this contract from ``block`` on (a rejoining node catches up with these)."""
        with self.chain.lock:
            query = {"fromBlock": block, "toBlock": "latest", "address": self.address}
            logs = self.chain.w3.eth.get_logs(query)
        return decode_events(self.contract, logs)
