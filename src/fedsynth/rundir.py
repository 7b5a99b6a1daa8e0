"""The run directory: every stage reads and writes here (a public interface).

Layout (see README): ``config.toml``, ``partitions.json``, ``partitions.png``,
``metrics.jsonl``, ``model/{unet,scheduler}``, ``checkpoints/round-NNNN/``,
``synthetic/<class>/*.png``, ``samples.png``, ``eval.json``, ``summary.json``, ``report.md``.

Directories (checkpoints, the final model) are written under a temporary name and
renamed into place, so a kill mid-write never leaves a corrupt latest checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsynth.errors import RunDirError

CHECKPOINT_RE = re.compile(r"^round-(\d{4,})$")


def write_json_atomic(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=False)
        fh.write("\n")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    if not path.is_file():
        raise RunDirError(f"missing {path}")
    return json.loads(path.read_text())


def write_dir_atomic(target: Path, fill: Callable[[Path], None]) -> None:
    """Call ``fill(tmpdir)`` then move ``tmpdir`` to ``target`` (replacing it)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        fill(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.toml"

    @property
    def partitions(self) -> Path:
        return self.root / "partitions.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def synthetic(self) -> Path:
        return self.root / "synthetic"

    @property
    def eval(self) -> Path:
        return self.root / "eval.json"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def clients(self) -> Path:
        """Per-client run directories (personal models of the udec / ulatdec plans)."""
        return self.root / "clients"

    def client(self, pid: int) -> RunDir:
        return RunDir(self.clients / f"client-{pid:02d}")

    def client_runs(self) -> list[RunDir]:
        if not self.clients.is_dir():
            return []
        return [RunDir(p) for p in sorted(self.clients.iterdir()) if (p / "model" / "unet").is_dir()]

    def create(self) -> RunDir:
        self.root.mkdir(parents=True, exist_ok=True)
        return self

    def checkpoint_dir(self, round_: int) -> Path:
        return self.checkpoints / f"round-{round_:04d}"

    def checkpoints_newest_first(self) -> list[Path]:
        """Complete checkpoints, newest first (temporary, half-written ones are ignored)."""
        if not self.checkpoints.is_dir():
            return []
        done = [
            (int(m.group(1)), p)
            for p in self.checkpoints.iterdir()
            if (m := CHECKPOINT_RE.match(p.name)) and (p / "meta.json").is_file()
        ]
        return [p for _, p in sorted(done, reverse=True)]

    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint."""
        found = self.checkpoints_newest_first()
        return found[0] if found else None

    def append_metrics(self, record: dict[str, Any]) -> None:
        with self.metrics.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics.is_file():
            return []
        return [json.loads(line) for line in self.metrics.read_text().splitlines() if line.strip()]

    def truncate_metrics(self, last_round: int) -> None:
        """Keep only rounds ≤ ``last_round`` (used when resuming from a checkpoint)."""
        kept = [r for r in self.read_metrics() if r.get("round", 0) <= last_round]
        text = "".join(json.dumps(r) + "\n" for r in kept)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".metrics.", suffix=".tmp")
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, self.metrics)

    def update_summary(self, **values: Any) -> dict[str, Any]:
        summary = read_json(self.summary) if self.summary.is_file() else {}
        summary.update(values)
        write_json_atomic(self.summary, summary)
        return summary
