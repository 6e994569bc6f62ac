"""PC-Loss, PGD and the defense losses, on tiny hand-checkable cases and a small model."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F

from core.losses import DefenseLoss, feature_distance, pc_loss, pgd


def test_pc_loss_equals_hand_computed_value() -> None:
    # Two 2-D features, three centroids; every distance is a 3-4-5 triangle or an axis length.
    features = torch.tensor([[0.0, 0.0], [3.0, 0.0]])
    labels = torch.tensor([0, 1])
    centroids = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 4.0]])
    # Example 0 (y=0): own 0; others ||f-w1|| = 5, ||f-w2|| = 4; ||w0-w1|| = 5, ||w0-w2|| = 4
    #   -> 0 - (5 + 4 + 5 + 4) / 2 = -9
    # Example 1 (y=1): own 4; others ||f-w0|| = 3, ||f-w2|| = 5; ||w1-w0|| = 5, ||w1-w2|| = 3
    #   -> 4 - (3 + 5 + 5 + 3) / 2 = -4
    expected = (-9.0 + -4.0) / 2
    assert pc_loss(features, labels, centroids).item() == pytest.approx(expected, abs=1e-5)


def test_pc_loss_gradient_is_finite_at_a_centroid() -> None:
    centroids = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    features = torch.tensor([[1.0, 2.0]], requires_grad=True)  # exactly on its centroid
    pc_loss(features, torch.tensor([0]), centroids).backward()
    assert torch.isfinite(features.grad).all() and torch.isfinite(centroids.grad).all()


def test_feature_distance_is_the_euclidean_norm_per_row() -> None:
    a = torch.tensor([[3.0, 4.0], [1.0, 1.0]])
    b = torch.zeros(2, 2)
    assert torch.allclose(feature_distance(a, b), torch.tensor([5.0, 2.0**0.5]))


@pytest.fixture(scope="module")
def small_model_and_batch(digits_extractor) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    from core.data import to_float
    from core.datasets import load_dataset

    data = load_dataset("digits")
    model = digits_extractor("none").model
    return model.eval(), to_float(data.test_x[:64]), data.test_y[:64]


@pytest.mark.parametrize("feature_term", [False, True])
def test_pgd_stays_in_budget_and_raises_the_loss(small_model_and_batch, feature_term) -> None:
    model, x, y = small_model_and_batch
    epsilon = 8 / 255
    generator = torch.Generator().manual_seed(0)
    x_adv = pgd(
        model,
        x,
        y,
        epsilon=epsilon,
        steps=10,
        step_size=2 / 255,
        random_start=True,
        feature_term=feature_term,
        generator=generator,
    )
    assert (x_adv - x).abs().max() <= epsilon + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        clean, adversarial = F.cross_entropy(model(x), y), F.cross_entropy(model(x_adv), y)
    assert adversarial > clean + 0.1


def test_pgd_restores_training_mode_and_leaves_no_parameter_gradients(
    small_model_and_batch,
) -> None:
    model, x, y = small_model_and_batch
    model.train()
    pgd(model, x, y, epsilon=0.03, steps=2, step_size=0.01)
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    model.eval()


def test_at_pcl_loss_is_equation_8(small_model_and_batch) -> None:
    model, x, y = small_model_and_batch
    torch.manual_seed(1)
    criterion = DefenseLoss(
        "at-pcl",
        num_classes=10,
        feature_dim=model.feature_dim,
        alpha=0.3,
        epsilon=4 / 255,
        pgd_steps=3,
        pgd_step_size=1 / 255,
        random_start=True,
        feature_term=True,
    )

    def seeded() -> torch.Generator:  # the same PGD random start for every call
        return torch.Generator().manual_seed(5)

    got = criterion(model, x, y, joint=True, generator=seeded(), autocast=nullcontext()).loss
    x_adv = pgd(
        model,
        x,
        y,
        epsilon=4 / 255,
        steps=3,
        step_size=1 / 255,
        feature_term=True,
        generator=seeded(),
    )
    f_adv, f_clean = model.features(x_adv), model.features(x)
    at_loss = F.cross_entropy(model.head(f_adv), y) + feature_distance(f_adv, f_clean).mean()
    expected = 0.7 * at_loss + 0.3 * pc_loss(f_clean, y, criterion.centroids)
    assert got.item() == pytest.approx(expected.item(), rel=1e-4)
    warm = criterion(model, x, y, joint=False, generator=seeded(), autocast=nullcontext()).loss
    assert warm.item() == pytest.approx(at_loss.item(), rel=1e-4)
