"""Child processes and their output: free local ports, process groups started, stopped and
watched (a watchdog ends them should this process be killed), and which of Flower's and Ray's
messages are not shown (they describe choices fedsynth made for the user)."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

_RUNNING: list[subprocess.Popen] = []  # process groups to stop if this process is interrupted

# Framework messages about choices fedsynth made for the user, which the user cannot act on:
# the in-process engine (bench/startup.py measures it against `flwr run` on a SuperLink),
# federated evaluation switched off (fedsynth evaluates the final model itself), the SuperNode
# count it sets, Ray's GPU-visibility tip, and simulation workers' normal shutdown.
SILENCED = (
    "The `run_simulation` function is deprecated",
    "fraction_evaluate is set to 0.0",
    "default simulated SuperNodes changed",
    "Tip: In future versions of Ray",
    "federation simulation-config",
    "Manually terminating",
)


def silenced(message: str) -> bool:
    """Whether a framework message is one of :data:`SILENCED`."""
    return any(text in message for text in SILENCED)


def _shown(record: logging.LogRecord) -> bool:
    return not silenced(record.getMessage())


def quiet_flower(level: int | None = logging.WARNING) -> None:
    """Flower's logger in this process at ``level`` (None: as it is), without :data:`SILENCED`
    messages; every other warning still shows."""
    flwr_logger = logging.getLogger("flwr")
    if level is not None:
        flwr_logger.setLevel(level)
    if _shown not in flwr_logger.filters:
        flwr_logger.addFilter(_shown)
    warnings.filterwarnings("ignore", message="Tip: In future versions of Ray", category=FutureWarning)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_group(cmd: list[str], env: dict[str, str], **kwargs) -> subprocess.Popen:
    """A child in its own process group (Ctrl-C reaches this process only; stop() ends it all)."""
    proc = subprocess.Popen(cmd, env=env, cwd=os.getcwd(), start_new_session=True, **kwargs)
    _RUNNING.append(proc)
    return proc


def stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM to the process groups under ``proc`` (the SuperLink starts its executor, the
    simulation and Ray in groups of their own), SIGKILL to what is left after ``grace`` s."""
    groups = _groups_under(proc.pid)
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        for group in groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, sig)
        if _gone(proc, groups, wait):
            break
    if proc in _RUNNING:
        _RUNNING.remove(proc)


def _groups_under(pid: int) -> list[int]:
    """Process groups of ``pid`` and its descendants (read from Linux's /proc; elsewhere
    ``pid``'s own group)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo.extend(children.get(tree[-1], []))
    groups, own = [], os.getpgrp()
    for member in tree:
        with contextlib.suppress(ProcessLookupError):
            if (group := os.getpgid(member)) not in groups and group != own:
                groups.append(group)
    return groups or [pid]


def _gone(proc: subprocess.Popen, groups: list[int], wait: float) -> bool:
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        proc.poll()  # reap the leader: a zombie still counts as a member of its group
        if not any(_alive(group) for group in groups):
            return True
        time.sleep(0.1)
    return False


def _alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # there, but not ours to signal
        pass
    return True


def watch_parent(parent: int, home: str, every: float = 0.5) -> None:
    """Run in a process of its own session: while this process's parent (``parent``, the CLI)
    lives, note the process groups under it; once it is gone — even killed by SIGKILL, which
    no handler sees — end those groups (the SuperLink, its executor, the simulation, Ray) and
    remove ``home``, so nothing finishes the run unattended or writes beside a resumed one."""
    own = {os.getpgrp(), os.getpgid(parent)}
    groups: list[int] = []
    while os.getppid() == parent:  # a dead parent's children are handed to another process
        groups = [g for g in _groups_under(parent) if g not in own]
        time.sleep(every)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for group in groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, sig)
        deadline = time.monotonic() + 5.0
        while any(_alive(g) for g in groups) and time.monotonic() < deadline:
            time.sleep(0.1)
    shutil.rmtree(home, ignore_errors=True)


def start_watchdog(home: Path) -> subprocess.Popen:
    """:func:`watch_parent` for this process, in a session of its own."""
    code = f"from fedsynth.runtime.processes import watch_parent; watch_parent({os.getpid()}, {str(home)!r})"
    return subprocess.Popen([sys.executable, "-c", code], start_new_session=True)


def stop_all() -> None:
    """Stop every SuperLink this process started (the CLI's interrupt handler calls this)."""
    for proc in list(_RUNNING):
        stop(proc, grace=3.0)
