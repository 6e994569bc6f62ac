"""Multi-draw crafting and the augmenting victim (issue 12).

``draws`` > 1 averages the poisons' features over random crops, mirrors and dropout masks of
the extractor; one draw is the plain attack, bit for bit. The shift/flip helper is checked
against a hand-built crop, the draws against every transformation the crop allows, and the
batch against its instances crafted one at a time (float64, as tests/test_attacks.py).
``victim_augment`` re-trains the victim on one seeded view of each poison and the baseline on
the same view of each base.
"""

from __future__ import annotations

import copy
import itertools
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from pydantic import ValidationError

from api.errors import InvalidFieldError
from api.ratelimit import check_audit_size
from catalog.attacks import ATTACKS
from core.attacks import AttackContext, BullseyePolytope, attack_class
from core.audit import Instance, run_audit, victim_views
from core.checkpoint import save_extractor
from core.config import AuditConfig
from core.data import augment, augment_padding, shift_and_flip
from core.datasets import load_dataset

DELTA = 25.5 / 255


@pytest.fixture(scope="module")
def context(digits_attack_context: AttackContext) -> AttackContext:
    return digits_attack_context


def _attack(name: str, k: int, **fields):
    settings = ATTACKS.get(name).settings(poisons=k)
    return attack_class(name)(settings=settings, **fields)


def _poisons(name: str) -> int:
    return 1 if name == "fc" else 3


def _slice(context: AttackContext, rows: slice, k: int, dtype: torch.dtype) -> AttackContext:
    assert context.poison_classes is not None and context.head_weight is not None
    assert context.head_bias is not None
    return AttackContext(
        targets=context.targets[rows].to(dtype),
        bases=context.bases[rows, :k].to(dtype),
        poison_classes=context.poison_classes[rows],
        head_weight=context.head_weight.to(dtype),
        head_bias=context.head_bias.to(dtype),
    )


class Flat(torch.nn.Module):
    """f(x) = x flattened, optionally through dropout: lets a test read the views off f."""

    def __init__(self, dropout: torch.nn.Module | None = None) -> None:
        super().__init__()
        self.dropout = dropout or torch.nn.Identity()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(x).flatten(1)


# ---- the shift/flip helper -------------------------------------------------------------------


def _shifted_by_hand(x: torch.Tensor, dy: int, dx: int, mirror: bool) -> torch.Tensor:
    """out[c, i, j] = x[c, i + dy, j + dx], 0 outside; then mirrored along the width."""
    channels, h, w = x.shape
    out = torch.zeros_like(x)
    for c, i, j in itertools.product(range(channels), range(h), range(w)):
        if 0 <= i + dy < h and 0 <= j + dx < w:
            out[c, i, j] = x[c, i + dy, j + dx]
    return out.flip(2) if mirror else out


def test_shift_and_flip_is_the_hand_built_crop():
    x = torch.arange(2 * 2 * 8 * 8, dtype=torch.float32).view(2, 2, 8, 8) + 1
    dy, dx, mirror = torch.tensor([1, -1]), torch.tensor([-1, 0]), torch.tensor([False, True])
    out = shift_and_flip(x, dy, dx, mirror)
    for n in range(2):
        expected = _shifted_by_hand(x[n], int(dy[n]), int(dx[n]), bool(mirror[n]))
        assert torch.equal(out[n], expected)
    assert torch.equal(shift_and_flip(x, torch.zeros(2, dtype=torch.long), dy * 0, None), x)
    assert augment_padding(8) == 1 and augment_padding(28) == 3 and augment_padding(64) == 4


@pytest.mark.parametrize("flip", [True, False])
def test_augment_is_the_helper_with_random_shifts(flip):
    """augment draws (dy, dx, mirror) in that order from its generator and applies the helper."""
    x = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    out = augment(x, flip=flip, generator=torch.Generator().manual_seed(5))
    generator, pad = torch.Generator().manual_seed(5), augment_padding(16)
    dy = torch.randint(0, 2 * pad + 1, (6,), generator=generator) - pad
    dx = torch.randint(0, 2 * pad + 1, (6,), generator=generator) - pad
    mirror = torch.rand(6, generator=generator) < 0.5 if flip else torch.zeros(6, dtype=torch.bool)
    for n in range(6):
        expected = _shifted_by_hand(x[n], int(dy[n]), int(dx[n]), bool(mirror[n]))
        assert torch.equal(out[n], expected)


# ---- the draws -------------------------------------------------------------------------------


@pytest.mark.parametrize("flip", [True, False])
def test_a_draw_is_one_crop_of_every_image_and_the_features_their_mean(flip):
    """With f the identity, each image's features are the mean of two transformations the
    crop allows (mirrors only where ``flip``), the same two for every image of the call."""
    images = torch.rand(4, 1, 1, 8, 8, generator=torch.Generator().manual_seed(2)).double()
    attack = BullseyePolytope(draws=2, draw_flip=flip, draw_seed=3)
    features = attack.poison_features(Flat(), images, iteration=7)
    pad = augment_padding(8)
    shifts = range(-pad, pad + 1)
    views = list(itertools.product(shifts, shifts, (False, True) if flip else (False,)))

    def mean_of(pair: tuple[int, int], image: torch.Tensor) -> torch.Tensor:
        a, b = (_shifted_by_hand(image, *views[i]) for i in pair)
        return ((a + b) / 2).flatten()

    found = []
    for n in range(4):
        pairs = [
            pair
            for pair in itertools.product(range(len(views)), repeat=2)
            if torch.allclose(features[n, 0], mean_of(pair, images[n, 0]), atol=1e-12, rtol=0)
        ]
        assert pairs, f"image {n}: not a mean of two allowed views"
        found.append(set(pairs))
    assert set.intersection(*found), "the images of one call got different views"
    # Another iteration draws other views; the same iteration the same ones.
    again = attack.poison_features(Flat(), images, iteration=7)
    assert torch.equal(again, features)
    assert not torch.equal(attack.poison_features(Flat(), images, iteration=8), features)


def test_one_draw_is_the_plain_features(digits_model, context):
    """draws=1 ignores the draw settings and computes f exactly as the plain attack does."""
    bases = context.bases
    plain = BullseyePolytope().poison_features(digits_model, bases, iteration=0)
    with torch.no_grad():
        direct = digits_model.features(bases.flatten(0, 1)).view(3, 3, -1)
    assert torch.equal(plain.detach(), direct)
    other = BullseyePolytope(draw_flip=False, draw_seed=9)
    assert torch.equal(other.poison_features(digits_model, bases, iteration=5).detach(), direct)


@pytest.mark.parametrize("name", ["fc", "bp", "gm"])
def test_one_draw_crafts_the_plain_poisons(name, digits_model, context):
    k = _poisons(name)
    on = _slice(context, slice(None), k, torch.float32)
    plain = _attack(name, k, iterations=8)(digits_model, on)
    seeded = _attack(name, k, iterations=8, draws=1, draw_seed=11, draw_flip=False)
    result = seeded(digits_model, on)
    assert torch.equal(result.poisons, plain.poisons)
    assert torch.equal(result.objective, plain.objective)
    assert result.work == plain.work


@pytest.mark.parametrize("name", ["fc", "cp", "bp", "gm"])
def test_draws_batch_equals_one_at_a_time_and_is_seeded(name, digits_model, context):
    k = _poisons(name)
    model = copy.deepcopy(digits_model).double()
    attack = _attack(name, k, iterations=6, draws=3, draw_seed=4)
    batched = attack(model, _slice(context, slice(None), k, torch.float64))
    chunked = _attack(name, k, iterations=6, draws=3, draw_seed=4, batch_size=3 * k)
    torch.testing.assert_close(
        chunked(model, _slice(context, slice(None), k, torch.float64)).poisons,
        batched.poisons,
        atol=1e-9,
        rtol=0,
    )
    for i in range(3):
        alone = attack(model, _slice(context, slice(i, i + 1), k, torch.float64))
        torch.testing.assert_close(alone.poisons[0], batched.poisons[i], atol=1e-9, rtol=0)
        torch.testing.assert_close(alone.objective[:, 0], batched.objective[:, i])
    again = attack(model, _slice(context, slice(None), k, torch.float64))
    assert torch.equal(again.poisons, batched.poisons)
    other = _attack(name, k, iterations=6, draws=3, draw_seed=5)
    assert not torch.equal(
        other(model, _slice(context, slice(None), k, torch.float64)).poisons, batched.poisons
    )


@pytest.mark.parametrize("name", ["fc", "bp", "gm"])
def test_draws_keep_the_budget_and_count_their_work(name, digits_model, context):
    k = _poisons(name)
    on = _slice(context, slice(None), k, torch.float32)
    plain = _attack(name, k, iterations=10)(digits_model, on)
    result = _attack(name, k, iterations=10, draws=3)(digits_model, on)
    assert float((result.poisons - on.bases).abs().max()) <= DELTA + 1e-6
    assert float(result.poisons.min()) >= 0.0 and float(result.poisons.max()) <= 1.0
    assert not torch.equal(result.poisons, plain.poisons)
    assert result.work == 3 * plain.work > 0


def test_dropout_draws_a_mask_shared_by_the_batch():
    """Dropout in a draw multiplies by a 0 or 1/(1-p) mask, the same for every image, per
    element (nn.Dropout) or per channel (nn.Dropout2d); the module stays in eval mode and
    keeps no hook afterwards."""
    scale = torch.rand(3, 1, 1, 1, 1, generator=torch.Generator().manual_seed(0)) + 0.5
    images = torch.ones(3, 1, 4, 8, 8, dtype=torch.float64) * scale
    p, draws = 0.5, 4
    attack = BullseyePolytope(draws=draws, draw_flip=False)
    # The same draws without dropout: the mean of the crops alone.
    crops = attack.poison_features(Flat(torch.nn.Dropout(0.0)), images, iteration=0)
    for layer in (torch.nn.Dropout(p), torch.nn.Dropout2d(p)):
        model = Flat(layer).eval()
        features = attack.poison_features(model, images, iteration=0)
        assert not torch.allclose(features, crops), "no mask was applied"
        # Each image is constant and the centre survives every crop, so there a draw gives
        # the constant times its mask entry, 0 or 1/(1-p): the mean is a multiple of
        # 1/(draws (1-p)), and the same for every image.
        ratio = (features / images[:, 0].flatten(1)[:, None]).view(3, 4, 8, 8)[..., 2:6, 2:6]
        lattice = ratio * draws * (1 - p)
        assert torch.allclose(lattice, lattice.round(), atol=1e-9), "not a mean of masks"
        assert torch.allclose(ratio[0], ratio[1]) and torch.allclose(ratio[0], ratio[2])
        assert not layer.training and not layer._forward_hooks
        if isinstance(layer, torch.nn.Dropout2d):  # one mask entry per channel
            centre = ratio[0].flatten(1)
            assert torch.allclose(centre, centre[:, :1].expand_as(centre))
        else:
            assert len(torch.unique(ratio[0])) > 1


# ---- the augmenting victim -------------------------------------------------------------------


def test_victim_views_are_seeded_per_instance_not_per_batch():
    images = torch.rand(3, 2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    instances = [Instance(t, 0, 1, (10 + t, 20 + t)) for t in range(3)]
    views = victim_views(images, instances, seed=0, flip=True)
    assert torch.equal(victim_views(images, instances, seed=0, flip=True), views)
    alone = victim_views(images[1:2], instances[1:2], seed=0, flip=True)
    assert torch.equal(alone[0], views[1])
    assert not torch.equal(views, images)
    assert not torch.equal(victim_views(images, instances, seed=1, flip=True), views)
    # A poison and its base get the same view: the view of their difference is the
    # difference of their views (the crop is linear).
    moved = images + 0.1
    torch.testing.assert_close(
        victim_views(moved, instances, seed=0, flip=True) - views,
        victim_views(torch.full_like(images, 0.1), instances, seed=0, flip=True),
    )


@pytest.fixture(scope="module")
def digits_checkpoint(digits_extractor, tmp_path_factory) -> Path:
    loaded = digits_extractor("none")
    out = tmp_path_factory.mktemp("digits-multidraw")
    save_extractor(out, loaded.model, loaded.manifest)
    return out


def _audit(checkpoint: Path, **overrides) -> dict:
    config = AuditConfig(
        model=str(checkpoint),
        dataset="digits",
        pairs=((0, 7), (2, 1)),
        targets_per_pair=2,
        attacks=("bp",),
        attack_settings={"bp": {"poisons": 3}},
        iterations=5,
        retrain_epochs=10,
        retrain_milestones=(6, 8),
        screen_images=0,
        **overrides,
    )
    return run_audit(config, dataset=load_dataset("digits")).model_dump()["attacks"]["bp"]


def test_victim_augment_changes_what_the_heads_train_on(digits_checkpoint):
    """At delta 0 the poisons are the bases: an augmenting victim then gives poisoned and
    baseline heads the same views (same outcome), other than the plain victim's."""
    plain = _audit(digits_checkpoint, delta=0.0)
    augmented = _audit(digits_checkpoint, delta=0.0, victim_augment=True)
    for row in augmented["rows"]:
        assert row["success"] == row["baseline_success"]
        assert row["poison_class_probability"] == pytest.approx(
            row["baseline_poison_class_probability"], abs=1e-6
        )
    before = [row["baseline_poison_class_probability"] for row in plain["rows"]]
    after = [row["baseline_poison_class_probability"] for row in augmented["rows"]]
    # The targets sit deep in their own class, so compare the probabilities' logarithms.
    change = max(abs(math.log(a / b)) for a, b in zip(before, after, strict=True))
    assert change > 0.1, change
    again = _audit(digits_checkpoint, delta=0.0, victim_augment=True)
    assert again["rows"] == augmented["rows"]


def test_audit_draws_multiply_the_crafting_work(digits_checkpoint):
    one, two = _audit(digits_checkpoint), _audit(digits_checkpoint, draws=2)
    assert two["crafting_work"] == 2 * one["crafting_work"] > 0


# ---- configuration and the service's job-size bound ------------------------------------------


def test_config_bounds():
    base = {"model": "m", "dataset": "digits"}
    config = AuditConfig(**base)
    assert config.draws == 1 and config.victim_augment is False
    assert AuditConfig(**base, draws=32).draws == 32
    for bad in (0, 33):
        with pytest.raises(ValidationError, match="draws"):
            AuditConfig(**base, draws=bad)
    with pytest.raises(ValueError, match="draws"):
        BullseyePolytope(draws=0)


def test_job_size_bound_counts_the_draws():
    config = AuditConfig(
        model="m",
        dataset="digits",
        pairs=((0, 1),),
        targets_per_pair=2,
        iterations=10,
        attacks=("bp",),
        attack_settings={"bp": {"poisons": 5}},
    )
    limit = SimpleNamespace(max_audit_work=150)  # 10 x 2 x 5 = 100 fits
    check_audit_size(limit, config)  # type: ignore[arg-type]
    with pytest.raises(InvalidFieldError) as error:
        check_audit_size(limit, config.model_copy(update={"draws": 2}))  # type: ignore[arg-type]
    assert "draws 2" in str(error.value.errors)
    assert error.value.errors[0]["loc"] == ["body", "overrides", "draws"]
