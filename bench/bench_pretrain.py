"""Pre-training throughput of each defense, side by side with ART's Madry PGD trainer.

What it measures, in one run on this machine:
1. images/s of Bulwark's training loop (``core.train.pretrain``, one epoch) for each defense
   on each architecture, on CIFAR-shaped inputs (3x32x32, 10 classes). CIFAR-10 cannot be
   downloaded here, so the pixels are seeded uniform noise: throughput does not depend on
   image content. The time runs from the first progress report (before the model is built)
   to the last training step, so set-up counts against Bulwark.
2. images/s of the Adversarial Robustness Toolbox's ``AdversarialTrainerMadryPGD`` (fit, one
   epoch) on the same model, batch size and PGD settings (eps, step, steps, random start),
   and the ratio Bulwark-`at` / ART. ART's objective is plain Madry AT, so the ratio is also
   shown against Bulwark's `at` without the feature term (the same objective).
3. Same accuracy: a ConvNet adversarially trained on a real Fashion-MNIST subset by Bulwark
   (plain Madry AT, constant lr, no augmentation, as ART trains) and by ART from the same
   initial weights, test accuracy side by side; and Bulwark's float32 run beside its
   bfloat16 run where bfloat16 is the automatic choice (CUDA, or a CPU with AMX or
   AVX512_BF16). The bfloat16/float32 speed ratio of ResNet-18's forward+input-gradient is
   printed last.

Repeat: ``pip install -e ".[bench]"`` then ``python bench/bench_pretrain.py`` (add
``--images 256 --art-images 128`` for a quicker run; ``--help`` lists the options).
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import torch
from torch import nn

from catalog import SplitConfig
from core.config import pretrain_config
from core.data import ImageDataset
from core.datasets import load_dataset
from core.device import autocast, cpu_has_fast_bfloat16, resolve_device, resolve_precision
from core.models import build_model
from core.train import evaluate, pretrain


def cifar_shaped(images_per_class: int, seed: int = 0) -> ImageDataset:
    """Seeded noise images shaped like CIFAR-10 (3x32x32 uint8, 10 balanced classes)."""
    generator = torch.Generator().manual_seed(seed)
    n = 10 * (images_per_class + 2)
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=generator)
    y = torch.arange(n) % 10
    return ImageDataset(
        "cifar-shaped-noise", x, y, x[:20], y[:20], tuple(str(i) for i in range(10)), flip=True
    )


def bulwark_images_per_second(
    data: ImageDataset, arch: str, defense: str, args: argparse.Namespace, **overrides: object
) -> float:
    per_class = int(data.train_y.bincount().min()) - 2
    # The config names a catalog dataset; the images are ``data``, handed to pretrain below, so
    # "cifar10" (the shape they imitate) only labels the run.
    config = pretrain_config(
        dataset="cifar10",
        defense=defense,
        recipe="quick",
        epochs=1,
        arch=arch,
        batch_size=args.batch,
        pgd_steps=args.pgd_steps,
        epsilon=args.epsilon,
        split=SplitConfig(pretrain=per_class, retrain=1, pool=1),
        device=args.device,
        warmup_epochs=0,
        **overrides,
    )
    marks: dict[str, float] = {}

    def clock(report) -> None:
        marks.setdefault("start", time.perf_counter())
        if report.phase == "training" and report.step is not None:
            marks["end"] = time.perf_counter()

    with TemporaryDirectory() as tmp:
        pretrain(config, out_dir=Path(tmp), progress=clock, dataset=data)
    return 10 * per_class / (marks["end"] - marks["start"])


def art_trainer(model: nn.Module, args: argparse.Namespace, shape: tuple[int, ...], lr: float):
    from art.defences.trainer import AdversarialTrainerMadryPGD
    from art.estimators.classification import PyTorchClassifier

    classifier = PyTorchClassifier(
        model=model,
        loss=nn.CrossEntropyLoss(),
        optimizer=torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4),
        input_shape=shape,
        nb_classes=10,
        clip_values=(0.0, 1.0),
        device_type="gpu" if resolve_device(args.device).type == "cuda" else "cpu",
    )
    return classifier, AdversarialTrainerMadryPGD(
        classifier,
        nb_epochs=1,
        batch_size=args.batch,
        eps=args.epsilon,
        eps_step=2.5 * args.epsilon / args.pgd_steps,
        max_iter=args.pgd_steps,
        num_random_init=1,
    )


def art_images_per_second(data: ImageDataset, arch: str, args: argparse.Namespace) -> float:
    torch.manual_seed(0)
    model = build_model(arch, in_channels=3, num_classes=10)
    _, trainer = art_trainer(model, args, (3, 32, 32), lr=0.1)
    x = (data.train_x[: args.art_images].float() / 255).numpy()
    y = data.train_y[: args.art_images].numpy()
    started = time.perf_counter()
    trainer.fit(x, y, nb_epochs=1)
    return len(x) / (time.perf_counter() - started)


def same_accuracy(args: argparse.Namespace) -> None:
    """Plain Madry AT of a ConvNet on real Fashion-MNIST by Bulwark and by ART, same init."""
    data = load_dataset("fashion-mnist")
    per_class, epochs, lr = args.accuracy_images // 10, args.accuracy_epochs, 0.05
    split = SplitConfig(pretrain=per_class, retrain=1, pool=1)
    subset = torch.cat([torch.nonzero(data.train_y == c).flatten()[:per_class] for c in range(10)])
    test_x, test_y = data.test_x[:2000], data.test_y[:2000]
    small = ImageDataset(
        data.name, data.train_x, data.train_y, test_x, test_y, data.classes, data.flip
    )
    precisions = ["float32"]
    device = resolve_device(args.device)
    if resolve_precision("auto", device) == torch.bfloat16:
        precisions.append("bfloat16")
    results = {}
    for precision in precisions:
        config = pretrain_config(
            dataset="fashion-mnist",
            defense="at",
            recipe="quick",
            epochs=epochs,
            arch="convnet",
            batch_size=args.batch,
            pgd_steps=args.pgd_steps,
            epsilon=args.epsilon,
            lr=lr,
            milestones=(),
            augment=False,
            feature_term=False,
            split=split,
            seed=0,
            precision=precision,
            device=args.device,
        )
        with TemporaryDirectory() as tmp:
            started = time.perf_counter()
            result = pretrain(config, out_dir=Path(tmp), dataset=small)
            results[f"Bulwark {precision}"] = (result.pre_acc, time.perf_counter() - started)

    from core.data import channel_stats

    torch.manual_seed(0)  # pretrain seeds the model the same way before building it
    mean, std = channel_stats(data.train_x[subset])
    model = build_model("convnet", in_channels=1, num_classes=10, mean=mean, std=std)
    _, trainer = art_trainer(model, args, (1, 28, 28), lr=lr)
    x = (data.train_x[subset].float() / 255).numpy()
    started = time.perf_counter()
    trainer.fit(x, data.train_y[subset].numpy(), nb_epochs=epochs)
    elapsed = time.perf_counter() - started
    results["ART"] = (evaluate(model.to(device), test_x, test_y), elapsed)
    print(
        f"\nSame-accuracy check: ConvNet, plain Madry AT (PGD-{args.pgd_steps}, eps "
        f"{args.epsilon:.4f}), Fashion-MNIST {10 * per_class} train / 2000 test images, "
        f"{epochs} epochs, SGD lr {lr}"
    )
    print(f"{'trainer':<20}{'Pre. Acc':>10}{'seconds':>10}")
    for name, (accuracy, seconds) in results.items():
        print(f"{name:<20}{100 * accuracy:>9.2f}%{seconds:>10.1f}")


def bfloat16_speed(args: argparse.Namespace) -> None:
    """bfloat16 vs float32 time of ResNet-18's forward + input-gradient, batch 64."""
    device = resolve_device(args.device)
    model = build_model("resnet18", in_channels=3, num_classes=10).to(device).eval()
    x = torch.rand(64, 3, 32, 32, device=device)
    timings = {}
    for dtype in (torch.float32, torch.bfloat16):
        net = model.to(memory_format=torch.channels_last) if dtype == torch.bfloat16 else model
        for repeat in range(3):
            started = time.perf_counter()
            xi = x.clone().requires_grad_(True)
            with autocast(device, dtype):
                loss = net(xi).float().sum()
            torch.autograd.grad(loss, xi)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if repeat:  # the first run warms up the kernels
                timings[dtype] = time.perf_counter() - started
    print(
        f"\nResNet-18 forward+input-gradient, batch 64: float32 {timings[torch.float32]:.2f} s,"
        f" bfloat16 {timings[torch.bfloat16]:.2f} s (bfloat16 is "
        f"{timings[torch.float32] / timings[torch.bfloat16]:.2f}x float32's speed); "
        f"fast bfloat16 on this CPU: {cpu_has_fast_bfloat16()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--archs", default="convnet,resnet18")
    parser.add_argument("--defenses", default="none,pcl,at,at-pcl")
    parser.add_argument("--images", type=int, default=512, help="images per Bulwark epoch")
    parser.add_argument("--art-images", type=int, default=256, help="images per ART epoch")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--pgd-steps", type=int, default=10)
    parser.add_argument("--epsilon", type=float, default=4 / 255)
    parser.add_argument("--device", default=None)
    parser.add_argument("--skip-art", action="store_true")
    parser.add_argument("--accuracy-images", type=int, default=2000)
    parser.add_argument("--accuracy-epochs", type=int, default=3)
    parser.add_argument("--skip-accuracy", action="store_true")
    args = parser.parse_args()

    device = resolve_device(args.device)
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} "
        f"threads, torch {torch.__version__}, device {device}, autocast "
        f"{resolve_precision('auto', device)}"
    )
    print(
        f"batch {args.batch}, PGD-{args.pgd_steps} eps {args.epsilon:.4f}, "
        f"{args.images} images per Bulwark epoch, {args.art_images} per ART epoch\n"
    )
    data = cifar_shaped(args.images // 10)
    print(f"{'arch':<10}{'trainer':<26}{'images/s':>10}{'vs ART':>9}")
    for arch in args.archs.split(","):
        art = None if args.skip_art else art_images_per_second(data, arch, args)
        rows = [
            (f"bulwark {d}", bulwark_images_per_second(data, arch, d, args))
            for d in args.defenses.split(",")
        ]
        if "at" in args.defenses.split(","):
            rows.append(
                (
                    "bulwark at (no feature)",
                    bulwark_images_per_second(data, arch, "at", args, feature_term=False),
                )
            )
        if art is not None:
            rows.append(("ART MadryPGD", art))
        for name, rate in rows:
            ratio = f"{rate / art:>8.2f}x" if art and name.endswith(("at", "feature)")) else ""
            print(f"{arch:<10}{name:<26}{rate:>10.1f}{ratio:>9}", flush=True)
    if not args.skip_accuracy and not args.skip_art:
        same_accuracy(args)
    bfloat16_speed(args)


if __name__ == "__main__":
    main()
