"""Shared fixtures: small extractors pre-trained once per test session on real data."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from core.checkpoint import LoadedExtractor, load_extractor


@pytest.fixture(scope="session")
def digits_extractor(tmp_path_factory) -> Callable[..., LoadedExtractor]:
    """``digits_extractor(defense, **overrides)``: a ConvNet pre-trained on sklearn's digits.

    Short runs of the quick recipe (3 epochs unless overridden), cached per session by their
    arguments, so tests that compare defenses share the same models.
    """
    from core.config import pretrain_config
    from core.train import pretrain

    cache: dict[tuple, LoadedExtractor] = {}

    def make(defense: str, **overrides: object) -> LoadedExtractor:
        key = (defense, *sorted(overrides.items()))
        if key not in cache:
            settings = {"epochs": 3, "arch": "convnet", "recipe": "quick", "seed": 0,
                        "batch_size": 64, **overrides}  # fmt: skip
            config = pretrain_config(dataset="digits", defense=defense, **settings)
            out = Path(tmp_path_factory.mktemp(f"digits-{defense}"))
            pretrain(config, out_dir=out)
            cache[key] = load_extractor(out)
        return cache[key]

    return make
