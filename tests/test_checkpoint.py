"""core.checkpoint: bit-exact round trips, the manifest, and loading untrusted files safely."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shlex
import shutil
from pathlib import Path

import numpy
import pytest
import safetensors
import torch
from safetensors.torch import save_file

from core.checkpoint import (
    MANIFEST_FORMAT,
    CheckpointError,
    infer_facts,
    load_extractor,
    save_extractor,
)
from core.models import FeatureClassifier, build_model

# arch -> (in_channels, num_classes, feature_dim)
SHAPES = {"convnet": (1, 10, 128), "resnet18": (3, 7, 512), "resnet50": (3, 4, 2048)}
ARCHS = tuple(SHAPES)


def _trained_looking_model(arch: str) -> FeatureClassifier:
    """A seeded model whose batch-norm buffers are not their defaults, in eval mode."""
    channels, classes, _ = SHAPES[arch]
    torch.manual_seed(0)
    mean, std = [0.1, 0.2, 0.3][:channels], [0.3, 0.25, 0.2][:channels]
    model = build_model(arch, in_channels=channels, num_classes=classes, mean=mean, std=std)
    gen = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            assert module.running_mean is not None and module.running_var is not None
            module.running_mean.normal_(0, 0.1, generator=gen)
            module.running_var.uniform_(0.5, 1.5, generator=gen)
            module.num_batches_tracked.fill_(17)
    return model.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[FeatureClassifier, Path]]:
    """Each arch saved once with save_extractor: arch -> (model, checkpoint folder)."""
    out = {}
    for arch in ARCHS:
        model = _trained_looking_model(arch)
        folder = tmp_path_factory.mktemp(arch)
        save_extractor(folder, model, {"defense": "pcl", "pre_acc": 0.875, "seed": 3})
        out[arch] = (model, folder)
    return out


def _input(arch: str) -> torch.Tensor:
    return torch.rand(2, SHAPES[arch][0], 8, 8, generator=torch.Generator().manual_seed(4))


def _assert_same_model(a: FeatureClassifier, b: FeatureClassifier, arch: str) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key
    assert not b.training
    x = _input(arch)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
        assert torch.equal(a.features(x), b.features(x))


@pytest.mark.parametrize("arch", ARCHS)
def test_save_then_load_is_bit_exact(saved: dict, arch: str) -> None:
    model, folder = saved[arch]
    loaded = load_extractor(folder)
    assert loaded.model.arch == arch
    _assert_same_model(model, loaded.model, arch)


@pytest.mark.parametrize("arch", ARCHS)
def test_manifest_records_model_facts_sha256_and_versions(saved: dict, arch: str) -> None:
    _, folder = saved[arch]
    channels, classes, dim = SHAPES[arch]
    manifest = json.loads((folder / "manifest.json").read_text())

    assert manifest["format"] == MANIFEST_FORMAT
    assert manifest["arch"] == arch
    assert manifest["in_channels"] == channels and manifest["num_classes"] == classes
    assert manifest["feature_dim"] == dim
    assert manifest["normalization"]["mean"] == pytest.approx([0.1, 0.2, 0.3][:channels])
    assert manifest["normalization"]["std"] == pytest.approx([0.3, 0.25, 0.2][:channels])
    assert manifest["weights_file"] == "model.safetensors"
    digest = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    assert manifest["weights_sha256"] == digest
    assert manifest["versions"]["torch"] == torch.__version__
    assert manifest["versions"]["numpy"] == numpy.__version__
    assert manifest["versions"]["safetensors"] == safetensors.__version__
    assert manifest["versions"]["python"].count(".") == 2
    # The caller's run description is kept, and comes back from load_extractor.
    assert (manifest["defense"], manifest["pre_acc"], manifest["seed"]) == ("pcl", 0.875, 3)
    assert load_extractor(folder).manifest["pre_acc"] == 0.875


def test_model_facts_override_what_the_caller_claims(tmp_path: Path) -> None:
    model = _trained_looking_model("convnet")
    weights = save_extractor(tmp_path / "out", model, {"arch": "resnet50", "num_classes": 99})
    assert weights == tmp_path / "out" / "model.safetensors" and weights.is_file()
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["arch"] == "convnet" and manifest["num_classes"] == 10


@pytest.mark.parametrize("arch", ARCHS)
def test_bare_safetensors_file_infers_the_architecture(saved: dict, arch: str) -> None:
    model, folder = saved[arch]
    channels, classes, dim = SHAPES[arch]
    loaded = load_extractor(folder / "model.safetensors")  # the file alone: no manifest
    facts = loaded.manifest
    assert (facts["arch"], facts["in_channels"], facts["num_classes"]) == (arch, channels, classes)
    assert facts["feature_dim"] == dim
    assert facts["normalization"]["mean"] == pytest.approx([0.1, 0.2, 0.3][:channels])
    assert "weights_sha256" not in facts
    _assert_same_model(model, loaded.model, arch)


def test_safetensors_is_recognised_by_content_not_name(saved: dict, tmp_path: Path) -> None:
    model, folder = saved["convnet"]
    renamed = tmp_path / "weights.bin"
    shutil.copy(folder / "model.safetensors", renamed)
    _assert_same_model(model, load_extractor(renamed).model, "convnet")


def test_infer_facts_tells_the_three_archs_apart(saved: dict) -> None:
    for arch in ARCHS:
        state = saved[arch][0].state_dict()
        assert infer_facts(state)["arch"] == arch


def test_weights_without_normalization_get_the_default(tmp_path: Path) -> None:
    model = _trained_looking_model("convnet")
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("normalize.")}
    save_file(state, str(tmp_path / "w.safetensors"))
    loaded = load_extractor(tmp_path / "w.safetensors").model
    assert loaded.normalize.mean.flatten().tolist() == [0.5]
    assert loaded.normalize.std.flatten().tolist() == [0.25]
    assert torch.equal(loaded.head.weight, model.head.weight)


@pytest.mark.parametrize("wrap", [False, True], ids=["state-dict", "state_dict-key"])
@pytest.mark.parametrize("zipfile", [True, False], ids=["zip", "legacy"])
def test_torch_saved_state_dict_is_loaded_weights_only(
    tmp_path: Path, wrap: bool, zipfile: bool
) -> None:
    model = _trained_looking_model("convnet")
    state = model.state_dict()
    path = tmp_path / "model.pt"
    torch.save(
        {"state_dict": state} if wrap else state, path, _use_new_zipfile_serialization=zipfile
    )
    loaded = load_extractor(path)
    assert loaded.manifest["arch"] == "convnet"
    _assert_same_model(model, loaded.model, "convnet")


class _TouchOnUnpickle:
    """A pickle payload: unpickling it runs ``touch <path>``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {shlex.quote(str(self.path))}",)


def _malicious_state(marker: Path) -> dict[str, object]:
    state: dict[str, object] = dict(_trained_looking_model("convnet").state_dict())
    state["head.bias"] = _TouchOnUnpickle(marker)
    return state


def test_malicious_payload_is_live_under_an_unsafe_load(tmp_path: Path) -> None:
    """Control for the next test: the payload really creates its file when fully unpickled."""
    marker = tmp_path / "control"
    torch.save(_malicious_state(marker), tmp_path / "evil.pt")
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("form", ["torch-zip", "torch-legacy", "raw-pickle", "as-safetensors"])
def test_malicious_pickle_raises_checkpoint_error_and_runs_nothing(
    tmp_path: Path, form: str
) -> None:
    marker = tmp_path / "pwned"
    state = _malicious_state(marker)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    if form == "torch-zip":
        path = tmp_path / "evil.pt"
        torch.save(state, path)
    elif form == "torch-legacy":
        path = tmp_path / "evil.pt"
        torch.save(state, path, _use_new_zipfile_serialization=False)
    elif form == "raw-pickle":
        path = tmp_path / "evil.pth"
        path.write_bytes(pickle.dumps(state, protocol=2))
    else:  # a pickle posing as the weights of a checkpoint folder
        path = folder
        (folder / "model.safetensors").write_bytes(pickle.dumps(state))

    with pytest.raises(CheckpointError):
        load_extractor(path)
    assert not marker.exists()


def test_tampered_weights_fail_the_sha256_check(saved: dict, tmp_path: Path) -> None:
    model, folder = saved["convnet"]
    copy = tmp_path / "ckpt"
    shutil.copytree(folder, copy)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["head.bias"][0] += 1.0  # a valid file with one changed weight
    save_file(state, str(copy / "model.safetensors"))
    with pytest.raises(CheckpointError, match="does not match the manifest's"):
        load_extractor(copy)


def test_sha256_is_checked_when_a_manifest_comes_with_a_bare_file(
    saved: dict, tmp_path: Path
) -> None:
    model, folder = saved["convnet"]
    manifest = json.loads((folder / "manifest.json").read_text())
    _assert_same_model(
        model, load_extractor(folder / "model.safetensors", manifest).model, "convnet"
    )
    with pytest.raises(CheckpointError, match="does not match the manifest's"):
        load_extractor(folder / "model.safetensors", {**manifest, "weights_sha256": "0" * 64})


def test_manifest_that_disagrees_with_the_weights_raises(saved: dict, tmp_path: Path) -> None:
    _, folder = saved["convnet"]
    for key, value in (("arch", "resnet18"), ("num_classes", 7), ("in_channels", 3)):
        copy = tmp_path / key
        shutil.copytree(folder, copy)
        manifest = json.loads((copy / "manifest.json").read_text())
        manifest[key] = value
        (copy / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(CheckpointError, match=f"manifest says {key}"):
            load_extractor(copy)


def _state(arch: str) -> dict[str, torch.Tensor]:
    return dict(_trained_looking_model(arch).state_dict())


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("foreign-names", "not a Bulwark model"),
        ("missing-key", "missing"),
        ("extra-key", "unexpected"),
        ("wrong-shape", "do not fit"),
        ("flat-head", "not a Bulwark model"),
        ("not-tensors", "flat state dict"),
    ],
)
def test_state_dict_that_does_not_fit_raises_checkpoint_error(
    tmp_path: Path, case: str, match: str
) -> None:
    state: dict[str, object]
    if case == "foreign-names":  # a torchvision-style ResNet's names
        state = {"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(10, 512)}
    elif case == "missing-key":
        state = _state("convnet")
        del state["body.7.weight"]
    elif case == "extra-key":
        state = {**_state("convnet"), "body.99.weight": torch.zeros(3)}
    elif case == "wrong-shape":  # convnet names, but a head for a 100-dim feature
        state = {**_state("convnet"), "head.weight": torch.zeros(10, 100)}
    elif case == "flat-head":
        state = {**_state("convnet"), "head.weight": torch.zeros(10)}
    else:
        state = {"body.0.weight": 1, "head.weight": [1.0, 2.0]}
    path = tmp_path / "w.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=match):
        load_extractor(path)


def test_garbage_and_missing_files_raise_checkpoint_error(tmp_path: Path) -> None:
    garbage = tmp_path / "w.safetensors"
    garbage.write_bytes(os.urandom(256))
    with pytest.raises(CheckpointError):
        load_extractor(garbage)
    (tmp_path / "w.pt").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError):
        load_extractor(tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match="no weights file"):
        load_extractor(tmp_path / "absent.safetensors")
    (tmp_path / "empty-folder").mkdir()
    with pytest.raises(CheckpointError, match="no weights file"):
        load_extractor(tmp_path / "empty-folder")
