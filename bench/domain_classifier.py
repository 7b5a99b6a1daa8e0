"""The domain classifier's real-data accuracy against its training epochs (``eval.classifier_epochs``).

FD, precision/recall, label fidelity and the CAS judge are only as good as the domain
classifier that supplies their features and labels. This trains it (``train_classifier``,
the same function and seed as evaluation) on a dataset's training split for each epoch
count and scores it on the held-out split; rows are kept as they finish.

    .venv/bin/python bench/domain_classifier.py --config configs/fashion-federated.toml --epochs 5,10,20
"""

from __future__ import annotations

import argparse
import time

import torch

from _common import ROOT, run_missing
from fedsynth.config import load_config
from fedsynth.data.datasets import load_dataset
from fedsynth.evaluation.classifier import predict, train_classifier
from fedsynth.evaluation.domain import DOMAIN_SEED


def row(config: str, epochs: int) -> dict:
    cfg = load_config(ROOT / config)
    dataset, data = cfg.data.dataset, load_dataset(cfg.data)
    train, test = data.train, data.test
    start = time.perf_counter()
    model = train_classifier(train, epochs=epochs, seed=DOMAIN_SEED, device=torch.device("cpu"))
    seconds = time.perf_counter() - start
    logits, _ = predict(model, test.images)
    accuracy = float((logits.argmax(1) == test.labels).float().mean())
    return {"dataset": dataset, "epochs": epochs, "train_images": len(train), "test_images": len(test),
            "accuracy": accuracy, "train_s": round(seconds, 1)}  # fmt: skip


def table(rows: list[dict]) -> str:
    out = [
        "# Domain classifier: real test accuracy vs training epochs (`bench/domain_classifier.py`)",
        "",
        "`SmallCNN` trained by `train_classifier` (AdamW, one-cycle lr 3e-3, batch 64, shifts of up to "
        "a pixel) on the training split, scored on the held-out split; wall seconds on a 2-core CPU "
        "(shared with other benchmarks when they ran).",
        "",
        "| dataset | epochs | train images | test accuracy | train s |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in sorted(rows, key=lambda r: (r["dataset"], r["epochs"])):
        out.append(
            f"| {r['dataset']} | {r['epochs']} | {r['train_images']} | {100 * r['accuracy']:.1f}% "
            f"| {r['train_s']:.0f} |"
        )
    return "\n".join(out) + "\n"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="configs/fashion-federated.toml")
    p.add_argument("--epochs", default="5,10,20")
    args = p.parse_args()
    dataset = load_config(ROOT / args.config).data.dataset
    keys = ((epochs,) for epochs in map(int, args.epochs.split(",")))
    run_missing(
        "domain_classifier", keys, lambda r: (r["epochs"],) if r["dataset"] == dataset else (),
        lambda epochs: row(args.config, epochs), table,
    )  # fmt: skip


if __name__ == "__main__":
    main()
