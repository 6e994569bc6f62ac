"""Benchmark: crafting FC, CP and BP poisons with Bulwark's batched attacks vs ART's, side by side.

What it measures, in one run, on one CIFAR-shaped ResNet-18 (3x32x32, the paper's network):

- seconds per instance to craft Feature Collision (1 poison) and Bullseye Polytope (5 poisons)
  with ``core.attacks`` (all instances in one batch per iteration) and with the Adversarial
  Robustness Toolbox's ``FeatureCollisionAttack`` and ``BullseyePolytopeAttackPyTorch`` (one
  instance per call, as ART works), on the same targets, bases and iteration count, and the
  ratio of the two; Convex Polytope, which ART does not implement, beside Bulwark's own BP
  (the same poisons, plus the simplex coefficient steps). Bulwark's attacks run with their
  catalog settings (``catalog.attacks``: FC's first step and mu, the polytopes' Adam lr, CP's
  coefficient steps) and ``--poisons`` poisons for the polytopes; ART's BP gets the same lr;
- the final objective of each, computed afterwards in float32 on the returned poisons:
  ``||f(x_p) - f(x_t)||`` for FC and ``||mean_j f(x_p^j) - f(x_t)||`` for BP, also divided by
  ``||f(x_t)||``; ART's FC does not enforce the l_inf budget, so its poisons are also scored
  after projection onto it;
- the crafting FLOP rate (FLOPs of a forward + input-gradient pass, counted by
  ``torch.utils.flop_counter``, times passes, over wall time) as a fraction of this machine's
  measured matrix-multiply rate in the same precision;
- the time to re-train 40 (and 80: poisoned + baseline) linear heads together, 100 epochs of
  Adam on 500 clean features + 5 poisons each (``core.audit.retrain_heads``);
- how crafting time grows with the number of instances crafted together (``--scaling``,
  default 1, 5, 10, 20, 40 instances of BP, ``--scaling-iterations`` iterations each): seconds
  and seconds per instance, which should fall (GPU) or stay flat (CPU) as instances grow.

Weights and data: the ResNet-18 is randomly initialized (seeded) and in eval mode, and the
images are synthetic smooth CIFAR-shaped images (8x8 uniform noise upsampled bilinearly),
because CIFAR-10 cannot be downloaded here. Speed does not depend on the weights; the
objectives compare the two implementations on the same problem, not attack success.

ART is only a benchmark dependency (``pip install -e '.[bench]'``). ART is slow, so it runs on
the first ``--art-instances`` instances only (it crafts one instance per call, so its time per
instance does not depend on how many it crafts); Bulwark's objective is reported on the same
instances. Known ART defect: ``BullseyePolytopeAttackPyTorch.poison`` (1.20.1) takes its
"target" features from the bases ``x``, not from ``target`` (ART issue #1594), so its
objective against the real target barely moves; its time per iteration is still a fair
measure of its cost.

Repeat (the figures in docs/performance.md came from these commands)::

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python bench/bench_attacks.py --instances 40 --iterations 500   # the full target
    .venv/bin/python bench/bench_attacks.py --instances 40 --iterations 10 --art-instances 2
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from catalog.attacks import (
    AttackSettings,
    ConvexPolytopeSettings,
    FeatureCollisionSettings,
    PolytopeSettings,
)
from core.attacks import AttackContext, BullseyePolytope, attack_class, budget_box, frozen
from core.audit import HeadSchedule, crafting_model, fresh_head, retrain_heads
from core.device import autocast, resolve_precision
from core.models import FeatureClassifier, build_model


def synthetic_images(count: int, generator: torch.Generator) -> torch.Tensor:
    """Smooth CIFAR-shaped images in [0,1]: 8x8 uniform noise upsampled to 32x32."""
    coarse = torch.rand(count, 3, 8, 8, generator=generator)
    return F.interpolate(coarse, size=(32, 32), mode="bilinear", align_corners=False)


def matmul_rate(dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    """Best-of-``repeats`` FLOP/s of a square matmul in ``dtype`` on the CPU."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def flops_per_image(model: FeatureClassifier, dtype: torch.dtype, channels_last: bool) -> float:
    """FLOPs of one forward + input-gradient pass of f, per image (batch of 8)."""
    x = torch.rand(8, 3, 32, 32)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    with frozen(model), FlopCounterMode(display=False) as counter:
        with autocast(x.device, dtype):
            features = model.features(x)
        features.float().square().sum().backward()  # FlopCounterMode needs .backward()
    return counter.get_total_flops() / 8


@torch.no_grad()
def score(
    model: FeatureClassifier, targets: torch.Tensor, poisons: torch.Tensor
) -> tuple[float, float]:
    """Mean over instances of ||mean_j f(x_p^j) - f(x_t)|| and of it over ||f(x_t)||, float32."""
    n, k = poisons.shape[:2]
    with frozen(model):
        target_features = model.features(targets.float())
        mix = model.features(poisons.flatten(0, 1).float()).view(n, k, -1).mean(1)
    distance = (mix - target_features).norm(dim=1)
    return float(distance.mean()), float((distance / target_features.norm(dim=1)).mean())


def art_classifier(model: FeatureClassifier):
    from art.estimators.classification import PyTorchClassifier

    return PyTorchClassifier(
        model=model,
        loss=torch.nn.CrossEntropyLoss(),
        input_shape=(3, 32, 32),
        nb_classes=model.num_classes,
        clip_values=(0.0, 1.0),
    )


def art_fc_learning_rate(model: FeatureClassifier, targets, bases, step: float) -> float:
    """An ART FC learning rate for [0,1] pixels whose first step moves at most ``step``.

    ART's default (500 * 255) is meant for 0-255 pixels; giving it the same first-step size as
    Bulwark's FC keeps the comparison about the algorithms.
    """
    with frozen(model):
        x = bases[:, 0].clone().requires_grad_(True)
        target_features = model.features(targets).detach()
        loss = (model.features(x) - target_features).norm(dim=1).sum()
        (grad,) = torch.autograd.grad(loss, x)
    return step / float(grad.abs().flatten(1).amax(1).median())


def run_art_fc(model, targets, bases, iterations: int, learning_rate: float) -> tuple[float, list]:
    from art.attacks.poisoning import FeatureCollisionAttack

    classifier = art_classifier(model)
    poisons, seconds = [], 0.0
    for i in range(len(targets)):
        attack = FeatureCollisionAttack(
            classifier,
            target=targets[i : i + 1].numpy(),
            feature_layer="body",
            learning_rate=learning_rate,
            max_iter=iterations,
            verbose=False,
        )
        start = time.perf_counter()
        poison, _ = attack.poison(bases[i, :1].numpy())
        seconds += time.perf_counter() - start
        poisons.append(torch.from_numpy(poison))
    return seconds / len(targets), poisons


def run_art_bp(model, targets, bases, iterations: int, delta: float, lr: float):
    from art.attacks.poisoning import BullseyePolytopeAttackPyTorch

    classifier = art_classifier(model)
    poisons, seconds = [], 0.0
    for i in range(len(targets)):
        attack = BullseyePolytopeAttackPyTorch(
            classifier,
            target=targets[i : i + 1].numpy(),
            feature_layer="body",
            max_iter=iterations,
            learning_rate=lr,
            epsilon=delta,
            verbose=False,
        )
        label = np.zeros((len(bases[i]), model.num_classes), dtype=np.float32)
        start = time.perf_counter()
        poison, _ = attack.poison(bases[i].numpy(), label)
        seconds += time.perf_counter() - start
        poisons.append(torch.from_numpy(poison))
    return seconds / len(targets), poisons


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=40, help="attack instances")
    parser.add_argument("--iterations", type=int, default=500, help="steps per attack")
    parser.add_argument(
        "--art-instances",
        type=int,
        default=2,
        help="instances ART crafts (its time per instance is per call)",
    )
    parser.add_argument("--poisons", type=int, default=5, help="BP poisons per instance")
    parser.add_argument("--delta", type=float, default=25.5 / 255)
    parser.add_argument("--precision", choices=("auto", "float32", "bfloat16"), default="auto")
    parser.add_argument("--skip-art", action="store_true")
    parser.add_argument(
        "--scaling", default="1,5,10,20,40", help="instance counts of the scaling run ('' to skip)"
    )
    parser.add_argument("--scaling-iterations", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    device = torch.device("cpu")
    dtype = resolve_precision(args.precision, device)
    model = build_model("resnet18", in_channels=3, num_classes=10).eval()
    # Bulwark crafts on what the audit crafts on: batch norms folded, channels_last where
    # faster (core.audit.crafting_model); ART gets the plain model, as its users would.
    attacker, channels_last = crafting_model(model, device, dtype)
    n, k = args.instances, args.poisons
    targets = synthetic_images(n, generator)
    bases = synthetic_images(n * k, generator).view(n, k, 3, 32, 32)
    art_n = min(args.art_instances, n)

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}, precision {str(dtype)[6:]}, "
        f"channels_last {channels_last}"
    )
    print(
        f"ResNet-18 (random init, eval), synthetic 3x32x32 images, {n} instances, "
        f"{args.iterations} iterations, delta {args.delta:.4f}"
    )
    peak = matmul_rate(dtype)
    per_image = flops_per_image(model, dtype, channels_last)
    print(
        f"matmul {peak / 1e9:.1f} GFLOP/s ({str(dtype)[6:]}); forward + input gradient "
        f"{per_image / 1e9:.3f} GFLOP per image"
    )

    common = {
        "delta": args.delta,
        "iterations": args.iterations,
        "dtype": dtype,
        "channels_last": channels_last,
    }
    # The catalog's three attacks (catalog.ATTACKS), FC and BP first: the two ART implements.
    bp_settings = PolytopeSettings(poisons=k)
    settings: dict[str, AttackSettings] = {
        "fc": FeatureCollisionSettings(),
        "bp": bp_settings,
        "cp": ConvexPolytopeSettings(poisons=k),
    }
    rows: dict[str, dict] = {}
    for key, attack_settings in settings.items():
        name, poisons_per = key.upper(), attack_settings.poisons
        attack = attack_class(key)(settings=attack_settings, **common)
        context = AttackContext(targets=targets, bases=bases[:, :poisons_per])
        start = time.perf_counter()
        result = attack(attacker, context)
        seconds = time.perf_counter() - start
        # Passes: one forward + input gradient per iteration, plus the first (FC) or last
        # (BP) forward, plus the target forward; forwards alone counted as a third of a pass.
        passes = n * poisons_per * (args.iterations + 1 / 3) + n / 3
        rate = passes * per_image / seconds
        ours = score(model, targets[:art_n], result.poisons[:art_n])
        rows[key] = {
            "attack": name,
            "ours_s": seconds / n,
            "ours_obj": ours,
            "flop_fraction": rate / peak,
            "gflops": rate / 1e9,
        }
        print(
            f"{name}: Bulwark {seconds:.1f}s for {n} instances = {seconds / n:.3f} s/instance, "
            f"{rate / 1e9:.1f} GFLOP/s = {100 * rate / peak:.0f}% of matmul"
        )

    if not args.skip_art:
        fc_lr = art_fc_learning_rate(model, targets[:art_n], bases[:art_n], 0.25 * args.delta)
        art_fc_s, art_fc = run_art_fc(model, targets[:art_n], bases[:art_n], args.iterations, fc_lr)
        art_fc_poisons = torch.stack(art_fc)  # (art_n, 1, C, H, W)
        lower, upper = budget_box(bases[:art_n, :1], args.delta)
        art_fc_projected = torch.clamp(art_fc_poisons, lower, upper)
        rows["fc"].update(
            art_s=art_fc_s,
            art_obj=score(model, targets[:art_n], art_fc_poisons),
            art_obj_projected=score(model, targets[:art_n], art_fc_projected),
            art_linf=float((art_fc_poisons - bases[:art_n, :1]).abs().max()),
        )
        art_bp_s, art_bp = run_art_bp(
            model, targets[:art_n], bases[:art_n], args.iterations, args.delta, bp_settings.lr
        )
        art_bp_poisons = torch.stack(art_bp)
        rows["bp"].update(
            art_s=art_bp_s,
            art_obj=score(model, targets[:art_n], art_bp_poisons),
            art_linf=float((art_bp_poisons - bases[:art_n]).abs().max()),
        )

    print()
    print(
        f"{'attack':<7}{'Bulwark s/inst':>15}{'ART s/inst':>12}{'speed-up':>10}"
        f"{'Bulwark obj (rel)':>22}{'ART obj (rel)':>22}{'ART projected':>22}"
    )
    for row in rows.values():
        ours_obj = f"{row['ours_obj'][0]:.4f} ({row['ours_obj'][1]:.4f})"
        if "art_s" in row:
            art_obj = f"{row['art_obj'][0]:.4f} ({row['art_obj'][1]:.4f})"
            projected = row.get("art_obj_projected")
            projected_text = f"{projected[0]:.4f} ({projected[1]:.4f})" if projected else "-"
            print(
                f"{row['attack']:<7}{row['ours_s']:>15.3f}{row['art_s']:>12.3f}"
                f"{row['art_s'] / row['ours_s']:>9.1f}x{ours_obj:>22}{art_obj:>22}"
                f"{projected_text:>22}"
            )
        else:
            print(f"{row['attack']:<7}{row['ours_s']:>15.3f}{'-':>12}{'-':>10}{ours_obj:>22}")
    if not args.skip_art:
        print(
            f"objectives on the first {art_n} instances; ART FC max l_inf "
            f"{rows['fc']['art_linf']:.4f}, ART BP max l_inf {rows['bp']['art_linf']:.4f} "
            f"(budget {args.delta:.4f})"
        )
    for row in rows.values():
        print(
            f"{row['attack']} crafting: {row['gflops']:.1f} GFLOP/s = "
            f"{100 * row['flop_fraction']:.0f}% of measured {str(dtype)[6:]} matmul rate"
        )

    # ---- re-training heads: 500 clean features (50 per class) + 5 poisons per head ---------
    dim, classes = model.feature_dim, model.num_classes
    clean = torch.randn(500, dim, generator=generator).abs()
    labels = torch.arange(classes).repeat_interleave(50)
    weight, bias = fresh_head(classes, dim, args.seed, device)
    for heads in (40, 80):
        extra = torch.randn(heads, 5, dim, generator=generator).abs()
        extra_labels = torch.randint(0, classes, (heads, 1), generator=generator).expand(-1, 5)
        start = time.perf_counter()
        retrain_heads(
            clean,
            labels,
            extra,
            extra_labels,
            init_weight=weight,
            init_bias=bias,
            schedule=HeadSchedule(),
            seed=args.seed,
        )
        print(
            f"re-training {heads} heads (100 epochs, Adam, batch 64): "
            f"{time.perf_counter() - start:.2f}s"
        )

    # ---- scaling: the same attack on more instances at once ------------------------------
    counts = [int(c) for c in args.scaling.split(",") if c]
    if counts:
        scaling = BullseyePolytope(
            settings=bp_settings, **{**common, "iterations": args.scaling_iterations}
        )
        extra = synthetic_images(max(counts) * (k + 1), generator)
        more_targets, more_bases = extra[: max(counts)], extra[max(counts) :].view(-1, k, 3, 32, 32)
        print(f"\nBP scaling ({args.scaling_iterations} iterations, {k} poisons per instance):")
        print(f"{'instances':>10}{'seconds':>10}{'s/instance':>12}{'vs 1 instance':>15}")
        single = None
        for count in counts:
            start = time.perf_counter()
            scaling(attacker, AttackContext(targets=more_targets[:count], bases=more_bases[:count]))
            seconds = time.perf_counter() - start
            single = single or seconds / count
            print(
                f"{count:>10}{seconds:>10.2f}{seconds / count:>12.3f}"
                f"{seconds / count / single:>14.2f}x"
            )


if __name__ == "__main__":
    main()
