"""What every poisoning attack shares: the context it crafts in, its result, the budget.

Threat model (the paper's white-box transfer setting, after Zhu et al. 2019): the attacker knows
the frozen extractor f (the network up to its pooled penultimate layer) that the victim will
re-train a linear head on. For one target image x_t of the target class it perturbs k base
images x_b of the poison class into poisons x_p, labelled (correctly) with the poison class, so
that the re-trained head puts x_t in the poison class. Every poison stays inside
``||x_p - x_b||_inf <= delta`` and the pixel box [0,1]; pixels are in [0,1] because the model
normalizes inside itself, so ``delta`` is in pixel units (25.5/255 in the paper).

Batching: the I instances of an audit are independent and f is frozen, so all I*k poisons go
through f together, one forward and one backward per iteration (in chunks of ``batch_size``
images where memory is short). Each instance's loss depends only on its own poisons, the batch
loss is the sum of the instance losses and every update is element-wise, so a batch gives the
same poisons as crafting its instances one at a time (up to float summation order).

Multi-draw crafting (``Attack.draws`` > 1, off by default; after Bullseye Polytope's
"net-repeat" and expectation over transformation): the poisons' features are the mean of
f(T_j(x_p)) over ``draws`` transformations T_j, each the victim's training augmentation (a
random crop of the zero-padded image, :func:`core.data.shift_and_flip`, and a mirror where
the dataset allows it) with the network's dropout modules drawing a mask. So the poisons keep
working for a victim who augments (or keeps dropout on) while re-training. A draw applies ONE
transformation to every image of a call, drawn from (``draw_seed``, iteration, draw), so a
batch still equals its instances crafted one at a time.

Tensor shapes: targets (I, C, H, W); bases and poisons (I, k, C, H, W), pixels in [0,1];
features (I, k, D); coefficients (I, k).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar, Protocol, cast

import torch
from torch import nn

from catalog.attacks import ATTACKS, AttackSettings
from core.data import augment_padding, shift_and_flip
from core.device import autocast

# (iteration done, iterations, mean objective over instances) after every iteration.
StepCallback = Callable[[int, int, float], None]


@dataclass(frozen=True)
class EarlyStop:
    """Stop crafting the instances whose poisons already succeed.

    Every ``every`` iterations the attack calls ``succeeded(indices, poisons)`` with the
    indices (into the batch) of the instances still being crafted and their current poisons
    (m, k, C, H, W); an instance it returns True for keeps those poisons and takes no more
    forward or backward passes. The attacker of the threat model would stop there too: the
    poisons already do what they were made for.
    """

    every: int
    succeeded: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"every must be at least 1, got {self.every}")


class ActiveRows:
    """The instances an attack still crafts: all of them (``rows`` None, the plain batched
    path, untouched) or, under an :class:`EarlyStop`, the index tensor of those left."""

    def __init__(
        self,
        count: int,
        early_stop: EarlyStop | None,
        device: torch.device,
        draws: int = 1,
    ) -> None:
        self.count, self.early_stop, self.draws = count, early_stop, draws
        self.rows: torch.Tensor | None = None
        self._all = torch.arange(count, device=device)
        # Poison forward-backward passes (instances x poisons x draws x iterations).
        self.work = 0

    @property
    def indices(self) -> torch.Tensor:
        return self._all if self.rows is None else self.rows

    @property
    def done(self) -> bool:
        return self.rows is not None and len(self.rows) == 0

    def count_step(self, poisons_per_instance: int) -> None:
        self.work += len(self.indices) * poisons_per_instance * self.draws

    def check(self, iteration: int, poisons: torch.Tensor) -> bool:
        """After ``iteration`` iterations: drop the instances that succeed; True if any was."""
        stop = self.early_stop
        if stop is None or iteration % stop.every or len(self.indices) == 0:
            return False
        left = self.indices
        succeeded = stop.succeeded(left, poisons[left].detach()).to(left.device)
        if not bool(succeeded.any()):
            return False
        self.rows = left[~succeeded]
        return True


class FeatureExtractor(Protocol):
    """What the attacks need of a model: ``features(x)`` = f(x), (N, C, H, W) -> (N, D)."""

    def features(self, x: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class AttackContext:
    """Everything an attack may use about the instances it crafts poisons for.

    The feature-space attacks (FC, CP, BP) need only targets and bases; an attack that works
    on the victim's training loss (gradient matching) also needs the labels, the head the
    victim starts from and the clean re-training features. Every tensor is on the device the
    crafting runs on; pixels are in [0,1].
    """

    targets: torch.Tensor  # (I, C, H, W)
    bases: torch.Tensor  # (I, k, C, H, W)
    target_classes: torch.Tensor | None = None  # (I,)
    poison_classes: torch.Tensor | None = None  # (I,) the label every poison carries
    head_weight: torch.Tensor | None = None  # (classes, D): the head re-training starts from
    head_bias: torch.Tensor | None = None  # (classes,)
    clean_features: torch.Tensor | None = None  # (N, D): the clean re-training set's f(x)
    clean_labels: torch.Tensor | None = None  # (N,)

    def __post_init__(self) -> None:
        targets, bases = self.targets, self.bases
        if targets.dim() != 4 or bases.dim() != 5 or bases.shape[0] != targets.shape[0]:
            raise ValueError(
                f"expected targets (I, C, H, W) and bases (I, k, C, H, W), got "
                f"{tuple(targets.shape)} and {tuple(bases.shape)}"
            )
        if bases.shape[2:] != targets.shape[1:]:
            raise ValueError(f"bases {tuple(bases.shape)} and targets {tuple(targets.shape)}")

    def require(self, *names: str) -> None:
        """Raise a clear error when an attack needs context this caller did not give."""
        missing = [name for name in names if getattr(self, name) is None]
        if missing:
            raise ValueError(f"this attack needs {missing} in its AttackContext")


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
    # Poison forward-backward passes the crafting took (instances x poisons x draws x
    # iterations, less what an EarlyStop saved): the measure of crafting work.
    work: int = 0


@dataclass(frozen=True)
class Crafted:
    """What an attack's optimization loop hands to the float32 scoring."""

    poisons: torch.Tensor  # (I, k, C, H, W)
    coefficients: torch.Tensor  # (I, k)
    objective: list[torch.Tensor]  # iterations + 1 tensors of shape (I,)
    per_poison_distance: bool  # FC scores each poison alone; the polytopes their mixture
    work: int = 0  # poison forward-backward passes taken


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


def _features_of(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The model's f(x) (any module with a ``features`` method, see :class:`FeatureExtractor`)."""
    return cast(FeatureExtractor, model).features


def _draw_seed(seed: int, iteration: int, draw: int) -> int:
    """A 63-bit generator seed for one draw of one crafting iteration (a hash, so that nearby
    (seed, iteration, draw) triples give unrelated streams)."""
    digest = hashlib.sha256(f"{seed}:{iteration}:{draw}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _one_view(batch: torch.Tensor, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """``batch`` (N, C, H, W) under one random crop shift (and mirror, if ``flip``) shared by
    every image: the victim's augmentation (``core.data.augment``), drawn once per call so
    that an image's view does not depend on the others in its batch. ``generator`` is a CPU
    generator, so a seed gives the same view on every device."""
    pad = augment_padding(batch.shape[2])
    shift = torch.randint(-pad, pad + 1, (2,), generator=generator).to(batch.device)
    count = len(batch)
    mirror = None
    if flip:
        mirror = (torch.rand(1, generator=generator) < 0.5).to(batch.device).expand(count)
    return shift_and_flip(batch, shift[0].expand(count), shift[1].expand(count), mirror)


# The dropout layers a draw samples a mask for. AlphaDropout and FeatureAlphaDropout are left
# out: their noise is not a scaled mask.
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)


@contextmanager
def _dropout_masks(model: nn.Module, generator: torch.Generator) -> Iterator[None]:
    """Inside, every dropout module of ``model`` (in eval mode, so itself the identity)
    multiplies its output by one mask drawn from ``generator`` for the call, shared by every
    image of the batch: dropout as in training, but an image's mask does not depend on the
    rest of its batch (train-mode dropout draws per element from the global generator, which
    would break both the seed and batch == one at a time). Element-wise for ``nn.Dropout``,
    per channel for ``Dropout1d/2d/3d``, scaled by 1 / (1 - p) as in training."""

    def hook(module: nn.Module, _: object, output: torch.Tensor) -> torch.Tensor:
        assert isinstance(module, _DROPOUTS)
        p = float(module.p)
        if p <= 0.0:
            return output
        shape = list(output.shape[1:])
        if not isinstance(module, nn.Dropout):  # a mask per channel
            shape = shape[:1] + [1] * (len(shape) - 1)
        keep = torch.rand(shape, generator=generator, dtype=torch.float64) >= p
        scale = keep.to(torch.float64) / (1.0 - p) if p < 1.0 else keep.to(torch.float64)
        return output * scale.to(device=output.device, dtype=output.dtype)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, _DROPOUTS)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def budget_box(bases: torch.Tensor, delta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel bounds of the budget: the delta-ball around ``bases`` intersected with [0,1].

    The two boxes intersect coordinate-wise, so clamping to these bounds is the exact
    Euclidean projection onto the feasible set.
    """
    return (bases - delta).clamp_(min=0.0), (bases + delta).clamp_(max=1.0)


def chunks(count: int, per_chunk: int) -> Iterator[slice]:
    for start in range(0, count, per_chunk):
        yield slice(start, min(count, start + per_chunk))


@dataclass(frozen=True)
class Attack:
    """Settings shared by every attack; a subclass implements :meth:`craft`.

    Construct with the attack's catalog settings (``catalog.attacks``; ``poisons`` there is
    the number of bases the caller puts in the context) and the audit-wide budget, and call
    with ``(model, context)``.
    """

    name: ClassVar[str]  # the attack's catalog entry
    # Whether the attack pulls poisons towards the target in feature space, so that an
    # instance whose poisons end far from it was not reached (the report's reach flag).
    feature_space: ClassVar[bool] = True
    settings: AttackSettings | None = None  # None: the catalog settings model's defaults
    delta: float = 25.5 / 255  # l_inf budget around each base, in [0,1] pixel units
    iterations: int = 500  # optimization steps (one forward + backward of all poisons each)
    batch_size: int | None = None  # images per forward/backward; None: all poisons at once
    dtype: torch.dtype = torch.float32  # autocast dtype of the network's forward pass
    channels_last: bool = False  # feed the network channels_last images (faster with oneDNN)
    # Multi-draw crafting (module docstring): extractor views averaged per crafting iteration;
    # 1 is the plain attack, k times the crafting work for k.
    draws: int = 1
    draw_flip: bool = True  # whether a draw may mirror the images (the dataset's ``flip``)
    draw_seed: int = 0  # seeds every draw's transformation, with the iteration and the draw

    def __post_init__(self) -> None:
        model = ATTACKS.get(self.name).settings
        if self.settings is None:
            object.__setattr__(self, "settings", model())
        elif not isinstance(self.settings, model):
            raise TypeError(f"{self.name} takes {model.__name__}, got {type(self.settings)}")
        if not 0.0 <= self.delta <= 1.0:
            raise ValueError(f"delta must lie in [0, 1], got {self.delta}")
        if self.iterations < 1:
            raise ValueError(f"iterations must be at least 1, got {self.iterations}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.draws < 1:
            raise ValueError(f"draws must be at least 1, got {self.draws}")

    def __call__(
        self,
        model: nn.Module,
        context: AttackContext,
        *,
        callback: StepCallback | None = None,
        early_stop: EarlyStop | None = None,
    ) -> CraftResult:
        """Craft poisons from ``context.bases`` against ``context.targets``.

        ``model`` needs ``features(x)``; it must sit on the device of the context's tensors.
        It is put in eval mode with frozen parameters for the call and restored afterwards.
        ``early_stop`` stops crafting instances whose poisons already succeed.
        """
        # float32 unless the caller works in float64 (exactness tests run a float64 model).
        work = torch.float64 if context.bases.dtype == torch.float64 else torch.float32
        targets, bases = context.targets.to(work), context.bases.to(work)
        with frozen(model), torch.no_grad():
            target_features = self.features(model, targets)
        active = ActiveRows(len(bases), early_stop, bases.device, self.draws)
        with frozen(model):
            crafted = self.craft(model, context, target_features, bases, callback, active)
        return self._measure(model, targets, bases, crafted)

    def craft(
        self,
        model: nn.Module,
        context: AttackContext,
        target_features: torch.Tensor,
        bases: torch.Tensor,
        callback: StepCallback | None,
        active: ActiveRows,
    ) -> Crafted:
        """The attack's optimization: poisons from ``bases`` (in the working dtype).

        ``active`` holds the instances still crafted: an attack crafts only those, counts its
        work there, and calls ``active.check`` after each iteration."""
        raise NotImplementedError

    # ---- helpers for subclasses ------------------------------------------------------------

    def images_per_chunk(self, k: int) -> int:
        """Instances per forward: whole instances only, at least one. Every draw keeps its
        own graph until the backward, so ``batch_size`` counts each image once per draw."""
        return max(1, (self.batch_size or 1 << 30) // (k * self.draws))

    def features(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """f(images) for (N, C, H, W) images, in chunks, under the attack's autocast."""
        outputs = []
        for part in chunks(len(images), self.batch_size or len(images)):
            batch = images[part]
            if self.channels_last:
                batch = batch.contiguous(memory_format=torch.channels_last)
            with autocast(images.device, self.dtype):
                outputs.append(_features_of(model)(batch).to(images.dtype))
        return torch.cat(outputs)

    def poison_features(
        self, model: nn.Module, poisons: torch.Tensor, iteration: int
    ) -> torch.Tensor:
        """f of poisons (n, k, C, H, W) -> (n, k, D) in their dtype, graph kept if grads are on.

        ``iteration`` numbers the crafting step (every call of one step passes the same, each
        step its own): with ``draws`` > 1 it seeds the step's transformations, and the result
        is the mean of f over them (the module docstring); with 1 it is unused.
        """
        n, k = poisons.shape[:2]
        batch = poisons.reshape(n * k, *poisons.shape[2:])
        if self.draws == 1:
            if self.channels_last:
                batch = batch.contiguous(memory_format=torch.channels_last)
            with autocast(poisons.device, self.dtype):
                features = _features_of(model)(batch)
            return features.to(poisons.dtype).view(n, k, -1)
        total: torch.Tensor | None = None
        for draw in range(self.draws):
            generator = torch.Generator().manual_seed(_draw_seed(self.draw_seed, iteration, draw))
            view = _one_view(batch, self.draw_flip, generator)
            if self.channels_last:
                view = view.contiguous(memory_format=torch.channels_last)
            with _dropout_masks(model, generator), autocast(poisons.device, self.dtype):
                features = _features_of(model)(view).to(poisons.dtype)
            total = features if total is None else total + features
        assert total is not None
        return (total / self.draws).view(n, k, -1)

    def _measure(
        self,
        model: nn.Module,
        targets: torch.Tensor,
        bases: torch.Tensor,
        crafted: Crafted,
    ) -> CraftResult:
        """Score the final poisons in float32 (or float64), whatever autocast crafted them."""
        poisons, coefficients = crafted.poisons, crafted.coefficients
        n, k = poisons.shape[:2]
        per_chunk = self.batch_size or n * k
        flat = poisons.reshape(n * k, *poisons.shape[2:])
        with frozen(model), torch.no_grad():
            target_features = torch.cat(
                [_features_of(model)(targets[part]) for part in chunks(n, per_chunk)]
            )
            features = torch.cat(
                [_features_of(model)(flat[part]) for part in chunks(n * k, per_chunk)]
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
            work=crafted.work,
        )
