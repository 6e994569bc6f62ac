"""catalog.archs: the torch-free table of every architecture's state dict is the one the torch
builders make, so the API's check of an upload (names, shapes, dtypes) is exactly what loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from api.safetensors_check import SafetensorsError, infer_model_facts, read_header
from catalog.archs import (
    ARCHS,
    SHOWN_PER_KIND,
    TensorFacts,
    compare_tensors,
    expected_kind,
)
from core.checkpoint import CheckpointError, load_extractor
from core.models import build_model

SIZES = [(1, 10), (3, 7), (4, 100)]  # (in_channels, num_classes)


@pytest.mark.parametrize(("in_channels", "num_classes"), SIZES)
@pytest.mark.parametrize("arch", ARCHS.names())
def test_expected_tensors_are_the_built_models_state_dict(
    arch: str, in_channels: int, num_classes: int
) -> None:
    model = build_model(arch, in_channels=in_channels, num_classes=num_classes)
    state = model.state_dict()
    spec = ARCHS.get(arch)
    assert spec.expected_tensors(in_channels, num_classes) == {
        k: tuple(v.shape) for k, v in state.items()
    }
    assert spec.feature_dim == model.feature_dim
    for name, tensor in state.items():  # the dtype rule: floating but the step counters
        kind = "floating" if tensor.is_floating_point() else "integer"
        assert expected_kind(name) == kind and tensor.dtype in (torch.float32, torch.int64), name


def _facts(shapes: dict[str, tuple[int, ...]]) -> dict[str, TensorFacts]:
    return {
        name: TensorFacts(shape, "I64", "integer")
        if expected_kind(name) == "integer"
        else TensorFacts(shape, "F32", "floating")
        for name, shape in shapes.items()
    }


def test_matching_tensors_fit_with_or_without_the_normalization_pair() -> None:
    expected = ARCHS.get("convnet").expected_tensors(3, 10)
    assert compare_tensors(expected, _facts(expected)).fits
    without = {k: v for k, v in expected.items() if not k.startswith("normalize.")}
    assert compare_tensors(expected, _facts(without)).fits
    half = {k: v for k, v in expected.items() if k != "normalize.std"}
    assert compare_tensors(expected, _facts(half)).missing == ("normalize.std",)


def test_every_mismatch_is_found_and_counted() -> None:
    expected = ARCHS.get("resnet18").expected_tensors(3, 10)
    found = _facts(expected)
    found["body.0.weight"] = TensorFacts((64, 3, 7, 7), "F32", "floating")
    found["body.1.num_batches_tracked"] = TensorFacts((), "F32", "floating")
    found["body.1.weight"] = TensorFacts((64,), "I32", "integer")
    for name in [n for n in expected if n.startswith("body.4.")]:
        del found[name]
    found |= {f"extra.{i}": TensorFacts((1,), "F32", "floating") for i in range(7)}
    mismatch = compare_tensors(expected, found)
    assert not mismatch.fits
    assert mismatch.wrong_shape == (("body.0.weight", (64, 3, 7, 7), (64, 3, 3, 3)),)
    assert {n for n, _, _ in mismatch.wrong_dtype} == {
        "body.1.weight",
        "body.1.num_batches_tracked",
    }
    assert mismatch.missing == tuple(n for n in expected if n.startswith("body.4."))
    assert len(mismatch.unexpected) == 7
    wrong_shape, missing, unexpected, dtypes = mismatch.problems()
    assert wrong_shape == "1 wrong shape: body.0.weight is (64, 3, 7, 7), expected (64, 3, 3, 3)"
    assert missing.startswith(f"{len(mismatch.missing)} missing tensors: body.4.conv1.weight")
    assert unexpected.endswith(f"; and {7 - SHOWN_PER_KIND} more")
    assert unexpected.count("extra.") == SHOWN_PER_KIND
    assert "body.1.num_batches_tracked is F32, expected integer" in dtypes
    assert "body.1.weight is I32, expected floating" in dtypes


def test_the_api_and_the_core_refuse_the_same_weights_in_the_same_words(tmp_path: Path) -> None:
    """A safetensors header checked by the API (torch-free) and the same file loaded by the
    core's ``load_extractor`` name the same problems."""
    state = dict(build_model("resnet18", in_channels=3, num_classes=10).state_dict())
    state["body.0.weight"] = torch.zeros(64, 3, 7, 7)
    state["body.4.shortcut.0.weight"] = torch.zeros(64, 64, 1, 1)  # an identity shortcut
    del state["head.bias"]
    path = tmp_path / "w.safetensors"
    save_file(state, str(path))
    with pytest.raises(SafetensorsError) as api_error:
        infer_model_facts(read_header(path)[0])
    with pytest.raises(CheckpointError) as core_error:
        load_extractor(path)
    context = "do not fit resnet18 (3 input channels, 10 classes): "
    problems = [
        "1 wrong shape: body.0.weight is (64, 3, 7, 7), expected (64, 3, 3, 3)",
        "1 missing tensor: head.bias",
        "1 unexpected tensor: body.4.shortcut.0.weight",
    ]
    assert api_error.value.problems == [f"the weights {context}{p}" for p in problems]
    assert str(core_error.value) == f"weights {context}" + "; ".join(problems)
