"""CP, Convex Polytope (Zhu et al. 2019), batched over instances."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from catalog.attacks import ConvexPolytopeSettings, PolytopeSettings
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


def project_simplex(v: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of each row of ``v`` (..., k) onto the probability simplex.

    The sort-based algorithm of Duchi et al. (2008), batched over the leading dimensions.
    """
    k = v.shape[-1]
    u = torch.sort(v, dim=-1, descending=True).values
    cumulative = u.cumsum(-1) - 1.0
    index = torch.arange(1, k + 1, device=v.device, dtype=v.dtype)
    active = (u - cumulative / index) > 0
    # rho: the last position where the condition holds (it always holds at position 0).
    rho = (active * index).argmax(-1, keepdim=True)
    theta = cumulative.gather(-1, rho) / (rho + 1).to(v.dtype)
    return (v - theta).clamp(min=0.0)


@register_attack
@dataclass(frozen=True)
class ConvexPolytope(Attack):
    """Convex Polytope: the target's feature inside the convex hull of the poisons' features.

    Minimizes, over the k poisons of an instance and coefficients c on the simplex,
    ``1/2 ||f(x_t) - sum_j c_j f(x_p^j)||^2 / ||f(x_t)||^2``. Each iteration runs one forward
    pass of all poisons, updates c by ``coefficient_steps`` projected-gradient steps of size
    1/L (L the largest eigenvalue of the k x k Gram matrix, as in Zhu et al.'s
    least-squares-on-the-simplex solver, warm-started), then takes a ``torch.optim.Adam`` step
    (``lr``, betas 0.9/0.999) on the poisons with c fixed and projects them onto the budget.
    Adam is element-wise, so every instance moves as if it were crafted alone.
    """

    name: ClassVar[str] = "cp"
    learn_coefficients: ClassVar[bool] = True
    betas: ClassVar[tuple[float, float]] = (0.9, 0.999)

    @property
    def polytope(self) -> PolytopeSettings:
        assert isinstance(self.settings, PolytopeSettings)
        return self.settings

    def _update_coefficients(
        self, features: torch.Tensor, target_features: torch.Tensor, c: torch.Tensor
    ) -> torch.Tensor:
        """Warm-started projected gradient on min_c 1/2 ||t - c F||^2 over the simplex.

        Solved in float64: it is k-dimensional, so precision is free.
        """
        assert isinstance(self.settings, ConvexPolytopeSettings)
        F = features.double()
        gram = F @ F.transpose(1, 2)  # (n, k, k)
        correlation = torch.einsum("nkd,nd->nk", F, target_features.double())
        lipschitz = torch.linalg.eigvalsh(gram)[:, -1].clamp_min(1e-30)
        step = (1.0 / lipschitz)[:, None]
        c = c.double()
        for _ in range(self.settings.coefficient_steps):
            gradient = torch.einsum("nij,nj->ni", gram, c) - correlation
            c = project_simplex(c - step * gradient)
        return c.to(features.dtype)

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
        lower, upper = budget_box(bases, self.delta)
        target_sq = target_features.square().sum(-1).clamp_min(1e-12)
        x = bases.clone()  # a leaf the optimizer updates in place
        optimizer = torch.optim.Adam([x], lr=self.polytope.lr, betas=self.betas, eps=1e-8)
        c = torch.full((n, k), 1.0 / k, device=x.device, dtype=x.dtype)
        history: list[torch.Tensor] = []
        kept = x.detach().clone()  # the poisons of instances whose crafting stopped
        for iteration in range(self.iterations + 1):
            measuring_only = iteration == self.iterations  # the last pass just scores the result
            rows = active.indices
            losses, grads = [], []
            for part in chunks(len(rows), self.images_per_chunk(k)):
                # The plain batched path slices; once instances stop, their rows are indexed.
                index = part if active.rows is None else rows[part]
                chunk = x[index].detach().requires_grad_(not measuring_only)
                with torch.set_grad_enabled(not measuring_only):
                    features = self.poison_features(model, chunk, iteration)
                    if self.learn_coefficients:
                        c[index] = self._update_coefficients(
                            features.detach(), target_features[index], c[index]
                        )
                    mix = torch.einsum("nk,nkd->nd", c[index], features)
                    loss = 0.5 * (mix - target_features[index]).square().sum(-1) / target_sq[index]
                if not measuring_only:
                    (grad,) = torch.autograd.grad(loss.sum(), chunk)
                    grads.append(grad)
                losses.append(loss.detach())
            if active.rows is None:
                history.append(torch.cat(losses))
            else:  # stopped instances keep their last objective
                current = history[-1].clone()
                if len(rows):
                    current[rows] = torch.cat(losses)
                history.append(current)
            active.count_step(k)
            if measuring_only:
                break
            if active.rows is None:
                x.grad = torch.cat(grads)
            else:
                x.grad = torch.zeros_like(x)
                x.grad[rows] = torch.cat(grads)
            optimizer.step()
            x.clamp_(lower, upper)
            if active.rows is not None:
                # Adam's momentum would still move a stopped instance: put its poisons back.
                stopped = torch.ones(n, dtype=torch.bool, device=x.device)
                stopped[rows] = False
                with torch.no_grad():
                    x[stopped] = kept[stopped]
            if callback is not None:
                callback(iteration + 1, self.iterations, float(history[-1].mean()))
            if active.check(iteration + 1, x):
                kept.copy_(x.detach())
            if active.done:
                history.append(history[-1])
                break
        return Crafted(x.detach(), c, history, per_poison_distance=False, work=active.work)
