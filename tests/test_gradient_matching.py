"""Gradient Matching in the transfer setting: the objective is the cosine between head
gradients (checked against autograd), the budget holds, the match improves, and a batch
equals its instances crafted one at a time."""

from __future__ import annotations

import copy

import pytest
import torch

from catalog.attacks import GradientMatchingSettings
from core.attacks import AttackContext, EarlyStop, GradientMatching, match_loss

DELTA = 25.5 / 255


@pytest.fixture(scope="module")
def context(digits_attack_context: AttackContext) -> AttackContext:
    return digits_attack_context


def _slice(context: AttackContext, i: int, dtype: torch.dtype) -> AttackContext:
    return AttackContext(
        targets=context.targets[i : i + 1].to(dtype),
        bases=context.bases[i : i + 1].to(dtype),
        poison_classes=context.poison_classes[i : i + 1],
        head_weight=context.head_weight.to(dtype),
        head_bias=context.head_bias.to(dtype),
    )


def test_match_loss_is_one_minus_the_cosine_of_the_head_gradients():
    generator = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(6, 4).double()
    poisons = torch.randn(2, 3, 6, generator=generator, dtype=torch.float64)
    targets = torch.randn(2, 6, generator=generator, dtype=torch.float64)
    labels = torch.tensor([1, 3])
    loss = match_loss(poisons, targets, labels, head.weight.detach(), head.bias.detach())
    for i in range(2):
        head.zero_grad()
        torch.nn.functional.cross_entropy(
            head(poisons[i]), labels[i].repeat(3), reduction="sum"
        ).backward()
        poison_grad = torch.cat([head.weight.grad.flatten(), head.bias.grad]).clone()
        head.zero_grad()
        torch.nn.functional.cross_entropy(head(targets[i : i + 1]), labels[i : i + 1]).backward()
        target_grad = torch.cat([head.weight.grad.flatten(), head.bias.grad])
        cosine = torch.nn.functional.cosine_similarity(poison_grad, target_grad, dim=0)
        torch.testing.assert_close(loss[i], 1 - cosine)


def test_budget_holds_and_the_match_improves(digits_model, context):
    attack = GradientMatching(settings=GradientMatchingSettings(poisons=3), iterations=40)
    result = attack(digits_model, context)
    assert float((result.poisons - context.bases).abs().max()) <= DELTA + 1e-6
    assert float(result.poisons.min()) >= 0.0 and float(result.poisons.max()) <= 1.0
    # two restarts of 40 steps, each with a final scoring pass
    assert result.objective.shape == (2 * 41, 3)
    first = result.objective[0]
    best = result.objective.min(0).values
    assert bool((best < first - 0.05).all()), (first, best)
    assert result.work == 3 * 3 * 2 * 41


def test_zero_budget_leaves_the_bases(digits_model, context):
    attack = GradientMatching(settings=GradientMatchingSettings(poisons=3), delta=0.0, iterations=3)
    assert torch.equal(attack(digits_model, context).poisons, context.bases)


def test_batched_equals_one_at_a_time(digits_model, context):
    """Random starts come from each instance's own bases, so any batch gives the same."""
    model = copy.deepcopy(digits_model).double()
    attack = GradientMatching(settings=GradientMatchingSettings(poisons=3), iterations=15)
    batched = attack(model, _slice_all(context, torch.float64))
    chunked = GradientMatching(
        settings=GradientMatchingSettings(poisons=3), iterations=15, batch_size=3
    )(model, _slice_all(context, torch.float64))
    for i in range(3):
        alone = attack(model, _slice(context, i, torch.float64))
        torch.testing.assert_close(alone.poisons[0], batched.poisons[i], atol=1e-9, rtol=0)
        torch.testing.assert_close(alone.objective[:, 0], batched.objective[:, i])
    torch.testing.assert_close(chunked.poisons, batched.poisons, atol=1e-9, rtol=0)


def _slice_all(context: AttackContext, dtype: torch.dtype) -> AttackContext:
    return AttackContext(
        targets=context.targets.to(dtype),
        bases=context.bases.to(dtype),
        poison_classes=context.poison_classes,
        head_weight=context.head_weight.to(dtype),
        head_bias=context.head_bias.to(dtype),
    )


def test_an_instance_that_succeeds_stops_and_skips_its_other_restarts(digits_model, context):
    attack = GradientMatching(settings=GradientMatchingSettings(poisons=3), iterations=10)
    seen = []

    def second_succeeds(indices: torch.Tensor, poisons: torch.Tensor) -> torch.Tensor:
        seen.append(indices.tolist())
        return indices == 1

    stopped = attack(digits_model, context, early_stop=EarlyStop(4, second_succeeds))
    full = attack(digits_model, context)
    assert seen[:2] == [[0, 1, 2], [0, 2]]
    # instance 1 took the passes of 4 steps of its first restart, of the 2 x 11 planned
    assert stopped.work == full.work - 3 * (2 * 11 - 4)
    torch.testing.assert_close(stopped.poisons[[0, 2]], full.poisons[[0, 2]])


def test_it_needs_the_head_and_the_labels(digits_model, context):
    bare = AttackContext(targets=context.targets, bases=context.bases)
    with pytest.raises(ValueError, match="poison_classes"):
        GradientMatching(iterations=2)(digits_model, bare)
