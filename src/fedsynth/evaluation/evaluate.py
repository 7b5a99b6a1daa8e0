"""Stage 4: judge ``RUN_DIR/synthetic`` against the real held-out test split.

Writes ``eval.json`` (every metric), the flat metric keys of ``summary.json`` and the
t-SNE figure data. Features for FD / precision / recall / IS come from the cached domain
classifier (penultimate layer), trained on the real training split.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from fedsynth.config import Config, DataConfig
from fedsynth.core.errors import RunDirError
from fedsynth.core.progress import progress_bar
from fedsynth.core.rundir import RunDir, read_json, write_json_atomic
from fedsynth.data.datasets import ImageData, SplitDataset, folder_name, load_dataset, load_images
from fedsynth.diffusion.training import resolve_device
from fedsynth.evaluation.classifier import predict, train_classifier
from fedsynth.evaluation.domain import domain_classifier
from fedsynth.evaluation.inception import inception_metrics
from fedsynth.evaluation.membership import class_matched, membership_audit
from fedsynth.evaluation.metrics import (
    classification_scores,
    distance_from_uniform,
    fd_between,
    inception_style_score,
    label_fidelity,
    memorisation,
    precision_recall,
)
from fedsynth.report.plots import plot_tsne
from fedsynth.stages.checkpoint import load_model

SUMMARY_KEYS = (
    "fd",
    "precision",
    "recall",
    "is_mean",
    "cas_accuracy",
    "label_fidelity",
    "cas_precision",
    "cas_recall",
    "cas_f1",
    "cas_real_accuracy",
    "real_accuracy",
    "class_tv_from_uniform",
    "near_copy_fraction",
)
INCEPTION_KEYS = ("fid", "inception_is_mean")  # only with eval.inception_weights
AUDIT_KEYS = ("mia_auc", "mia_tpr_at_1pct_fpr", "mia_model")  # membership-inference audit of the model


def load_synthetic(folder: Path, real: ImageData, image_size: int) -> ImageData:
    """Read an image folder of generated samples, labelled in the real class order."""
    if not folder.is_dir():
        raise RunDirError(f"no synthetic dataset at {folder} (run `fedsynth sample` first)")
    cfg = DataConfig(dataset="imagefolder", path=str(folder), image_size=image_size, channels=real.shape[0])
    fake = load_images(cfg)
    index = {folder_name(n): i for i, n in enumerate(real.class_names)}
    unknown = sorted(set(fake.class_names) - set(index))
    if unknown:
        raise RunDirError(f"{folder}: class folders {unknown} are not classes of the real data")
    remap = torch.tensor([index[n] for n in fake.class_names])
    return ImageData(fake.images, remap[fake.labels], real.class_names)


def per_class_fd(
    real_feats: np.ndarray,
    real_y: np.ndarray,
    fake_feats: np.ndarray,
    fake_y: np.ndarray,
    names: tuple[str, ...],
) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for c, name in enumerate(names):
        r, f = real_feats[real_y == c], fake_feats[fake_y == c]
        out[name] = fd_between(r, f) if len(r) > 1 and len(f) > 1 else None
    return out


def cas_scores(cfg: Config, train: ImageData, real_test: ImageData, device: torch.device) -> dict:
    """CAS's protocol: the CNN trained on ``train`` only (``eval.cas_epochs``, the run's seed),
    scored on the real test split."""
    model = train_classifier(train, epochs=cfg.eval.cas_epochs, seed=cfg.seed, device=device)
    logits, _ = predict(model, real_test.images)
    return classification_scores(real_test.labels.numpy(), logits.argmax(1).numpy(), real_test.num_classes)


def evaluate_synthetic(
    cfg: Config, real_train: ImageData, real_test: ImageData, fake: ImageData, device: torch.device
) -> tuple[dict, dict]:
    """(metrics, arrays for figures)."""
    ev, n = cfg.eval, real_test.num_classes
    with progress_bar("evaluation", total=4) as bar:
        domain = domain_classifier(
            real_train, epochs=ev.classifier_epochs, device=device, cache_dir=ev.cache_dir
        )
        test_logits, test_feats = predict(domain, real_test.images)
        fake_logits, fake_feats = predict(domain, fake.images)
        real_scores = classification_scores(real_test.labels.numpy(), test_logits.argmax(1).numpy(), n)
        bar.advance()
        precision, recall = precision_recall(test_feats.numpy(), fake_feats.numpy(), k=3)
        is_mean, is_std = inception_style_score(torch.softmax(fake_logits, 1).numpy())
        judged = np.bincount(fake_logits.argmax(1).numpy(), minlength=n)
        bar.advance()
        cas = cas_scores(cfg, fake, real_test, device)
        # the same protocol on real training images with the synthetic set's class counts:
        # the accuracy data of this size could give, the ceiling CAS is read against
        _, real_same = class_matched(fake, real_train, cfg.seed)
        cas_real = cas_scores(cfg, real_same, real_test, device)
        bar.advance()
        memo = memorisation(
            fake.images.flatten(1).numpy(), real_train.images.flatten(1).numpy(), ev.copy_ratio
        )
        bar.advance()
    uniform = distance_from_uniform(judged)
    if ev.inception_weights:
        extra = inception_metrics(ev.inception_weights, real_test.images, fake.images, device)
    else:
        extra = {}
    metrics = {
        "feature_extractor": "domain classifier (penultimate layer, trained once on the real train split)",
        "fd": fd_between(test_feats.numpy(), fake_feats.numpy()),
        "fd_per_class": per_class_fd(
            test_feats.numpy(),
            real_test.labels.numpy(),
            fake_feats.numpy(),
            fake.labels.numpy(),
            real_test.class_names,
        ),
        "precision": precision,
        "recall": recall,
        "k": 3,
        "is_mean": is_mean,
        "is_std": is_std,
        "real_accuracy": real_scores["accuracy"],
        "real_scores": real_scores,
        "cas_accuracy": cas["accuracy"],
        "cas_precision": cas["precision"],
        "cas_recall": cas["recall"],
        "cas_f1": cas["f1"],
        "cas_real_accuracy": cas_real["accuracy"],
        "cas_real_size": len(real_same),
        "class_distribution": {c: int(v) for c, v in zip(real_test.class_names, judged, strict=True)},
        **label_fidelity(fake.labels.numpy(), fake_logits.argmax(1).numpy(), real_test.class_names),
        "class_tv_from_uniform": uniform["tv"],
        "class_kl_from_uniform": uniform["kl"],
        "memorisation": memo,
        "near_copy_fraction": memo["near_copy_fraction"],
        "num_synthetic": len(fake),
        "num_real_test": len(real_test),
        **extra,
    }
    figures = {
        "real_feats": test_feats.numpy(),
        "real_y": real_test.labels.numpy(),
        "fake_feats": fake_feats.numpy(),
        "fake_y": fake.labels.numpy(),
    }
    return metrics, figures


def _evaluate_dir(
    cfg: Config, run: RunDir, real_train: ImageData, real_test: ImageData, device, audit: dict | None = None
) -> dict:
    """Judge ``run/synthetic``; ``audit`` (the model's membership audit) is stored beside it."""
    start = time.perf_counter()
    fake = load_synthetic(run.synthetic, real_test, cfg.data.image_size)
    result, figures = evaluate_synthetic(cfg, real_train, real_test, fake, device)
    if cfg.eval.tsne_points > 0:
        plot_tsne(figures, list(real_test.class_names), run.root / "tsne.png", cfg.eval.tsne_points, cfg.seed)
    result["eval_wall_s"] = time.perf_counter() - start
    if audit:
        result["membership"] = audit
    write_json_atomic(run.eval, result)
    summary = {k: result[k] for k in SUMMARY_KEYS + INCEPTION_KEYS if k in result}
    run.update_summary(**summary, **{k: audit[k] for k in AUDIT_KEYS if audit})
    return result


def mean_over_clients(per_client: dict[str, dict]) -> dict:
    """Personal-model runs: each summary metric averaged over clients; class counts summed;
    per-class FD averaged over the clients that have it."""
    results = list(per_client.values())
    keys = [k for k in SUMMARY_KEYS + INCEPTION_KEYS if all(k in r for r in results)]
    out: dict = {k: float(np.mean([r[k] for r in results])) for k in keys}
    names = list(results[0]["class_distribution"])
    out["class_distribution"] = {n: int(sum(r["class_distribution"][n] for r in results)) for n in names}
    per_class = {
        n: [r["fd_per_class"][n] for r in results if r["fd_per_class"].get(n) is not None] for n in names
    }
    out["fd_per_class"] = {n: float(np.mean(v)) if v else None for n, v in per_class.items()}
    out["feature_extractor"] = results[0]["feature_extractor"]
    out["per_client"] = {name: {k: r[k] for k in keys} for name, r in per_client.items()}
    return out


def audit_models(cfg: Config, run: RunDir, data: SplitDataset, device) -> dict:
    """The membership-inference audit of the model(s) behind ``run/synthetic``: ``run/model``,
    or, for a mixture of client models (paradigm ``local``, ``federation.finetune_steps`` with
    ``local.upload = "model"``), every client's model on its own training images against test
    images of the same classes in the same proportions (:func:`class_matched`) — the worst
    client's result is the run's (``mia_model`` says which)."""
    n = cfg.eval.membership_samples
    clients = run.client_runs()
    if n <= 0 or not (clients or run.has_model()):
        return {}
    if not clients:
        unet, scheduler = load_model(run, device)
        which = "global model"
        if cfg.federation.finetune_steps:  # local.upload = "samples": the fine-tuned models stayed home
            which = "global model before fine-tuning (the clients' fine-tuned models were not uploaded)"
        return {**membership_audit(unet, scheduler, data.train, data.test, n, cfg.seed), "mia_model": which}
    parts = read_json(run.partitions)["clients"]
    per_client = {}
    for client in clients:
        pid = int(client.root.name.removeprefix("client-"))
        own = data.full.subset(np.array(parts[pid]["indices"] + parts[pid]["shared_received"], dtype=int))
        members, nonmembers = class_matched(own, data.test, cfg.seed)
        unet, scheduler = load_model(client, device)
        per_client[pid] = membership_audit(unet, scheduler, members, nonmembers, n, cfg.seed)
    worst = max(per_client, key=lambda pid: per_client[pid]["mia_auc"])
    which = f"each client's model on its own images vs test images of its classes; worst: client {worst}"
    return {**per_client[worst], "mia_model": which, "mia_per_client": per_client}


def evaluate_run(cfg: Config, run: RunDir) -> dict:
    """Judge ``run/synthetic``; for personal-model runs, every ``clients/*/synthetic`` and their mean."""
    run.check_links()
    device = resolve_device(cfg.train.device)
    data = load_dataset(cfg.data)
    clients = run.client_runs()
    if run.synthetic.is_dir() or not clients:
        audit = audit_models(cfg, run, data, device)
        return {**_evaluate_dir(cfg, run, data.train, data.test, device, audit), **audit}
    per_client = {c.root.name: _evaluate_dir(cfg, c, data.train, data.test, device) for c in clients}
    result = mean_over_clients(per_client)
    write_json_atomic(run.eval, result)
    run.update_summary(**{k: result[k] for k in SUMMARY_KEYS + INCEPTION_KEYS if k in result})
    return result
