"""The poisoning audit: FC, CP and BP against a frozen extractor, under the paper's protocol.

Protocol (Zhou et al., Appendix A, after Zhu et al. 2019). The training set is split per class
into pre-training, clean re-training and base-pool images (``core.data.split_dataset``). An
instance is one target image of the target class, drawn from the test set, plus poisons made
from base images of the poison class drawn from the pool; targets and bases are drawn from
``config.seed`` and recorded. The victim re-trains only the linear head on the frozen features
of the clean re-training set plus the poisons, labelled with the poison class (Adam, lr 0.1,
100 epochs, x0.1 at epochs 60 and 80). The instance succeeds when the re-trained model puts the
target in the poison class; ASR = successes / instances. The baseline re-trains the same way
with the unperturbed bases in place of the poisons, so ASR minus baseline is what the poisons
did.

What makes it fast (DESIGN.md): the extractor is frozen, so the features of the re-training
and test sets are computed once per audit; the instances of an attack are crafted together
(``core.attacks``); and the heads of all instances, poisoned and baseline, are re-trained
together as one batched linear problem (weights (H, classes, D), one Adam over all of them).

Entry point: :func:`run_audit` (config in, JSON-able report out).
"""

from __future__ import annotations

import json
import math
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.attacks import ATTACKS, CraftResult
from core.checkpoint import library_versions, load_extractor
from core.config import AuditConfig
from core.data import ImageDataset, default_split, encode_png, load_dataset, split_dataset, to_float
from core.device import autocast, resolve_device, resolve_precision, uses_channels_last
from core.models import FeatureClassifier, FoldedBatchNorm
from core.progress import Progress, ProgressCallback, ignore_progress
from core.screen import screen

SCHEMA_VERSION = "bulwark-audit/1"


class AuditError(ValueError):
    """An audit that cannot run as configured; the message names the field to change."""


@dataclass(frozen=True)
class Instance:
    """One attack instance: a test-set target and the training-set indices of its bases.

    ``base_indices`` holds as many bases as the largest attack needs; an attack with k
    poisons uses the first k, so FC's base is the first of CP's and BP's.
    """

    target_index: int  # into the test set
    target_class: int
    poison_class: int
    base_indices: tuple[int, ...]  # into the training set, all from the poison class's pool


@dataclass(frozen=True)
class HeadSchedule:
    """How the victim re-trains its linear head (Appendix A: Adam, 100 epochs, lr 0.1)."""

    epochs: int = 100
    lr: float = 0.1
    milestones: tuple[int, ...] = (60, 80)  # epochs after which lr is multiplied by gamma
    gamma: float = 0.1
    batch_size: int = 64  # images per Adam step (clean re-training images + poisons)

    def lr_at(self, epoch: int) -> float:
        """The learning rate in force during 0-based ``epoch``."""
        return self.lr * self.gamma ** sum(epoch >= m for m in self.milestones)


def choose_instances(
    data: ImageDataset,
    pool: torch.Tensor,
    pairs: Sequence[tuple[int, int]],
    targets_per_pair: int,
    bases_per_instance: int,
    seed: int,
) -> list[Instance]:
    """Draw targets (test set) and bases (pool of the poison class) from ``seed``.

    For every (target class, poison class) pair in order: ``targets_per_pair`` distinct test
    images of the target class, and for each of them ``bases_per_instance`` distinct pool
    images of the poison class. Deterministic for a seed; independent of which attacks run.
    """
    generator = torch.Generator().manual_seed(seed)
    instances = []
    for target_class, poison_class in pairs:
        candidates = torch.nonzero(data.test_y == target_class).flatten()
        if len(candidates) < targets_per_pair:
            raise AuditError(
                f"targets_per_pair={targets_per_pair} but the test set has only "
                f"{len(candidates)} images of class {target_class}"
            )
        bases_pool = pool[data.train_y[pool] == poison_class]
        if len(bases_pool) < bases_per_instance:
            raise AuditError(
                f"the pool has {len(bases_pool)} images of class {poison_class}, fewer than the "
                f"{bases_per_instance} poisons per instance: raise split.pool or lower "
                "fc_poisons / polytope_poisons"
            )
        chosen = candidates[torch.randperm(len(candidates), generator=generator)[:targets_per_pair]]
        for target_index in chosen.tolist():
            order = torch.randperm(len(bases_pool), generator=generator)[:bases_per_instance]
            instances.append(
                Instance(
                    target_index=target_index,
                    target_class=target_class,
                    poison_class=poison_class,
                    base_indices=tuple(bases_pool[order].tolist()),
                )
            )
    return instances


@torch.no_grad()
def extract_features(
    model: FeatureClassifier,
    images: torch.Tensor,
    *,
    dtype: torch.dtype = torch.float32,
    batch_size: int = 256,
) -> torch.Tensor:
    """f(x) of uint8 or [0,1] float images (N, C, H, W), on the model's device -> (N, D) float32."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size].to(device)
        batch = to_float(batch) if batch.dtype == torch.uint8 else batch.float()
        with autocast(device, dtype):
            out.append(model.features(batch).float())
    if not out:
        return torch.zeros(0, model.feature_dim, device=device)
    return torch.cat(out)


def fresh_head(
    num_classes: int, feature_dim: int, seed: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``nn.Linear``'s default initialization, drawn from ``seed`` (weight (C, D), bias (C,))."""
    generator = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(feature_dim)
    weight = (torch.rand(num_classes, feature_dim, generator=generator) * 2 - 1) * bound
    bias = (torch.rand(num_classes, generator=generator) * 2 - 1) * bound
    return weight.to(device), bias.to(device)


def retrain_heads(
    clean_features: torch.Tensor,
    clean_labels: torch.Tensor,
    extra_features: torch.Tensor,
    extra_labels: torch.Tensor,
    *,
    init_weight: torch.Tensor,
    init_bias: torch.Tensor,
    schedule: HeadSchedule,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-train H linear heads at once, head h on the clean set plus its own k extra images.

    Args:
        clean_features: (N, D) frozen features of the clean re-training set, shared by all heads.
        clean_labels: (N,) their labels.
        extra_features: (H, k, D) features of each head's own images (poisons or bases).
        extra_labels: (H, k) their labels (the poison class).
        init_weight, init_bias: (C, D) and (C,), the starting head of every instance.
        schedule: epochs, Adam lr and its milestones, batch size.
        seed: draws the shuffling, one permutation of the N + k images per epoch, shared by
            all heads.

    Returns (weights (H, C, D), biases (H, C)). Head h's loss is the mean cross-entropy over
    its own batch; Adam is element-wise, so every head ends as if it had been trained alone
    with ``nn.Linear`` and ``torch.optim.Adam`` on the same batches. The gradient of
    softmax cross-entropy is written out (softmax minus one-hot) instead of taken by autograd,
    and weight and bias live in one (H, C, D + 1) tensor: a step is then two matrix
    products forward, two back and one fused Adam update, whatever H is.
    """
    heads, k = extra_labels.shape
    n, dim = clean_features.shape
    classes = init_weight.shape[0]
    device = clean_features.device
    ones_clean = torch.ones(n, 1, device=device)
    clean = torch.cat([clean_features.float(), ones_clean], 1)  # (N, D + 1)
    extra = torch.cat([extra_features.float(), torch.ones(heads, k, 1, device=device)], 2)
    initial = torch.cat([init_weight.float(), init_bias.float()[:, None]], 1).to(device)
    theta = initial.expand(heads, -1, -1).clone()  # (H, C, D + 1)
    theta.grad = torch.zeros_like(theta)
    optimizer = torch.optim.Adam([theta], lr=schedule.lr, fused=device.type in ("cpu", "cuda"))
    eye = torch.eye(classes, device=device)
    clean_onehot, extra_onehot = eye[clean_labels.to(device)], eye[extra_labels.to(device)]
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(schedule.epochs):
        for group in optimizer.param_groups:
            group["lr"] = schedule.lr_at(epoch)
        order = torch.randperm(n + k, generator=generator)
        for start in range(0, n + k, schedule.batch_size):
            batch = order[start : start + schedule.batch_size]
            clean_rows = batch[batch < n].to(device)
            extra_rows = batch[batch >= n].to(device) - n
            scale = 1.0 / len(batch)  # the mean over each head's own batch
            grad = theta.grad
            if len(clean_rows):
                x = clean[clean_rows]  # (b, D + 1), the same rows for every head
                logits = (x @ theta.view(heads * classes, dim + 1).T).view(-1, heads, classes)
                residual = (logits.softmax(-1) - clean_onehot[clean_rows, None]) * scale
                torch.mm(residual.flatten(1).T, x, out=grad.view(heads * classes, dim + 1))
            else:
                grad.zero_()
            if len(extra_rows):
                x = extra[:, extra_rows]  # (H, e, D + 1), each head's own rows
                logits = torch.bmm(x, theta.transpose(1, 2))  # (H, e, C)
                residual = (logits.softmax(-1) - extra_onehot[:, extra_rows]) * scale
                grad.baddbmm_(residual.transpose(1, 2), x)
            optimizer.step()
    return theta[:, :, :dim].contiguous(), theta[:, :, dim].contiguous()


def head_logits(
    weights: torch.Tensor, biases: torch.Tensor, features: torch.Tensor
) -> torch.Tensor:
    """Logits of H heads on shared features (N, D) -> (H, N, C)."""
    return torch.einsum("nd,hcd->hnc", features, weights) + biases[:, None]


def wilson_interval(successes: int, trials: int, z: float = 1.959963984540054) -> list[float]:
    """The Wilson score interval of a binomial rate (95% for the default z)."""
    if trials == 0:
        return [0.0, 1.0]
    rate = successes / trials
    denominator = 1 + z * z / trials
    centre = (rate + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(rate * (1 - rate) / trials + z * z / (4 * trials * trials)) / denominator
    # At 0 or all successes the bound is exact; say so rather than leave rounding residue.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == trials else min(1.0, centre + half)
    return [low, high]


def _mean_std(values: Sequence[float]) -> dict[str, float]:
    array = np.asarray(values, dtype=np.float64)
    std = float(array.std(ddof=1)) if len(array) > 1 else 0.0
    return {"mean": float(array.mean()), "std": std}


class _Tracker:
    """Turns phase-local progress into the whole audit's fraction and an ETA."""

    def __init__(self, callback: ProgressCallback, weights: dict[str, float]) -> None:
        self.callback = callback
        total = sum(weights.values())
        self.weights = {name: weight / total for name, weight in weights.items()}
        self.done = 0.0
        self.started = time.perf_counter()

    def report(self, phase: str, local: float, **fields: Any) -> None:
        fraction = min(1.0, self.done + self.weights[phase] * local)
        elapsed = time.perf_counter() - self.started
        eta = elapsed * (1 - fraction) / fraction if fraction > 0.01 else None
        self.callback(Progress(phase=phase, fraction=fraction, eta_seconds=eta, **fields))

    def finish(self, phase: str) -> None:
        self.done += self.weights[phase]


def run_audit(
    config: AuditConfig,
    *,
    progress: ProgressCallback = ignore_progress,
    poisons_dir: Path | None = None,
    dataset: ImageDataset | None = None,
) -> dict[str, Any]:
    """Run ``config.attacks`` against ``config.model`` and return the JSON-able ASR report.

    Args:
        config: the audit (model, dataset, pairs, budgets, attack and re-training settings).
        progress: called with the whole audit's fraction done (phases ``load``,
            ``features``, ``screen``, ``craft:<attack>``, ``retrain:<attack>``); raising from
            it stops the audit.
        poisons_dir: if given, each attack's poisons are written there as ``<attack>.npz``
            (float32 poisons (I, k, C, H, W), uint8 bases and targets, indices) and
            ``<attack>.png`` (one row per instance: base | poison pairs, then the target).
        dataset: the already-read dataset named by ``config`` (saves re-reading it).

    Raises :class:`AuditError` for a dataset or pair that does not fit the model, and the
    loaders' errors for unreadable checkpoints or datasets.
    """
    started = time.perf_counter()
    timings: dict[str, float] = {}
    device = resolve_device(config.device)
    dtype = resolve_precision(config.precision, device)
    k_fc, k_poly = config.fc_poisons, config.polytope_poisons
    attack_sizes = {name: (k_fc if name == "fc" else k_poly) for name in config.attacks}
    images_per_attack = {name: attack_sizes[name] * config.iterations for name in config.attacks}
    tracker = _Tracker(
        progress,
        {
            "load": 1.0,
            "features": 4.0,
            "screen": 2.0 if config.screen_images else 0.0,
            **{
                f"craft:{a}": 90.0 * w / sum(images_per_attack.values())
                for a, w in images_per_attack.items()
            },
            **{f"retrain:{a}": 5.0 / len(config.attacks) for a in config.attacks},
        },
    )

    # ---- load -----------------------------------------------------------------------------
    tracker.report("load", 0.0, message=f"model {config.model}")
    loaded = load_extractor(config.model)
    model = loaded.model.to(device).eval()
    manifest = loaded.manifest
    data = dataset or load_dataset(config.dataset, config.data_dir)
    split_counts = config.split or default_split(config.dataset)
    split = split_dataset(data.train_y, split_counts)
    in_channels = int(model.normalize.mean.shape[1])
    if data.channels != in_channels:
        raise AuditError(
            f"dataset {config.dataset!r} has {data.channels}-channel images but the model "
            f"takes {in_channels}"
        )
    for target_class, poison_class in config.pairs:
        if max(target_class, poison_class) >= data.num_classes:
            raise AuditError(
                f"pairs: ({target_class}, {poison_class}) names a class outside "
                f"0..{data.num_classes - 1} of {config.dataset!r}"
            )
    instances = choose_instances(
        data, split.pool, config.pairs, config.targets_per_pair,
        max(attack_sizes.values()), config.seed,
    )  # fmt: skip
    classes_match = model.num_classes == data.num_classes and manifest.get("classes") in (
        None,
        list(data.classes),
    )
    timings["load"] = time.perf_counter() - started
    tracker.finish("load")

    # ---- features of the re-training and test sets: once per audit -------------------------
    phase_start = time.perf_counter()
    tracker.report("features", 0.0, message="re-training and test set features")
    clean_features = extract_features(model, data.train_x[split.retrain], dtype=dtype)
    clean_labels = data.train_y[split.retrain].to(device)
    eval_count = min(config.eval_images or len(data.test_y), len(data.test_y))
    test_features = extract_features(model, data.test_x[:eval_count], dtype=dtype)
    test_labels = data.test_y[:eval_count].to(device)
    target_index = torch.tensor([inst.target_index for inst in instances])
    targets = to_float(data.test_x[target_index].to(device))
    target_features = extract_features(model, targets, dtype=dtype)
    all_bases = torch.tensor([inst.base_indices for inst in instances])  # (I, k_max)
    bases_uint8 = data.train_x[all_bases].to(device)  # (I, k_max, C, H, W)
    if classes_match:
        with torch.no_grad():
            pre_acc: float | None = float(
                (model.head(test_features).argmax(1) == test_labels).float().mean()
            )
        init_weight, init_bias = model.head.weight.detach(), model.head.bias.detach()
    else:
        pre_acc = manifest.get("pre_acc")
        init_weight, init_bias = fresh_head(
            data.num_classes, model.feature_dim, config.seed, device
        )
    timings["features"] = time.perf_counter() - phase_start
    tracker.finish("features")

    # ---- the cheap feature-space screen (Eq. 4a separation, Eq. 4b drift at delta) ----------
    feature_screen = None
    if config.screen_images:
        phase_start = time.perf_counter()
        screen_count = min(config.screen_images, len(data.test_y))
        tracker.report("screen", 0.0, message=f"Eq. 4 screen on {screen_count} test images")
        measured = screen(
            model, to_float(data.test_x[:screen_count].to(device)),
            data.test_y[:screen_count].to(device), delta=config.delta,
            steps=config.screen_steps, seed=config.seed,
        )  # fmt: skip
        feature_screen = {**measured.as_dict(), "images": screen_count,
                          "pgd_steps": config.screen_steps, "delta": config.delta}  # fmt: skip
        timings["screen"] = time.perf_counter() - phase_start
        tracker.finish("screen")

    schedule = HeadSchedule(
        epochs=config.retrain_epochs,
        lr=config.retrain_lr,
        milestones=config.retrain_milestones,
        gamma=config.retrain_gamma,
        batch_size=config.retrain_batch_size,
    )
    poison_class = torch.tensor([inst.poison_class for inst in instances], device=device)
    baseline_features: dict[int, torch.Tensor] = {}

    attacker, channels_last = crafting_model(model, device, dtype)
    attack_reports: dict[str, Any] = {}
    for name in config.attacks:
        k = attack_sizes[name]
        bases = to_float(bases_uint8[:, :k])
        attack = _build_attack(config, name, dtype, channels_last)

        # ---- craft: all instances together ------------------------------------------------
        phase_start = time.perf_counter()
        phase = f"craft:{name}"

        def on_step(step: int, steps: int, objective: float, phase: str = phase) -> None:
            tracker.report(phase, step / steps, step=step, steps=steps, loss=objective)

        tracker.report(phase, 0.0, step=0, steps=config.iterations)
        crafted = attack(attacker, targets, bases, callback=on_step)
        craft_seconds = time.perf_counter() - phase_start
        tracker.finish(phase)

        # ---- re-train the poisoned and the baseline heads as one batched problem ----------
        phase_start = time.perf_counter()
        phase = f"retrain:{name}"
        tracker.report(phase, 0.0, message=f"{2 * len(instances)} heads")
        instances_count = len(instances)
        poison_features = extract_features(
            model, crafted.poisons.flatten(0, 1), dtype=dtype
        ).view(instances_count, k, -1)
        if k not in baseline_features:
            baseline_features[k] = extract_features(
                model, bases.flatten(0, 1), dtype=dtype
            ).view(instances_count, k, -1)
        extra = torch.cat([poison_features, baseline_features[k]])  # (2I, k, D)
        extra_labels = poison_class.repeat(2)[:, None].expand(-1, k)
        weights, biases = retrain_heads(
            clean_features, clean_labels, extra, extra_labels,
            init_weight=init_weight, init_bias=init_bias, schedule=schedule, seed=config.seed,
        )  # fmt: skip
        with torch.no_grad():
            target_probs = torch.softmax(
                torch.einsum("hd,hcd->hc", target_features.repeat(2, 1), weights) + biases, -1
            )
            re_acc = (head_logits(weights, biases, test_features).argmax(-1) == test_labels)
            re_acc = re_acc.float().mean(1)
        retrain_seconds = time.perf_counter() - phase_start
        tracker.finish(phase)

        attack_reports[name] = _attack_report(
            name, k, instances, crafted, target_probs, re_acc, craft_seconds, retrain_seconds
        )
        timings[f"craft:{name}"] = craft_seconds
        timings[f"retrain:{name}"] = retrain_seconds
        if poisons_dir is not None:
            _save_poisons(poisons_dir, name, instances, crafted, bases_uint8[:, :k], targets)

    timings["total"] = time.perf_counter() - started
    progress(Progress(phase="done", fraction=1.0, message=f"{len(config.attacks)} attacks"))
    return {
        "schema_version": SCHEMA_VERSION,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": {
            "path": str(config.model),
            "arch": model.arch,
            "feature_dim": model.feature_dim,
            "num_classes": model.num_classes,
            "defense": manifest.get("defense"),
            "trained_on": manifest.get("dataset"),
            "weights_sha256": manifest.get("weights_sha256"),
        },
        "dataset": {
            "name": config.dataset,
            "classes": list(data.classes),
            "split": split_counts.model_dump(),
            "retrain_images": len(clean_labels),
            "pool_images": len(split.pool),
            "eval_images": eval_count,
        },
        "pre_acc": pre_acc,
        "pre_acc_source": (
            "measured" if classes_match else ("manifest" if pre_acc is not None else None)
        ),
        "head_init": "pretrained" if classes_match else "fresh",
        "config": config.model_dump(mode="json"),
        "seed": config.seed,
        "device": str(device),
        "precision": str(dtype).removeprefix("torch."),
        "instances": [
            {
                "target_index": inst.target_index,
                "target_class": inst.target_class,
                "poison_class": inst.poison_class,
                "base_indices": list(inst.base_indices),
            }
            for inst in instances
        ],
        "attacks": attack_reports,
        "screen": feature_screen,
        "timings": timings,
        "versions": {**library_versions(), "platform": platform.platform()},
    }


def crafting_model(
    model: FeatureClassifier, device: torch.device, dtype: torch.dtype
) -> tuple[FeatureClassifier, bool]:
    """The network the attacks differentiate through, and whether it is channels_last.

    An eval-mode copy with every batch norm folded into its convolution (the same function to
    float rounding, one pass over memory fewer per layer), laid out channels_last where that
    is faster. On the 2-core Zen 4 CPU the two made ResNet-18 crafting about 20% faster
    (docs/performance.md).
    """
    folded = FoldedBatchNorm(model).model
    channels_last = uses_channels_last(device, dtype)
    if channels_last:
        folded = folded.to(memory_format=torch.channels_last)
    return folded, channels_last


def _build_attack(
    config: AuditConfig, name: str, dtype: torch.dtype, channels_last: bool
) -> Any:
    common = {
        "delta": config.delta,
        "iterations": config.iterations,
        "batch_size": config.attack_batch_size,
        "dtype": dtype,
        "channels_last": channels_last,
    }
    if name == "fc":
        return ATTACKS["fc"](**common, step=config.fc_step, mu=config.fc_mu)
    if name == "cp":
        return ATTACKS["cp"](
            **common, lr=config.polytope_lr, coefficient_steps=config.cp_coefficient_steps
        )
    return ATTACKS[name](**common, lr=config.polytope_lr)


def _attack_report(
    name: str,
    k: int,
    instances: list[Instance],
    crafted: CraftResult,
    target_probs: torch.Tensor,
    re_acc: torch.Tensor,
    craft_seconds: float,
    retrain_seconds: float,
) -> dict[str, Any]:
    """Summary and per-instance rows; rows [0, I) of the heads are poisoned, [I, 2I) baseline."""
    count = len(instances)
    poison_class = torch.tensor([inst.poison_class for inst in instances])
    probs = target_probs.cpu()
    predicted = probs.argmax(-1)
    success = (predicted[:count] == poison_class).tolist()
    baseline_success = (predicted[count:] == poison_class).tolist()
    poison_prob = probs[torch.arange(2 * count), poison_class.repeat(2)].tolist()
    re_acc_list = re_acc.cpu().tolist()
    rows = []
    for i, inst in enumerate(instances):
        rows.append(
            {
                "instance": i,
                "target_index": inst.target_index,
                "target_class": inst.target_class,
                "poison_class": inst.poison_class,
                "base_indices": list(inst.base_indices[:k]),
                "success": bool(success[i]),
                "predicted_class": int(predicted[i]),
                "poison_class_probability": poison_prob[i],
                "re_acc": re_acc_list[i],
                "feature_distance": float(crafted.feature_distance[i]),
                "relative_feature_distance": float(crafted.relative_distance[i]),
                "linf": float(crafted.linf[i]),
                "coefficients": crafted.coefficients[i].cpu().tolist(),
                "objective_start": float(crafted.objective[0, i]),
                "objective_end": float(crafted.objective[-1, i]),
                "baseline_success": bool(baseline_success[i]),
                "baseline_poison_class_probability": poison_prob[count + i],
                "baseline_re_acc": re_acc_list[count + i],
            }
        )
    successes, baseline_successes = sum(success), sum(baseline_success)
    return {
        "attack": name,
        "poisons_per_instance": k,
        "instances": count,
        "successes": successes,
        "asr": successes / count,
        "asr_wilson95": wilson_interval(successes, count),
        "baseline": {
            "successes": baseline_successes,
            "rate": baseline_successes / count,
            "wilson95": wilson_interval(baseline_successes, count),
            "re_acc": _mean_std(re_acc_list[count:]),
        },
        "re_acc": _mean_std(re_acc_list[:count]),
        "feature_distance": _mean_std(crafted.feature_distance.cpu().tolist()),
        "relative_feature_distance": _mean_std(crafted.relative_distance.cpu().tolist()),
        "max_linf": float(crafted.linf.max()),
        "seconds": {"craft": craft_seconds, "retrain": retrain_seconds},
        "rows": rows,
    }


def _save_poisons(
    out_dir: Path,
    name: str,
    instances: list[Instance],
    crafted: CraftResult,
    bases: torch.Tensor,
    targets: torch.Tensor,
) -> None:
    """``<name>.npz`` (exact float32 poisons) and ``<name>.png`` (base | poison ... | target)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    poisons = crafted.poisons.cpu()
    targets_uint8 = (targets.cpu() * 255).round().to(torch.uint8)
    np.savez_compressed(
        out_dir / f"{name}.npz",
        poisons=poisons.numpy(),
        bases=bases.cpu().numpy(),
        targets=targets_uint8.numpy(),
        target_indices=np.array([inst.target_index for inst in instances]),
        base_indices=np.array([inst.base_indices[: poisons.shape[1]] for inst in instances]),
        poison_classes=np.array([inst.poison_class for inst in instances]),
        target_classes=np.array([inst.target_class for inst in instances]),
    )
    poisons_uint8 = (poisons * 255).round().to(torch.uint8)
    rows = []
    for i in range(len(instances)):
        tiles = []
        for j in range(poisons.shape[1]):
            tiles += [bases[i, j].cpu(), poisons_uint8[i, j]]
        tiles.append(targets_uint8[i])
        rows.append(_pad_row(tiles))
    grid = torch.cat(rows, dim=1)
    (out_dir / f"{name}.png").write_bytes(encode_png(grid))


def _pad_row(tiles: list[torch.Tensor], gap: int = 2) -> torch.Tensor:
    """Tiles (C, H, W) side by side with a white gap after each, and one below the row."""
    channels, height, _ = tiles[0].shape
    white = torch.full((channels, height, gap), 255, dtype=torch.uint8)
    row = torch.cat([t for tile in tiles for t in (tile, white)], dim=2)
    return torch.cat([row, torch.full((channels, gap, row.shape[2]), 255, dtype=torch.uint8)], 1)


def write_report(report: dict[str, Any], path: Path) -> None:
    """Write the report as indented JSON, atomically (a temporary file renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(report, indent=2) + "\n")
    partial.replace(path)
