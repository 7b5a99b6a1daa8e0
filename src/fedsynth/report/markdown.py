"""``report.md``: what a person reads — summary table, samples, curves, coverage, partitions."""

from __future__ import annotations

import json
import re

from fedsynth.config import PrivacyConfig, is_pipeline_folder, load_config
from fedsynth.core.rundir import RunDir, read_json, write_text_atomic
from fedsynth.report.plots import plot_bars, plot_curve

SUMMARY_ROWS = (
    ("paradigm", "paradigm", "{}"),
    ("task", "task", "{}"),
    ("strategy", "strategy", "{}"),
    ("rounds", "rounds", "{}"),
    ("wall time (s)", "wall_s", "{:.1f}"),
    ("bytes up", "bytes_up", "{:,}"),
    ("bytes down", "bytes_down", "{:,}"),
    ("test accuracy (last round) ↑", "test_accuracy", "{:.2%}"),
    ("best test accuracy ↑", "best_test_accuracy", "{:.2%}"),
    ("rounds to 95% of the best", "rounds_to_95pct_best", "{}"),
    ("FD ↓", "fd", "{:.3f}"),
    ("IS-style score ↑", "is_mean", "{:.2f}"),
    ("precision ↑", "precision", "{:.3f}"),
    ("recall ↑", "recall", "{:.3f}"),
    ("CAS accuracy ↑", "cas_accuracy", "{:.2%}"),
    ("CAS F1 ↑", "cas_f1", "{:.2%}"),
    ("CAS of as many real images (same class counts)", "cas_real_accuracy", "{:.2%}"),
    ("label fidelity ↑", "label_fidelity", "{:.2%}"),
    ("real-data classifier accuracy", "real_accuracy", "{:.2%}"),
    ("class distribution TV from uniform ↓", "class_tv_from_uniform", "{:.3f}"),
    ("near-copies of training images ↓", "near_copy_fraction", "{:.2%}"),
    ("membership attack AUC (0.5: chance)", "mia_auc", "{:.3f}"),
    ("membership attack TPR at 1% FPR", "mia_tpr_at_1pct_fpr", "{:.2%}"),
    ("membership attack on", "mia_model", "{}"),
    ("privacy", "privacy", "{}"),
    ("ε (largest party)", "epsilon", "{:.3f}"),
    ("δ", "delta", "{:.2e}"),
)


_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+!|<>~])")
_CONTROL = re.compile(r"[\x00-\x1f\x7f\u2028\u2029]+")


def md(value) -> str:
    """Any value read from a run's files, as markdown *data*: one line (control characters and
    line breaks become spaces), every markdown and HTML special character escaped, at most
    300 characters. A run directory may come from someone else."""
    text = _CONTROL.sub(" ", str(value))
    if len(text) > 300:
        text = text[:299] + "…"
    return _MARKDOWN_SPECIAL.sub(r"\\\1", text)


def code(value) -> str:
    """A value as an inline code span: one line, literal inside the backticks (falls back to
    :func:`md` when the value holds a backtick itself)."""
    text = _CONTROL.sub(" ", str(value))
    return md(text) if "`" in text or len(text) > 300 else f"`{text}`"


def _fmt(fmt: str, value) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return md(value)
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return md(value)


def _training(run: RunDir, metrics: list[dict]) -> list[str]:
    if not metrics:
        return []
    rounds = [m["round"] for m in metrics]
    tested = [m for m in metrics if "test_accuracy" in m]  # task classifier
    plot_curve(
        rounds,
        {"train loss": [m["train_loss"] for m in metrics]},
        "round",
        "cross-entropy" if tested else "diffusion loss",
        run.root / "loss.png",
        "training loss per round",
    )
    lines = ["", "## Training", "", "![loss](loss.png)"]
    if tested:
        plot_curve(
            [m["round"] for m in tested],
            {"global model": [m["test_accuracy"] for m in tested]},
            "round",
            "test accuracy",
            run.root / "accuracy.png",
            "held-out test accuracy per round",
        )
        lines += ["", "![accuracy](accuracy.png)"]
    if any(m.get("bytes_up") or m.get("bytes_down") for m in metrics):
        plot_curve(
            rounds,
            {"up": [m["bytes_up"] / 1e6 for m in metrics], "down": [m["bytes_down"] / 1e6 for m in metrics]},
            "round",
            "MB per round",
            run.root / "bytes.png",
            "payload bytes per round",
        )
        lines += ["", "![bytes](bytes.png)"]
    dropped = [(m["round"], d["client"], d["reason"]) for m in metrics for d in m.get("dropped", [])]
    if dropped:
        lines += ["", "Dropped client updates:", "", "| round | client | reason |", "| --- | --- | --- |"]
        lines += [f"| {md(r)} | {md(c)} | {md(why)} |" for r, c, why in dropped]
    return lines


def _feddiff(run: RunDir, metrics: list[dict], summary: dict) -> list[str]:
    """FedDiff's cost and, per round, the proxy-set score of the generated subset beside the
    base aggregate's (what the consolidation gained or lost)."""
    metrics = [m for m in metrics if "feddiff" in m]
    info = summary.get("feddiff")
    if not metrics or not info:
        return []
    plot_curve(
        [m["round"] for m in metrics],
        {
            "generated subset": [m["feddiff"]["score"] for m in metrics],
            "base aggregate": [m["feddiff"]["base_score"] for m in metrics],
        },
        "round",
        "proxy-set score (higher is better)",
        run.root / "feddiff.png",
        "FedDiff consolidation per round",
    )
    server_s = sum(m["feddiff"]["server_s"] for m in metrics) / len(metrics)
    return [
        "",
        "## FedDiff",
        "",
        f"Subset generated: {md(', '.join(map(str, info['subset'])))} ({_fmt('{}', info['subset_params'])} "
        "parameters). "
        f"Pool: {info['pool_size']} checkpoints from {info['proxy_images']} proxy images "
        f"(scores {info['pool_score_range'][0]:.3g} … {info['pool_score_range'][1]:.3g}); pre-training "
        f"{info['pretrain_s']:.0f} s (pool {info['pool_s']:.0f} s); "
        f"consolidation {server_s:.2f} s per round. "
        "The pool and the weight-space models never left the server.",
        "",
        "![feddiff](feddiff.png)",
    ]


def _evaluation(run: RunDir) -> list[str]:
    if not run.eval.is_file():
        return []
    ev = read_json(run.eval)
    names = list(ev["class_distribution"])
    counts = [ev["class_distribution"][n] for n in names]
    plot_bars(
        names,
        {"generated": counts},
        "samples (judged class)",
        run.root / "classes.png",
        "class distribution of generated samples",
        reference=sum(counts) / len(counts),
    )
    lines = [
        "",
        "## Evaluation",
        "",
        f"Features: {md(ev['feature_extractor'])}.",
        "",
        "![classes](classes.png)",
        "",
    ]
    if (run.root / "tsne.png").is_file():
        lines += ["![t-SNE](tsne.png)", ""]
    fidelity = ev.get("label_fidelity_per_class", {})  # runs evaluated before it existed have none
    lines += ["| class | FD ↓ | label fidelity ↑ | judged samples |", "| --- | --- | --- | --- |"]
    for n in names:
        fd, lf = ev["fd_per_class"].get(n), fidelity.get(n)
        lines.append(
            f"| {md(n)} | {'–' if fd is None else _fmt('{:.3f}', fd)} | "
            f"{'–' if lf is None else _fmt('{:.0%}', lf)} | {_fmt('{}', ev['class_distribution'][n])} |"
        )
    memo = ev.get("memorisation", {})
    if memo:
        lines += [
            "",
            "Memorisation: median nearest-training-image distance is "
            f"{_fmt('{:.2f}', memo['median_relative_nn'])}× the typical train-to-train distance; "
            f"{_fmt('{:.2%}', memo['near_copy_fraction'])} of samples are closer than "
            f"{_fmt('{}', memo['near_copy_ratio'])}× (near-copies).",
        ]
    return lines


def _local_models(run: RunDir, record: dict) -> list[str]:
    """Paradigm local (or a federated run's fine-tuning round, ``record``: its metrics line):
    who holds which classes, and how many images each model drew."""
    manifest = run.synthetic / "manifest.json"
    drawn = read_json(manifest).get("mixture", {}) if manifest.is_file() else {}
    lines = [
        "",
        "## Local models (one per client; the synthetic set is their mixture)",
        "",
        "| client | images held per class | images drawn per class |",
        "| --- | --- | --- |",
    ]
    for pid, held in sorted(record["class_counts_per_client"].items(), key=lambda kv: int(kv[0])):
        lines.append(f"| {md(pid)} | {md(held)} | {md(drawn.get(str(pid), '–'))} |")
    return lines


def _personal(run: RunDir, metrics: list[dict]) -> list[str]:
    clients = run.client_runs()
    if not clients:
        return []
    if metrics and "class_counts_per_client" in metrics[-1]:
        return _local_models(run, metrics[-1])  # paradigm local, or federation.finetune_steps
    lines = [
        "",
        "## Personal models (one per client; the table above shows their mean)",
        "",
        "| client | FD ↓ | precision ↑ | recall ↑ | CAS accuracy ↑ |",
        "| --- | --- | --- | --- | --- |",
    ]
    for c in clients:
        sm = read_json(c.summary) if c.summary.is_file() else {}
        cells = [_fmt(f, sm.get(k, "–")) for k, f in (("fd", "{:.3f}"), ("precision", "{:.3f}"))]
        cells += [_fmt("{:.3f}", sm.get("recall", "–")), _fmt("{:.2%}", sm.get("cas_accuracy", "–"))]
        name = md(c.root.name)
        lines.append(f"| [{name}](clients/{name}/report.md) | {' | '.join(cells)} |")
    for c in clients:
        if (c.root / "samples.png").is_file():
            name = md(c.root.name)
            lines += ["", f"![{name}](clients/{name}/samples.png)"]
    return lines


def _clip_groups(text: str) -> str:
    if not text:
        return ""
    return (
        f"; group-wise clipping {code(f'privacy.clip_groups = {json.dumps(text)}')}: each group "
        "clipped at its own norm and noised in proportion, the same guarantee"
    )


def _public_subspace(p: PrivacyConfig) -> str:
    if not p.public_subspace:
        return ""
    return (
        f"; each noised gradient projected onto the top {p.subspace_dim} directions of "
        f"{p.subspace_examples} public {code(p.public_subspace)} images' gradients (projected DP-SGD: "
        "post-processing, the same guarantee)"
    )


def privacy_facts(run: RunDir, summary: dict) -> list[str]:
    """What is protected and what is not, from the run's config (docs/privacy.md)."""
    cfg = load_config(run.config)
    lines = ["", "## Privacy", ""]
    p = cfg.privacy
    epsilon, delta = _fmt("{:.2f}", summary.get("epsilon", "?")), _fmt("{:.2e}", summary.get("delta", "?"))
    spent = f"(ε, δ) = ({epsilon}, {delta})"
    if p.mode == "dp-sgd":
        lines.append(
            f"- **Sample-level DP-SGD**: {spent} for each training party "
            f"({'the central trainer' if cfg.paradigm == 'centralized' else 'every client'}; σ = "
            f"{p.noise_multiplier}, C = {p.max_grad_norm}, {p.accountant} accountant, Poisson sampling"
            f"{_clip_groups(p.clip_groups)}{_public_subspace(p)}). "
            "It bounds what the model and everything derived from it (updates, samples) reveal about "
            "any one training image; it does not hide which classes a party holds."
        )
    elif p.mode == "dp-fedavg":
        lines.append(
            f"- **Client-level DP-FedAvg**: {spent} for each client's whole dataset (each update "
            f"clipped to C = {p.max_grad_norm}, Gaussian noise σC/m on their mean, σ = {p.noise_multiplier}, "
            f"{p.accountant} accountant, no amplification by client sampling)."
        )
    else:
        lines.append(
            '- **No formal guarantee** (`privacy.mode = "none"`): model updates and the final model '
            "can reveal training images; the near-copy fraction above is an empirical check only."
        )
    if cfg.model.init:
        lines.append(
            f"- Training started from the model at {code(cfg.model.init)} (`model.init`): whatever it "
            "learned from its own training data is in this model too, outside any ε stated here (treat that "
            "data as public)."
        )
    if cfg.train.trainable:
        sent = {
            "federated": "; they never travelled: every client built them itself (from the seed or "
            "model.init), checked against the server's SHA-256",
            "decentralized": "; they never travelled: the ledger's round models and the trainers' "
            "updates held only the trained ones, every node built the rest itself",
        }.get(cfg.paradigm, "")
        lines.append(
            f"- Only {code(cfg.train.trainable)} trained (`train.trainable`); every other parameter kept its "
            f"initial weights{sent}."
        )
    if cfg.lora.rank:
        lo = cfg.lora
        saved = (
            "`model/` holds the adapter and `base.json` (the base's path and SHA-256), not the base"
            if is_pipeline_folder(cfg.model.init)
            else "`model/unet` holds the merged model, `model/pytorch_lora_weights.safetensors` the adapter"
        )
        lines.append(
            f"- LoRA adapters (`lora.rank` = {lo.rank}, α = {lo.alpha or lo.rank:g}, aggregation "
            f"{code(lo.aggregation)}): only they{' and the modules above' if cfg.train.trainable else ''} "
            f"trained and were exchanged; the base model's weights stayed fixed and never left any node. "
            f"{saved}."
        )
    if cfg.paradigm == "centralized":
        lines.append("- Centralized: every training image was pooled in one place.")
    elif cfg.paradigm == "local":
        lines.append(f"- Each client uploaded once: its whole local {cfg.local.upload}.")
    else:
        lines.append("- Images stayed with their holders; model weights (or their deltas) left every round.")
        if cfg.federation.finetune_steps:
            lines.append(f"- After the last round each client uploaded its fine-tuned {cfg.local.upload}.")
    if cfg.phoenix.beta > 0:
        use = " (FedDiff's proxy set)" if cfg.strategy.name == "feddiff" else ""
        lines.append(
            f"- Data sharing: {cfg.phoenix.beta}% of the clients' images were sent to the server "
            f"(set G){use}."
        )
    if cfg.calibration.mode != "off":
        lines.append(
            "- FedDDPM: each client uploaded a local model once; the server generated an auxiliary set "
            "from them."
        )
    if cfg.exchange.personal:
        lines.append(f"- Personal layers ({code(cfg.exchange.personal)}) never left their clients.")
    lines.append("- Evaluation used the held-out test split, which no party trained on.")
    return lines


def write_report(run: RunDir) -> str:
    run.check_is_run().check_links()
    summary = read_json(run.summary) if run.summary.is_file() else {}
    lines = [f"# fedsynth run report: {code(run.root.name)}", "", "| metric | value |", "| --- | --- |"]
    lines += [
        f"| {label} | {_fmt(fmt, summary[key])} |" for label, key, fmt in SUMMARY_ROWS if key in summary
    ]
    if (run.root / "samples.png").is_file():
        lines += ["", "## Samples (one row per class)", "", "![samples](samples.png)"]
    metrics = run.read_metrics()
    lines += _personal(run, metrics) + _training(run, metrics) + _feddiff(run, metrics, summary)
    lines += _evaluation(run) + privacy_facts(run, summary)
    if (run.root / "partitions.png").is_file():
        lines += ["", "## Data partitions", "", "![partitions](partitions.png)"]
    text = "\n".join(lines) + "\n"
    write_text_atomic(run.report, text)
    return text
