"""GM, Gradient Matching (Geiping et al. 2021, "Witches' Brew"), in the transfer setting."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from catalog.attacks import GradientMatchingSettings
from core.attacks.base import (
    ActiveRows,
    Attack,
    AttackContext,
    Crafted,
    StepCallback,
    budget_box,
    chunks,
)
from core.attacks.registry import register_attack


def match_loss(
    poison_features: torch.Tensor,
    target_features: torch.Tensor,
    poison_classes: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
) -> torch.Tensor:
    """1 - cos(grad of the poisons' loss, grad of the target's adversarial loss), per instance.

    Both gradients are of the victim's cross-entropy with respect to its linear head (weight
    (C, D), bias (C,)), every image labelled with the poison class: the poisons with their own
    (correct) label, the target with the label the attacker wants. For softmax cross-entropy
    the gradient of one image is ``r (x) phi`` with ``r = softmax(W f + b) - onehot(y)`` and
    ``phi = [f, 1]``, so inner products of gradients factor as ``(r.r')(phi.phi')`` and no
    (C, D + 1) gradient is ever formed.

    Args: poison_features (n, k, D), target_features (n, D), poison_classes (n,). Returns (n,).
    """
    classes = weight.shape[0]
    onehot = torch.nn.functional.one_hot(poison_classes, classes).to(poison_features.dtype)
    ones_p = torch.ones(*poison_features.shape[:2], 1, dtype=poison_features.dtype)
    phi_p = torch.cat([poison_features, ones_p.to(poison_features.device)], -1)  # (n, k, D+1)
    ones_t = torch.ones(len(target_features), 1, dtype=target_features.dtype)
    phi_t = torch.cat([target_features, ones_t.to(target_features.device)], -1)  # (n, D+1)
    r_p = torch.softmax(poison_features @ weight.T + bias, -1) - onehot[:, None]  # (n, k, C)
    r_t = torch.softmax(target_features @ weight.T + bias, -1) - onehot  # (n, C)
    dot = (torch.einsum("nkc,nc->nk", r_p, r_t) * torch.einsum("nkd,nd->nk", phi_p, phi_t)).sum(1)
    gram = r_p @ r_p.transpose(1, 2) * (phi_p @ phi_p.transpose(1, 2))  # (n, k, k)
    poison_norm = gram.sum((1, 2)).clamp_min(1e-30).sqrt()
    target_norm = (r_t.square().sum(-1) * phi_t.square().sum(-1)).clamp_min(1e-30).sqrt()
    return 1.0 - dot / (poison_norm * target_norm)


@register_attack
@dataclass(frozen=True)
class GradientMatching(Attack):
    """Gradient Matching: poisons whose head gradient points where the target's would.

    The victim re-trains its linear head on clean data plus the poisons; Witches' Brew makes
    the poisons' gradient on the head parameters align (cosine similarity) with the gradient
    of the adversarial loss of the target (the target labelled with the poison class), so
    that every re-training step on the poisons is also a step towards misclassifying the
    target. The head is the one re-training starts from (``AttackContext.head_weight``).

    Each of ``restarts`` runs starts from a random point of the budget (drawn per instance
    from a hash of its bases, so an instance gets the same start in any batch) and takes
    ``iterations`` ``torch.optim.Adam`` steps (``lr``) on the poisons, projected onto the
    budget; the run with the lowest final loss is kept. Element-wise updates and
    per-instance losses make a batch equal to its instances crafted one at a time.
    """

    name: ClassVar[str] = "gm"
    # Its objective is gradient alignment, not feature distance: no reach flag from distance.
    feature_space: ClassVar[bool] = False
    betas: ClassVar[tuple[float, float]] = (0.9, 0.999)

    @property
    def gm(self) -> GradientMatchingSettings:
        assert isinstance(self.settings, GradientMatchingSettings)
        return self.settings

    def _start(self, bases: torch.Tensor, restart: int) -> torch.Tensor:
        """A uniform point of the budget for each instance, from a hash of its own bases."""
        starts = []
        for instance in bases:
            digest = hashlib.sha256(instance.detach().float().cpu().numpy().tobytes())
            digest.update(restart.to_bytes(2, "little"))
            generator = torch.Generator().manual_seed(int.from_bytes(digest.digest()[:8], "little"))
            noise = torch.rand(instance.shape, generator=generator, dtype=torch.float64)
            starts.append(((noise * 2 - 1) * self.delta).to(bases.dtype))
        lower, upper = budget_box(bases, self.delta)
        return torch.clamp(bases + torch.stack(starts).to(bases.device), lower, upper)

    def craft(
        self,
        model: nn.Module,
        context: AttackContext,
        target_features: torch.Tensor,
        bases: torch.Tensor,
        callback: StepCallback | None,
        active: ActiveRows,
    ) -> Crafted:
        context.require("poison_classes", "head_weight", "head_bias")
        assert context.poison_classes is not None
        assert context.head_weight is not None and context.head_bias is not None
        n, k = bases.shape[:2]
        work = bases.dtype
        weight, bias = context.head_weight.to(work), context.head_bias.to(work)
        labels = context.poison_classes.to(bases.device)
        lower, upper = budget_box(bases, self.delta)
        restarts, steps = self.gm.restarts, self.iterations
        best = bases.clone()
        best_loss = torch.full((n,), math.inf, dtype=work, device=bases.device)
        current_loss = torch.ones(n, dtype=work, device=bases.device)
        history: list[torch.Tensor] = []
        for restart in range(restarts):
            rows = active.indices.clone()
            if len(rows) == 0:
                break
            x = bases.clone()  # a leaf the optimizer updates in place
            x[rows] = self._start(bases[rows], restart)
            optimizer = torch.optim.Adam([x], lr=self.gm.lr, betas=self.betas, eps=1e-8)
            kept = x.detach().clone()
            for iteration in range(steps + 1):
                measuring_only = iteration == steps
                rows = active.indices
                losses, grads = [], []
                for part in chunks(len(rows), self.images_per_chunk(k)):
                    index = rows[part]
                    chunk = x[index].detach().requires_grad_(not measuring_only)
                    with torch.set_grad_enabled(not measuring_only):
                        # Every restart's steps get their own draws.
                        step = restart * (steps + 1) + iteration
                        features = self.poison_features(model, chunk, step)
                        loss = match_loss(
                            features, target_features[index], labels[index], weight, bias
                        )
                    if not measuring_only:
                        (grad,) = torch.autograd.grad(loss.sum(), chunk)
                        grads.append(grad)
                    losses.append(loss.detach())
                if len(rows):
                    current_loss[rows] = torch.cat(losses)
                history.append(current_loss.clone())
                active.count_step(k)
                if measuring_only:
                    break
                x.grad = torch.zeros_like(x)
                x.grad[rows] = torch.cat(grads)
                optimizer.step()
                with torch.no_grad():
                    x.clamp_(lower, upper)
                    # Adam's momentum would move the instances not crafted: put them back.
                    idle = torch.ones(n, dtype=torch.bool, device=x.device)
                    idle[rows] = False
                    x[idle] = kept[idle]
                if callback is not None:
                    done = restart * steps + iteration + 1
                    callback(done, restarts * steps, float(current_loss.mean()))
                if active.check(iteration + 1, x):
                    # The instances that just succeeded keep these poisons: they won.
                    newly = rows[~torch.isin(rows, active.indices)]
                    best[newly] = x.detach()[newly]
                    best_loss[newly] = -math.inf
                    kept.copy_(x.detach())
                if active.done:
                    break
            # The instances still crafted keep this run's poisons where they match better.
            rows = active.indices
            better = rows[current_loss[rows] < best_loss[rows]]
            best[better] = x.detach()[better]
            best_loss[better] = current_loss[better]
        coefficients = torch.full((n, k), 1.0 / k, device=bases.device, dtype=work)
        return Crafted(best, coefficients, history, per_poison_distance=True, work=active.work)
