"""The attacks' mechanics on a small ConvNet pre-trained on real data (sklearn's digits).

Budgets hold, objectives fall, the model comes back as it was, and crafting a batch of
instances gives the poisons that crafting them one at a time gives.
"""

from __future__ import annotations

import copy

import pytest
import torch

from catalog.attacks import (
    ATTACKS,
    ConvexPolytopeSettings,
    FeatureCollisionSettings,
    PolytopeSettings,
)
from core.attacks import (
    AttackContext,
    BullseyePolytope,
    ConvexPolytope,
    FeatureCollision,
    attack_class,
    budget_box,
    frozen,
    project_simplex,
)
from core.data import to_float
from core.datasets import load_dataset

DELTA = 25.5 / 255


@pytest.fixture(scope="module")
def instances() -> tuple[torch.Tensor, torch.Tensor]:
    """Three targets (test digits 0, 2, 4) and five bases each (training digits 7, 1, 1)."""
    data = load_dataset("digits")
    x_test, x_train = to_float(data.test_x), to_float(data.train_x)
    targets = torch.stack([x_test[data.test_y == c][i] for c, i in ((0, 0), (2, 1), (4, 2))])
    bases = torch.stack(
        [x_train[data.train_y == c][5 * i : 5 * i + 5] for c, i in ((7, 0), (1, 0), (1, 1))]
    )
    return targets, bases


def _attack(name: str, **budget):
    """The registered implementation of ``name`` with its catalog defaults."""
    return attack_class(name)(settings=ATTACKS.get(name).settings(), **budget)


def _on(targets: torch.Tensor, bases: torch.Tensor) -> AttackContext:
    return AttackContext(targets=targets, bases=bases)


@pytest.mark.parametrize("name", ["fc", "cp", "bp"])
def test_budget_holds_and_objective_falls(name, digits_model, instances):
    targets, bases = instances
    k = 1 if name == "fc" else 5
    result = _attack(name, iterations=30)(digits_model, _on(targets, bases[:, :k]))

    assert result.poisons.shape == bases[:, :k].shape
    assert float((result.poisons - bases[:, :k]).abs().max()) <= DELTA + 1e-6
    assert float(result.poisons.min()) >= 0.0 and float(result.poisons.max()) <= 1.0
    assert torch.allclose(result.linf, (result.poisons - bases[:, :k]).abs().flatten(1).amax(1))
    assert result.objective.shape == (31, 3)
    # Every instance ends clearly closer to its target than its bases started.
    assert bool((result.objective[-1] < 0.9 * result.objective[0]).all())
    coefficients = result.coefficients
    assert torch.allclose(coefficients.sum(1), torch.ones(3)) and bool((coefficients >= 0).all())
    if name == "fc":
        # Forward-backward splitting with backtracking never accepts a worse iterate.
        assert bool((result.objective[1:] <= result.objective[:-1] + 1e-7).all())


@pytest.mark.parametrize("name", ["fc", "cp", "bp"])
def test_zero_budget_leaves_the_bases(name, digits_model, instances):
    targets, bases = instances
    k = 1 if name == "fc" else 5
    result = _attack(name, delta=0.0, iterations=5)(digits_model, _on(targets, bases[:, :k]))
    assert torch.equal(result.poisons, bases[:, :k])
    assert float(result.linf.max()) == 0.0


@pytest.mark.parametrize("name", ["fc", "cp", "bp"])
def test_batched_equals_one_at_a_time(name, digits_model, instances):
    """In float64 the batch and the single instances agree to rounding; chunks too."""
    targets, bases = instances
    k = 1 if name == "fc" else 5
    model = copy.deepcopy(digits_model).double()
    targets, bases = targets.double(), bases[:, :k].double()
    attack = _attack(name, iterations=25)
    batched = attack(model, _on(targets, bases))
    chunked = _attack(name, iterations=25, batch_size=k)(model, _on(targets, bases))
    for i in range(len(targets)):
        alone = attack(model, _on(targets[i : i + 1], bases[i : i + 1]))
        torch.testing.assert_close(alone.poisons[0], batched.poisons[i], atol=1e-9, rtol=0)
        torch.testing.assert_close(alone.coefficients[0], batched.coefficients[i])
        torch.testing.assert_close(alone.objective[:, 0], batched.objective[:, i])
    torch.testing.assert_close(chunked.poisons, batched.poisons, atol=1e-9, rtol=0)


def test_batched_equals_one_at_a_time_in_float32(digits_model, instances):
    """The production precision: the same poisons up to float32 summation order."""
    targets, bases = instances
    attack = BullseyePolytope(iterations=25)
    batched = attack(digits_model, _on(targets, bases))
    for i in range(len(targets)):
        alone = attack(digits_model, _on(targets[i : i + 1], bases[i : i + 1]))
        torch.testing.assert_close(alone.poisons[0], batched.poisons[i], atol=1e-4, rtol=0)


def test_model_is_frozen_inside_and_restored_after(digits_model, instances):
    targets, bases = instances
    model = copy.deepcopy(digits_model)
    model.train()
    model.body[1].eval()  # a mixed state must come back exactly
    model.head.weight.requires_grad_(False)
    modes_before = [m.training for m in model.modules()]
    flags_before = [p.requires_grad for p in model.parameters()]
    running_mean = model.body[1].running_mean.clone()
    seen = []

    def record(module, inputs, output):
        seen.append((module.training, any(p.requires_grad for p in model.parameters())))

    handle = model.body.register_forward_hook(record)
    FeatureCollision(iterations=3)(model, _on(targets, bases[:, :1]))
    handle.remove()

    assert seen and all(not training and not grads for training, grads in seen)
    assert [m.training for m in model.modules()] == modes_before
    assert [p.requires_grad for p in model.parameters()] == flags_before
    # Eval mode means BatchNorm's running statistics were never updated.
    assert torch.equal(model.body[1].running_mean, running_mean)


def test_convex_polytope_learns_coefficients_and_bullseye_keeps_them(digits_model, instances):
    targets, bases = instances
    cp = ConvexPolytope(iterations=20)(digits_model, _on(targets, bases))
    bp = BullseyePolytope(iterations=20)(digits_model, _on(targets, bases))
    assert torch.allclose(bp.coefficients, torch.full((3, 5), 0.2))
    assert not torch.allclose(cp.coefficients, torch.full((3, 5), 0.2))
    assert torch.allclose(cp.coefficients.sum(1), torch.ones(3), atol=1e-6)


def test_project_simplex():
    v = torch.tensor([[0.2, 0.3, 0.5], [2.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.9, 0.8, -3.0]])
    expected = torch.tensor(
        [[0.2, 0.3, 0.5], [1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3], [0.55, 0.45, 0.0]]
    )
    torch.testing.assert_close(project_simplex(v), expected)
    # The projection is the closest simplex point: no random simplex point is closer.
    generator = torch.Generator().manual_seed(0)
    point = torch.randn(6, generator=generator)
    projected = project_simplex(point)
    others = torch.distributions.Dirichlet(torch.ones(6)).sample((2000,))
    assert float((point - projected).norm()) <= float((point - others).norm(dim=1).min())


def test_budget_box_is_the_exact_projection():
    bases = torch.tensor([0.0, 0.05, 0.5, 0.97, 1.0])
    lower, upper = budget_box(bases, 0.1)
    torch.testing.assert_close(lower, torch.tensor([0.0, 0.0, 0.4, 0.87, 0.9]))
    torch.testing.assert_close(upper, torch.tensor([0.1, 0.15, 0.6, 1.0, 1.0]))


def test_frozen_restores_on_error(digits_model):
    model = copy.deepcopy(digits_model).train()
    with pytest.raises(RuntimeError), frozen(model):
        raise RuntimeError("stop")
    assert model.training and all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize(
    ("cls", "budget"),
    [
        (FeatureCollision, {"delta": -0.1}),
        (FeatureCollision, {"iterations": 0}),
        (BullseyePolytope, {"batch_size": 0}),
    ],
)
def test_bad_budgets_are_refused(cls, budget):
    with pytest.raises(ValueError):
        cls(**budget)


@pytest.mark.parametrize(
    ("model", "settings"),
    [
        (FeatureCollisionSettings, {"mu": -1.0}),
        (FeatureCollisionSettings, {"step": 0.0}),
        (ConvexPolytopeSettings, {"coefficient_steps": 0}),
        (PolytopeSettings, {"lr": 0.0}),
        (PolytopeSettings, {"poisons": 0}),
    ],
)
def test_bad_settings_are_refused_by_the_catalog_model(model, settings):
    with pytest.raises(ValueError):
        model(**settings)


def test_an_attack_takes_only_its_own_settings_model():
    with pytest.raises(TypeError, match="FeatureCollisionSettings"):
        FeatureCollision(settings=PolytopeSettings())


def test_mismatched_shapes_are_refused(digits_model, instances):
    targets, bases = instances
    with pytest.raises(ValueError, match="expected targets"):
        AttackContext(targets=targets[:2], bases=bases)
