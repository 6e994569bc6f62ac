"""The defenses' losses: Prototype Conformity Loss, PGD, and the per-defense training loss.

Paper: Zhou, Yan, Liu, Zhang, Han, "Pre-training Robust Feature Extractor Against Clean-label
Data Poisoning Attacks". The defenses widen the lower bound of Eq. 3,
||f(x_p) - f(x_t)|| >= ||f(x_b) - f(x_t)|| - ||f(x_p) - f(x_b)||, by separating classes in
feature space (Eq. 4a: PC-Loss, Mustafa et al. 2019) and by keeping the features of
perturbed inputs near the clean ones (Eq. 4b: PGD adversarial training with a feature-distance
term, Madry et al. 2018).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from core.models import FeatureClassifier, FoldedBatchNorm


def _distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distances (N, M) between rows of a (N, D) and b (M, D).

    Written out rather than ``torch.cdist`` so the gradient stays finite where a distance
    is zero (a centroid's distance to itself).
    """
    squared = (a[:, None, :] - b[None, :, :]).pow(2).sum(-1)
    return squared.clamp_min(1e-12).sqrt()


def pc_loss(features: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Prototype Conformity Loss (Eq. 5), averaged over the batch.

    L_PC(x, y) = ||f(x) - w_y|| - 1/(k-1) * sum_{j != y} (||f(x) - w_j|| + ||w_y - w_j||)

    Args:
        features: f(x), (N, D).
        labels: y, (N,) int64 in [0, k).
        centroids: the trainable class centroids w, (k, D).
    Returns:
        A scalar: the mean of L_PC over the batch.
    """
    k = centroids.shape[0]
    to_centroids = _distances(features, centroids)  # (N, k)
    between_centroids = _distances(centroids, centroids)  # (k, k), diagonal ~0
    own = to_centroids.gather(1, labels[:, None]).squeeze(1)
    others = to_centroids.sum(1) - own
    # Row y of the centroid distances holds ||w_y - w_j|| for all j; its diagonal entry is the
    # clamped zero, which contributes 1e-6 at most.
    separation = between_centroids[labels].sum(1) - between_centroids[labels, labels]
    return (own - (others + separation) / (k - 1)).mean()


def feature_distance(adversarial: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """||f(x_adv) - f(x)||_2 per example, (N,) from two (N, D) feature batches."""
    return (adversarial - clean).pow(2).sum(1).clamp_min(1e-12).sqrt()


def pgd(
    model: FeatureClassifier,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epsilon: float,
    steps: int,
    step_size: float,
    random_start: bool = True,
    feature_term: bool = False,
    generator: torch.Generator | None = None,
    autocast: AbstractContextManager | None = None,
    start_noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """L_inf PGD (Madry et al. 2018): maximize the loss within ||x_adv - x||_inf <= epsilon.

    The objective is CE(model(x_adv), y), plus ||f(x_adv) - f(x)|| when ``feature_term`` (Eq.
    7 puts the feature term inside the maximization). Each step is a signed-gradient ascent
    step followed by projection onto the epsilon-ball and [0,1]. The model is run in eval mode
    (batch-norm statistics are neither used from the batch nor updated by the attack) and
    restored afterwards; only the input gradient is computed.

    Args:
        x: clean pixels (N, C, H, W) in [0,1]; y: labels (N,).
        start_noise: the uniform [0,1) draws of the random start, shaped like ``x`` (default:
            drawn here from ``generator``); a distributed run draws them for the global batch
            and passes each rank its rows.
    Returns:
        x_adv, detached, same shape and dtype as ``x``.
    """
    was_training = model.training
    model.eval()
    autocast = autocast or nullcontext()
    try:
        clean_features = None
        if feature_term:
            with torch.no_grad(), autocast:
                clean_features = model.features(x).float()
        x_adv = x.detach().clone()
        if random_start:
            noise = start_noise
            if noise is None:
                noise = torch.rand(x.shape, device=x.device, generator=generator, dtype=x.dtype)
            x_adv = (x_adv + (2 * noise - 1) * epsilon).clamp_(0, 1)
        for _ in range(steps):
            x_adv.requires_grad_(True)
            with autocast:
                features = model.features(x_adv)
                loss = F.cross_entropy(model.head(features).float(), y, reduction="sum")
                if clean_features is not None:
                    loss = loss + feature_distance(features.float(), clean_features).sum()
            (grad,) = torch.autograd.grad(loss, x_adv)
            with torch.no_grad():
                x_adv = x_adv + step_size * grad.sign()
                x_adv = torch.min(torch.max(x_adv, x - epsilon), x + epsilon).clamp_(0, 1)
        return x_adv.detach()
    finally:
        model.train(was_training)


@dataclass(frozen=True)
class StepLoss:
    """A training step's loss and the logits on which its accuracy is measured."""

    loss: torch.Tensor
    logits: torch.Tensor


class DefenseLoss(nn.Module):
    """The pre-training loss of one defense (Eq. 6-8 of the paper).

    - ``none``: CE(x, y).
    - ``pcl``: (1 - alpha) CE(x, y) + alpha L_PC(x, y)                      (Eq. 6)
    - ``at``: CE(x_adv, y) + ||f(x_adv) - f(x)||                           (Eq. 7)
    - ``at-pcl``: (1 - alpha) {CE(x_adv, y) + ||f(x_adv) - f(x)||} + alpha L_PC(x, y)  (Eq. 8)

    Before the joint loss is switched on (``joint=False``, the PCL warm-up epochs), the PCL
    defenses train with their base loss alone (CE, or the AT loss). With ``feature_term`` off,
    the AT loss is plain Madry AT, CE(x_adv, y). The centroids w are a parameter of this
    module, trained by their own optimizer.
    """

    def __init__(
        self,
        defense: str,
        *,
        num_classes: int,
        feature_dim: int,
        alpha: float,
        epsilon: float,
        pgd_steps: int,
        pgd_step_size: float,
        random_start: bool,
        feature_term: bool,
    ) -> None:
        super().__init__()
        self.defense = defense
        self.alpha = alpha
        self.adversarial = defense in ("at", "at-pcl")
        self.prototypes = defense in ("pcl", "at-pcl")
        self.epsilon = epsilon
        self.pgd_steps = pgd_steps
        self.pgd_step_size = pgd_step_size
        self.random_start = random_start
        self.feature_term = feature_term
        # Initialised by the caller's seeded RNG; only PCL defenses train or save them.
        self.centroids = nn.Parameter(torch.randn(num_classes, feature_dim))
        self._attack_model: FoldedBatchNorm | None = None  # built on first use, not saved

    def forward(
        self,
        model: FeatureClassifier,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        joint: bool,
        generator: torch.Generator | None,
        autocast: AbstractContextManager,
        start_noise: torch.Tensor | None = None,
    ) -> StepLoss:
        """The loss of one batch; x (N, C, H, W) in [0,1], y (N,); ``start_noise``: see
        :func:`pgd`."""
        use_pcl = self.prototypes and joint
        if not self.adversarial:
            with autocast:
                features = model.features(x)
                logits = model.head(features).float()
            loss = F.cross_entropy(logits, y)
            if use_pcl:
                loss = (1 - self.alpha) * loss + self.alpha * pc_loss(
                    features.float(), y, self.centroids
                )
            return StepLoss(loss, logits.detach())

        # PGD runs the model in eval mode, where batch norm is affine: attack a folded copy
        # (same function, fewer memory passes), refreshed from the current weights.
        if self._attack_model is None or self._attack_model.source is not model:
            self._attack_model = FoldedBatchNorm(model)
        x_adv = pgd(
            self._attack_model.refresh(),
            x,
            y,
            epsilon=self.epsilon,
            steps=self.pgd_steps,
            step_size=self.pgd_step_size,
            random_start=self.random_start,
            feature_term=self.feature_term,
            generator=generator,
            autocast=autocast,
            start_noise=start_noise,
        )
        needs_clean = self.feature_term or use_pcl
        # One forward over adversarial and clean inputs together (batch-norm sees both).
        inputs = torch.cat([x_adv, x]) if needs_clean else x_adv
        with autocast:
            features = model.features(inputs)
            adv_features = features[: len(x)]
            logits = model.head(adv_features).float()
        loss = F.cross_entropy(logits, y)
        if needs_clean:
            clean_features = features[len(x) :].float()
            if self.feature_term:
                loss = loss + feature_distance(adv_features.float(), clean_features).mean()
            if use_pcl:
                loss = (1 - self.alpha) * loss + self.alpha * pc_loss(
                    clean_features, y, self.centroids
                )
        return StepLoss(loss, logits.detach())
