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

import hashlib
import math
import platform
import shutil
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from catalog.datasets import CIFAR10_CLASSES
from catalog.policy import DEFAULT_POLICY, Policy
from catalog.requests import PAPER_PAIRS
from core.attacks import AttackContext, CraftResult, EarlyStop, StepCallback, attack_class
from core.checkpoint import library_versions, load_extractor
from core.config import AuditConfig
from core.data import ImageDataset, Split, augment, split_dataset, to_float
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
    BudgetCurve,
    BudgetPoint,
    Comparison,
    DatasetFacts,
    InstanceDraw,
    InstanceResult,
    MeanStd,
    ModelFacts,
    PairChoice,
    PairResult,
    PairSource,
    Rate,
    ReferenceFacts,
    ScreenFacts,
    SequentialFacts,
    UnionResult,
)
from core.screen import screen
from core.verdict import UNION, decide_results, difference_interval, futile, wilson_interval


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

    def finish(self, phase: str, share: float = 1.0) -> None:
        """Count ``share`` of ``phase`` as done (a round of a sequential audit is a share)."""
        self.done += self.weights[phase] * share


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
    clean_correct: torch.Tensor  # (I,) bool: the clean model classifies the target correctly


@dataclass(frozen=True)
class HeadOutcome:
    """Stage ``retrain``: rows [0, I) are the poisoned heads, [I, 2I) the baseline heads."""

    target_probs: torch.Tensor  # (2I, classes) softmax of each head on its own target
    re_acc: torch.Tensor  # (2I,) test accuracy of each head


def load_stage(
    config: AuditConfig,
    dataset: ImageDataset | None = None,
    *,
    model_path: str | None = None,
) -> AuditInputs:
    """Read the model (``model_path``, default ``config.model``) and the dataset, and check
    that they fit. The instances are drawn later (:func:`draw_stage`): the closest pairs
    depend on the model's features."""
    device = resolve_device(config.device)
    dtype = resolve_precision(config.precision, device)
    loaded = load_extractor(model_path or config.model)
    model = loaded.model.to(device).eval()
    data = dataset or load_dataset(config.dataset, config.data_dir)
    split = split_dataset(data.train_y, config.resolved_split)
    in_channels = int(model.normalize.mean.shape[1])
    if data.channels != in_channels:
        raise AuditError(
            f"dataset {config.dataset!r} has {data.channels}-channel images but the model "
            f"{'reference ' if model_path else ''}takes {in_channels}"
        )
    for target_class, poison_class in config.pairs:
        if max(target_class, poison_class) >= data.num_classes:
            raise AuditError(
                f"pairs: ({target_class}, {poison_class}) names a class outside "
                f"0..{data.num_classes - 1} of {config.dataset!r}"
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
        instances=[],
        classes_match=classes_match,
    )


@dataclass(frozen=True)
class CleanFeatures:
    """Stage ``features``, part one: the frozen features of the clean re-training set and the
    evaluation images, the head every re-training starts from, and the clean model: that head
    re-trained on the clean set alone, as the victim would have it without poisons."""

    clean_features: torch.Tensor  # (N, D)
    clean_labels: torch.Tensor  # (N,)
    test_features: torch.Tensor  # (E, D) the first eval_images test images
    test_labels: torch.Tensor  # (E,)
    head_weight: torch.Tensor  # (classes, D)
    head_bias: torch.Tensor  # (classes,)
    clean_weight: torch.Tensor  # (classes, D) the clean model's head
    clean_bias: torch.Tensor  # (classes,)
    pre_acc: float | None


def clean_stage(inputs: AuditInputs) -> CleanFeatures:
    """f(x) of the re-training set and the evaluation images; the starting and clean heads."""
    config, data, model, device, dtype = (
        inputs.config,
        inputs.data,
        inputs.model,
        inputs.device,
        inputs.dtype,
    )
    retrain = inputs.split.retrain
    clean_features = extract_features(model, data.train_x[retrain], dtype=dtype)
    clean_labels = data.train_y[retrain].to(device)
    eval_count = min(config.eval_images or len(data.test_y), len(data.test_y))
    test_features = extract_features(model, data.test_x[:eval_count], dtype=dtype)
    test_labels = data.test_y[:eval_count].to(device)
    if inputs.classes_match:
        with torch.no_grad():
            pre_acc: float | None = float(
                (model.head(test_features).argmax(1) == test_labels).float().mean()
            )
        weight, bias = model.head.weight.detach(), model.head.bias.detach()
    else:
        pre_acc = inputs.manifest.get("pre_acc")
        weight, bias = fresh_head(data.num_classes, model.feature_dim, config.seed, device)
    no_extra = torch.zeros(1, 0, model.feature_dim, device=device)
    clean_weights, clean_biases = retrain_heads(
        clean_features,
        clean_labels,
        no_extra,
        torch.zeros(1, 0, dtype=torch.long, device=device),
        init_weight=weight,
        init_bias=bias,
        schedule=HeadSchedule.of(config),
        seed=config.seed,
    )
    return CleanFeatures(
        clean_features=clean_features,
        clean_labels=clean_labels,
        test_features=test_features,
        test_labels=test_labels,
        head_weight=weight,
        head_bias=bias,
        clean_weight=clean_weights[0],
        clean_bias=clean_biases[0],
        pre_acc=pre_acc,
    )


def confusion(clean: CleanFeatures, num_classes: int) -> torch.Tensor:
    """(classes, classes): row t, column p is the clean model's mean probability of class p
    over the evaluation images of class t."""
    with torch.no_grad():
        probs = torch.softmax(clean.test_features @ clean.clean_weight.T + clean.clean_bias, -1)
    matrix = torch.zeros(num_classes, num_classes, dtype=torch.float64)
    labels = clean.test_labels.cpu()
    for label in range(num_classes):
        rows = probs[(labels == label).to(probs.device)]
        if len(rows):
            matrix[label] = rows.double().mean(0).cpu()
    return matrix


def choose_pairs(config: AuditConfig, data: ImageDataset, clean: CleanFeatures) -> list[PairChoice]:
    """The audit's (target, poison) pairs: the explicit ones, then each set's in the order of
    ``config.pair_sets``, skipping pairs already chosen.

    - ``closest``: the ``closest_pairs`` ordered pairs the clean model confuses most (the
      largest mean probability of the poison class on test images of the target class): the
      classes nearest in the model's own feature space, where poisons need to move least.
    - ``paper``: the paper's four pairs (Appendix A), defined on CIFAR-10's classes.
    - ``random``: ``random_pairs`` ordered pairs drawn from ``config.seed``.
    """
    classes = data.num_classes
    chosen: list[PairChoice] = []
    taken: set[tuple[int, int]] = set()

    def add(pair: tuple[int, int], source: PairSource, score: float | None = None) -> None:
        if pair not in taken:
            taken.add(pair)
            chosen.append(
                PairChoice(target_class=pair[0], poison_class=pair[1], source=source, score=score)
            )

    for pair in config.pairs:
        add((int(pair[0]), int(pair[1])), "explicit")
    every = [(t, p) for t in range(classes) for p in range(classes) if t != p]
    for name in config.pair_sets or ():
        if name == "closest":
            matrix = confusion(clean, classes)
            ranked = sorted(every, key=lambda pair: (-float(matrix[pair]), pair))
            fresh = [pair for pair in ranked if pair not in taken][: config.closest_pairs]
            for pair in fresh:
                add(pair, "closest", round(float(matrix[pair]), 6))
        elif name == "paper":
            if tuple(data.classes) != CIFAR10_CLASSES:
                raise AuditError(
                    "pair_sets: 'paper' names the paper's CIFAR-10 pairs, but the dataset's "
                    f"classes are {list(data.classes)[:10]}; use closest or random"
                )
            for pair in PAPER_PAIRS:
                add(pair, "paper")
        else:
            generator = torch.Generator().manual_seed(config.seed + 1)
            order = torch.randperm(len(every), generator=generator).tolist()
            fresh = [every[i] for i in order if every[i] not in taken][: config.random_pairs]
            for pair in fresh:
                add(pair, "random")
    return chosen


def draw_stage(inputs: AuditInputs, clean: CleanFeatures) -> tuple[AuditInputs, list[PairChoice]]:
    """Choose the pairs (:func:`choose_pairs`) and draw the instances from the seed."""
    config = inputs.config
    choices = choose_pairs(config, inputs.data, clean)
    instances = choose_instances(
        inputs.data,
        inputs.split.pool,
        [(c.target_class, c.poison_class) for c in choices],
        config.targets_per_pair,
        config.max_poisons,
        config.seed,
    )
    return replace(inputs, instances=instances), choices


def features_stage(inputs: AuditInputs, clean: CleanFeatures) -> AuditFeatures:
    """The targets' pixels and features and the bases of the drawn instances, with the clean
    features computed before the draw."""
    data, model, device, dtype = inputs.data, inputs.model, inputs.device, inputs.dtype
    instances = inputs.instances
    target_index = torch.tensor([inst.target_index for inst in instances])
    targets = to_float(data.test_x[target_index].to(device))
    target_features = extract_features(model, targets, dtype=dtype)
    target_classes = torch.tensor([inst.target_class for inst in instances], device=device)
    with torch.no_grad():
        clean_logits = target_features @ clean.clean_weight.T + clean.clean_bias
    return AuditFeatures(
        clean_features=clean.clean_features,
        clean_labels=clean.clean_labels,
        test_features=clean.test_features,
        test_labels=clean.test_labels,
        targets=targets,
        target_features=target_features,
        bases=data.train_x[torch.tensor([inst.base_indices for inst in instances])].to(device),
        target_classes=target_classes,
        poison_classes=torch.tensor([inst.poison_class for inst in instances], device=device),
        head_weight=clean.head_weight,
        head_bias=clean.head_bias,
        pre_acc=clean.pre_acc,
        clean_correct=(clean_logits.argmax(-1) == target_classes).cpu(),
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
    delta: float | None = None,
    poisons: int | None = None,
    early_stop: EarlyStop | None = None,
) -> CraftResult:
    """Craft ``attack``'s poisons for every instance at once against ``attacker``.

    ``delta`` and ``poisons`` replace the audit's budget (the budget curve's points);
    ``early_stop`` stops crafting instances whose poisons already succeed."""
    config = inputs.config
    settings = config.attack_settings[attack]
    if poisons is not None:
        settings = settings.model_copy(update={"poisons": poisons})
    implementation = attack_class(attack)(
        settings=settings,
        delta=config.delta if delta is None else delta,
        iterations=config.iterations,
        batch_size=config.attack_batch_size,
        dtype=inputs.dtype,
        channels_last=channels_last,
        draws=config.draws,
        draw_flip=inputs.data.flip,
        draw_seed=config.seed,
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
    return implementation(attacker, context, callback=on_step, early_stop=early_stop)


def victim_views(
    images: torch.Tensor, instances: Sequence[Instance], seed: int, flip: bool
) -> torch.Tensor:
    """The view a victim who augments trains on: one random crop (and mirror where ``flip``)
    of each image (I, k, C, H, W) of the instances, by ``core.data.augment``.

    Each view is drawn from (``seed``, the instance's target, the base, its slot), not from
    its place in the batch, so an instance gets the same views in any round or subset, and a
    poison and its own base get the same view (the baseline stays comparable).
    """
    views = torch.empty_like(images)
    for i, instance in enumerate(instances):
        for j in range(images.shape[1]):
            key = f"{seed}:{instance.target_index}:{instance.base_indices[j]}:{j}".encode()
            generator = torch.Generator(device=images.device)
            generator.manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1)
            views[i, j] = augment(images[i, j : j + 1], flip=flip, generator=generator)[0]
    return views


def retrain_stage(
    inputs: AuditInputs,
    features: AuditFeatures,
    crafted: CraftResult,
    baseline_features: torch.Tensor,
) -> HeadOutcome:
    """Re-train every poisoned head and every baseline head as one batched problem.

    ``baseline_features`` (I, k, D) are the unperturbed bases' features (shared by attacks
    with the same number of poisons). With ``victim_augment`` the victim trains on one
    augmented view of each poison and the baseline on the same view of each base
    (:func:`victim_views`; the clean set stays as it is, its features precomputed): an
    approximation of a victim who draws a fresh augmentation every epoch.
    """
    model, dtype, config = inputs.model, inputs.dtype, inputs.config
    count, k = crafted.poisons.shape[:2]
    poisons = crafted.poisons
    if config.victim_augment:
        flip = inputs.data.flip
        poisons = victim_views(poisons, inputs.instances, config.seed, flip)
        bases = victim_views(to_float(features.bases[:, :k]), inputs.instances, config.seed, flip)
        baseline_features = extract_features(model, bases.flatten(0, 1), dtype=dtype)
        baseline_features = baseline_features.view(count, k, -1)
    poison_features = extract_features(model, poisons.flatten(0, 1), dtype=dtype)
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


def rate(successes: int, trials: int) -> Rate:
    """A binomial rate with its 95% Wilson interval (0 of 0 reads as rate 0, interval [0, 1])."""
    return Rate(
        successes=successes,
        trials=trials,
        rate=successes / trials if trials else 0.0,
        wilson95=wilson_interval(successes, trials),
    )


def score_stage(
    attack: str,
    instances: list[Instance],
    crafted: CraftResult,
    outcome: HeadOutcome,
    seconds: dict[str, float],
    *,
    clean_correct: Sequence[bool],
    pair_sources: dict[tuple[int, int], PairSource],
    reach_level: float | None,
) -> AttackResult:
    """ASR, the baseline, Re. Acc and a row per instance for one attack; the headline (ASR
    among targets the clean model gets right), ASR per pair, and the reach."""
    count, k = crafted.poisons.shape[:2]
    poison_class = torch.tensor([inst.poison_class for inst in instances])
    probs = outcome.target_probs.cpu()
    predicted = probs.argmax(-1)
    success = (predicted[:count] == poison_class).tolist()
    baseline_success = (predicted[count:] == poison_class).tolist()
    poison_prob = probs[torch.arange(2 * count), poison_class.repeat(2)].tolist()
    re_acc = outcome.re_acc.cpu().tolist()
    relative = crafted.relative_distance.cpu().tolist()
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
            relative_feature_distance=float(relative[i]),
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
    correct = [i for i in range(count) if clean_correct[i]]
    pairs = []
    for pair, source in pair_sources.items():
        members = [
            i for i, inst in enumerate(instances) if (inst.target_class, inst.poison_class) == pair
        ]
        pairs.append(
            PairResult(
                target_class=pair[0],
                poison_class=pair[1],
                source=source,
                asr=rate(sum(success[i] for i in members), len(members)),
                baseline=rate(sum(baseline_success[i] for i in members), len(members)),
            )
        )
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
        relative_feature_distance=mean_std(relative),
        max_linf=float(crafted.linf.max()),
        seconds=seconds,
        rows=rows,
        asr_correct_targets=rate(sum(success[i] for i in correct), len(correct)),
        baseline_correct_targets=rate(sum(baseline_success[i] for i in correct), len(correct)),
        pairs=pairs,
        reach_level=reach_level,
        unreached=0 if reach_level is None else sum(1 for value in relative if value > reach_level),
        crafting_work=crafted.work,
        discordant=(
            sum(1 for i in correct if success[i] and not baseline_success[i]),
            sum(1 for i in correct if baseline_success[i] and not success[i]),
        ),
    )


def _progress_weights(config: AuditConfig, parts: frozenset[str] | None = None) -> dict[str, float]:
    """Each phase's share of the audit's progress bar, by its rough cost (of ``parts``
    only, for a task crafting some parts)."""
    work = {name: config.poisons(name) * config.iterations for name in config.attacks}
    total = sum(work.values())
    sides = ("", "reference:") if config.reference else ("",)
    weights = {"load": 1.0, "features": 4.0, "screen": 2.0 if config.screen_images else 0.0}
    for side in sides:
        if side:
            weights |= {f"{side}load": 1.0, f"{side}features": 4.0}
        weights |= {f"{side}craft:{name}": 90.0 * w / total for name, w in work.items()}
        weights |= {f"{side}retrain:{name}": 5.0 / len(config.attacks) for name in config.attacks}
    curve = config.curve_attack
    if curve is not None:
        points = [config.poisons(curve)] * len(config.budget_deltas) + list(config.budget_poisons)
        weights["curve"] = 90.0 * len(sides) * sum(points) * config.iterations / total
    if parts is not None:
        # A parts task crafts only its own attacks: the others weigh nothing in its bar.
        crafted = {
            f"{'' if part.startswith('model-') else 'reference:'}{phase}:{part.split('-')[1]}"
            for part in parts
            for phase in ("craft", "retrain")
        }
        for phase in weights:
            kind = phase.removeprefix("reference:").split(":")[0]
            if kind in ("craft", "retrain") and phase not in crafted:
                weights[phase] = 0.0
        weights["screen"] = weights["curve"] = 0.0
    return weights


@dataclass(frozen=True)
class _Side:
    """One audited network (the model, or its reference) with everything its attacks need."""

    inputs: AuditInputs
    features: AuditFeatures
    attacker: FeatureClassifier
    channels_last: bool
    baseline_features: dict[int, torch.Tensor]  # poisons per instance -> (I, k, D)

    @classmethod
    def of(cls, inputs: AuditInputs, features: AuditFeatures) -> _Side:
        attacker, channels_last = crafting_model(inputs.model, inputs.device, inputs.dtype)
        return cls(inputs, features, attacker, channels_last, {})

    def subset(self, indices: Sequence[int]) -> _Side:
        """The same network on the instances at ``indices`` (a round, or those run)."""
        rows = torch.tensor(list(indices), dtype=torch.long)
        on_device = rows.to(self.inputs.device)
        features = self.features
        sliced = replace(
            features,
            targets=features.targets[on_device],
            target_features=features.target_features[on_device],
            bases=features.bases[on_device],
            target_classes=features.target_classes[on_device],
            poison_classes=features.poison_classes[on_device],
            clean_correct=features.clean_correct[rows],
        )
        inputs = replace(self.inputs, instances=[self.inputs.instances[i] for i in indices])
        return _Side(inputs, sliced, self.attacker, self.channels_last, {})

    def bases_features(self, k: int) -> torch.Tensor:
        """The unperturbed bases' features (I, k, D), shared by attacks with k poisons."""
        if k not in self.baseline_features:
            count = len(self.inputs.instances)
            flat = to_float(self.features.bases[:, :k]).flatten(0, 1)
            self.baseline_features[k] = extract_features(
                self.inputs.model, flat, dtype=self.inputs.dtype
            ).view(count, k, -1)
        return self.baseline_features[k]

    def succeeded(self, indices: torch.Tensor, poisons: torch.Tensor) -> torch.Tensor:
        """Whether the poisons (m, k, C, H, W) of the instances at ``indices`` already succeed:
        their heads re-trained as one batched problem, each target's prediction read. The
        early stop of crafting (``core.attacks.EarlyStop``) asks this every few iterations."""
        features, inputs = self.features, self.inputs
        m, k = poisons.shape[:2]
        rows = indices.to(inputs.device)
        config = inputs.config
        if config.victim_augment:  # judged on what the victim trains on (retrain_stage)
            chosen = [inputs.instances[i] for i in indices.tolist()]
            poisons = victim_views(poisons, chosen, config.seed, inputs.data.flip)
        extra = extract_features(inputs.model, poisons.flatten(0, 1), dtype=inputs.dtype)
        poison_classes = features.poison_classes[rows]
        weights, biases = retrain_heads(
            features.clean_features,
            features.clean_labels,
            extra.view(m, k, -1),
            poison_classes[:, None].expand(-1, k),
            init_weight=features.head_weight,
            init_bias=features.head_bias,
            schedule=HeadSchedule.of(inputs.config),
            seed=inputs.config.seed,
        )
        with torch.no_grad():
            logits = torch.einsum("hd,hcd->hc", features.target_features[rows], weights) + biases
        return (logits.argmax(-1) == poison_classes).cpu()

    def craft(
        self,
        name: str,
        *,
        on_step: StepCallback | None = None,
        delta: float | None = None,
        poisons: int | None = None,
        early_stop_every: int = 0,
    ) -> tuple[CraftResult, HeadOutcome, dict[str, float]]:
        """Craft and re-train one attack (at the audit's budget unless given)."""
        started = time.perf_counter()
        early_stop = EarlyStop(early_stop_every, self.succeeded) if early_stop_every else None
        crafted = craft_stage(
            self.inputs,
            self.features,
            name,
            self.attacker,
            channels_last=self.channels_last,
            on_step=on_step,
            delta=delta,
            poisons=poisons,
            early_stop=early_stop,
        )
        crafted_at = time.perf_counter()
        k = crafted.poisons.shape[1]
        outcome = retrain_stage(self.inputs, self.features, crafted, self.bases_features(k))
        seconds = {"craft": crafted_at - started, "retrain": time.perf_counter() - crafted_at}
        return crafted, outcome, seconds

    def score(
        self,
        name: str,
        crafted: CraftResult,
        outcome: HeadOutcome,
        seconds: dict[str, float],
        pair_sources: dict[tuple[int, int], PairSource],
    ) -> AttackResult:
        return score_stage(
            name,
            self.inputs.instances,
            crafted,
            outcome,
            seconds,
            clean_correct=self.features.clean_correct.tolist(),
            pair_sources=pair_sources,
            # Distance to the target says whether an attack reached it only for attacks that
            # pull poisons onto the target in feature space.
            reach_level=self.inputs.config.reach_level
            if attack_class(name).feature_space
            else None,
        )


class AuditState:
    """The finished attacks of an audit on disk, so a rerun resumes after the last one.

    One file per (model or reference, attack, round) with the poisons, their scores and the
    re-trained heads' outcome, written atomically and read back with
    ``torch.load(weights_only=True)`` (tensors and numbers only: this process wrote them).
    The folder remembers the config it was written for; another config starts it afresh.
    Instances, pairs and crafting are deterministic for a config, so what was kept is what
    the rerun would have computed.
    """

    CONFIG = "config.json"

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    @classmethod
    def open(cls, folder: Path, config: AuditConfig) -> AuditState:
        identity = config.model_dump_json(exclude={"device"})
        marker = folder / cls.CONFIG
        if folder.is_dir() and (not marker.is_file() or marker.read_text() != identity):
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        marker.write_text(identity)
        return cls(folder)

    def save(
        self, key: str, crafted: CraftResult, outcome: HeadOutcome, seconds: dict[str, float]
    ) -> None:
        partial = self.folder / f"{key}.pt.partial"
        torch.save(
            {
                "poisons": crafted.poisons.cpu(),
                "coefficients": crafted.coefficients.cpu(),
                "feature_distance": crafted.feature_distance.cpu(),
                "relative_distance": crafted.relative_distance.cpu(),
                "linf": crafted.linf.cpu(),
                "objective": crafted.objective.cpu(),
                "work": crafted.work,
                "target_probs": outcome.target_probs.cpu(),
                "re_acc": outcome.re_acc.cpu(),
                "seconds": dict(seconds),
            },
            partial,
        )
        partial.replace(self.folder / f"{key}.pt")

    def load(
        self, key: str, device: torch.device
    ) -> tuple[CraftResult, HeadOutcome, dict[str, float]] | None:
        path = self.folder / f"{key}.pt"
        if not path.is_file():
            return None
        saved = torch.load(path, weights_only=True, map_location=device)
        crafted = CraftResult(
            poisons=saved["poisons"],
            coefficients=saved["coefficients"],
            feature_distance=saved["feature_distance"],
            relative_distance=saved["relative_distance"],
            linf=saved["linf"],
            objective=saved["objective"],
            work=int(saved["work"]),
        )
        outcome = HeadOutcome(target_probs=saved["target_probs"], re_acc=saved["re_acc"])
        return crafted, outcome, {k: float(v) for k, v in saved["seconds"].items()}


def merge_crafts(parts: Sequence[CraftResult]) -> CraftResult:
    """The crafting of several rounds as one, instances in round order. An instance whose
    crafting stopped early has a shorter objective history: its last value is repeated."""
    if len(parts) == 1:
        return parts[0]
    length = max(part.objective.shape[0] for part in parts)
    objectives = [
        torch.cat([part.objective, part.objective[-1:].expand(length - len(part.objective), -1)])
        for part in parts
    ]
    return CraftResult(
        poisons=torch.cat([part.poisons for part in parts]),
        coefficients=torch.cat([part.coefficients for part in parts]),
        feature_distance=torch.cat([part.feature_distance for part in parts]),
        relative_distance=torch.cat([part.relative_distance for part in parts]),
        linf=torch.cat([part.linf for part in parts]),
        objective=torch.cat(objectives, 1),
        work=sum(part.work for part in parts),
    )


def merge_outcomes(parts: Sequence[HeadOutcome]) -> HeadOutcome:
    """Head outcomes of several rounds as one: poisoned rows first, then baseline rows."""
    if len(parts) == 1:
        return parts[0]
    halves = [len(part.re_acc) // 2 for part in parts]
    return HeadOutcome(
        target_probs=torch.cat(
            [p.target_probs[:h] for p, h in zip(parts, halves, strict=True)]
            + [p.target_probs[h:] for p, h in zip(parts, halves, strict=True)]
        ),
        re_acc=torch.cat(
            [p.re_acc[:h] for p, h in zip(parts, halves, strict=True)]
            + [p.re_acc[h:] for p, h in zip(parts, halves, strict=True)]
        ),
    )


def instance_rounds(instances: Sequence[Instance], rounds: int) -> list[list[int]]:
    """Instance indices in ``rounds`` groups, each taking a share of every pair's targets (in
    the order they were drawn), so every round covers every pair."""
    by_pair: dict[tuple[int, int], list[int]] = {}
    for index, inst in enumerate(instances):
        by_pair.setdefault((inst.target_class, inst.poison_class), []).append(index)
    groups: list[list[int]] = [[] for _ in range(rounds)]
    for members in by_pair.values():
        for number, share in enumerate(np.array_split(np.array(members), rounds)):
            groups[number] += share.tolist()
    return [sorted(group) for group in groups if group]


@dataclass
class _Crafting:
    """What one side's attacks crafted so far, round by round."""

    crafts: dict[str, list[CraftResult]]
    outcomes: dict[str, list[HeadOutcome]]
    seconds: dict[str, dict[str, float]]

    @classmethod
    def empty(cls, attacks: Sequence[str]) -> _Crafting:
        return cls(
            {name: [] for name in attacks},
            {name: [] for name in attacks},
            {name: {"craft": 0.0, "retrain": 0.0} for name in attacks},
        )

    def add(
        self, name: str, crafted: CraftResult, outcome: HeadOutcome, seconds: dict[str, float]
    ) -> None:
        self.crafts[name].append(crafted)
        self.outcomes[name].append(outcome)
        for key, value in seconds.items():
            self.seconds[name][key] += value

    def results(
        self, side: _Side, pair_sources: dict[tuple[int, int], PairSource]
    ) -> dict[str, AttackResult]:
        """Every attack scored over the instances of ``side`` (those crafted so far)."""
        return {
            name: side.score(
                name,
                merge_crafts(self.crafts[name]),
                merge_outcomes(self.outcomes[name]),
                dict(self.seconds[name]),
                pair_sources,
            )
            for name in self.crafts
        }

    @property
    def work(self) -> int:
        return sum(part.work for parts in self.crafts.values() for part in parts)


def run_audit(
    config: AuditConfig,
    *,
    progress: ProgressCallback = ignore_progress,
    poisons_dir: Path | None = None,
    dataset: ImageDataset | None = None,
    reference_source: Literal["named", "auto"] = "named",
    policy: Policy | None = None,
    state_dir: Path | None = None,
) -> AuditReport:
    """Run ``config.attacks`` against ``config.model`` and return the ASR report.

    Args:
        config: the audit (model, dataset, pairs, budgets, attack and re-training settings;
            ``reference``, an undefended model audited on the same instances; the budget
            curve's points; the sequential mode).
        progress: called with the whole audit's fraction done (phases ``load``,
            ``features``, ``screen``, ``craft:<attack>``, ``retrain:<attack>``, the same
            prefixed ``reference:`` for the reference, and ``curve``); raising from it stops
            the audit.
        poisons_dir: if given, each attack's poisons are written there as ``<attack>.npz``
            (float32 poisons (I, k, C, H, W), uint8 bases and targets, indices) and
            ``<attack>.png`` (one row per instance: base | poison pairs, then the target).
        dataset: the already-read dataset named by ``config`` (saves re-reading it).
        reference_source: how the caller got ``config.reference``: named by the user, or
            pre-trained for this audit (``auto``); recorded in the report.
        policy: the policy a sequential audit (``config.sequential``) stops under
            (default: ``catalog.policy.DEFAULT_POLICY``); the caller still decides the
            report's verdict.
        state_dir: where each finished attack (per round and per model) is kept, so that an
            audit stopped mid-way (a worker that died) resumes from its last finished attack
            when run again with the same config and folder (:class:`AuditState`).

    A sequential audit crafts the instances in ``config.rounds`` rounds, each a share of
    every pair's targets, and after each round decides the verdict under ``policy`` at a
    Bonferroni-corrected confidence (``1 - (1 - confidence) / rounds`` per look, so the
    chance that any look decides wrongly stays within the policy's): once it is decided, no
    more rounds are crafted. A look that finds the verdict undecidable by the planned end (all
    planned instances at the rates seen so far would leave it inconclusive) stops the audit
    for futility (``config.stop_for_futility``). The report's verdict
    (:func:`core.verdict.decide`) is decided at the same per-look confidence, so it agrees
    with the look that stopped the audit.

    Raises :class:`AuditError` for a dataset or pair that does not fit the model, and the
    loaders' errors (``BulwarkError`` subclasses) for unreadable checkpoints or datasets.
    """
    report = _run(
        config,
        progress=progress,
        poisons_dir=poisons_dir,
        dataset=dataset,
        reference_source=reference_source,
        policy=policy,
        state_dir=state_dir,
        parts=None,
    )
    assert report is not None
    return report


def audit_parts(config: AuditConfig) -> list[str]:
    """The independent crafting parts of a (non-sequential) audit: one per attack, and one
    per attack on the reference. :func:`craft_audit_parts` crafts any subset of them on any
    worker; :func:`run_audit` with the same ``state_dir`` holding every part's file then only
    scores (the fan-out of an audit across workers)."""
    sides = ["model", "reference"] if config.reference is not None else ["model"]
    return [f"{side}-{name}-round0" for side in sides for name in config.attacks]


def craft_audit_parts(
    config: AuditConfig,
    parts: Collection[str],
    *,
    state_dir: Path,
    progress: ProgressCallback = ignore_progress,
    dataset: ImageDataset | None = None,
) -> None:
    """Craft and re-train the ``parts`` (:func:`audit_parts`) of ``config``'s audit into
    ``state_dir``; parts already there are kept. Loads the model (and the reference, for a
    reference part) and draws the same instances as :func:`run_audit` does."""
    unknown = sorted(set(parts) - set(audit_parts(config)))
    if unknown:
        raise AuditError(f"unknown audit parts {unknown}; the parts are {audit_parts(config)}")
    if config.sequential:
        raise AuditError("a sequential audit decides between rounds: it runs as one task")
    _run(
        config,
        progress=progress,
        poisons_dir=None,
        dataset=dataset,
        reference_source="named",
        policy=None,
        state_dir=state_dir,
        parts=frozenset(parts),
    )


def _run(
    config: AuditConfig,
    *,
    progress: ProgressCallback,
    poisons_dir: Path | None,
    dataset: ImageDataset | None,
    reference_source: Literal["named", "auto"],
    policy: Policy | None,
    state_dir: Path | None,
    parts: frozenset[str] | None,
) -> AuditReport | None:
    """:func:`run_audit`, or with ``parts`` only the crafting of those parts (returns None)."""
    started = time.perf_counter()
    timings: dict[str, float] = {}
    tracker = _Tracker(progress, _progress_weights(config, parts))

    def timed(phase: str, message: str = "") -> _Phase:
        return _Phase(tracker, timings, phase, message)

    with timed("load", f"the model and the {config.dataset} dataset"):
        inputs = load_stage(config, dataset)
    with timed("features", "re-training and test set features, the clean model, the pairs"):
        clean = clean_stage(inputs)
        inputs, choices = draw_stage(inputs, clean)
        features = features_stage(inputs, clean)
    feature_screen = None
    if config.screen_images and parts is None:
        with timed("screen", f"Eq. 4 screen on {config.screen_images} test images"):
            feature_screen = screen_stage(inputs)
    pair_sources = {(c.target_class, c.poison_class): c.source for c in choices}

    model_side = _Side.of(inputs, features)
    reference_side = None
    reference_clean = None
    wants_reference = parts is None or any(part.startswith("reference-") for part in parts)
    if config.reference is not None and wants_reference:
        with timed("reference:load", "the undefended reference model"):
            reference_inputs = load_stage(config, inputs.data, model_path=config.reference)
        with timed("reference:features", "the reference's features on the same instances"):
            reference_clean = clean_stage(reference_inputs)
            reference_inputs = replace(reference_inputs, instances=inputs.instances)
            reference_features = features_stage(reference_inputs, reference_clean)
        reference_side = _Side.of(reference_inputs, reference_features)

    sides = [("", model_side)] + ([("reference:", reference_side)] if reference_side else [])
    state = AuditState.open(state_dir, config) if state_dir is not None else None
    crafting = {prefix: _Crafting.empty(config.attacks) for prefix, _ in sides}
    groups = (
        instance_rounds(inputs.instances, config.rounds)
        if config.sequential
        else [list(range(len(inputs.instances)))]
    )
    policy = policy or DEFAULT_POLICY
    look_confidence = 1 - (1 - policy.confidence) / len(groups)
    done: list[int] = []
    rounds_run = 0
    stopped_by: str | None = None
    for number, group in enumerate(groups):
        for prefix, side in sides:
            round_side = side.subset(group) if config.sequential else side
            for name in config.attacks:
                phase = f"{prefix}craft:{name}"
                share = 1.0 / len(groups)

                def on_step(
                    step: int, steps: int, objective: float, phase: str = phase, base: int = number
                ) -> None:
                    local = (base + step / steps) / len(groups)
                    tracker.report(phase, local, step=step, steps=steps, loss=objective)

                step_key = f"{prefix.rstrip(':') or 'model'}-{name}-round{number}"
                if parts is not None and step_key not in parts:
                    continue
                done_before = state.load(step_key, inputs.device) if state is not None else None
                if done_before is not None:
                    crafted, outcome, seconds = done_before
                else:
                    tracker.report(phase, number / len(groups), step=0, steps=config.iterations)
                    crafted, outcome, seconds = round_side.craft(
                        name, on_step=on_step, early_stop_every=config.early_stop_every
                    )
                    if state is not None:
                        state.save(step_key, crafted, outcome, seconds)
                crafting[prefix].add(name, crafted, outcome, seconds)
                tracker.finish(phase, share)
                tracker.finish(f"{prefix}retrain:{name}", share)
        done += group
        rounds_run = number + 1
        if config.sequential and number < len(groups) - 1:
            looked = model_side.subset(done)
            results_so_far = crafting[""].results(looked, pair_sources)
            references_so_far: dict[str, AttackResult] = {}
            reference_union = None
            if reference_side is not None:
                looked_reference = reference_side.subset(done)
                references_so_far = crafting["reference:"].results(looked_reference, pair_sources)
                if len(references_so_far) > 1:
                    reference_union = union_result(
                        references_so_far, looked_reference.features.clean_correct.tolist()
                    )
            union_so_far = (
                union_result(results_so_far, looked.features.clean_correct.tolist())
                if len(results_so_far) > 1
                else None
            )
            verdict = decide_results(
                results_so_far,
                references_so_far,
                policy,
                union=union_so_far,
                reference_union=reference_union,
                confidence=look_confidence,
            )
            if verdict.outcome != "inconclusive":
                stopped_by = (
                    f"{verdict.outcome} decided after round {number + 1} of {len(groups)} "
                    f"at {100 * look_confidence:.4g}% per look: {verdict.reason}"
                )
                break
            if config.stop_for_futility and futile(
                results_so_far,
                references_so_far,
                policy,
                factor=len(inputs.instances) / len(done),
                confidence=look_confidence,
                union=union_so_far,
                reference_union=reference_union,
            ):
                stopped_by = (
                    f"inconclusive after round {number + 1} of {len(groups)}, stopped for "
                    f"futility: all {len(inputs.instances)} planned instances at the rates "
                    f"of these {len(done)} would leave it undecided at "
                    f"{100 * look_confidence:.4g}% per look ({verdict.reason})"
                )
                break

    if parts is not None:
        return None  # the parts are in state_dir; the scoring task reads them all
    run_order = done if config.sequential else list(range(len(inputs.instances)))
    model_run = model_side.subset(run_order) if config.sequential else model_side
    results = crafting[""].results(model_run, pair_sources)
    for name in config.attacks:
        timings[f"craft:{name}"] = crafting[""].seconds[name]["craft"]
        timings[f"retrain:{name}"] = crafting[""].seconds[name]["retrain"]
        if poisons_dir is not None:
            _save_poisons(
                poisons_dir,
                name,
                model_run.inputs.instances,
                merge_crafts(crafting[""].crafts[name]),
                model_run.features.bases[:, : results[name].poisons_per_instance],
                model_run.features.targets,
                [row.success for row in sorted(results[name].rows, key=lambda r: r.instance)],
            )

    reference = None
    reference_run = None
    if reference_side is not None and reference_clean is not None:
        reference_run = reference_side.subset(run_order) if config.sequential else reference_side
        reference_results = crafting["reference:"].results(reference_run, pair_sources)
        for name in config.attacks:
            for key, value in crafting["reference:"].seconds[name].items():
                timings[f"reference:{key}:{name}"] = value
        reference = ReferenceFacts(
            model=_model_facts(reference_run.inputs, config.reference or ""),
            source=reference_source,
            pre_acc=reference_clean.pre_acc,
            head_init="pretrained" if reference_run.inputs.classes_match else "fresh",
            instances_correct=int(reference_run.features.clean_correct.sum()),
            attacks=reference_results,
            union=union_result(reference_results, reference_run.features.clean_correct.tolist())
            if len(reference_results) > 1
            else None,
        )

    sequential = None
    if config.sequential:
        planned = sum(
            len(inputs.instances)
            * config.poisons(name)
            * (config.iterations + 1)
            * getattr(config.attack_settings[name], "restarts", 1)
            * config.draws
            for name in config.attacks
        ) * len(sides)
        work = sum(crafting[prefix].work for prefix, _ in sides)
        sequential = SequentialFacts(
            rounds_planned=len(groups),
            rounds_run=rounds_run,
            instances_planned=len(inputs.instances),
            instances_run=len(done),
            look_confidence=look_confidence,
            stopped=stopped_by or "every round ran: no look decided the verdict earlier",
            early_stop_every=config.early_stop_every,
            crafting_work=work,
            crafting_work_full=planned,
        )

    curve = None
    if config.curve_attack is not None:
        with timed("curve", f"the budget curve of {config.curve_attack}"):
            curve = _budget_curve(
                config,
                config.curve_attack,
                model_run,
                reference_run,
                pair_sources,
                lambda fraction: tracker.report("curve", fraction),
            )

    timings["total"] = time.perf_counter() - started
    progress(Progress(phase="done", fraction=1.0, message=f"{len(config.attacks)} attacks"))
    report = _report(
        model_run.inputs,
        model_run.features,
        feature_screen,
        results,
        timings,
        choices,
        reference,
        curve,
    )
    return report.model_copy(update={"sequential": sequential}) if sequential else report


def _budget_curve(
    config: AuditConfig,
    attack: str,
    model_side: _Side,
    reference_side: _Side | None,
    pair_sources: dict[tuple[int, int], PairSource],
    on_fraction: Callable[[float], None],
) -> BudgetCurve:
    """``attack`` re-crafted at each delta (the audit's poisons) and at each poison count (the
    audit's delta), on the model and on the reference: headline ASR per point."""
    default_poisons = config.poisons(attack)
    budgets = [(delta, default_poisons) for delta in config.budget_deltas]
    budgets += [(config.delta, poisons) for poisons in config.budget_poisons]
    sides = [side for side in (model_side, reference_side) if side is not None]
    work = sum(poisons for _, poisons in budgets) * len(sides)
    finished = 0
    points = []
    for delta, poisons in budgets:
        outcomes = []
        for side in sides:
            crafted, outcome, seconds = side.craft(attack, delta=delta, poisons=poisons)
            outcomes.append(side.score(attack, crafted, outcome, seconds, pair_sources))
            finished += poisons
            on_fraction(finished / work)
        model_result = outcomes[0]
        points.append(
            BudgetPoint(
                delta=delta,
                poisons=poisons,
                model=model_result.headline,
                model_baseline=model_result.headline_baseline,
                reference=outcomes[1].headline if len(outcomes) > 1 else None,
            )
        )
    deltas = len(config.budget_deltas)
    return BudgetCurve(attack=attack, delta_points=points[:deltas], poisons_points=points[deltas:])


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


def _model_facts(inputs: AuditInputs, path: str) -> ModelFacts:
    model, manifest = inputs.model, inputs.manifest
    return ModelFacts(
        path=str(path),
        arch=model.arch,
        feature_dim=model.feature_dim,
        num_classes=model.num_classes,
        defense=manifest.get("defense"),
        trained_on=manifest.get("dataset"),
        weights_sha256=manifest.get("weights_sha256"),
    )


def union_result(results: dict[str, AttackResult], clean_correct: Sequence[bool]) -> UnionResult:
    """The worst case over ``results`` (same instances): lost if any attack won it."""
    count = len(clean_correct)
    won = [False] * count
    base = [False] * count
    for result in results.values():
        for row in result.rows:
            won[row.instance] |= row.success
            base[row.instance] |= row.baseline_success
    correct = [i for i in range(count) if clean_correct[i]]
    return UnionResult(
        attacks=list(results),
        asr=rate(sum(won[i] for i in correct), len(correct)),
        asr_all=rate(sum(won), count),
        baseline=rate(sum(base[i] for i in correct), len(correct)),
        discordant=(
            sum(1 for i in correct if won[i] and not base[i]),
            sum(1 for i in correct if base[i] and not won[i]),
        ),
    )


def compare(
    results: dict[str, AttackResult],
    reference: ReferenceFacts,
    union: UnionResult | None = None,
) -> dict[str, Comparison]:
    """Per attack run on both (and the union where both have one): the headline rates and
    model minus reference with Newcombe's 95% interval."""
    comparison = {}
    pairs: dict[str, tuple[AttackResult | UnionResult, AttackResult | UnionResult | None]] = {
        name: (result, reference.attacks.get(name)) for name, result in results.items()
    }
    if union is not None:
        pairs[UNION] = (union, reference.union)
    for name, (result, theirs) in pairs.items():
        if theirs is None:
            continue
        mine, ref = result.headline, theirs.headline
        comparison[name] = Comparison(
            attack=name,
            model=mine,
            reference=ref,
            difference=mine.rate - ref.rate,
            difference95=difference_interval(
                (mine.successes, mine.trials), (ref.successes, ref.trials)
            ),
        )
    return comparison


def _report(
    inputs: AuditInputs,
    features: AuditFeatures,
    feature_screen: ScreenFacts | None,
    results: dict[str, AttackResult],
    timings: dict[str, float],
    choices: list[PairChoice],
    reference: ReferenceFacts | None,
    curve: BudgetCurve | None,
) -> AuditReport:
    config, data = inputs.config, inputs.data
    clean_correct = features.clean_correct.tolist()
    union = union_result(results, clean_correct) if len(results) > 1 else None
    pre_acc_source: Literal["measured", "manifest"] | None = None
    if inputs.classes_match:
        pre_acc_source = "measured"
    elif features.pre_acc is not None:
        pre_acc_source = "manifest"
    return AuditReport(
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        model=_model_facts(inputs, config.model),
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
                clean_correct=bool(clean_correct[i]),
            )
            for i, inst in enumerate(inputs.instances)
        ],
        attacks=results,
        screen=feature_screen,
        timings=timings,
        versions={**library_versions(), "platform": platform.platform()},
        pair_choices=choices,
        reference=reference,
        reference_note=None if reference is not None else "no reference model was given",
        comparison=compare(results, reference, union) if reference is not None else {},
        union=union,
        budget_curve=curve,
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
