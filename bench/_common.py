"""Helpers shared by the benchmarks: runs, resumable result rows, JSON output and machine description."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parents[1]


FEDSYNTH = str(Path(sys.executable).with_name("fedsynth"))  # the CLI of this environment


def run_command(config: str, out: Path, overrides: list[str]) -> list[str]:
    """``fedsynth run ROOT/config --out OUT --set ...``"""
    return [
        FEDSYNTH,
        "run",
        str(ROOT / config),
        "--out",
        str(out),
        *(x for s in overrides for x in ("--set", s)),
    ]


def fedsynth_run(config: str, out: Path, overrides: list[str]) -> subprocess.CompletedProcess:
    """:func:`run_command` in a fresh process (output captured)."""
    return subprocess.run(run_command(config, out, overrides), capture_output=True, text=True)


def timed_command(cmd: list[str], label: str) -> float:
    """Run ``cmd`` in a fresh process (output captured; a one-line exit naming ``label`` on
    failure); its wall seconds."""
    start = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{label} failed: {res.stderr.strip().splitlines()[-3:]}")
    return time.perf_counter() - start


def timed_fedsynth_run(config: str, out: Path, overrides: list[str], label: str) -> tuple[float, list[dict]]:
    """Run ``fedsynth run`` (a one-line exit on failure); its wall seconds and metrics lines."""
    total = timed_command(run_command(config, out, overrides), f"{label} run")
    return total, [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def machine() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def result_file(name: str, suffix: str) -> Path:
    """``bench/results/<bench>/<name><suffix>``: every result of a bench in its folder, named
    after the script (the longest ``bench/*.py`` stem ``name`` starts with, ``-`` read as ``_``:
    ``server-ema-seed1`` → ``server_ema/``, ``dp_overhead_b512`` → ``dp_overhead/``)."""
    flat = name.replace("-", "_")
    benches = sorted((p.stem for p in Path(__file__).parent.glob("[!_]*.py")), key=len, reverse=True)
    bench = next((b for b in benches if flat == b or flat.startswith(b + "_")), None)
    if bench is None:
        raise ValueError(f"result {name!r} names no bench script: it must start with one's name")
    path = RESULTS / bench / f"{name}{suffix}"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def write_result(name: str, payload: dict) -> Path:
    path = result_file(name, ".json")
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2) + "\n")
    print(json.dumps(payload, indent=2))
    print(f"wrote {path}")
    return path


def load_rows(name: str) -> list[dict]:
    path = result_file(name, ".json")
    return json.loads(path.read_text())["rows"] if path.exists() else []


def run_missing(
    name: str,
    keys: Iterable[tuple],
    key_of: Callable[[dict], tuple],
    run: Callable[..., dict],
    render: Callable[[list[dict]], str],
    *,
    payload: Callable[[list[dict]], dict] = lambda rows: {},
    rerun: bool = False,
) -> list[dict]:
    """``run(*key)`` for every key without a row in ``name.json`` (:func:`result_file`) yet (every key with
    ``rerun``, replacing its row); after each, ``name.json`` (``payload(rows)`` + rows) and
    ``name.md`` (``render(rows)``) are rewritten, so an interrupted benchmark goes on where
    it stopped and loses nothing it finished."""
    rows = load_rows(name)
    for key in keys:
        done = [r for r in rows if key_of(r) == tuple(key)]
        if done and not rerun:
            continue
        rows = [r for r in rows if r not in done] + [run(*key)]
        write_result(name, {**payload(rows), "rows": rows})
        result_file(name, ".md").write_text(render(rows))
    return rows


class TreeRss:
    """The peak of the summed resident memory of every process under this one (the run, its
    SuperLink, the simulation and Ray), sampled every ``every`` seconds from /proc; with
    ``role(pid, cmdline) -> str``, also the peak of each role's sum."""

    def __init__(self, every: float = 1.0, role: Callable[[int, str], str] | None = None) -> None:
        self.every, self.peak, self._stop = every, 0, threading.Event()
        self.role, self.peak_by_role = role, {}

    def __enter__(self) -> TreeRss:
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.wait(self.every):
            pids = _descendants(os.getpid())
            rss = {pid: _rss(pid) for pid in pids}
            self.peak = max(self.peak, sum(rss.values()))
            if self.role is None:
                continue
            by_role: dict[str, int] = {}
            for pid, size in rss.items():
                name = self.role(pid, _cmdline(pid))
                by_role[name] = by_role.get(name, 0) + size
            for name, size in by_role.items():
                self.peak_by_role[name] = max(self.peak_by_role.get(name, 0), size)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            children.setdefault(int(stat.read_text().rsplit(")", 1)[1].split()[1]), []).append(
                int(stat.parent.name)
            )
        except (OSError, IndexError, ValueError):
            continue
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0
