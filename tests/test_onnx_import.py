"""core.onnx_import: ONNX models as extractors where onnx2torch imports, and a clear error
where it does not.

The conversion itself needs the ``onnx`` extra (onnx2torch imports torchvision), so that test
is skipped where it is not installed. The wrapping of a converted graph (splitting off its
linear head, the FeatureClassifier contract, the checks) runs here on torch.fx graphs of the
same kind: call_module nodes, the last one an ``nn.Linear`` as onnx2torch makes of a Gemm.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from api.onnx_check import SNIFF_BYTES, looks_like_onnx
from core.checkpoint import CheckpointError
from core.errors import BulwarkError
from core.exported import ExportedBody, ExportedClassifier
from core.onnx_import import OnnxUnavailableError, load_onnx, wrap_graph

MEAN, STD = (0.2, 0.3, 0.4), (0.5, 0.5, 0.25)


class TinyNet(nn.Module):
    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(8, classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.flatten(self.pool(torch.relu(self.bn(self.conv(x)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def _tiny() -> TinyNet:
    torch.manual_seed(0)
    net = TinyNet()
    with torch.no_grad():  # statistics that are not the identity, so eval mode matters
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
    return net.eval()


def _normalized(x: torch.Tensor) -> torch.Tensor:
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def test_without_the_converter_load_onnx_says_what_to_install_and_what_else_to_do(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "onnx2torch", None)  # import onnx2torch now fails
    with pytest.raises(BulwarkError) as raised:
        load_onnx(tmp_path / "m.onnx", input_shape=(3, 8, 8), output="logits", mean=None, std=None)
    assert isinstance(raised.value, OnnxUnavailableError)
    message = raised.value.user_message
    assert "`onnx` extra" in message and "torchvision" in message
    assert "export the model with torch.export and upload the .pt2" in message


def test_a_converter_that_fails_inside_its_own_imports_gives_the_same_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """onnx2torch imports torchvision, whose failures are not always ImportErrors."""

    def broken(name: str) -> object:
        raise RuntimeError("operator torchvision::nms does not exist")

    monkeypatch.setattr("core.onnx_import.importlib.import_module", broken)
    with pytest.raises(OnnxUnavailableError, match="torchvision::nms"):
        load_onnx(tmp_path / "m.onnx", input_shape=(3, 8, 8), output="logits", mean=None, std=None)


def test_a_graph_ending_in_a_linear_layer_becomes_features_and_head() -> None:
    net = _tiny()
    model = wrap_graph(
        fx.symbolic_trace(net),
        name="m.onnx",
        input_shape=(3, 8, 8),
        output="logits",
        mean=MEAN,
        std=STD,
    )
    # The exported-program wrapper (core.exported), with its own arch.
    assert isinstance(model, ExportedClassifier) and isinstance(model.body, ExportedBody)
    assert (model.arch, model.output, model.feature_dim, model.num_classes) == (
        "onnx",
        "logits",
        8,
        4,
    )
    assert not any(isinstance(m, nn.Linear) for m in model.body.modules())  # the head is cut
    x = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model.features(x), net.features(_normalized(x)))
        torch.testing.assert_close(model(x), net(_normalized(x)))
    torch.testing.assert_close(model.head.weight, net.fc.weight)
    assert not any(p.requires_grad for p in model.body.parameters())  # frozen, as exported
    x.requires_grad_(True)  # the attacks differentiate f(x) with respect to the pixels
    model.features(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with pytest.raises(CheckpointError, match=r"images of shape \[3, 8, 8\]"):
        model.features(torch.rand(1, 3, 9, 9))


def test_a_graph_of_features_has_no_trained_head() -> None:
    net = _tiny()
    graph = fx.symbolic_trace(nn.Sequential(net.conv, net.bn, nn.ReLU(), net.pool))
    model = wrap_graph(
        graph, name="m", input_shape=(3, 8, 8), output="features", mean=None, std=None
    )
    assert (model.output, model.feature_dim, model.num_classes) == ("features", 8, 0)
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model.features(x), net.features(x))  # mean 0, std 1


class FixedBatch(nn.Module):
    """A graph as exported with a batch of one: it flattens the whole batch into one row."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 2, 1), nn.Linear(2 * 8 * 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).reshape(1, -1))


def test_a_graph_with_a_fixed_batch_runs_one_image_at_a_time() -> None:
    net = FixedBatch()
    with pytest.raises(CheckpointError, match="dynamic batch axis"):  # declared dynamic
        wrap_graph(
            fx.symbolic_trace(net),
            name="m",
            input_shape=(3, 8, 8),
            output="logits",
            mean=MEAN,
            std=STD,
        )
    model = wrap_graph(
        fx.symbolic_trace(net),
        name="m",
        input_shape=(3, 8, 8),
        output="logits",
        mean=MEAN,
        std=STD,
        batch_range=(1, 1),  # what load_onnx reads from a graph input of static batch 1
    )
    x = torch.rand(3, 3, 8, 8)
    with torch.no_grad():
        expected = torch.cat([net(_normalized(x[i : i + 1])) for i in range(3)])
        torch.testing.assert_close(model(x), expected)


def test_graphs_that_cannot_be_audited_are_refused_with_the_reason() -> None:
    net = _tiny()
    no_head = fx.symbolic_trace(nn.Sequential(net.conv, nn.ReLU(), net.pool, nn.Flatten()))
    with pytest.raises(CheckpointError, match=r"output=logits needs .* linear layer"):
        wrap_graph(no_head, name="m", input_shape=(3, 8, 8), output="logits", mean=MEAN, std=STD)
    wrong_size = fx.symbolic_trace(_tiny())
    with pytest.raises(CheckpointError, match="does not run on a batch of shape"):
        wrap_graph(wrong_size, name="m", input_shape=(1, 8, 8), output="logits", mean=[0], std=[1])
    spatial = fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 300, 1)))  # a map, not a vector
    with pytest.raises(CheckpointError, match="pooled vector"):
        wrap_graph(
            spatial, name="m", input_shape=(3, 16, 16), output="features", mean=None, std=None
        )


def test_the_apis_sniff_tells_other_weight_formats_from_onnx() -> None:
    import io
    import pickle

    from safetensors.torch import save

    state = _tiny().state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    for data in (save(dict(state)), buffer.getvalue(), pickle.dumps({"a": 1}), b""):
        assert not looks_like_onnx(data[:SNIFF_BYTES], len(data))
    assert not looks_like_onnx(b"\x08\x07" + b"\xff" * 64, 66)  # a varint longer than 64 bits
    start = b"\x08\x08\x12\x07pytorch:\x40"  # ir_version, producer, a graph of 64 bytes
    assert looks_like_onnx(start, len(start) + 64)
    assert not looks_like_onnx(start, len(start) + 10)  # the graph would run past the file
    assert not looks_like_onnx(b"\x12\x07pytorch\x08\x08", 100)  # ir_version comes first


def _onnx_tiny(path: Path, net: TinyNet) -> None:
    """``net`` written as an ONNX graph by hand with onnx.helper (no exporter needed): Conv,
    BatchNormalization, Relu, GlobalAveragePool, Flatten, Gemm; a dynamic batch axis."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def constant(name: str, tensor: torch.Tensor) -> onnx.TensorProto:
        return numpy_helper.from_array(tensor.detach().numpy(), name)

    nodes = [
        helper.make_node("Conv", ["input", "conv.w", "conv.b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node(
            "BatchNormalization",
            ["c", "bn.w", "bn.b", "bn.mean", "bn.var"],
            ["b"],
            epsilon=net.bn.eps,
        ),
        helper.make_node("Relu", ["b"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["logits"], transB=1),
    ]
    initializers = [
        constant("conv.w", net.conv.weight),
        constant("conv.b", net.conv.bias),
        constant("bn.w", net.bn.weight),
        constant("bn.b", net.bn.bias),
        constant("bn.mean", net.bn.running_mean),
        constant("bn.var", net.bn.running_var),
        constant("fc.w", net.fc.weight),
        constant("fc.b", net.fc.bias),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    onnx.save_model(model, str(path))


@pytest.mark.skipif(
    importlib.util.find_spec("onnx2torch") is None,
    reason="needs the onnx extra (onnx2torch, with an importable torchvision)",
)
def test_a_tiny_onnx_model_converts_into_the_same_function(tmp_path: Path) -> None:
    net = _tiny()
    path = tmp_path / "tiny.onnx"
    _onnx_tiny(path, net)
    data = path.read_bytes()
    assert looks_like_onnx(data[:SNIFF_BYTES], len(data))  # what the API checks
    model = load_onnx(path, input_shape=(3, 8, 8), output="logits", mean=MEAN, std=STD)
    assert (model.arch, model.feature_dim, model.num_classes) == ("onnx", 8, 4)
    assert model.body.batch_range == (1, 1024)  # the input's batch axis is named, not fixed
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(x), net(_normalized(x)), rtol=1e-4, atol=1e-5)
        reference = F.adaptive_avg_pool2d(torch.relu(net.bn(net.conv(_normalized(x)))), 1)
        torch.testing.assert_close(model.features(x), reference.flatten(1), rtol=1e-4, atol=1e-5)
    with pytest.raises(CheckpointError, match="takes 8 at height"):
        load_onnx(path, input_shape=(3, 16, 8), output="logits", mean=MEAN, std=STD)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07" + b"\xff" * 64)
    with pytest.raises(CheckpointError, match=r"garbage\.onnx"):
        load_onnx(garbage, input_shape=(3, 8, 8), output="logits", mean=None, std=None)


# ---- the worker's path: a converted graph re-exported with torch.export, then core.exported ----

NEEDS_CONVERTER = pytest.mark.skipif(
    importlib.util.find_spec("onnx2torch") is None,
    reason="needs the onnx extra (onnx2torch, with an importable torchvision)",
)


def test_a_converted_graph_is_re_exported_with_a_dynamic_batch_and_loads_as_a_pt2(
    tmp_path: Path,
) -> None:
    """``export_graph`` takes the torch.fx graph onnx2torch makes (here: traced from the same
    modules) to a ``.pt2`` that the safe loader of uploaded programs accepts unchanged."""
    from core.exported import load_exported
    from core.onnx_import import export_graph

    net = _tiny()
    program = export_graph(
        fx.symbolic_trace(net), tmp_path / "m.pt2", name="m.onnx", input_shape=(3, 8, 8)
    )
    model = load_exported(program, input_shape=(3, 8, 8), output="logits", mean=MEAN, std=STD)
    assert (model.arch, model.feature_dim, model.num_classes) == ("exported", 8, 4)
    assert model.body.batch_range == (1, 1024)  # one dynamic axis, not one image at a time
    x = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model(x), net(_normalized(x)))
    with pytest.raises(CheckpointError, match="takes 8 at height"):  # exported on 8x8 images
        load_exported(program, input_shape=(3, 16, 8), output="logits")


def test_a_graph_that_fixes_its_batch_is_exported_for_one_image_at_a_time(
    tmp_path: Path,
) -> None:
    from core.exported import load_exported
    from core.onnx_import import export_graph

    net = FixedBatch()  # declared with a dynamic batch axis, but it reshapes to one row
    program = export_graph(
        fx.symbolic_trace(net), tmp_path / "m.pt2", name="m.onnx", input_shape=(3, 8, 8)
    )
    model = load_exported(program, input_shape=(3, 8, 8), output="logits")
    assert model.body.batch_range == (1, 1)
    x = torch.rand(3, 3, 8, 8)
    with torch.no_grad():
        expected = torch.cat([net(x[i : i + 1]) for i in range(3)])
        torch.testing.assert_close(model(x), expected)


def test_a_graph_torch_export_cannot_take_is_refused_with_the_reason(tmp_path: Path) -> None:
    from core.onnx_import import export_graph

    class Branches(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.flatten(1) if x.sum() > 0 else -x.flatten(1)  # data-dependent control flow

    with pytest.raises(CheckpointError, match=r"m\.onnx was converted but torch.export could not"):
        export_graph(Branches(), tmp_path / "m.pt2", name="m.onnx", input_shape=(3, 8, 8))
    assert not (tmp_path / "m.pt2").exists()


@NEEDS_CONVERTER
def test_an_onnx_model_becomes_a_pt2_the_safe_loader_accepts(tmp_path: Path) -> None:
    """The worker's whole path on a real ONNX file: onnx2torch, torch.export, core.exported."""
    from api.onnx_check import check_onnx_file
    from core.exported import load_exported
    from core.onnx_import import export_onnx

    net = _tiny()
    path = tmp_path / "tiny.onnx"
    _onnx_tiny(path, net)
    assert check_onnx_file(path).opsets == {"": 13}  # what the API checks before queueing
    program = export_onnx(path, tmp_path / "tiny.pt2", input_shape=(3, 8, 8))
    model = load_exported(program, input_shape=(3, 8, 8), output="logits", mean=MEAN, std=STD)
    assert (model.arch, model.feature_dim, model.num_classes) == ("exported", 8, 4)
    assert model.body.batch_range == (1, 1024)
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(model(x), net(_normalized(x)), rtol=1e-4, atol=1e-5)


@NEEDS_CONVERTER
def test_custom_domains_functions_and_unknown_operators_are_refused_before_conversion(
    tmp_path: Path,
) -> None:
    import onnx
    from onnx import TensorProto, helper

    from core.onnx_import import export_onnx

    def write(node: onnx.NodeProto, name: str, **model: object) -> Path:
        graph = helper.make_graph(
            [node],
            "g",
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 8, 8])],
            [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        )
        proto = helper.make_model(graph, **model)
        path = tmp_path / name
        onnx.save_model(proto, str(path))
        return path

    custom = write(
        helper.make_node("Inverse", ["input"], ["out"], domain="com.microsoft"),
        "custom.onnx",
        opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("com.microsoft", 1)],
    )
    with pytest.raises(CheckpointError, match=r"custom operators \(com\.microsoft::Inverse\)"):
        export_onnx(custom, tmp_path / "c.pt2", input_shape=(3, 8, 8))
    unknown = write(
        helper.make_node("NotAnOperator", ["input"], ["out"]),
        "unknown.onnx",
        opset_imports=[helper.make_opsetid("", 13)],
    )
    with pytest.raises(CheckpointError, match=r"operators ONNX does not define: \['NotAn"):
        export_onnx(unknown, tmp_path / "u.pt2", input_shape=(3, 8, 8))
    assert not (tmp_path / "c.pt2").exists() and not (tmp_path / "u.pt2").exists()
