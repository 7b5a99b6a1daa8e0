"""``fedsynth run`` on Flower 1.41's supported simulation path: a private SuperLink in
simulation mode (free local ports, its own ``FLWR_HOME``) and ``flwr run`` of the fedsynth
app on it, with one simulated SuperNode per client.

Every stage then runs in Flower's ``flwr-simulation`` process (:mod:`fedsynth.runtime.serverapp`).
This process relays that process's output (progress bars, the summary) without Flower's
own log lines, turns a failure into one line (the raw log is kept and named), and stops
the SuperLink and everything under it when the run ends or is interrupted.
"""

from __future__ import annotations

import codecs
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from fedsynth.config import Config
from fedsynth.core.errors import FedsynthError
from fedsynth.runtime.processes import free_port, silenced, start_group, start_watchdog, stop, stop_all

# the app's own failure line, printed by fedsynth.runtime.serverapp and turned back into an error here
ERROR_MARK = "fedsynth-error: "
CRASH_MARK = "fedsynth-crash: "
REPORT_MARK = "report: "  # the app's last line: every stage finished

_BIN = Path(sys.executable).parent
# Flower's log lines in its console format (INFO/DEBUG dropped, warnings kept unless silenced
# below) and in the simulation's second, timestamped format (a duplicate of the first)
_LOG_HEAD = r"(?:\x1b\[\d+m)?(INFO|DEBUG|WARNING|ERROR)\s*(?:\x1b\[0m)?\s*:"  # level, colour or not
_FLOWER_LOG = re.compile(rf"^{_LOG_HEAD}\s*(.*)$")
_LOG_START = re.compile(rf"{_LOG_HEAD}\s")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_CURSOR = re.compile(r"\x1b\[\?25[hl]")
_TIMESTAMPED = re.compile(r"^\d\d/\d\d/\d{4} \d\d:\d\d:\d\d:[A-Z]+:")
# lines of the `flwr run` client about its own bookkeeping, and the app's report line
# (`fedsynth run` prints it after the summary)
_PREAMBLE = ("Using SuperLink", "Successfully started run", "Successfully installed ", REPORT_MARK)
_SILENCED = (
    "fraction_evaluate is set to 0.0",
    "default simulated SuperNodes changed",
    "Tip: In future versions of Ray",
    "federation simulation-config",
)

_APP_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedsynth-run"
version = "1.0.0"
description = "fedsynth run on a local SuperLink (fedsynth is imported from this environment)"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "fedsynth"

[tool.flwr.app.components]
serverapp = "fedsynth.runtime.serverapp:app"
clientapp = "fedsynth.client.app:app"

[tool.flwr.app.config]
config = ""
out = ""
resume = false
overrides = ""
"""


@dataclass
class Relay:
    """Filters the streamed output line by line (a progress bar's ``\\r`` redraws pass as they
    come) and remembers the app's failure line."""

    out: TextIO
    error: str | None = None
    crashed: bool = False
    report: str | None = None  # the app's last line when every stage finished
    _skip_next: bool = False
    _blank: str = ""  # blank lines wait for the next line shown (none before a failure line)

    def line(self, text: str) -> None:
        if (behind := _LOG_START.search(text, 1)) is not None:  # a log line written right after
            self.line(text[: behind.start()])  # a progress bar's redraw, with no newline between
            self.line(text[behind.start() :])
            return
        body = _ANSI.sub("", text.rstrip("\r\n"))
        if self.error is not None:
            return  # the traceback after the app's failure line stays in the raw log
        for mark, crashed in ((ERROR_MARK, False), (CRASH_MARK, True)):
            if body.startswith(mark):
                self.error, self.crashed = body[len(mark) :], crashed
                return
        if body.startswith(REPORT_MARK):
            self.report = body[len(REPORT_MARK) :].strip()
        if self._skip_next:  # the source line Python prints under a warning
            self._skip_next = False
            if body.strip().startswith("warnings.warn("):
                return
        if self.dropped(body):  # a cursor shown or hidden by a progress bar still is
            self.out.write("".join(_CURSOR.findall(text)))
            return
        if not body.strip():
            self._blank += text
            return
        self.out.write(self._blank + text)
        self.out.flush()
        self._blank = ""

    def dropped(self, body: str) -> bool:
        if silenced(body):
            self._skip_next = "Warning:" in body
            return True
        if _TIMESTAMPED.match(body) or body.startswith(_PREAMBLE):
            return True
        found = _FLOWER_LOG.match(body)
        return bool(found) and (found.group(1) in ("INFO", "DEBUG") or not found.group(2).strip())


def split_lines(chunks: Iterable[str]) -> Iterator[str]:
    """Lines ending in ``\\n`` or ``\\r`` (kept), from chunks cut anywhere."""
    pending = ""
    for chunk in chunks:
        pending += chunk
        while (cut := _first_end(pending)) >= 0:
            yield pending[: cut + 1]
            pending = pending[cut + 1 :]
    if pending:
        yield pending


def _decoded(stream) -> Iterator[str]:
    """Text as it arrives (not line by line: a progress bar redraws without a newline)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    while chunk := stream.read1(4096):
        yield decoder.decode(chunk)
    yield decoder.decode(b"", final=True)


def _first_end(text: str) -> int:
    ends = [i for i in (text.find("\n"), text.find("\r")) if i >= 0]
    return min(ends) if ends else -1


def flower_env(home: Path | None, live: bool = False) -> dict[str, str]:
    """The environment of Flower's commands: this ``FLWR_HOME`` (None: the user's own), this
    environment's binaries, no telemetry or update check; with ``live``, the app's progress
    bars drawn for this terminal."""
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1")
    if home is not None:
        env["FLWR_HOME"] = str(home)
    env["PATH"] = f"{_BIN}{os.pathsep}{env.get('PATH', '')}"
    if live:  # the app's progress bars redraw as on this terminal, at its width
        env["FORCE_COLOR"] = "1"
        env["COLUMNS"] = str(shutil.get_terminal_size().columns)
    return env


def start_superlink(home: Path, env: dict[str, str]) -> subprocess.Popen:
    """A simulation-mode SuperLink on free 127.0.0.1 ports, named ``local`` in
    ``home/config.toml``; returns once it listens (:func:`stop` ends it and all under it)."""
    port, control = free_port(), free_port()
    connection = f'[superlink.local]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    (home / "config.toml").write_text(f'[superlink]\ndefault = "local"\n\n{connection}')
    cmd = [str(_BIN / "flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess"]
    cmd += ["--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--control-api-address", f"127.0.0.1:{control}", "--database", str(home / "state.db")]
    with (home / "superlink.log").open("w") as log:
        proc = start_group(cmd, env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc
        time.sleep(0.2)
    stop(proc)
    raise FedsynthError(f"the local SuperLink did not start; its log: {home / 'superlink.log'}")


def federation_config(cfg: Config) -> str:
    """``--federation-config``: one simulated SuperNode per client and the per-client resources."""
    fed = cfg.federation
    if fed.client_cpus != int(fed.client_cpus):
        raise FedsynthError(
            f"federation.client_cpus = {fed.client_cpus}: Flower's SuperLink simulation takes whole "
            'CPUs per client; use a whole number or federation.engine = "in-process"'
        )
    return (
        f"num-supernodes={cfg.partition.num_clients} client-resources-num-cpus={int(fed.client_cpus)} "
        f"client-resources-num-gpus={float(fed.client_gpus)} init-args-num-cpus={os.cpu_count() or 1} "
        "verbose=false"
    )


def run_config(config: Path, out: Path, overrides: list[str], resume: bool) -> str:
    """The app's run config as TOML (read by :mod:`fedsynth.runtime.serverapp`)."""
    if any(";" in item for item in overrides):
        raise FedsynthError(
            'a --set value containing ";" cannot cross to the SuperLink; use federation.engine = "in-process"'
        )
    values = {"config": str(config.resolve()), "out": str(out.resolve()), "overrides": ";".join(overrides)}
    lines = [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    return "\n".join([*lines, f"resume = {'true' if resume else 'false'}", ""])


def run_on_superlink(cfg: Config, config: Path, out: Path, overrides: list[str], *, resume: bool) -> None:
    """Run every stage of ``cfg`` as ``flwr run`` on a private local SuperLink."""
    values, federation = run_config(config, out, overrides, resume), federation_config(cfg)
    home = _app_home("fedsynth-superlink-", values)
    env = flower_env(home, live=sys.stdout.isatty())
    cmd = [str(_BIN / "flwr"), "run", str(home / "app"), "local", "--stream"]
    cmd += ["--run-config", str(home / "run-config.toml"), "--federation-config", federation]
    watchdog = start_watchdog(home)  # ends everything below should this process be killed
    try:
        start_superlink(home, env)
        relay, code = _relay(cmd, env, home / "run.log")
    finally:
        stop_all()
        watchdog.terminate()
        watchdog.wait()
    done = (out / "summary.json").is_file()
    _raise_failure(relay, code, done, home, "the simulation on the local SuperLink")
    shutil.rmtree(home, ignore_errors=True)


def submit(federation: str, config: Path, out: Path, overrides: list[str], *, resume: bool) -> str:
    """Run every stage on the SuperLink of a real federation: ``flwr run`` against the
    connection ``[superlink.<federation>]`` of ``$FLWR_HOME/config.toml``. Paths are sent
    absolute (the ServerApp reads them on the SuperLink's machine); a run that fails there
    raises its one line here (``flwr run`` itself exits 0). Returns the report's path."""
    home = _app_home("fedsynth-submit-", run_config(config, out, overrides, resume))
    env = flower_env(None)  # the federation's connection is in the user's $FLWR_HOME
    cmd = [str(_BIN / "flwr"), "run", str(home / "app"), federation, "--stream"]
    relay, code = _relay([*cmd, "--run-config", str(home / "run-config.toml")], env, home / "run.log")
    _raise_failure(relay, code, relay.report is not None, home, f"the run on SuperLink {federation!r}")
    shutil.rmtree(home, ignore_errors=True)
    return str(relay.report)


def _app_home(prefix: str, run_config_text: str) -> Path:
    """A temporary folder holding the minimal app (fedsynth's components, imported from the
    SuperLink's environment) and its run config."""
    home = Path(tempfile.mkdtemp(prefix=prefix))
    (home / "app").mkdir()
    (home / "app" / "pyproject.toml").write_text(_APP_PYPROJECT)
    (home / "run-config.toml").write_text(run_config_text)
    return home


def _relay(cmd: list[str], env: dict[str, str], log: Path) -> tuple[Relay, int]:
    """Run ``cmd``, relaying its output (raw copy in ``log``); the relay and the exit code."""
    relay = Relay(sys.stdout)
    client = start_group(cmd, env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    with log.open("w") as raw:
        for line in split_lines(_decoded(client.stdout)):
            raw.write(line)
            relay.line(line)
    return relay, client.wait()


def _raise_failure(relay: Relay, code: int, done: bool, home: Path, what: str) -> None:
    """The app's own error as it is; anything else names the full log (kept for that)."""
    log = home / "run.log"
    if relay.error is not None and not relay.crashed:
        shutil.rmtree(home, ignore_errors=True)
        raise FedsynthError(relay.error)
    if relay.error is not None:
        raise FedsynthError(f"{relay.error} (the full log: {log})")
    if code != 0 or not done:
        raise FedsynthError(f"{what} failed (exit {code}); the full log: {log}")
