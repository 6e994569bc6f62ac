"""FC, Feature Collision (Shafahi et al. 2018, "Poison Frogs!"), batched over instances."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from catalog.attacks import FeatureCollisionSettings
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


@register_attack
@dataclass(frozen=True)
class FeatureCollision(Attack):
    """Feature Collision by forward-backward splitting, per poison.

    Objective of poison x with base x_b and target x_t (the paper's, with a scale-free mu)::

        J(x) = ||f(x) - f(x_t)||^2 / ||f(x_t)||^2 + mu * mean((x - x_b)^2)

    which is ``||f(x) - f(x_t)||^2 + mu' ||x - x_b||^2`` divided by ``||f(x_t)||^2``, with
    ``mu' = mu ||f(x_t)||^2 / (C*H*W)``: stating mu this way lets one default fit every
    extractor, whatever its feature scale. Each iteration takes the forward step
    ``x - lam * grad`` on the feature term, the proximal step of the mu term
    ``(x + 2 lam mu/n x_b) / (1 + 2 lam mu/n)`` and the projection onto the budget. As in
    Poison Frogs' adaptive scheme the step lam is kept per poison: a step that raises J is
    undone and lam shrinks, an accepted one lets lam grow. The first step moves the most-moved
    pixel by ``settings.step``. Under multi-draw crafting (``draws`` > 1) every evaluation
    averages its own draws, so a step is accepted on two estimates of J, not two exact values.
    """

    name: ClassVar[str] = "fc"
    grow: ClassVar[float] = 1.2  # step multiplier after an accepted step
    shrink: ClassVar[float] = 0.5  # step multiplier after a rejected step

    @property
    def fc(self) -> FeatureCollisionSettings:
        assert isinstance(self.settings, FeatureCollisionSettings)
        return self.settings

    def _evaluate(
        self,
        model: nn.Module,
        x: torch.Tensor,
        bases: torch.Tensor,
        target_features: torch.Tensor,
        target_sq: torch.Tensor,
        with_grad: bool,
        iteration: int,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """J for every poison (n, k) and the gradient of its feature term w.r.t. x.

        ``iteration`` numbers the evaluation (0 the bases, i the proposal of step i): it seeds
        multi-draw crafting's transformations (``Attack.poison_features``)."""
        n, k = x.shape[:2]
        objectives, grads = [], []
        for part in chunks(n, self.images_per_chunk(k)):
            chunk = x[part].detach().requires_grad_(with_grad)
            with torch.set_grad_enabled(with_grad):
                features = self.poison_features(model, chunk, iteration)
                collision = (features - target_features[part, None]).square().sum(-1)
                collision = collision / target_sq[part, None]
            if with_grad:
                (grad,) = torch.autograd.grad(collision.sum(), chunk)
                grads.append(grad)
            proximity = (chunk.detach() - bases[part]).square().flatten(2).mean(-1)
            objectives.append(collision.detach() + self.fc.mu * proximity)
        return torch.cat(objectives), torch.cat(grads) if with_grad else None

    def craft(
        self,
        model: nn.Module,
        context: AttackContext,
        target_features: torch.Tensor,
        bases: torch.Tensor,
        callback: StepCallback | None,
        active: ActiveRows,
    ) -> Crafted:
        n, k = bases.shape[:2]
        mu = self.fc.mu
        lower, upper = budget_box(bases, self.delta)
        target_sq = target_features.square().sum(-1).clamp_min(1e-12)
        pixels = bases[0, 0].numel()

        x = bases.clone()
        objective, grad = self._evaluate(model, x, bases, target_features, target_sq, True, 0)
        assert grad is not None
        active.count_step(k)
        # The first step moves each poison's largest-gradient pixel by `step`.
        lam = self.fc.step / grad.abs().flatten(2).amax(-1).clamp_min(1e-20)
        history = [objective.mean(1)]
        for iteration in range(self.iterations):
            last = iteration == self.iterations - 1
            # Every instance while none has stopped (the plain batched step); else the rows
            # of those still crafted, written back in place.
            rows = active.rows if active.rows is not None else slice(None)
            m = n if active.rows is None else len(active.rows)
            view = (m, k, 1, 1, 1)
            x_rows, lam_rows, bases_rows = x[rows], lam[rows], bases[rows]
            rate = 2.0 * lam_rows.view(view) * mu / pixels
            proposal = (x_rows - lam_rows.view(view) * grad[rows] + rate * bases_rows) / (
                1.0 + rate
            )
            proposal = torch.clamp(proposal, lower[rows], upper[rows])
            new_objective, new_grad = self._evaluate(
                model,
                proposal,
                bases_rows,
                target_features[rows],
                target_sq[rows],
                not last,
                iteration + 1,
            )
            active.count_step(k)
            accept = new_objective <= objective[rows]
            x[rows] = torch.where(accept.view(view), proposal, x_rows)
            objective[rows] = torch.where(accept, new_objective, objective[rows])
            if new_grad is not None:
                grad[rows] = torch.where(accept.view(view), new_grad, grad[rows])
            lam[rows] = torch.where(accept, lam_rows * self.grow, lam_rows * self.shrink)
            history.append(objective.mean(1))
            if callback is not None:
                callback(iteration + 1, self.iterations, float(history[-1].mean()))
            active.check(iteration + 1, x)
            if active.done:
                break
        coefficients = torch.full((n, k), 1.0 / k, device=x.device, dtype=x.dtype)
        return Crafted(x, coefficients, history, per_poison_distance=True, work=active.work)
