"""Multi-draw crafting against a victim who augments: does averaging over draws help?

One undefended ConvNet pre-trained on Fashion-MNIST (``--per-class`` images per class, the
CPU preset of ``bench/reproduce.py``, reused from ``--out/models/none`` when there), one draw
of instances (the ``--closest-pairs`` closest pairs, ``--targets-per-pair`` targets each),
and for each attack and each ``--draws`` value the poisons crafted ONCE, then judged by two
victims on the same instances:

- ``victim_augment=false``: the paper's victim, re-training its head on the poisons;
- ``victim_augment=true``: a victim who re-trains on one seeded random crop / flip of each
  poison (``core.audit.victim_views``; the baseline on the same view of each base).

It prints, per attack and draws, the headline ASR (targets the clean model gets right) with
its 95% Wilson interval under both victims, the baseline, the crafting work counted by the
attack (poison forward-backward passes) and the crafting wall time, each relative to draws 1
of the same attack in the same run; then the machine (CPU and flags). The audit's own stage
functions do the work (``core.audit``), so the crafting is the audit's. Figures come only
from this run.

    .venv/bin/python bench/bench_multidraw.py --out runs/multidraw
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))

from bench_sequential import cpu_line
from reproduce import Variant, atomic_json, ensure_model, log

from catalog import SplitConfig
from core.audit import (
    clean_stage,
    craft_stage,
    crafting_model,
    draw_stage,
    extract_features,
    features_stage,
    load_stage,
    retrain_stage,
    score_stage,
)
from core.config import audit_config
from core.data import to_float
from core.datasets import load_dataset


def percent(rate: Any) -> str:
    """A rate as "12.5% [5, 27] (5/40)": the 95% Wilson interval, then the counts."""
    low, high = rate.wilson95
    share = f"{100 * rate.rate:.1f}% [{100 * low:.0f}, {100 * high:.0f}]"
    return f"{share} ({rate.successes}/{rate.trials})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--attacks", default="bp")
    parser.add_argument("--draws", default="1,4")
    parser.add_argument("--closest-pairs", type=int, default=4)
    parser.add_argument("--targets-per-pair", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=200)
    # The pre-training preset, as bench/reproduce.py's (undefended: no PGD)
    parser.add_argument("--arch", default="convnet")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--pgd-steps", type=int, default=5)
    parser.add_argument("--per-class", type=int, default=1000)
    parser.add_argument("--data-dir")
    parser.add_argument("--device")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    split = SplitConfig(pretrain=args.per_class, retrain=50, pool=150)
    data = load_dataset("fashion-mnist", args.data_dir)
    started = time.perf_counter()
    ensure_model(Variant("none", "none"), out / "models" / "none", data, args, split)
    log(f"model ready after {time.perf_counter() - started:.0f} s")

    attacks = tuple(args.attacks.split(","))
    draws_list = [int(d) for d in args.draws.split(",")]
    config = audit_config(
        model=str(out / "models" / "none"),
        dataset="fashion-mnist",
        data_dir=args.data_dir,
        split=split,
        attacks=attacks,
        pair_sets=("closest",),
        closest_pairs=args.closest_pairs,
        targets_per_pair=args.targets_per_pair,
        iterations=args.iterations,
        screen_images=0,
        seed=args.seed,
        device=args.device,
    )
    inputs = load_stage(config, data)
    clean = clean_stage(inputs)
    inputs, choices = draw_stage(inputs, clean)
    features = features_stage(inputs, clean)
    attacker, channels_last = crafting_model(inputs.model, inputs.device, inputs.dtype)
    pair_sources = {(c.target_class, c.poison_class): c.source for c in choices}
    log(f"{len(inputs.instances)} instances on pairs {list(pair_sources)}")

    # One short untimed craft first: the first calls pay for oneDNN's kernel set-up, which
    # would otherwise land on whichever draws come first.
    warm = replace(inputs, config=config.model_copy(update={"iterations": 2}))
    craft_stage(warm, features, attacks[0], attacker, channels_last=channels_last)

    rows: list[dict[str, Any]] = []
    for attack in attacks:
        k = config.poisons(attack)
        bases = to_float(features.bases[:, :k]).flatten(0, 1)
        plain_bases = extract_features(inputs.model, bases, dtype=inputs.dtype)
        plain_bases = plain_bases.view(len(inputs.instances), k, -1)
        for draws in draws_list:
            drawn = replace(inputs, config=config.model_copy(update={"draws": draws}))
            began = time.perf_counter()
            crafted = craft_stage(drawn, features, attack, attacker, channels_last=channels_last)
            seconds = time.perf_counter() - began
            row: dict[str, Any] = {
                "attack": attack,
                "draws": draws,
                "work": crafted.work,
                "seconds": seconds,
            }
            for victim in (False, True):
                judged = replace(
                    drawn, config=drawn.config.model_copy(update={"victim_augment": victim})
                )
                outcome = retrain_stage(judged, features, crafted, plain_bases)
                result = score_stage(
                    attack,
                    inputs.instances,
                    crafted,
                    outcome,
                    {"craft": seconds},
                    clean_correct=features.clean_correct.tolist(),
                    pair_sources=pair_sources,
                    reach_level=config.reach_level,
                )
                name = "augmenting" if victim else "plain"
                row[name] = {
                    "headline": result.headline.model_dump(),
                    "baseline": result.baseline_correct_targets.model_dump()
                    if result.baseline_correct_targets
                    else None,
                    "text": percent(result.headline),
                    "baseline_text": percent(result.baseline_correct_targets)
                    if result.baseline_correct_targets
                    else "-",
                }
            log(
                f"{attack} draws {draws}: {seconds:.0f} s, plain {row['plain']['text']}, "
                f"augmenting {row['augmenting']['text']}"
            )
            rows.append(row)
            atomic_json(out / "results.json", {"rows": rows, "command": " ".join(sys.argv)})

    print()
    print(f"CPU: {cpu_line()}; {torch.get_num_threads()} threads, autocast {inputs.dtype}")
    print(
        f"Fashion-MNIST ConvNet, undefended ({args.per_class}/class, {args.epochs} epochs); "
        f"{len(inputs.instances)} instances ({args.closest_pairs} closest pairs x "
        f"{args.targets_per_pair}), {args.iterations} iterations; headline ASR over the "
        f"{int(features.clean_correct.sum())} targets the clean model gets right"
    )
    print(
        "| attack | draws | ASR, victim augments | ASR, plain victim | baseline (augments / "
        "plain) | crafting work | work ratio | craft s | time ratio |"
    )
    print("|" + "---|" * 9)
    first: dict[str, dict[str, Any]] = {}
    for row in rows:
        one = first.setdefault(row["attack"], row)
        print(
            f"| {row['attack']} | {row['draws']} | {row['augmenting']['text']} | "
            f"{row['plain']['text']} | {row['augmenting']['baseline_text']} / "
            f"{row['plain']['baseline_text']} | {row['work']:,} | "
            f"{row['work'] / one['work']:.1f} | {row['seconds']:.0f} | "
            f"{row['seconds'] / one['seconds']:.1f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
