"""Targeted clean-label poisoning attacks on a frozen feature extractor: FC, CP and BP.

Threat model (the paper's white-box transfer setting, after Zhu et al. 2019): the attacker knows
the frozen extractor f (the network up to its pooled penultimate layer) that the victim will
re-train a linear head on. For one target image x_t of the target class it perturbs k base
images x_b of the poison class into poisons x_p, labelled (correctly) with the poison class, so
that the re-trained head puts x_t in the poison class. Every poison stays inside
``||x_p - x_b||_inf <= delta`` and the pixel box [0,1]; pixels are in [0,1] because the model
normalizes inside itself, so ``delta`` is in pixel units (25.5/255 in the paper).

- FC, Feature Collision (Shafahi et al. 2018, "Poison Frogs!"): each poison minimizes
  ``||f(x) - f(x_t)||^2 + mu ||x - x_b||^2`` by forward-backward splitting: a gradient step on
  the feature term, the proximal step of the mu term, then projection onto the budget.
- CP, Convex Polytope (Zhu et al. 2019): the k poisons and coefficients c on the simplex
  minimize ``1/2 ||f(x_t) - sum_j c_j f(x_p^j)||^2 / ||f(x_t)||^2``, alternating a projected
  gradient update of c with an Adam step on the poisons followed by projection.
- BP, Bullseye Polytope (Aghakhani et al. 2021): CP with c fixed at 1/k, so the poisons'
  mean feature is pulled onto the target's.

Batching: the I instances of an audit are independent and f is frozen, so all I*k poisons go
through f together, one forward and one backward per iteration (in chunks of
``batch_size`` images where memory is short). Each instance's loss depends only on its own
poisons, the batch loss is the sum of the instance losses, Adam is element-wise and FC's step
size is kept per instance, so a batch gives the same poisons as crafting its instances one at
a time (up to float summation order).

Tensor shapes: targets (I, C, H, W); bases and poisons (I, k, C, H, W), pixels in [0,1];
features (I, k, D); coefficients (I, k).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import torch
from torch import nn

from core.device import autocast

# (iteration done, iterations, mean objective over instances) after every iteration.
StepCallback = Callable[[int, int, float], None]


class FeatureExtractor(Protocol):
    """What the attacks need of a model: ``features(x)`` = f(x), (N, C, H, W) -> (N, D)."""

    def features(self, x: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class CraftResult:
    """The poisons of I instances and how close each instance got to its target.

    ``feature_distance`` is ``||sum_j c_j f(x_p^j) - f(x_t)||`` for the polytope attacks and
    the mean over poisons of ``||f(x_p^j) - f(x_t)||`` for FC (one poison: the same thing);
    ``relative_distance`` divides it by ``||f(x_t)||``. Both are computed in float32 on the
    final poisons. ``objective`` holds the attack's own objective for every instance before
    the first step and after every iteration, shape (iterations + 1, I).
    """

    poisons: torch.Tensor  # (I, k, C, H, W) in [0,1], within delta of the bases
    coefficients: torch.Tensor  # (I, k): convex weights (CP learned, BP 1/k, FC 1/k)
    feature_distance: torch.Tensor  # (I,)
    relative_distance: torch.Tensor  # (I,)
    linf: torch.Tensor  # (I,) max_j ||x_p^j - x_b^j||_inf achieved
    objective: torch.Tensor  # (iterations + 1, I)


@dataclass(frozen=True)
class _Crafted:
    """What an attack's optimization loop hands to the float32 scoring."""

    poisons: torch.Tensor  # (I, k, C, H, W)
    coefficients: torch.Tensor  # (I, k)
    objective: list[torch.Tensor]  # iterations + 1 tensors of shape (I,)
    per_poison_distance: bool  # FC scores each poison alone; the polytopes their mixture


@contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and no parameter gradients inside; every module's mode and flag restored after.

    Eval mode matters for correctness, not only speed: BatchNorm must use its running
    statistics, or one instance's poisons would change another's features.
    """
    modes = [(module, module.training) for module in model.modules()]
    flags = [(param, param.requires_grad) for param in model.parameters()]
    model.eval()
    for param, _ in flags:
        param.requires_grad_(False)
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training
        for param, requires_grad in flags:
            param.requires_grad_(requires_grad)


def budget_box(bases: torch.Tensor, delta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel bounds of the budget: the delta-ball around ``bases`` intersected with [0,1].

    The two boxes intersect coordinate-wise, so clamping to these bounds is the exact
    Euclidean projection onto the feasible set.
    """
    return (bases - delta).clamp_(min=0.0), (bases + delta).clamp_(max=1.0)


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


def _chunks(count: int, per_chunk: int) -> Iterator[slice]:
    for start in range(0, count, per_chunk):
        yield slice(start, min(count, start + per_chunk))


@dataclass(frozen=True)
class _Attack:
    """Settings shared by the three attacks; subclasses implement ``_craft``."""

    name: ClassVar[str]
    delta: float = 25.5 / 255  # l_inf budget around each base, in [0,1] pixel units
    iterations: int = 500  # optimization steps (one forward + backward of all poisons each)
    batch_size: int | None = None  # images per forward/backward; None: all poisons at once
    dtype: torch.dtype = torch.float32  # autocast dtype of the network's forward pass
    channels_last: bool = False  # feed the network channels_last images (faster with oneDNN)

    def __post_init__(self) -> None:
        if not 0.0 <= self.delta <= 1.0:
            raise ValueError(f"delta must lie in [0, 1], got {self.delta}")
        if self.iterations < 1:
            raise ValueError(f"iterations must be at least 1, got {self.iterations}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")

    def __call__(
        self,
        model: nn.Module,
        targets: torch.Tensor,
        bases: torch.Tensor,
        *,
        callback: StepCallback | None = None,
    ) -> CraftResult:
        """Craft poisons from ``bases`` (I, k, C, H, W) against ``targets`` (I, C, H, W).

        ``model`` needs ``features(x)``; it must sit on the device of ``targets``. It is put
        in eval mode with frozen parameters for the call and restored afterwards.
        """
        if targets.dim() != 4 or bases.dim() != 5 or bases.shape[0] != targets.shape[0]:
            raise ValueError(
                f"expected targets (I, C, H, W) and bases (I, k, C, H, W), got "
                f"{tuple(targets.shape)} and {tuple(bases.shape)}"
            )
        if bases.shape[2:] != targets.shape[1:]:
            raise ValueError(f"bases {tuple(bases.shape)} and targets {tuple(targets.shape)}")
        # float32 unless the caller works in float64 (exactness tests run a float64 model).
        work = torch.float64 if bases.dtype == torch.float64 else torch.float32
        targets, bases = targets.to(work), bases.to(work)
        with frozen(model), torch.no_grad():
            target_features = self._features(model, targets)
        with frozen(model):
            crafted = self._craft(model, target_features, bases, callback)
        return self._measure(model, targets, bases, crafted)

    # ---- helpers ---------------------------------------------------------------------------

    def _images_per_chunk(self, k: int) -> int:
        """Instances per forward: whole instances only, at least one."""
        return max(1, (self.batch_size or 1 << 30) // k)

    def _features(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """f(images) for (N, C, H, W) images, in chunks, under the attack's autocast."""
        outputs = []
        for part in _chunks(len(images), self.batch_size or len(images)):
            batch = images[part]
            if self.channels_last:
                batch = batch.contiguous(memory_format=torch.channels_last)
            with autocast(images.device, self.dtype):
                outputs.append(model.features(batch).to(images.dtype))
        return torch.cat(outputs)

    def _poison_features(self, model: nn.Module, poisons: torch.Tensor) -> torch.Tensor:
        """f of poisons (n, k, C, H, W) -> (n, k, D) in their dtype, graph kept if grads are on."""
        n, k = poisons.shape[:2]
        batch = poisons.reshape(n * k, *poisons.shape[2:])
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with autocast(poisons.device, self.dtype):
            features = model.features(batch)
        return features.to(poisons.dtype).view(n, k, -1)

    def _measure(
        self,
        model: nn.Module,
        targets: torch.Tensor,
        bases: torch.Tensor,
        crafted: _Crafted,
    ) -> CraftResult:
        """Score the final poisons in float32 (or float64), whatever autocast crafted them."""
        poisons, coefficients = crafted.poisons, crafted.coefficients
        n, k = poisons.shape[:2]
        per_chunk = self.batch_size or n * k
        flat = poisons.reshape(n * k, *poisons.shape[2:])
        with frozen(model), torch.no_grad():
            target_features = torch.cat(
                [model.features(targets[part]) for part in _chunks(n, per_chunk)]
            )
            features = torch.cat(
                [model.features(flat[part]) for part in _chunks(n * k, per_chunk)]
            ).view(n, k, -1)
        if crafted.per_poison_distance:
            distance = (features - target_features[:, None]).norm(dim=-1).mean(1)
        else:
            mix = torch.einsum("nk,nkd->nd", coefficients, features)
            distance = (mix - target_features).norm(dim=-1)
        return CraftResult(
            poisons=poisons.detach(),
            coefficients=coefficients.detach(),
            feature_distance=distance,
            relative_distance=distance / target_features.norm(dim=-1).clamp_min(1e-12),
            linf=(poisons - bases).abs().flatten(2).amax(-1).amax(-1),
            objective=torch.stack(crafted.objective),
        )

    def _craft(
        self,
        model: nn.Module,
        target_features: torch.Tensor,
        bases: torch.Tensor,
        callback: StepCallback | None,
    ) -> _Crafted:
        raise NotImplementedError


@dataclass(frozen=True)
class FeatureCollision(_Attack):
    """Feature Collision (Shafahi et al. 2018) by forward-backward splitting, per poison.

    Objective of poison x with base x_b and target x_t (the paper's, with a scale-free mu)::

        J(x) = ||f(x) - f(x_t)||^2 / ||f(x_t)||^2 + mu * mean((x - x_b)^2)

    which is ``||f(x) - f(x_t)||^2 + mu' ||x - x_b||^2`` divided by ``||f(x_t)||^2``, with
    ``mu' = mu ||f(x_t)||^2 / (C*H*W)``: stating mu this way lets one default fit every
    extractor, whatever its feature scale. Each iteration takes the forward step
    ``x - lam * grad`` on the feature term, the proximal step of the mu term
    ``(x + 2 lam mu/n x_b) / (1 + 2 lam mu/n)`` and the projection onto the budget. As in
    Poison Frogs' adaptive scheme the step lam is kept per poison: a step that raises J is
    undone and lam shrinks, an accepted one lets lam grow. The first step moves the most-moved
    pixel by ``step``.
    """

    name: ClassVar[str] = "fc"
    step: float = 0.25 * 25.5 / 255  # l_inf size of the first gradient step, in pixels
    mu: float = 0.1  # weight of mean((x - x_b)^2) against the relative feature distance^2
    grow: float = 1.2  # step multiplier after an accepted step
    shrink: float = 0.5  # step multiplier after a rejected step

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.step <= 0 or self.mu < 0 or self.grow < 1 or not 0 < self.shrink < 1:
            raise ValueError(
                f"need step > 0, mu >= 0, grow >= 1 and 0 < shrink < 1; got step={self.step}, "
                f"mu={self.mu}, grow={self.grow}, shrink={self.shrink}"
            )

    def _evaluate(
        self,
        model: nn.Module,
        x: torch.Tensor,
        bases: torch.Tensor,
        target_features: torch.Tensor,
        target_sq: torch.Tensor,
        with_grad: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """J for every poison (n, k) and the gradient of its feature term w.r.t. x."""
        n, k = x.shape[:2]
        objectives, grads = [], []
        for part in _chunks(n, self._images_per_chunk(k)):
            chunk = x[part].detach().requires_grad_(with_grad)
            with torch.set_grad_enabled(with_grad):
                features = self._poison_features(model, chunk)
                collision = (features - target_features[part, None]).square().sum(-1)
                collision = collision / target_sq[part, None]
            if with_grad:
                (grad,) = torch.autograd.grad(collision.sum(), chunk)
                grads.append(grad)
            proximity = (chunk.detach() - bases[part]).square().flatten(2).mean(-1)
            objectives.append(collision.detach() + self.mu * proximity)
        return torch.cat(objectives), torch.cat(grads) if with_grad else None

    def _craft(
        self,
        model: nn.Module,
        target_features: torch.Tensor,
        bases: torch.Tensor,
        callback: StepCallback | None,
    ) -> _Crafted:
        n, k = bases.shape[:2]
        lower, upper = budget_box(bases, self.delta)
        target_sq = target_features.square().sum(-1).clamp_min(1e-12)
        pixels = bases[0, 0].numel()
        view = (n, k, 1, 1, 1)

        x = bases.clone()
        objective, grad = self._evaluate(model, x, bases, target_features, target_sq, True)
        assert grad is not None
        # The first step moves each poison's largest-gradient pixel by `step`.
        lam = self.step / grad.abs().flatten(2).amax(-1).clamp_min(1e-20)
        history = [objective.mean(1)]
        for iteration in range(self.iterations):
            last = iteration == self.iterations - 1
            rate = 2.0 * lam.view(view) * self.mu / pixels
            proposal = (x - lam.view(view) * grad + rate * bases) / (1.0 + rate)
            proposal = torch.clamp(proposal, lower, upper)
            new_objective, new_grad = self._evaluate(
                model, proposal, bases, target_features, target_sq, not last
            )
            accept = new_objective <= objective
            x = torch.where(accept.view(view), proposal, x)
            objective = torch.where(accept, new_objective, objective)
            if new_grad is not None:
                grad = torch.where(accept.view(view), new_grad, grad)
            lam = torch.where(accept, lam * self.grow, lam * self.shrink)
            history.append(objective.mean(1))
            if callback is not None:
                callback(iteration + 1, self.iterations, float(history[-1].mean()))
        coefficients = torch.full((n, k), 1.0 / k, device=x.device, dtype=x.dtype)
        return _Crafted(x, coefficients, history, per_poison_distance=True)


@dataclass(frozen=True)
class ConvexPolytope(_Attack):
    """Convex Polytope (Zhu et al. 2019): the target's feature inside the poisons' hull.

    Minimizes, over the k poisons of an instance and coefficients c on the simplex,
    ``1/2 ||f(x_t) - sum_j c_j f(x_p^j)||^2 / ||f(x_t)||^2``. Each iteration runs one forward
    pass of all poisons, updates c by ``coefficient_steps`` projected-gradient steps of size
    1/L (L the largest eigenvalue of the k x k Gram matrix, as in Zhu et al.'s
    least-squares-on-the-simplex solver, warm-started), then takes an Adam step (``lr``,
    betas 0.9/0.999) on the poisons with c fixed and projects them onto the budget.
    """

    name: ClassVar[str] = "cp"
    learn_coefficients: ClassVar[bool] = True
    lr: float = 0.04  # Adam step on the poisons, in [0,1] pixel units
    betas: tuple[float, float] = field(default=(0.9, 0.999))
    coefficient_steps: int = 10  # projected-gradient steps on c per iteration

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lr <= 0 or self.coefficient_steps < 1:
            raise ValueError(
                f"need lr > 0 and coefficient_steps >= 1; got lr={self.lr}, "
                f"coefficient_steps={self.coefficient_steps}"
            )

    def _update_coefficients(
        self, features: torch.Tensor, target_features: torch.Tensor, c: torch.Tensor
    ) -> torch.Tensor:
        """Warm-started projected gradient on min_c 1/2 ||t - c F||^2 over the simplex.

        Solved in float64: it is k-dimensional, so precision is free.
        """
        F = features.double()
        gram = F @ F.transpose(1, 2)  # (n, k, k)
        correlation = torch.einsum("nkd,nd->nk", F, target_features.double())
        lipschitz = torch.linalg.eigvalsh(gram)[:, -1].clamp_min(1e-30)
        step = (1.0 / lipschitz)[:, None]
        c = c.double()
        for _ in range(self.coefficient_steps):
            gradient = torch.einsum("nij,nj->ni", gram, c) - correlation
            c = project_simplex(c - step * gradient)
        return c.to(features.dtype)

    def _craft(
        self,
        model: nn.Module,
        target_features: torch.Tensor,
        bases: torch.Tensor,
        callback: StepCallback | None,
    ) -> _Crafted:
        n, k = bases.shape[:2]
        lower, upper = budget_box(bases, self.delta)
        target_sq = target_features.square().sum(-1).clamp_min(1e-12)
        beta1, beta2 = self.betas
        x = bases.clone()
        first_moment = torch.zeros_like(x)
        second_moment = torch.zeros_like(x)
        c = torch.full((n, k), 1.0 / k, device=x.device, dtype=x.dtype)
        history = []
        for iteration in range(self.iterations + 1):
            measuring_only = iteration == self.iterations  # the last pass just scores the result
            losses, grads = [], []
            for part in _chunks(n, self._images_per_chunk(k)):
                chunk = x[part].detach().requires_grad_(not measuring_only)
                with torch.set_grad_enabled(not measuring_only):
                    features = self._poison_features(model, chunk)
                    if self.learn_coefficients:
                        c[part] = self._update_coefficients(
                            features.detach(), target_features[part], c[part]
                        )
                    mix = torch.einsum("nk,nkd->nd", c[part], features)
                    loss = 0.5 * (mix - target_features[part]).square().sum(-1) / target_sq[part]
                if not measuring_only:
                    (grad,) = torch.autograd.grad(loss.sum(), chunk)
                    grads.append(grad)
                losses.append(loss.detach())
            history.append(torch.cat(losses))
            if measuring_only:
                break
            grad = torch.cat(grads)
            # Adam, element-wise, so every instance moves as if it were alone.
            step_number = iteration + 1
            first_moment.mul_(beta1).add_(grad, alpha=1 - beta1)
            second_moment.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            corrected_lr = self.lr / (1 - beta1**step_number)
            denominator = (second_moment / (1 - beta2**step_number)).sqrt_().add_(1e-8)
            x = torch.clamp(x - corrected_lr * first_moment / denominator, lower, upper)
            if callback is not None:
                callback(step_number, self.iterations, float(history[-1].mean()))
        return _Crafted(x, c, history, per_poison_distance=False)


@dataclass(frozen=True)
class BullseyePolytope(ConvexPolytope):
    """Bullseye Polytope (Aghakhani et al. 2021): Convex Polytope with c fixed at 1/k.

    The poisons' mean feature is pulled onto the target's feature ("bullseye"), which puts
    the target near the centre of the polytope rather than on its boundary and transfers
    better; the optimizer, budget and objective are otherwise CP's.
    """

    name: ClassVar[str] = "bp"
    learn_coefficients: ClassVar[bool] = False


# Attack name -> class. Construct with keyword settings, call with (model, targets, bases).
ATTACKS: dict[str, type[_Attack]] = {
    "fc": FeatureCollision,
    "cp": ConvexPolytope,
    "bp": BullseyePolytope,
}
