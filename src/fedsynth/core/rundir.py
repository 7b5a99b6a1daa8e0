"""The run directory: every stage reads and writes here (a public interface).

Layout (docs/run-directory.md): ``config.toml``, ``partitions.json``, ``partitions.png``,
``metrics.jsonl``, ``model/{unet,scheduler}``, ``checkpoints/round-NNNN/``,
``synthetic/<class>/*.png``, ``samples.png``, ``eval.json``, ``summary.json``, ``report.md``.

Directories (checkpoints, the final model) are written under a temporary name and
renamed into place, so a kill mid-write never leaves a corrupt latest checkpoint.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsynth.config import Config, config_toml
from fedsynth.core.errors import RunDirError

CHECKPOINT_RE = re.compile(r"^round-(\d{4,})$")
LOCK_NAME = ".lock"
LOCK_ENV = "FEDSYNTH_RUN_LOCKED"  # a run directory whose writer lock a parent process holds
# what a run directory holds before its first checkpoint (a run stopped then may start again)
BEFORE_FIRST_CHECKPOINT = frozenset(
    {
        "config.toml",
        "partitions.json",
        "partitions.png",
        "metrics.jsonl",
        "checkpoints",
        "ledger.json",
        "store",
        LOCK_NAME,
    }
)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()
FILE_MODE, DIR_MODE = 0o666 & ~_UMASK, 0o777 & ~_UMASK  # what open() / mkdir() would give


def write_bytes_atomic(path: Path, data: bytes, mode: int | None = None) -> None:
    """Write ``path`` as a new file: a temporary file beside it, then ``os.replace``, which
    replaces a link standing at ``path`` instead of writing through it. Permissions follow
    the umask (mkstemp's own are 0600) unless ``mode`` is given (a private key's 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, FILE_MODE if mode is None else mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: Path) -> Any:
    if not path.is_file():
        raise RunDirError(f"missing {path}")
    return json.loads(path.read_text())


def make_dir_temp(parent: Path, name: str) -> Path:
    """A new empty folder beside ``parent / name`` (for filling, then renaming into place),
    with the umask's permissions (mkdtemp's own are 0700)."""
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{name}.", suffix=".tmp"))
    os.chmod(tmp, DIR_MODE)
    return tmp


def disk_full(err: BaseException) -> bool:
    """Whether ``err`` says the disk is full: ENOSPC / EDQUOT, or torch's serializer's
    "unexpected pos" (what a full disk gives ``torch.save``)."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("unexpected pos" in text or "No space left" in text)


def write_dir_atomic(target: Path, fill: Callable[[Path], None]) -> None:
    """Call ``fill(tmpdir)`` then move ``tmpdir`` to ``target`` (replacing it). A full disk is a
    one-line RunDirError; what ``target`` held before is kept."""
    tmp = make_dir_temp(target.parent, target.name)
    try:
        try:
            fill(tmp)
        except (OSError, RuntimeError) as err:
            if disk_full(err):
                raise RunDirError(
                    f"no space left on device writing {target}: free some and --resume"
                ) from None
            raise
        if target.exists() or target.is_symlink():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            if old.is_symlink():
                old.unlink()
            else:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def links_out(root: Path, depth: int = 2) -> list[Path]:
    """Symbolic links under ``root`` (to ``depth`` levels) that lead outside it (or nowhere)."""
    base = root.resolve()
    found: list[Path] = []
    level = [root]
    for _ in range(depth):
        below: list[Path] = []
        for folder in level:
            for entry in sorted(folder.iterdir()) if folder.is_dir() else []:
                if entry.is_symlink():
                    target = entry.resolve()
                    if not target.exists() or not target.is_relative_to(base):
                        found.append(entry)
                elif entry.is_dir():
                    below.append(entry)
        level = below
    return found


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
        return [RunDir(p) for p in sorted(self.clients.iterdir()) if RunDir(p).has_model()]

    def has_model(self) -> bool:
        """Whether ``model/`` holds a trained model: ``unet/``, or a latent run's ``base.json``."""
        return (self.model / "unet").is_dir() or (self.model / "base.json").is_file()

    def create(self) -> RunDir:
        self.root.mkdir(parents=True, exist_ok=True)
        return self.check_links()

    @contextlib.contextmanager
    def writer_lock(self) -> Iterator[None]:
        """One writer per run directory: an advisory lock (``flock`` on ``RUN/.lock``, which
        holds the holder's PID) for as long as the block runs; a second writer gets a one-line
        RunDirError naming the holder. The lock goes with its process (a killed run leaves none).
        Processes this one starts (Flower's, for a simulation on a SuperLink) write under it."""
        key = str(self.root.resolve())
        if os.environ.get(LOCK_ENV) == key:
            yield
            return
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, FILE_MODE)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                raise RunDirError(
                    f"{self.root} is in use by another fedsynth process (PID {holder}): one writer per "
                    "run directory; wait for it to end or stop it"
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            os.environ[LOCK_ENV] = key
            try:
                yield
            finally:
                os.environ.pop(LOCK_ENV, None)
        finally:
            os.close(fd)

    def write_config(self, cfg: Config) -> None:
        write_text_atomic(self.config, config_toml(cfg))

    def check_is_run(self) -> RunDir:
        """A one-line RunDirError when ``root`` holds no fedsynth run (no ``config.toml``)."""
        if not self.config.is_file():
            raise RunDirError(f"{self.root} is not a fedsynth run (no config.toml)")
        return self

    def check_links(self) -> RunDir:
        """Refuse a run directory (e.g. one received from someone else) whose entries are links
        leading out of it: every file fedsynth writes must land inside the run directory."""
        if self.root.is_symlink() or not self.root.is_dir():
            return self
        bad = links_out(self.root)
        if bad:
            where = bad[0].relative_to(self.root)
            raise RunDirError(
                f"{self.root}: {where} is a link leading outside the run directory; fedsynth writes "
                "only inside it (remove the link)"
            )
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
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
        try:
            fd = os.open(self.metrics, flags, FILE_MODE)
        except OSError as exc:
            if self.metrics.is_symlink():
                raise RunDirError(f"{self.metrics} is a link: no file is written through a link") from None
            raise exc
        with os.fdopen(fd, "a") as fh:
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
        write_text_atomic(self.metrics, "".join(json.dumps(r) + "\n" for r in kept))

    def update_summary(self, **values: Any) -> dict[str, Any]:
        summary = read_json(self.summary) if self.summary.is_file() else {}
        summary.update(values)
        write_json_atomic(self.summary, summary)
        return summary


def check_fresh(root: Path) -> None:
    """A new run goes into a new or empty folder, or over a run that failed before its first
    checkpoint (nothing to resume: it starts again); never over a run, a file or anyone's files."""
    if root.exists() and not root.is_dir():
        raise RunDirError(f"--out {root} is a file, not a folder")
    if not root.is_dir() or not any(p.name != LOCK_NAME for p in root.iterdir()):
        return
    run = RunDir(root)
    names = {p.name for p in root.iterdir()}
    if run.partitions.is_file() and names <= BEFORE_FIRST_CHECKPOINT and not run.checkpoints_newest_first():
        return  # only what a run writes before its first checkpoint: nothing to resume, it starts again
    if run.metrics.exists() or run.model.exists() or run.latest_checkpoint() is not None:
        raise RunDirError(f"{root} already holds a run: pass --resume to continue it, or choose a new --out")
    raise RunDirError(f"{root} is not empty and holds no fedsynth run: choose a new --out")
