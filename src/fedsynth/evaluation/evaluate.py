"""Stage 4: judge ``RUN_DIR/synthetic`` against the real held-out test split.

Writes ``eval.json`` (every metric) and the flat metric keys of ``summary.json``.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from fedsynth.config import Config, DataConfig
from fedsynth.data.datasets import ImageData, load_dataset, load_images
from fedsynth.diffusion.training import resolve_device
from fedsynth.errors import RunDirError
from fedsynth.evaluation.classifier import predict, train_classifier
from fedsynth.evaluation.metrics import classification_scores, fd_between, precision_recall
from fedsynth.progress import progress_bar
from fedsynth.rundir import RunDir, write_json_atomic


def load_synthetic(folder: Path, real: ImageData, image_size: int) -> ImageData:
    """Read an image folder of generated samples, labelled in the real class order."""
    if not folder.is_dir():
        raise RunDirError(f"no synthetic dataset at {folder} (run `fedsynth sample` first)")
    cfg = DataConfig(dataset="imagefolder", path=str(folder), image_size=image_size, channels=real.shape[0])
    fake = load_images(cfg)
    unknown = sorted(set(fake.class_names) - set(real.class_names))
    if unknown:
        raise RunDirError(f"{folder}: class folders {unknown} are not classes of the real data")
    remap = torch.tensor([real.class_names.index(n) for n in fake.class_names])
    return ImageData(fake.images, remap[fake.labels], real.class_names)


def evaluate_synthetic(
    cfg: Config, real_train: ImageData, real_test: ImageData, fake: ImageData, device: torch.device
) -> dict:
    ev = cfg.eval
    num_classes = real_test.num_classes
    with progress_bar("evaluation", total=4) as bar:
        domain = train_classifier(real_train, epochs=ev.classifier_epochs, seed=cfg.seed, device=device)
        bar.advance()
        test_logits, test_feats = predict(domain, real_test.images)
        fake_logits, fake_feats = predict(domain, fake.images)
        real_scores = classification_scores(
            real_test.labels.numpy(), test_logits.argmax(1).numpy(), num_classes
        )
        precision, recall = precision_recall(test_feats.numpy(), fake_feats.numpy(), k=3)
        bar.advance()
        cas_model = train_classifier(fake, epochs=ev.cas_epochs, seed=cfg.seed, device=device)
        cas_logits, _ = predict(cas_model, real_test.images)
        cas = classification_scores(real_test.labels.numpy(), cas_logits.argmax(1).numpy(), num_classes)
        bar.advance()
        judged = np.bincount(fake_logits.argmax(1).numpy(), minlength=num_classes)
        bar.advance()
    return {
        "feature_extractor": "domain-classifier (penultimate layer, trained on the real train split)",
        "fd": fd_between(test_feats.numpy(), fake_feats.numpy()),
        "precision": precision,
        "recall": recall,
        "k": 3,
        "real_accuracy": real_scores["accuracy"],
        "real_scores": real_scores,
        "cas_accuracy": cas["accuracy"],
        "cas_precision": cas["precision"],
        "cas_recall": cas["recall"],
        "cas_f1": cas["f1"],
        "class_distribution": {n: int(v) for n, v in zip(real_test.class_names, judged, strict=True)},
        "num_synthetic": len(fake),
        "num_real_test": len(real_test),
    }


def evaluate_run(cfg: Config, run: RunDir) -> dict:
    start = time.perf_counter()
    device = resolve_device(cfg.train.device)
    data = load_dataset(cfg.data)
    real_train, real_test = data.train, data.test
    fake = load_synthetic(run.synthetic, real_test, cfg.data.image_size)
    result = evaluate_synthetic(cfg, real_train, real_test, fake, device)
    result["eval_wall_s"] = time.perf_counter() - start
    write_json_atomic(run.eval, result)
    keys = (
        "fd",
        "precision",
        "recall",
        "cas_accuracy",
        "cas_precision",
        "cas_recall",
        "cas_f1",
        "real_accuracy",
    )
    run.update_summary(**{k: result[k] for k in keys})
    return result
