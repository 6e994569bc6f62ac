"""Shared test set-up: one torch thread budget, the e2e marker, and small pre-trained extractors.

Tiers (markers in pyproject.toml): ``make test-fast`` runs ``-m "not slow and not e2e"``,
``make test`` runs everything.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from core.attacks.base import AttackContext
from core.checkpoint import LoadedExtractor, load_extractor
from core.data import to_float
from core.datasets import load_dataset

# The torch thread budget, set here and nowhere else. By default half the cores this process
# may use, at least one: on the 2-core test machine one thread, since pytest shares the cores
# with worker processes and the other tests' subprocesses, and two spinning OpenMP threads on
# a busy core make the small convs here several times slower. Modules marked slow (real
# pre-training and audits on Fashion-MNIST) get every core when they run alone: measured on
# the 2-core AMD EPYC, tests/test_attack_strength.py took 8m20s on one thread, 4m20s on two.
# Under pytest-xdist (make test: two processes) each process gets its share of the cores.
# BULWARK_TEST_THREADS overrides the default (to measure, or on a bigger machine).
TEST_PROCESSES = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
ALL_THREADS = max(1, len(os.sched_getaffinity(0)) // TEST_PROCESSES)
DEFAULT_THREADS = int(os.environ.get("BULWARK_TEST_THREADS", max(1, ALL_THREADS // 2)))
torch.set_num_threads(DEFAULT_THREADS)


@pytest.fixture(scope="session", autouse=True)
def _reference_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """``bulwark audit --reference auto`` caches references under $BULWARK_CACHE_DIR: a
    session's own folder, never the user's ~/.cache (and shared by the session's tests)."""
    before = os.environ.get("BULWARK_CACHE_DIR")
    os.environ["BULWARK_CACHE_DIR"] = str(tmp_path_factory.mktemp("bulwark-cache"))
    yield
    if before is None:
        os.environ.pop("BULWARK_CACHE_DIR", None)
    else:
        os.environ["BULWARK_CACHE_DIR"] = before


def slow_module(module: object) -> bool:
    """Whether a whole test module is marked slow (its ``pytestmark``)."""
    marks = getattr(module, "pytestmark", [])
    return any(mark.name == "slow" for mark in (marks if isinstance(marks, list) else [marks]))


@pytest.fixture(scope="module", autouse=True)
def _slow_modules_use_every_core(request: pytest.FixtureRequest) -> Iterator[None]:
    torch.set_num_threads(ALL_THREADS if slow_module(request.module) else DEFAULT_THREADS)
    yield
    torch.set_num_threads(DEFAULT_THREADS)


# Tests that start real worker or server processes: the tests/service end-to-end tier.
E2E_FIXTURES = frozenset({"start_worker"})
# `bulwark serve` and `bulwark demo`; workers of a fanned-out audit (their own fixture).
E2E_MODULES = frozenset({"test_service_embedded.py", "test_service_fanout.py"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if fixtures & E2E_FIXTURES or item.path.name in E2E_MODULES:
            item.add_marker(pytest.mark.e2e)
    # The slow modules (minutes each) first, so that under pytest-xdist they start at once and
    # the short files fill the other process meanwhile, instead of one ending the run alone.
    # A stable sort by module: each module's tests stay together, in their order.
    items.sort(key=lambda item: not slow_module(getattr(item, "module", None)))


QUICK_DIGITS = {"epochs": 3, "arch": "convnet", "recipe": "quick", "seed": 0, "batch_size": 64}


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
            settings = QUICK_DIGITS | overrides
            config = pretrain_config(dataset="digits", defense=defense, **settings)
            out = Path(tmp_path_factory.mktemp(f"digits-{defense}"))
            pretrain(config, out_dir=out)
            cache[key] = load_extractor(out)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def digits_model(digits_extractor):
    return digits_extractor("none").model


@pytest.fixture(scope="session")
def digits_attack_context(digits_model) -> AttackContext:
    """Three targets (test digits 0, 2, 4), three bases each (training digits 7, 1, 1), the
    model's own head as the head re-training starts from."""
    data = load_dataset("digits")
    x_test, x_train = to_float(data.test_x), to_float(data.train_x)
    targets = torch.stack([x_test[data.test_y == c][i] for c, i in ((0, 0), (2, 1), (4, 2))])
    bases = torch.stack(
        [x_train[data.train_y == c][3 * i : 3 * i + 3] for c, i in ((7, 0), (1, 0), (1, 1))]
    )
    head = digits_model.head
    return AttackContext(
        targets=targets,
        bases=bases,
        poison_classes=torch.tensor([7, 1, 1]),
        target_classes=torch.tensor([0, 2, 4]),
        head_weight=head.weight.detach(),
        head_bias=head.bias.detach(),
    )
