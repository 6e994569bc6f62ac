"""The poisoning audit: attacks against a frozen extractor, under the paper's protocol.

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

Stages, each a function with typed input and output, run in order by :func:`run_audit`:
``load`` (:func:`load_stage` -> :class:`AuditInputs`), ``features`` (:func:`features_stage` ->
:class:`AuditFeatures`), ``screen`` (:func:`screen_stage`), then per attack ``craft``
(:func:`craft_stage` -> ``CraftResult``), ``retrain`` (:func:`retrain_stage` ->
:class:`HeadOutcome`) and ``score`` (:func:`score_stage` -> ``AttackResult``). The result is an
:class:`core.report.AuditReport`.
"""

from __future__ import annotations

import math
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from core.attacks import AttackContext, CraftResult, StepCallback, attack_class
from core.checkpoint import library_versions, load_extractor
from core.config import AuditConfig
from core.data import ImageDataset, Split, split_dataset, to_float
from core.datasets import load_dataset
from core.device import autocast, resolve_device, resolve_precision, uses_channels_last
from core.errors import BulwarkError, ErrorKind
from core.models import FeatureClassifier, FoldedBatchNorm
from core.pictures import poison_grid_png
from core.progress import Progress, ProgressCallback, ignore_progress
from core.report import (
    AttackResult,
    AuditReport,
    BaselineResult,
    DatasetFacts,
    InstanceDraw,
    InstanceResult,
    MeanStd,
    ModelFacts,
    ScreenFacts,
)
from core.screen import screen
from core.verdict import wilson_interval


class AuditError(BulwarkError):
    """An audit that cannot run as configured; the message names the field to change."""

    kind = ErrorKind.INVALID_CONFIG


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

    @classmethod
    def of(cls, config: AuditConfig) -> HeadSchedule:
        return cls(
            epochs=config.retrain_epochs,
            lr=config.retrain_lr,
            milestones=config.retrain_milestones,
            gamma=config.retrain_gamma,
            batch_size=config.retrain_batch_size,
        )


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
    scheduler = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=list(schedule.milestones), gamma=schedule.gamma
    )
    for _ in range(schedule.epochs):
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
        scheduler.step()
    return theta[:, :, :dim].contiguous(), theta[:, :, dim].contiguous()


def head_logits(
    weights: torch.Tensor, biases: torch.Tensor, features: torch.Tensor
) -> torch.Tensor:
    """Logits of H heads on shared features (N, D) -> (H, N, C)."""
    return torch.einsum("nd,hcd->hnc", features, weights) + biases[:, None]


def mean_std(values: Sequence[float]) -> MeanStd:
    array = np.asarray(values, dtype=np.float64)
    std = float(array.std(ddof=1)) if len(array) > 1 else 0.0
    return MeanStd(mean=float(array.mean()), std=std)


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


# ---- the stages ----------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditInputs:
    """Stage ``load``: the model, the data, its split and the drawn instances."""

    config: AuditConfig
    device: torch.device
    dtype: torch.dtype  # autocast dtype of crafting and feature extraction
    model: FeatureClassifier  # eval mode, on ``device``
    manifest: dict[str, Any]
    data: ImageDataset
    split: Split
    instances: list[Instance]
    classes_match: bool  # the model's own head fits the dataset's classes


@dataclass(frozen=True)
class AuditFeatures:
    """Stage ``features``: everything computed once per audit on the frozen extractor."""

    clean_features: torch.Tensor  # (N, D) clean re-training set
    clean_labels: torch.Tensor  # (N,)
    test_features: torch.Tensor  # (E, D) the first eval_images test images
    test_labels: torch.Tensor  # (E,)
    targets: torch.Tensor  # (I, C, H, W) float pixels
    target_features: torch.Tensor  # (I, D)
    bases: torch.Tensor  # (I, k_max, C, H, W) uint8
    target_classes: torch.Tensor  # (I,)
    poison_classes: torch.Tensor  # (I,)
    head_weight: torch.Tensor  # (classes, D): where every re-trained head starts
    head_bias: torch.Tensor  # (classes,)
    pre_acc: float | None


@dataclass(frozen=True)
class HeadOutcome:
    """Stage ``retrain``: rows [0, I) are the poisoned heads, [I, 2I) the baseline heads."""

    target_probs: torch.Tensor  # (2I, classes) softmax of each head on its own target
    re_acc: torch.Tensor  # (2I,) test accuracy of each head


def load_stage(config: AuditConfig, dataset: ImageDataset | None = None) -> AuditInputs:
    """Read the model and the dataset, check that they fit, draw the instances."""
    device = resolve_device(config.device)
    dtype = resolve_precision(config.precision, device)
    loaded = load_extractor(config.model)
    model = loaded.model.to(device).eval()
    data = dataset or load_dataset(config.dataset, config.data_dir)
    split = split_dataset(data.train_y, config.resolved_split)
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
        data, split.pool, config.pairs, config.targets_per_pair, config.max_poisons, config.seed
    )
    classes_match = model.num_classes == data.num_classes and loaded.manifest.get("classes") in (
        None,
        list(data.classes),
    )
    return AuditInputs(
        config=config,
        device=device,
        dtype=dtype,
        model=model,
        manifest=loaded.manifest,
        data=data,
        split=split,
        instances=instances,
        classes_match=classes_match,
    )


def features_stage(inputs: AuditInputs) -> AuditFeatures:
    """f(x) of the re-training set, the evaluation images and the targets, once per audit."""
    config, data, model, device, dtype = (
        inputs.config,
        inputs.data,
        inputs.model,
        inputs.device,
        inputs.dtype,
    )
    retrain = inputs.split.retrain
    clean_features = extract_features(model, data.train_x[retrain], dtype=dtype)
    eval_count = min(config.eval_images or len(data.test_y), len(data.test_y))
    test_features = extract_features(model, data.test_x[:eval_count], dtype=dtype)
    test_labels = data.test_y[:eval_count].to(device)
    instances = inputs.instances
    target_index = torch.tensor([inst.target_index for inst in instances])
    targets = to_float(data.test_x[target_index].to(device))
    if inputs.classes_match:
        with torch.no_grad():
            pre_acc: float | None = float(
                (model.head(test_features).argmax(1) == test_labels).float().mean()
            )
        weight, bias = model.head.weight.detach(), model.head.bias.detach()
    else:
        pre_acc = inputs.manifest.get("pre_acc")
        weight, bias = fresh_head(data.num_classes, model.feature_dim, config.seed, device)
    return AuditFeatures(
        clean_features=clean_features,
        clean_labels=data.train_y[retrain].to(device),
        test_features=test_features,
        test_labels=test_labels,
        targets=targets,
        target_features=extract_features(model, targets, dtype=dtype),
        bases=data.train_x[torch.tensor([inst.base_indices for inst in instances])].to(device),
        target_classes=torch.tensor([inst.target_class for inst in instances], device=device),
        poison_classes=torch.tensor([inst.poison_class for inst in instances], device=device),
        head_weight=weight,
        head_bias=bias,
        pre_acc=pre_acc,
    )


def screen_stage(inputs: AuditInputs) -> ScreenFacts | None:
    """The Eq. 4a separation and Eq. 4b drift at delta on the first test images (or None)."""
    config, data, device = inputs.config, inputs.data, inputs.device
    if not config.screen_images:
        return None
    count = min(config.screen_images, len(data.test_y))
    model, own_head = inputs.model, inputs.model.head
    if model.num_classes < data.num_classes:
        # A head that cannot score the dataset's labels (a feature-only exported model has
        # none): PGD's cross-entropy term uses the fresh head the re-training starts from.
        weight, bias = fresh_head(data.num_classes, model.feature_dim, config.seed, device)
        model.head = torch.nn.Linear(model.feature_dim, data.num_classes, device=device)
        with torch.no_grad():
            model.head.weight.copy_(weight)
            model.head.bias.copy_(bias)
    try:
        measured = screen(
            model,
            to_float(data.test_x[:count].to(device)),
            data.test_y[:count].to(device),
            delta=config.delta,
            steps=config.screen_steps,
            seed=config.seed,
        )
    finally:
        model.head = own_head
    return ScreenFacts(
        **measured.as_dict(), images=count, pgd_steps=config.screen_steps, delta=config.delta
    )


def craft_stage(
    inputs: AuditInputs,
    features: AuditFeatures,
    attack: str,
    attacker: torch.nn.Module,
    *,
    channels_last: bool,
    on_step: StepCallback | None = None,
) -> CraftResult:
    """Craft ``attack``'s poisons for every instance at once against ``attacker``."""
    config = inputs.config
    settings = config.attack_settings[attack]
    implementation = attack_class(attack)(
        settings=settings,
        delta=config.delta,
        iterations=config.iterations,
        batch_size=config.attack_batch_size,
        dtype=inputs.dtype,
        channels_last=channels_last,
    )
    context = AttackContext(
        targets=features.targets,
        bases=to_float(features.bases[:, : settings.poisons]),
        target_classes=features.target_classes,
        poison_classes=features.poison_classes,
        head_weight=features.head_weight,
        head_bias=features.head_bias,
        clean_features=features.clean_features,
        clean_labels=features.clean_labels,
    )
    return implementation(attacker, context, callback=on_step)


def retrain_stage(
    inputs: AuditInputs,
    features: AuditFeatures,
    crafted: CraftResult,
    baseline_features: torch.Tensor,
) -> HeadOutcome:
    """Re-train every poisoned head and every baseline head as one batched problem.

    ``baseline_features`` (I, k, D) are the unperturbed bases' features (shared by attacks
    with the same number of poisons).
    """
    model, dtype = inputs.model, inputs.dtype
    count, k = crafted.poisons.shape[:2]
    poison_features = extract_features(model, crafted.poisons.flatten(0, 1), dtype=dtype)
    extra = torch.cat([poison_features.view(count, k, -1), baseline_features])  # (2I, k, D)
    extra_labels = features.poison_classes.repeat(2)[:, None].expand(-1, k)
    weights, biases = retrain_heads(
        features.clean_features,
        features.clean_labels,
        extra,
        extra_labels,
        init_weight=features.head_weight,
        init_bias=features.head_bias,
        schedule=HeadSchedule.of(inputs.config),
        seed=inputs.config.seed,
    )
    with torch.no_grad():
        own_targets = features.target_features.repeat(2, 1)
        target_probs = torch.softmax(torch.einsum("hd,hcd->hc", own_targets, weights) + biases, -1)
        correct = head_logits(weights, biases, features.test_features).argmax(-1)
        re_acc = (correct == features.test_labels).float().mean(1)
    return HeadOutcome(target_probs=target_probs, re_acc=re_acc)


def score_stage(
    attack: str,
    instances: list[Instance],
    crafted: CraftResult,
    outcome: HeadOutcome,
    seconds: dict[str, float],
) -> AttackResult:
    """ASR, the baseline, Re. Acc and a row per instance for one attack."""
    count, k = crafted.poisons.shape[:2]
    poison_class = torch.tensor([inst.poison_class for inst in instances])
    probs = outcome.target_probs.cpu()
    predicted = probs.argmax(-1)
    success = (predicted[:count] == poison_class).tolist()
    baseline_success = (predicted[count:] == poison_class).tolist()
    poison_prob = probs[torch.arange(2 * count), poison_class.repeat(2)].tolist()
    re_acc = outcome.re_acc.cpu().tolist()
    rows = [
        InstanceResult(
            instance=i,
            target_index=inst.target_index,
            target_class=inst.target_class,
            poison_class=inst.poison_class,
            base_indices=list(inst.base_indices[:k]),
            success=bool(success[i]),
            predicted_class=int(predicted[i]),
            poison_class_probability=poison_prob[i],
            re_acc=re_acc[i],
            feature_distance=float(crafted.feature_distance[i]),
            relative_feature_distance=float(crafted.relative_distance[i]),
            linf=float(crafted.linf[i]),
            coefficients=crafted.coefficients[i].cpu().tolist(),
            objective_start=float(crafted.objective[0, i]),
            objective_end=float(crafted.objective[-1, i]),
            baseline_success=bool(baseline_success[i]),
            baseline_poison_class_probability=poison_prob[count + i],
            baseline_re_acc=re_acc[count + i],
        )
        for i, inst in enumerate(instances)
    ]
    successes, baseline_successes = sum(success), sum(baseline_success)
    return AttackResult(
        attack=attack,
        poisons_per_instance=k,
        instances=count,
        successes=successes,
        asr=successes / count,
        asr_wilson95=wilson_interval(successes, count),
        baseline=BaselineResult(
            successes=baseline_successes,
            rate=baseline_successes / count,
            wilson95=wilson_interval(baseline_successes, count),
            re_acc=mean_std(re_acc[count:]),
        ),
        re_acc=mean_std(re_acc[:count]),
        feature_distance=mean_std(crafted.feature_distance.cpu().tolist()),
        relative_feature_distance=mean_std(crafted.relative_distance.cpu().tolist()),
        max_linf=float(crafted.linf.max()),
        seconds=seconds,
        rows=rows,
    )


def _progress_weights(config: AuditConfig) -> dict[str, float]:
    """Each phase's share of the audit's progress bar, by its rough cost."""
    work = {name: config.poisons(name) * config.iterations for name in config.attacks}
    return {
        "load": 1.0,
        "features": 4.0,
        "screen": 2.0 if config.screen_images else 0.0,
        **{f"craft:{name}": 90.0 * w / sum(work.values()) for name, w in work.items()},
        **{f"retrain:{name}": 5.0 / len(config.attacks) for name in config.attacks},
    }


def run_audit(
    config: AuditConfig,
    *,
    progress: ProgressCallback = ignore_progress,
    poisons_dir: Path | None = None,
    dataset: ImageDataset | None = None,
) -> AuditReport:
    """Run ``config.attacks`` against ``config.model`` and return the ASR report.

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
    loaders' errors (``BulwarkError`` subclasses) for unreadable checkpoints or datasets.
    """
    started = time.perf_counter()
    timings: dict[str, float] = {}
    tracker = _Tracker(progress, _progress_weights(config))

    def timed(phase: str, message: str = "") -> _Phase:
        return _Phase(tracker, timings, phase, message)

    with timed("load", f"the model and the {config.dataset} dataset"):
        inputs = load_stage(config, dataset)
    with timed("features", "re-training and test set features"):
        features = features_stage(inputs)
    feature_screen = None
    if config.screen_images:
        with timed("screen", f"Eq. 4 screen on {config.screen_images} test images"):
            feature_screen = screen_stage(inputs)

    attacker, channels_last = crafting_model(inputs.model, inputs.device, inputs.dtype)
    baseline_features: dict[int, torch.Tensor] = {}
    results: dict[str, AttackResult] = {}
    for name in config.attacks:
        phase = f"craft:{name}"

        def on_step(step: int, steps: int, objective: float, phase: str = phase) -> None:
            tracker.report(phase, step / steps, step=step, steps=steps, loss=objective)

        with timed(phase):
            tracker.report(phase, 0.0, step=0, steps=config.iterations)
            crafted = craft_stage(
                inputs, features, name, attacker, channels_last=channels_last, on_step=on_step
            )
        k = crafted.poisons.shape[1]
        with timed(f"retrain:{name}", f"{2 * len(inputs.instances)} heads"):
            if k not in baseline_features:
                flat = to_float(features.bases[:, :k]).flatten(0, 1)
                baseline_features[k] = extract_features(
                    inputs.model, flat, dtype=inputs.dtype
                ).view(len(inputs.instances), k, -1)
            outcome = retrain_stage(inputs, features, crafted, baseline_features[k])
        seconds = {"craft": timings[phase], "retrain": timings[f"retrain:{name}"]}
        results[name] = score_stage(name, inputs.instances, crafted, outcome, seconds)
        if poisons_dir is not None:
            _save_poisons(
                poisons_dir,
                name,
                inputs.instances,
                crafted,
                features.bases[:, :k],
                features.targets,
                [row.success for row in sorted(results[name].rows, key=lambda r: r.instance)],
            )

    timings["total"] = time.perf_counter() - started
    progress(Progress(phase="done", fraction=1.0, message=f"{len(config.attacks)} attacks"))
    return _report(inputs, features, feature_screen, results, timings)


class _Phase:
    """Times one phase, reports its start, and moves the progress tracker past it."""

    def __init__(
        self, tracker: _Tracker, timings: dict[str, float], phase: str, message: str
    ) -> None:
        self.tracker, self.timings, self.phase, self.message = tracker, timings, phase, message

    def __enter__(self) -> None:
        self.started = time.perf_counter()
        if self.message:
            self.tracker.report(self.phase, 0.0, message=self.message)

    def __exit__(self, error_type: object, *_: object) -> None:
        if error_type is None:
            self.timings[self.phase] = time.perf_counter() - self.started
            self.tracker.finish(self.phase)


def _report(
    inputs: AuditInputs,
    features: AuditFeatures,
    feature_screen: ScreenFacts | None,
    results: dict[str, AttackResult],
    timings: dict[str, float],
) -> AuditReport:
    config, model, manifest, data = inputs.config, inputs.model, inputs.manifest, inputs.data
    pre_acc_source: Literal["measured", "manifest"] | None = None
    if inputs.classes_match:
        pre_acc_source = "measured"
    elif features.pre_acc is not None:
        pre_acc_source = "manifest"
    return AuditReport(
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        model=ModelFacts(
            path=str(config.model),
            arch=model.arch,
            feature_dim=model.feature_dim,
            num_classes=model.num_classes,
            defense=manifest.get("defense"),
            trained_on=manifest.get("dataset"),
            weights_sha256=manifest.get("weights_sha256"),
        ),
        dataset=DatasetFacts(
            name=config.dataset,
            classes=list(data.classes),
            split=config.resolved_split.model_dump(),
            retrain_images=len(features.clean_labels),
            pool_images=len(inputs.split.pool),
            eval_images=len(features.test_labels),
        ),
        pre_acc=features.pre_acc,
        pre_acc_source=pre_acc_source,
        head_init="pretrained" if inputs.classes_match else "fresh",
        config=config.model_dump(mode="json"),
        seed=config.seed,
        device=str(inputs.device),
        precision=str(inputs.dtype).removeprefix("torch."),
        instances=[
            InstanceDraw(
                target_index=inst.target_index,
                target_class=inst.target_class,
                poison_class=inst.poison_class,
                base_indices=list(inst.base_indices),
            )
            for inst in inputs.instances
        ],
        attacks=results,
        screen=feature_screen,
        timings=timings,
        versions={**library_versions(), "platform": platform.platform()},
    )


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
        folded = folded.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return folded, channels_last


def _save_poisons(
    out_dir: Path,
    name: str,
    instances: list[Instance],
    crafted: CraftResult,
    bases: torch.Tensor,
    targets: torch.Tensor,
    successes: Sequence[bool],
) -> None:
    """``<name>.npz`` (exact float32 poisons) and ``<name>.png``: a labelled grid, one row per
    instance (base | poison ... | target, ``core.pictures``), ``successes`` per instance."""
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
    poisons_uint8 = (poisons * 255).round().to(torch.uint8).numpy()
    bases_uint8, targets_array = bases.cpu().numpy(), targets_uint8.numpy()
    rows, labels = [], []
    for i, inst in enumerate(instances):
        tiles = []
        for j in range(poisons.shape[1]):
            tiles += [bases_uint8[i, j], poisons_uint8[i, j]]
        tiles.append(targets_array[i])
        rows.append(tiles)
        outcome = "success" if successes[i] else "failed"
        labels.append(f"{inst.target_class} -> {inst.poison_class}, {outcome}")
    columns = [f"{kind} {j + 1}" for j in range(poisons.shape[1]) for kind in ("base", "poison")]
    png = poison_grid_png(
        rows,
        column_labels=[*columns, "target"],
        row_labels=labels,
        row_success=list(successes),
    )
    (out_dir / f"{name}.png").write_bytes(png)
