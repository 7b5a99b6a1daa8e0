"""The privacy–quality trade-off: sample-level DP-SGD at ε ∈ {1, 10, ∞} on digits and Fashion-MNIST.

Centralized: ``configs/digits-centralized.toml`` (2,000 steps) or
``configs/fashion-centralized.toml`` (``--dataset fashion``: 60,000 images, where the same ε
costs ~40× less noise per example seen); federated: the demo config
(``configs/digits-federated.toml``, 30 rounds × 4 clients × 20 steps; every client's ε is
its own, on its own data; on Fashion-MNIST ``configs/fashion-federated.toml``, 40 rounds × 5 of
10 clients × 10 steps, ~6,000 images a client). ε = ∞ is the same run without DP. For each
row: CAS, FD, label fidelity, precision/recall, the membership-inference audit (AUC, TPR at 1%
FPR), the ε reached, σ and the training wall time (DP-SGD's overhead = its time / the ε = ∞ row's).
Rows are kept as they finish (an interrupted run goes on where it stopped).
Results: bench/results/privacy/privacy.{json,md}.

    .venv/bin/python bench/privacy.py [--paradigms centralized,federated] [--epsilons inf,10,1]
        [--dataset digits|fashion] [--variant NAME]  (NAME: a key of VARIANTS below)

``pub-`` variants start from a model trained without DP on public images (Fashion-MNIST at
16×16, trained once into ``runs/bench-privacy/public-fashion16``) through ``model.init``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
from pathlib import Path

from _common import run_missing, timed_fedsynth_run

CONFIGS = {
    ("centralized", "digits"): "configs/digits-centralized.toml",
    ("federated", "digits"): "configs/digits-federated.toml",
    ("centralized", "fashion"): "configs/fashion-centralized.toml",
    ("federated", "fashion"): "configs/fashion-federated.toml",
}
# larger batches at the same examples seen (2,000 × 64): less noise per step relative to the
# clipped signal (σC/B), as DP-SGD practice (DPDM: batch 4,096) suggests
B512 = ["train.batch_size=512", "federation.rounds=5", "train.local_steps=13"]
CONDITIONING = "class_embedding=0.005:0.1,time_embedding=0.02:0.1,*.time_emb_proj=0.03:0.2"
PATH = "class_embedding,time_embedding,*.time_emb_proj"  # the modules the class label acts through
ONLY_PATH = "only the conditioning path"
PUBLIC = 'privacy.public_subspace="fashion-mnist"'  # projected DP-SGD's public images


def fine_tune(
    what: str,
    modules: str,
    *more: str,
    lr: str,
    clip: str,
    shape: str = "512 × 260",
    note: str = "",
    base: tuple[str, ...] = tuple(B512),
) -> tuple[str, list[str]]:
    """A variant of ``base`` (``B512``, or () for the configs' own batch and steps) that trains
    only ``modules`` (``train.trainable``; ``what`` names them in its label) at learning rate
    ``lr``, DP-SGD clipping at ``clip``; ``more`` after them (later settings win). The label
    shows lr and C where they differ from lr 1e-3 and C = 0.1 (HEADER)."""
    shown = [lr != "1e-3" and f"lr {lr}", clip != "0.1" and f"C = {clip}", note]
    label = f"{shape}, from public Fashion-MNIST, {what} trained" + "".join(f", {t}" for t in shown if t)
    overrides = [f"train.trainable='{modules}'", f"train.lr={lr}", f"privacy.max_grad_norm={clip}", *more]
    return label, [*base, *overrides]


VARIANTS: dict[str, tuple[str, list[str]]] = {  # name: (centralized batch × steps, overrides)
    "": ("64 × 2,000", []),
    "b256": ("256 × 500", ["train.batch_size=256", "federation.rounds=5"]),
    "b512": ("512 × 260", B512),
    # DP-SGD's noise norm grows with √(parameters): the 165k-parameter preset against 652k
    "tiny-b512": ("512 × 260, tiny model", [*B512, "model.preset=tiny"]),
    # public pretraining (Ghalebikesabi et al. 2023): start from a model trained on public
    # images (Fashion-MNIST at the digits' 16×16, see public_model) and fine-tune it with DP-SGD
    "pub-b512": ("512 × 260, from public Fashion-MNIST", B512),
    # group-wise clipping: the class embedding (per-example gradients 0.002–0.01, bench/dp_snr.py)
    # clipped at 0.005 and noised at its own scale with a fifth of the budget
    "pub-b512-ce": (
        "512 × 260, from public Fashion-MNIST, class embedding clipped apart",
        [*B512, 'privacy.clip_groups="class_embedding=0.005:0.2"'],
    ),
    # ... and the path the class acts through: the time-and-class embedding MLP and every residual
    # block's projection of it, each clipped near its per-example norm (bench/results/dp_snr/dp_snr.md)
    "pub-b512-path": (
        "512 × 260, from public Fashion-MNIST, class embedding and its projections clipped apart",
        [*B512, f'privacy.clip_groups="{CONDITIONING}"'],
    ),
    # parameter-efficient DP fine-tuning (DP-LDM, Lyu et al. 2023: only some modules of a public
    # model train): only the conditioning path trains (75.8k of 652k parameters: the noise norm
    # √P 2.9× smaller), clipped near its per-example norm (~0.09, bench/results/dp_snr/dp_snr.md)
    "pub-b512-ft-path": fine_tune(ONLY_PATH, PATH, lr="1e-3", clip="0.1"),
    # ... at 3× the learning rate: the noise-dominated steps drift along the signal by a fraction
    # of the non-private step, so at lr 1e-3 260 steps cover a fraction of its path
    "pub-b512-ft-path-lr3": fine_tune(ONLY_PATH, PATH, lr="3e-3", clip="0.1"),
    "pub-b512-ft-path-lr10": fine_tune(ONLY_PATH, PATH, lr="1e-2", clip="0.1"),
    # ... every example's gradient clipped (C far below the path's per-example norms, which fall
    # from ~0.09 to ~0.04 as it trains): the noise σC/B shrinks with C while the clipped mean
    # shrinks less (DP-SGD with normalised gradients; Adam does not see the scale)
    "pub-b512-ft-path-c02": fine_tune(ONLY_PATH, PATH, lr="3e-3", clip="0.02"),
    "pub-b512-ft-path-c005": fine_tune(ONLY_PATH, PATH, lr="3e-3", clip="0.005"),
    # ... with DPDM's noise multiplicity, K = 4 draws of (t, ε) per example: 140 steps (σ lower)
    # at twice the compute of the 260-step rows
    "pub-b512-ft-path-c02-k4": fine_tune(
        ONLY_PATH,
        PATH,
        "train.local_steps=7",
        "privacy.noise_multiplicity=4",
        lr="3e-3",
        clip="0.02",
        shape="512 × 140, K = 4",
    ),
    # ... noise multiplicity at C = 0.005: K = 4 over 140 steps and K = 8 over 80 (the accountant's
    # accumulated signal-to-noise √T·B/σ is nearly fixed by ε and N, so fewer, cleaner steps cost
    # no privacy: averaging K draws aligns each clipped gradient with the mean the noise buries)
    "pub-b512-ft-path-c005-k4": fine_tune(
        ONLY_PATH,
        PATH,
        "train.local_steps=7",
        "privacy.noise_multiplicity=4",
        lr="3e-3",
        clip="0.005",
        shape="512 × 140, K = 4",
    ),
    "pub-b512-ft-path-c005-k8": fine_tune(
        ONLY_PATH,
        PATH,
        "train.local_steps=4",
        "privacy.noise_multiplicity=8",
        lr="3e-3",
        clip="0.005",
        shape="512 × 80, K = 8",
    ),
    # ... without the blocks' projections: the class and time embeddings alone (22.7k parameters,
    # the noise norm 1.8× below the path's), if they have the capacity
    "pub-b512-ft-emb-c005": fine_tune(
        "only the class and time embeddings", "class_embedding,time_embedding", lr="3e-3", clip="0.005"
    ),
    # ... with projected DP-SGD (PDP-SGD / GEP): the noised gradient projected onto the top k
    # directions of 512 public Fashion-MNIST images' per-example gradients at each round's start
    # (post-processing: ε unchanged; the noise norm falls by √(75.8k / k), the signal by what lies
    # outside those k directions)
    "pub-b512-ft-path-c005-pub64": fine_tune(
        ONLY_PATH,
        PATH,
        PUBLIC,
        "privacy.subspace_dim=64",
        lr="3e-3",
        clip="0.005",
        note="projected onto 64 public directions",
    ),
    "pub-b512-ft-path-c005-pub256": fine_tune(
        ONLY_PATH,
        PATH,
        PUBLIC,
        "privacy.subspace_dim=256",
        lr="3e-3",
        clip="0.005",
        note="projected onto 256 public directions",
    ),
    # ... with plain SGD, which PDP-SGD uses: Adam rescales every coordinate of the projected
    # gradient to a step of ~lr, spreading the noise left in k directions back over all of them
    # (the clipped gradients are C = 0.005 unit directions, their noised, projected mean ~0.001:
    # at lr 3 the model stays the public one; lr 100 moves a coordinate ~1e-3 a step, as Adam's)
    "pub-b512-ft-path-c005-sgd-pub256": fine_tune(
        ONLY_PATH,
        PATH,
        'train.optimizer="sgd"',
        PUBLIC,
        "privacy.subspace_dim=256",
        lr="3",
        clip="0.005",
        note="SGD, projected onto 256 public directions",
    ),
    "pub-b512-ft-path-c005-sgd100-pub256": fine_tune(
        ONLY_PATH,
        PATH,
        'train.optimizer="sgd"',
        PUBLIC,
        "privacy.subspace_dim=256",
        lr="100",
        clip="0.005",
        note="SGD, projected onto 256 public directions",
    ),
    # ... at lr 1,000: under noise Adam divides each coordinate by the noise's scale, so AdamW at
    # lr 3e-3 on the projected gradient is plain SGD at an lr of order 1,000 (σC/B ≈ 2.9e-5, the
    # projected noise √(k/P) of it per coordinate)
    "pub-b512-ft-path-c005-sgd1000-pub256": fine_tune(
        ONLY_PATH,
        PATH,
        'train.optimizer="sgd"',
        PUBLIC,
        "privacy.subspace_dim=256",
        lr="1000",
        clip="0.005",
        note="SGD, projected onto 256 public directions",
    ),
    # ... sampled with classifier-free guidance w = 2 (post-processing: ε unchanged): the DP model's
    # class signal is weak (label fidelity 0.21), guidance amplifies the class-conditional part
    # of its noise estimate (w = 3 and 6 screened on the seed-0 model: 50.1% and 34.8%)
    "pub-b512-ft-path-c005-w2": fine_tune(
        ONLY_PATH, PATH, "sample.guidance=2", lr="3e-3", clip="0.005", note="guidance w = 2"
    ),
    # the same recipe in the federated demo (each client's own batch 64 × 20 steps a round)
    "pub-ft-path-c005": fine_tune(ONLY_PATH, PATH, lr="3e-3", clip="0.005", shape="64 × 2,000", base=()),
    # ... with the class embedding clipped apart (its per-example norm ~0.01 is a tenth of the
    # path's: clipped with the rest, the one class-specific group's signal is a sliver of C)
    "pub-b512-ft-path-grp": fine_tune(
        ONLY_PATH,
        PATH,
        'privacy.clip_groups="class_embedding=0.002:0.2"',
        lr="3e-3",
        clip="0.02",
        note="class embedding clipped apart",
    ),
    # ... and every normalisation layer's scale and shift (2,176 parameters: they adapt the
    # features to the new domain)
    "pub-b512-ft-pathnorm-c02": fine_tune(
        "the conditioning path and the norms", f"{PATH},*norm*", lr="3e-3", clip="0.02"
    ),
    # the class embedding alone (1,408 parameters: the noise norm 21× below the whole model's); in
    # diffusers' UNet2DModel it is added to the time embedding after its MLP, so these rows are the
    # only class-specific weights; at lr 1e-2 (at 1e-3 Adam moves a coordinate ≤ 0.26 in 260 steps,
    # against rows of norm ~11 over 128 coordinates)
    "pub-b512-ft-ce": fine_tune("only the class embedding", "class_embedding", lr="1e-2", clip="0.01"),
    # DPDM's noise multiplicity: K = 4 (t, ε) draws per example, at ~the same compute (80 steps)
    "pub-b512-k4": (
        "512 × 80, K = 4, from public Fashion-MNIST",
        [*B512, "train.local_steps=4", "privacy.noise_multiplicity=4"],
    ),
}
PUBLIC_SETS = ["data.image_size=16", "federation.rounds=20", "sample.per_class=10", "eval.enabled=false"]
# the Fashion-MNIST rows are judged on 100 images per class drawn with DDIM-25, not the
# centralized config's own 1,500 with DDIM-10 (its 30-minute budget)
FASHION_SAMPLING = ["sample.per_class=100", "sample.steps=25"]


def public_model(runs: Path) -> Path:
    """The "public" starting point of the ``pub-`` variants: the centralized Fashion-MNIST
    configuration (2,000 steps, the ``small`` preset, 10 classes) trained at 16×16, no DP."""
    out = runs / "public-fashion16"
    if not (out / "summary.json").is_file():
        shutil.rmtree(out, ignore_errors=True)
        timed_fedsynth_run(CONFIGS["centralized", "fashion"], out, PUBLIC_SETS, "public Fashion-MNIST 16×16")
    return out


KEYS = ("cas_accuracy", "fd", "label_fidelity", "precision", "recall", "mia_auc", "mia_tpr_at_1pct_fpr")


def run_row(paradigm: str, eps: str, seed: int, variant: str, dataset: str, runs: Path) -> dict:
    prefix = paradigm if dataset == "digits" else f"{dataset}-{paradigm}"
    out = runs / f"{prefix}-eps{eps}-s{seed}{'-' + variant if variant else ''}"
    shutil.rmtree(out, ignore_errors=True)
    # ε = ∞ is the same run without DP: DP-SGD's own settings (clip groups) do not apply
    overrides = [s for s in VARIANTS[variant][1] if eps != "inf" or not s.startswith("privacy.")]
    sets = [f"seed={seed}", *(FASHION_SAMPLING if dataset == "fashion" else []), *overrides]
    if variant.startswith("pub-"):
        sets.append(f"model.init='{public_model(runs)}'")
    if eps != "inf":
        sets += ['privacy.mode="dp-sgd"', f"privacy.target_epsilon={eps}"]
    wall, _ = timed_fedsynth_run(CONFIGS[paradigm, dataset], out, sets, f"{dataset} {paradigm} ε={eps}")
    summary = json.loads((out / "summary.json").read_text())
    return {
        "paradigm": paradigm,
        "dataset": dataset,
        "target_epsilon": eps,
        "seed": seed,
        "variant": variant,
        "epsilon": summary.get("epsilon"),
        "delta": summary.get("delta"),
        "noise_multiplier": summary.get("noise_multiplier"),
        **{k: summary.get(k) for k in KEYS},
        "train_wall_s": round(summary["train_wall_s"], 1),
        "wall_s": round(wall, 1),
        "run": str(out),
    }


def row_key(r: dict) -> tuple:
    return r["paradigm"], r["target_epsilon"], r["seed"], r.get("variant", ""), data(r)


def data(row: dict) -> str:
    return row.get("dataset", "digits")  # rows written before the dataset axis are digits


def fmt(value, spec: str, scale: float = 1.0) -> str:
    return "–" if value is None else format(scale * value, spec)


def shape(row: dict) -> str:
    """The variant's label; a federated row's batch × steps are each client's per round."""
    label = VARIANTS[row.get("variant", "")][0]
    if row["paradigm"] == "federated":
        steps = {"digits": 20, "fashion": 10}[data(row)]  # the configs' train.local_steps
        return ", ".join([f"64 × {steps} per client-round", *label.split(", ")[1:]])
    return label


def table(rows: list[dict]) -> str:
    base = {
        (data(r), r["paradigm"], r["seed"], r.get("variant", "")): r["train_wall_s"]
        for r in rows
        if r["target_epsilon"] == "inf"
    }
    lines = [
        "| data | paradigm | batch × steps | target ε | seed | ε reached (δ) | σ | CAS | FD | label fidelity "
        "| precision | recall | MIA AUC | MIA TPR @1% FPR | train s | DP time × |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    order = {"inf": 0, "10": 1, "1": 2}
    for r in sorted(
        rows,
        key=lambda r: (
            data(r),
            r["paradigm"],
            r.get("variant", ""),
            order.get(r["target_epsilon"], 9),
            r["seed"],
        ),
    ):
        ref = base.get((data(r), r["paradigm"], r["seed"], r.get("variant", "")))
        ratio = f"{r['train_wall_s'] / ref:.1f}" if ref and r["target_epsilon"] != "inf" else "–"
        reached = "∞" if r["epsilon"] is None else f"{r['epsilon']:.2f} ({r['delta']:.1e})"
        lines.append(
            f"| {data(r)} | {r['paradigm']} | {shape(r)} | {r['target_epsilon']} | {r['seed']} | {reached} | "
            f"{fmt(r['noise_multiplier'], '.3f')} | {fmt(r['cas_accuracy'], '.1f', 100)}% | "
            f"{fmt(r['fd'], '.2f')} | "
            f"{fmt(r['label_fidelity'], '.2f')} | {fmt(r['precision'], '.2f')} | {fmt(r['recall'], '.2f')} | "
            f"{fmt(r['mia_auc'], '.3f')} | {fmt(r['mia_tpr_at_1pct_fpr'], '.1f', 100)}% | "
            f"{r['train_wall_s']:.0f} | {ratio} |"
        )
    return "\n".join(lines) + "\n"


HEADER = (
    "# Privacy vs quality: sample-level DP-SGD on digits and Fashion-MNIST (`bench/privacy.py`)\n\n"
    "Centralized: `configs/digits-centralized.toml` (2,000 steps, batch 64 → q = 64/1438) or "
    "`configs/fashion-centralized.toml` (60,000 images; batch 256 × 500 steps); "
    "federated: the demo (`configs/digits-federated.toml`; each client's ε on its own ~180 "
    "images, σ calibrated for a client selected every round) or `configs/fashion-federated.toml` "
    "(10 clients, Dirichlet α = 0.3, 40 rounds × 5 clients × 10 steps). δ = 1/(10 N) of the smallest "
    "party. Same optimizer (AdamW, lr 1e-3), clipping norm C = 1, RDP accountant. Wall times "
    "share a 2-core machine with other work; the ratio compares rows of one paradigm.\n\n"
    "The centralized ε = 10 row was trained with Opacus' per-example gradients (the engine before "
    "`torch.func`) while the test suite ran beside it: its time ratio is not DP-SGD's overhead, "
    "which `bench/results/dp_overhead/dp_overhead.md` measures side by side.\n\n"
    "Variants: `tiny model` is the 165k-parameter preset (the noise norm grows as √P); `from public "
    "Fashion-MNIST` starts DP-SGD from a model trained without DP on Fashion-MNIST at 16×16 "
    "(`model.init`; public pretraining as in Ghalebikesabi et al. 2023), whose data ε does not cover; "
    "`clipped apart` is group-wise clipping (`privacy.clip_groups`, the groups in the variant's "
    "overrides: `bench/results/privacy/privacy.json` → `variants`); `only … trained` is parameter-efficient "
    "DP fine-tuning (`train.trainable`: the other parameters keep the public model's weights; "
    "DP-LDM, Lyu et al. 2023), with its learning rate and clipping norm C where they differ from "
    "lr 1e-3 and C = 0.1; `K = n` is DPDM's noise multiplicity (`privacy.noise_multiplicity`); "
    "`projected onto k public directions` is projected DP-SGD (`privacy.public_subspace`, the top k "
    "directions of 512 public Fashion-MNIST images' per-example gradients; PDP-SGD, Zhou et al. 2021); "
    "`SGD` is plain SGD in place of AdamW; `guidance w` samples with classifier-free guidance "
    "(`sample.guidance`, post-processing of the trained model: ε unchanged).\n\n"
    "Anchor, not comparable in scale (MNIST 28×28 with 60,000 images, large batches, GPU days): "
    "DPDM (Dockhorn et al. 2023), MNIST at ε = 10: FID 5.01, downstream classifier 98.1%. Our "
    "digits set has 1,438 training images, so the same ε costs far more noise per step. Comparable "
    "(same data, split, δ and accountant): the CAS classifier trained with DP-SGD on the real "
    "digits themselves, one untuned setting, reaches 79.9% / 82.5% at ε = 10 and 47.6% / 30.9% at "
    "ε = 1 (two seeds; 96.7% / 98.6% without DP): `bench/results/dp_classifier/dp_classifier.md`.\n\n"
)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--paradigms", default="centralized,federated")
    p.add_argument("--epsilons", default="inf,10,1")
    p.add_argument("--seeds", default="0")
    p.add_argument("--variant", default="", choices=tuple(VARIANTS))
    p.add_argument("--dataset", default="digits", choices=("digits", "fashion"))
    p.add_argument("--runs-dir", type=Path, default=Path("runs/bench-privacy"))
    args = p.parse_args()
    keys = itertools.product(
        args.paradigms.split(","), args.epsilons.split(","), map(int, args.seeds.split(",")), [args.variant],
        [args.dataset],
    )  # fmt: skip
    run_missing(
        "privacy", keys, row_key,
        lambda *key: run_row(*key, args.runs_dir), lambda rows: HEADER + table(rows),
        payload=lambda rows: {
            "configs": {"-".join(k): v for k, v in CONFIGS.items()},
            "variants": {name: overrides for name, (_, overrides) in VARIANTS.items()},
        },
    )  # fmt: skip


if __name__ == "__main__":
    main()
