"""The ``fedsynth`` command line. Errors the user can fix are printed as one line."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer
from PIL import Image
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fedsynth.core.errors import FedsynthError, first_line

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Federated diffusion training and synthetic datasets."
)
console = Console(stderr=True)

Overrides = Annotated[list[str] | None, typer.Option("--set", help="section.key=value (repeatable)")]


def _set_threads(threads: int) -> None:
    from fedsynth.diffusion.training import use_threads

    use_threads(threads)


def print_summary(summary: dict) -> None:
    table = Table(title="fedsynth summary")
    table.add_column("key")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    Console().print(table)


@app.command()
def run(
    config: Annotated[Path | None, typer.Argument(help="config TOML")] = None,
    out: Annotated[Path | None, typer.Option(help="run directory to create")] = None,
    overrides: Overrides = None,
    resume: Annotated[Path | None, typer.Option(help="continue the run in this directory")] = None,
) -> None:
    """Run every stage: partition, train, sample, evaluate, report."""
    from fedsynth.config import load_config
    from fedsynth.core.rundir import RunDir, check_fresh, read_json

    target = _target(config, out, resume, "run")
    if resume is not None:
        cfg = load_config(RunDir(resume).check_links().config, overrides)
    else:
        cfg = load_config(config, overrides)
    if cfg.paradigm in ("federated", "local") and cfg.federation.engine == "superlink":
        from fedsynth.runtime.superlink import run_on_superlink  # every stage runs in Flower's process

        source = RunDir(target).config if resume is not None else config
        if resume is None:
            check_fresh(target)
        with RunDir(target).writer_lock():  # Flower's processes write under this process's lock
            run_on_superlink(cfg, source, target, overrides or [], resume=resume is not None)
        result = RunDir(target)
    else:
        from fedsynth.pipeline import run_all

        _set_threads(cfg.train.threads)
        result = run_all(cfg, target, resume=resume is not None)
    print_summary(read_json(result.summary))
    print(f"report: {result.report}")


def _target(config: Path | None, out: Path | None, resume: Path | None, command: str) -> Path:
    """The run directory of ``run``/``submit``: ``--out`` with a CONFIG, or ``--resume`` alone."""
    if resume is not None:
        if config is not None or out is not None:
            raise FedsynthError(
                "--resume RUN_DIR takes the config from RUN_DIR/config.toml; "
                "do not pass CONFIG or --out with it"
            )
        return resume
    if config is None or out is None:
        raise FedsynthError(f"usage: fedsynth {command} CONFIG --out RUN_DIR [--set k=v] | --resume RUN_DIR")
    return out


@app.command()
def submit(
    federation: Annotated[str, typer.Argument(help="[superlink.NAME] in $FLWR_HOME/config.toml")],
    config: Annotated[Path | None, typer.Argument(help="config TOML on the SuperLink's machine")] = None,
    out: Annotated[Path | None, typer.Option(help="run directory on the SuperLink's machine")] = None,
    overrides: Overrides = None,
    resume: Annotated[Path | None, typer.Option(help="continue the run in this directory")] = None,
) -> None:
    """Run every stage on a real federation's SuperLink (`flwr run` with paths made absolute);
    a run that fails there exits 2 with its one-line error."""
    from fedsynth.core.rundir import RunDir
    from fedsynth.runtime.superlink import submit as submit_run

    target = _target(config, out, resume, f"submit {federation}")
    source = RunDir(target).config if resume is not None else config
    report = submit_run(federation, source, target, overrides or [], resume=resume is not None)
    print(f"report: {report}")


@app.command()
def keys(
    folder: Annotated[Path, typer.Argument(help="new folder for the federation's keys")],
    host: Annotated[list[str], typer.Option(help="the SuperLink's host name or IP (repeatable)")],
    nodes: Annotated[int, typer.Option(help="how many data holders (SuperNodes)")],
    days: Annotated[int, typer.Option(min=1, help="certificate lifetime")] = 365,
) -> None:
    """Write a federation's TLS certificates (CA, SuperLink) and one key pair per SuperNode."""
    from fedsynth.runtime.deploy import write_keys

    for path in write_keys(folder, host, nodes, days):
        print(path)


@app.command()
def node(
    role: Annotated[str, typer.Argument(help="trainer | aggregator")],
    config: Annotated[Path, typer.Option(help="the run's config TOML (same as the owner's)")],
    contract: Annotated[str, typer.Option(help="address of the deployed round contract")],
    key_file: Annotated[Path, typer.Option("--key-file", help="file holding this node's hex private key")],
    partition_id: Annotated[int, typer.Option("--partition-id", help="trainer: its partition")] = 0,
    data_path: Annotated[str, typer.Option("--data-path", help="trainer: its own image folder or .npz")] = "",
    classes: Annotated[str, typer.Option(help="with --data-path: the federation's class names, a,b,c")] = "",
    store_dir: Annotated[
        Path, typer.Option("--store-dir", help="store directory if ledger.store is empty")
    ] = Path("fedsynth-store"),
    overrides: Overrides = None,
) -> None:
    """Run one decentralized node (trainer or aggregator) against a deployed contract."""
    from fedsynth.config import load_config
    from fedsynth.runtime.ledger_node import run_node

    cfg = load_config(config, overrides)
    if not key_file.is_file():
        raise FedsynthError(f"--key-file: {key_file} does not exist")
    taken = run_node(
        cfg,
        role,
        contract,
        key_file.read_text().strip(),
        partition_id=partition_id,
        data_path=data_path,
        class_names=tuple(c for c in classes.split(",") if c),
        store_dir=store_dir,
    )
    print(f"{role} done: took part in {taken} round(s)")


@app.command()
def sample(
    run_dir: Annotated[Path, typer.Argument(help="a finished run directory")],
    out: Annotated[Path, typer.Option(help="output directory")],
    per_class: Annotated[int, typer.Option("--per-class", min=1)] = 100,
    sampler: Annotated[str, typer.Option(help="ddpm | ddim | dpm")] = "ddim",
    steps: Annotated[int, typer.Option(min=1)] = 50,
    guidance: Annotated[float, typer.Option(min=0.0)] = 1.0,
    seed: int = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 250,
    fmt: Annotated[str, typer.Option("--format", help="png | npz")] = "png",
    client: Annotated[
        int | None, typer.Option(help="a client's own model (udec / ulatdec / personal layers)")
    ] = None,
) -> None:
    """Generate a class-balanced synthetic dataset of any size from a trained run."""
    from fedsynth.config import load_config
    from fedsynth.core.errors import RunDirError
    from fedsynth.core.rundir import RunDir, read_json
    from fedsynth.diffusion.training import resolve_device
    from fedsynth.stages.checkpoint import load_model
    from fedsynth.stages.synthesize import SampleSpec, synthesize
    from fedsynth.stages.synthetic_set import check_output

    check_output(out, fmt)  # before loading anything
    rd = RunDir(run_dir).check_links()
    cfg = load_config(rd.config)
    _set_threads(cfg.train.threads)
    model_dir = rd if client is None else rd.client(client)
    if client is None and rd.client_runs():
        raise RunDirError(f"{rd.root} holds one model per client: pass --client N (see {rd.clients})")
    unet, scheduler = load_model(model_dir, resolve_device(cfg.train.device))
    names = read_json(rd.partitions)["class_names"]
    rounds = [r["round"] for r in rd.read_metrics()]
    spec = SampleSpec(
        per_class=per_class, sampler=sampler, steps=steps, guidance=guidance, batch_size=batch_size, seed=seed
    )
    manifest = synthesize(
        unet, scheduler, names, spec, out, fmt=fmt, model_round=max(rounds) if rounds else None
    )
    print(f"wrote {manifest['total']} images to {out}")


@app.command()
def evaluate(run_dir: Annotated[Path, typer.Argument(help="a run directory with synthetic/")]) -> None:
    """Judge RUN_DIR/synthetic against the real test split: eval.json + summary.json."""
    from fedsynth.config import load_config
    from fedsynth.core.rundir import RunDir, read_json
    from fedsynth.evaluation.evaluate import evaluate_run

    rd = RunDir(run_dir)
    cfg = load_config(rd.config)
    _set_threads(cfg.train.threads)
    with rd.writer_lock():
        evaluate_run(cfg, rd)
    print_summary(read_json(rd.summary))


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="a run directory")]) -> None:
    """Write RUN_DIR/report.md with its pictures."""
    from fedsynth.core.rundir import RunDir
    from fedsynth.report.markdown import write_report

    rd = RunDir(run_dir).check_is_run()  # before the lock, which would create the folder
    with rd.writer_lock():
        write_report(rd)
    print(f"report: {rd.report}")


@app.command()
def compare(
    run_dirs: Annotated[list[Path], typer.Argument(help="finished run directories")],
    out: Annotated[Path, typer.Option(help="markdown file to write (a .png chart goes beside it)")],
) -> None:
    """Compare runs in one table (IS, FD, CAS accuracy/precision/recall/F1, time, bytes)."""
    from fedsynth.report.compare import write_comparison

    write_comparison(run_dirs, out)
    print(f"comparison: {out}")


@app.command()
def datasets() -> None:
    """List the built-in datasets: size, where they are read from, and whether they are present."""
    from fedsynth.data.datasets import fashion_mnist_dirs
    from fedsynth.data.idx import find_idx

    found = next((d for d in fashion_mnist_dirs() if find_idx(d, "train-images-idx3-ubyte")), None)
    table = Table(title="built-in datasets (data.dataset)")
    for column in ("name", "images", "classes", "size", "read from", "present"):
        table.add_column(column)
    table.add_row("digits", "1,797", "10", "8×8 → data.image_size (16)", "scikit-learn (installed)", "yes")
    where = str(found) if found else " or ".join(str(d) for d in fashion_mnist_dirs())
    present = "yes" if found else "no: `make install` (Debian's dataset-fashion-mnist), or data.path"
    table.add_row("fashion-mnist", "60,000 + 10,000 test", "10", "28×28", where, present)
    table.add_row("idx", "yours", "labels", "yours", "data.path: MNIST-format IDX files", "–")
    table.add_row("imagefolder", "yours", "sub-folders", "any → data.image_size", "data.path", "–")
    table.add_row("npz", "yours", "labels", "any → data.image_size", "data.path", "–")
    Console().print(table)


def _terminate(signum, frame) -> None:
    """SIGTERM stops at once, like ``kill -9`` (checkpoints are written atomically, so
    nothing completed is lost) but with the one-line note. Unwinding instead would let a
    simulation's worker threads log every client they lose on the way out."""
    if sys.stdout.isatty():
        sys.stdout.write("\x1b[?25h")  # a progress bar may have hidden the cursor
    _interrupted(143)


def _interrupted(code: int) -> None:
    console.print(
        "[yellow]interrupted[/yellow]: completed checkpoints are kept; "
        "continue with `fedsynth run --resume RUN_DIR`",
        highlight=False,
        soft_wrap=True,
    )
    from fedsynth.runtime.superlink import stop_all

    stop_all()  # a local SuperLink and its simulation, if this run started one
    # os._exit: threads still running (a simulation's server thread waiting on workers that
    # the interrupt stopped) would keep the process alive; checkpoints are written atomically
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _fail(message: str, code: int) -> None:
    console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    sys.exit(code)


def main() -> None:
    """Run the CLI: errors a user can fix are one line (exit 2); anything else is one line
    naming the exception (exit 1) unless FEDSYNTH_DEBUG=1 asks for the traceback; Ctrl-C
    (exit 130) and SIGTERM (exit 143) say how to resume."""
    import click

    signal.signal(signal.SIGTERM, _terminate)
    debug = os.environ.get("FEDSYNTH_DEBUG", "") not in ("", "0")
    try:
        code = app(standalone_mode=False)
    except FedsynthError as exc:
        _fail(str(exc), 2)
    except (typer.Abort, KeyboardInterrupt):
        _interrupted(130)
    except click.ClickException as exc:  # usage errors
        exc.show()
        sys.exit(exc.exit_code)
    except (OSError, UnicodeDecodeError, Image.DecompressionBombError) as exc:
        if debug:
            raise
        _fail(first_line(exc), 2)
    except Exception as exc:
        if debug:
            raise
        _fail(f"{type(exc).__name__}: {first_line(exc)} (FEDSYNTH_DEBUG=1 shows the traceback)", 1)
    if code == 130:  # typer turns Ctrl-C into this return value
        _interrupted(130)
    if isinstance(code, int) and code:
        sys.exit(code)


if __name__ == "__main__":
    main()
