"""ONNX models as Bulwark extractors, where the optional converter imports.

An ONNX file is a protobuf graph of operators and constant tensors: reading it runs no code.
``load_onnx`` converts it with onnx2torch (the ``onnx`` extra, ``pip install -e ".[onnx]"``;
onnx2torch imports torchvision, so the worker needs one that imports) into a torch.fx graph of
torch modules, and wraps that graph exactly as ``core.exported`` wraps a torch.export program:
an :class:`core.exported.ExportedBody` (images of the declared (C, H, W) only, run in chunks
within the graph's batch sizes, weights frozen) inside an :class:`OnnxClassifier`, the
``ExportedClassifier`` with ``arch = "onnx"``: pixels in [0,1] of shape (N, C, H, W) ->
``normalize`` -> graph -> f(x) of shape (N, feature_dim) -> ``head``.

What the graph outputs (``output``), as for an exported program:

- ``"features"``: the graph computes f(x) (N, D) (or (N, D, 1, 1)); there is no trained head
  (``num_classes`` 0: every audit re-trains a fresh one).
- ``"logits"``: the graph ends in one linear layer (an ONNX ``Gemm`` with constant weights,
  which is what ``torch.onnx.export`` writes for ``nn.Linear``, and onnx2torch turns into an
  ``nn.Linear``). That layer becomes ``head`` and the graph up to its input computes f(x).

A file that does not parse or convert, keeps tensors in external files (which would be read
from paths the file names), defines its own functions or uses operators of a custom domain or
unknown to ONNX, has other than one image input, does not run on ``input_shape``, or gives
features that are not finite pooled vectors or not differentiable in x raises a
``CheckpointError`` naming the problem. A worker without the converter raises
``OnnxUnavailableError``, which suggests torch.export instead.

The service does not keep the converted torch.fx graph: ``export_onnx`` re-exports it with
``torch.export`` on the declared input shape into a ``.pt2``, which the worker's import job
then checks and stores exactly as an uploaded program (``core.exported``: the operator
allowlist, no pickles), so an ONNX model is audited as an exported program.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import fx, nn

from core.checkpoint import CheckpointError
from core.errors import BulwarkError, ErrorKind
from core.exported import MAX_FEATURE_DIM, ExportedBody, ExportedClassifier, Output
from core.models import Normalize

ARCH = "onnx"
STANDARD_DOMAINS = frozenset({"", "ai.onnx"})  # the default operator set, by both its names
PROBE_BATCH = 2  # images per probe batch, where the graph's batch sizes allow
MAX_BATCH = 1024  # the largest chunk a graph with a dynamic batch axis is run on


class OnnxClassifier(ExportedClassifier):
    """A converted ONNX graph in the exported-program wrapper; ``arch`` is ``"onnx"``."""

    def __init__(
        self,
        body: ExportedBody,
        feature_dim: int,
        num_classes: int,
        normalize: Normalize,
        *,
        output: Output,
    ) -> None:
        super().__init__(body, feature_dim, num_classes, normalize, output=output)
        self.arch = ARCH


class OnnxUnavailableError(BulwarkError):
    """This worker cannot convert ONNX: the optional converter does not import here."""

    kind = ErrorKind.INVALID_CONFIG


def _converter() -> tuple[ModuleType, ModuleType]:
    """``onnx`` and ``onnx2torch``, imported on first use (neither is a core dependency)."""
    try:
        onnx2torch = importlib.import_module("onnx2torch")
        onnx = importlib.import_module("onnx")
    except Exception as error:  # ImportError, or torchvision failing inside onnx2torch's import
        raise OnnxUnavailableError(
            "ONNX support needs the `onnx` extra (pip install 'bulwark[onnx]': onnx2torch and "
            "onnx) on a worker where torchvision imports, and this worker cannot import it "
            f"({type(error).__name__}: {error}); or export the model with torch.export and "
            "upload the .pt2"
        ) from error
    return onnx, onnx2torch


def load_onnx(
    path: str | Path,
    *,
    input_shape: Sequence[int],
    output: Output,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
) -> OnnxClassifier:
    """The ONNX model at ``path`` as an extractor (``arch == "onnx"``), in eval mode on the CPU.

    Args:
        path: the ``.onnx`` file (self-contained: no external data files).
        input_shape: (C, H, W) of the images; the graph's static sizes must agree.
        output: ``"features"`` or ``"logits"`` (see the module docstring).
        mean, std: per-channel pixel statistics the graph expects its input normalized by
            (pixels in [0,1]); None for a graph that takes raw [0,1] pixels.
    """
    path = Path(path)
    graph, batch_range = convert_onnx(path, input_shape=input_shape)
    return wrap_graph(
        graph,
        name=path.name,
        input_shape=input_shape,
        output=output,
        mean=mean,
        std=std,
        batch_range=batch_range,
    )


def convert_onnx(
    path: str | Path, *, input_shape: Sequence[int], name: str | None = None
) -> tuple[fx.GraphModule, tuple[int, int]]:
    """The ONNX model at ``path`` converted by onnx2torch into a torch.fx graph (its input the
    image batch, its output the graph's one output), and the batch sizes its input takes.
    ``name`` names the file in messages (default: its own name).

    Refused with a :class:`CheckpointError` naming the problem, before the converter sees the
    graph: a file that does not parse or check, tensors in external files, model-local
    functions, operators of other than the standard domain or unknown to ONNX, other than one
    image input, static sizes that disagree with ``input_shape``; then whatever onnx2torch
    cannot convert (its message relayed).
    """
    onnx, onnx2torch = _converter()
    path = Path(path)
    name = name or path.name
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as error:  # protobuf's and onnx's errors for a file that does not parse
        raise CheckpointError(f"{name} is not a readable ONNX model: {error}") from error
    external = [
        tensor.name
        for tensor in _tensors(proto)
        if onnx.external_data_helper.uses_external_data(tensor)
    ]
    if external:
        raise CheckpointError(
            f"{name} keeps {len(external)} tensors in external files ({external[:5]}); "
            "upload one self-contained .onnx (onnx.save_model(model, path, "
            "save_as_external_data=False))"
        )
    check_operators(onnx, proto, name)
    try:
        onnx.checker.check_model(proto)
    except Exception as error:  # onnx.checker.ValidationError and its relatives
        raise CheckpointError(f"{name} is not a valid ONNX model: {error}") from error
    batch_range = _batch_range(proto, input_shape, name)
    try:
        graph = onnx2torch.convert(proto)
    except Exception as error:  # operators onnx2torch lacks, graphs it cannot build
        raise CheckpointError(f"{name} could not be converted from ONNX: {error}") from error
    return graph, batch_range


def check_operators(onnx: ModuleType, proto: Any, name: str) -> None:
    """Refuse what no converter can take: model-local functions, operator sets or nodes of
    other than the standard domain (custom operators), and operators ONNX does not define."""
    if len(proto.functions):
        functions = sorted({f"{f.domain}.{f.name}" for f in proto.functions})
        raise CheckpointError(
            f"{name} defines its own functions {functions[:5]} (custom operators); only graphs "
            "of standard ONNX operators can be converted"
        )
    domains = sorted({o.domain for o in proto.opset_import} - STANDARD_DOMAINS)
    custom = sorted(
        {
            f"{n.domain}::{n.op_type}"
            for n in _nodes(proto.graph)
            if n.domain not in STANDARD_DOMAINS
        }
    )
    if domains or custom:
        raise CheckpointError(
            f"{name} uses custom operators ({', '.join(custom[:10] or domains)}); only the "
            "standard ONNX operators (domain '' / 'ai.onnx') can be converted: export the model "
            "with torch.export and upload the .pt2"
        )
    unknown = sorted({n.op_type for n in _nodes(proto.graph) if not onnx.defs.has(n.op_type)})
    if unknown:
        raise CheckpointError(f"{name} uses operators ONNX does not define: {unknown[:10]}")


def _nodes(graph: Any) -> Iterator[Any]:
    """Every node of an ONNX graph, those of its subgraphs (If, Loop, Scan bodies) included."""
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.HasField("g"):
                yield from _nodes(attribute.g)
            for subgraph in attribute.graphs:
                yield from _nodes(subgraph)


def export_onnx(
    path: str | Path, out: str | Path, *, input_shape: Sequence[int], name: str | None = None
) -> Path:
    """Convert the ONNX model at ``path`` (:func:`convert_onnx`) and write it to ``out`` as a
    ``torch.export`` program (:func:`export_graph`): what ``core.exported`` then checks and
    loads exactly as an uploaded ``.pt2``. ``name`` names the file in messages."""
    name = name or Path(path).name
    graph, batch_range = convert_onnx(path, input_shape=input_shape, name=name)
    return export_graph(graph, out, name=name, input_shape=input_shape, batch_range=batch_range)


def export_graph(
    graph: nn.Module,
    out: str | Path,
    *,
    name: str,
    input_shape: Sequence[int],
    batch_range: tuple[int, int] = (1, MAX_BATCH),
) -> Path:
    """``torch.export.export`` of ``graph`` (in eval mode, float32, weights frozen) on images
    of ``input_shape``, saved with ``torch.export.save`` to ``out``.

    A graph whose input takes a range of batch sizes is exported with a dynamic batch axis
    over that range; where the converted graph fixes its batch size after all (a reshape to a
    constant batch, say), it is exported for one image at a time instead, which
    ``core.exported`` runs image by image. A graph that cannot be exported raises a
    :class:`CheckpointError` with torch's reason.
    """
    shape = tuple(int(v) for v in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise CheckpointError(f"input_shape must be [channels, height, width], got {list(shape)}")
    graph = graph.float().eval().requires_grad_(False)
    smallest, largest = batch_range
    generator = torch.Generator().manual_seed(0)
    attempts: list[tuple[int, Any]] = []
    if smallest < largest:
        # torch.export specializes an axis whose example size is 0 or 1: show it 2 images.
        batch = torch.export.Dim("batch", min=smallest, max=largest)
        attempts.append((max(2, smallest), ({0: batch},)))
    attempts.append((smallest, None))
    failures = []
    for size, dynamic_shapes in attempts:
        example = torch.rand(size, *shape, generator=generator)
        try:
            program = torch.export.export(
                graph, (example,), dynamic_shapes=dynamic_shapes, strict=False
            )
        except Exception as error:  # torch's export errors have no common base class
            failures.append(f"{type(error).__name__}: {str(error)[:300]}")
            continue
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.export.save(program, out)
        return out
    raise CheckpointError(
        f"{name} was converted but torch.export could not export it on input "
        f"{list(shape)}: {'; '.join(failures)}"
    )


def _batch_range(proto: Any, input_shape: Sequence[int], name: str) -> tuple[int, int]:
    """The batch sizes the graph runs on, [smallest, largest], from its one image input; its
    static channel, height and width sizes must be those of ``input_shape``."""
    constants = {tensor.name for tensor in proto.graph.initializer}
    inputs = [value for value in proto.graph.input if value.name not in constants]
    if len(inputs) != 1:
        raise CheckpointError(f"{name} has {len(inputs)} inputs; one image batch is needed")
    dims = inputs[0].type.tensor_type.shape.dim
    sizes = [dim.dim_value if dim.WhichOneof("value") == "dim_value" else None for dim in dims]
    if len(sizes) != 4:
        raise CheckpointError(f"{name}'s input has {len(sizes)} axes, not (N, C, H, W)")
    for axis, (declared, static) in enumerate(zip(input_shape, sizes[1:], strict=False)):
        if static is not None and static != declared:
            raise CheckpointError(
                f"input_shape {list(input_shape)}: {name} takes {static} at "
                f"{('channels', 'height', 'width')[axis]}"
            )
    return (sizes[0], sizes[0]) if sizes[0] else (1, MAX_BATCH)


def _tensors(proto: Any) -> Iterator[Any]:
    """Every TensorProto of an ONNX model: initializers, constants, subgraphs, functions."""

    def of_nodes(nodes: Any) -> Iterator[Any]:
        for node in nodes:
            for attribute in node.attribute:
                if attribute.HasField("t"):
                    yield attribute.t
                yield from attribute.tensors
                if attribute.HasField("g"):
                    yield from of_graph(attribute.g)
                for subgraph in attribute.graphs:
                    yield from of_graph(subgraph)

    def of_graph(graph: Any) -> Iterator[Any]:
        yield from graph.initializer
        for sparse in graph.sparse_initializer:
            yield from (sparse.values, sparse.indices)
        yield from of_nodes(graph.node)

    yield from of_graph(proto.graph)
    for function in proto.functions:
        yield from of_nodes(function.node)


def wrap_graph(
    graph: fx.GraphModule,
    *,
    name: str,
    input_shape: Sequence[int],
    output: Output,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    batch_range: tuple[int, int] = (1, MAX_BATCH),
) -> OnnxClassifier:
    """A converted graph (one tensor input, one tensor output) as an :class:`OnnxClassifier`;
    ``graph`` is changed in place. ``name`` names the file in messages."""
    shape = tuple(int(v) for v in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise CheckpointError(f"input_shape must be [channels, height, width], got {list(shape)}")
    mean = [0.0] * shape[0] if mean is None else list(mean)
    std = [1.0] * shape[0] if std is None else list(std)
    if len(mean) != shape[0] or len(std) != shape[0] or min(std) <= 0:
        raise CheckpointError(f"mean and std need {shape[0]} values each (std > 0)")
    normalize = Normalize(mean, std)
    head: nn.Linear | None = None
    if output == "logits":
        head = _split_head(graph, name)
    elif output == "features":
        _return_one(graph, _single_output(graph, name))
    else:
        raise CheckpointError(f"output must be 'features' or 'logits', got {output!r}")
    graph.float().eval().requires_grad_(False)
    body = ExportedBody(graph, [], input_shape=shape, batch_range=batch_range)
    body.feature_dim = feature_dim = _measure(body, normalize, name)
    num_classes = 0 if head is None else head.out_features
    if head is not None and head.in_features != feature_dim:
        raise CheckpointError(
            f"{name}: the final linear layer takes {head.in_features} features but gets "
            f"{feature_dim} on input {list(shape)}"
        )
    model = OnnxClassifier(body, feature_dim, num_classes, normalize, output=output)
    if head is not None:
        with torch.no_grad():
            model.head.weight.copy_(head.weight)
            if head.bias is None:  # a Gemm without its C input
                model.head.bias.zero_()
            else:
                model.head.bias.copy_(head.bias)
    _check_gradient(model, name)
    return model.eval()


def _single_output(graph: fx.GraphModule, name: str) -> fx.Node:
    (output_node,) = [node for node in graph.graph.nodes if node.op == "output"]
    result = output_node.args[0]
    if isinstance(result, tuple | list) and len(result) == 1:
        result = result[0]
    if not isinstance(result, fx.Node):
        raise CheckpointError(f"{name} has several outputs; one (features or logits) is needed")
    return result


def _return_one(graph: fx.GraphModule, node: fx.Node) -> None:
    """Make ``node`` the graph's one output, as a 1-tuple (what ``ExportedBody`` calls for),
    and drop what no longer leads to it."""
    (output_node,) = [n for n in graph.graph.nodes if n.op == "output"]
    output_node.args = ((node,),)
    graph.graph.eliminate_dead_code()
    graph.delete_all_unused_submodules()
    graph.graph.lint()
    graph.recompile()


def _split_head(graph: fx.GraphModule, name: str) -> nn.Linear:
    """Cut the graph's final linear layer off and return it; the graph then outputs its input."""
    result = _single_output(graph, name)
    last = graph.get_submodule(str(result.target)) if result.op == "call_module" else None
    features = result.args[0] if len(result.args) == 1 and not result.kwargs else None
    if not isinstance(last, nn.Linear) or not isinstance(features, fx.Node):
        raise CheckpointError(
            f"{name}: output=logits needs a graph that ends in a linear layer (an ONNX Gemm "
            f"with constant weights, as torch.onnx.export writes for nn.Linear); this one ends "
            f"in {result.format_node()}: upload it with output=features, or export the model "
            "with torch.export and upload the .pt2"
        )
    _return_one(graph, features)
    return last


def _measure(body: ExportedBody, normalize: Normalize, name: str) -> int:
    """f(x)'s width, from a probe batch of the declared shape; refuses a graph that fails on
    it, gives one row per batch instead of per image, a map instead of a pooled vector,
    non-finite values, or features of an image that depend on the rest of its batch."""
    smallest, largest = body.batch_range
    x = torch.rand(
        max(smallest, min(PROBE_BATCH, largest)),
        *body.input_shape,
        generator=torch.Generator().manual_seed(0),
    )
    try:
        with torch.no_grad():
            features = torch.flatten(body(normalize(x)), 1)
            alone = torch.flatten(body(normalize(x[:1])), 1)
    except Exception as error:  # any operator may refuse the shape
        raise CheckpointError(
            f"{name} does not run on a batch of shape {list(x.shape)}: {str(error)[:300]}"
        ) from error
    if len(features) != len(x):
        raise CheckpointError(
            f"{name} returns {len(features)} rows for {len(x)} images: export it with a "
            "dynamic batch axis (torch.onnx.export(..., dynamic_axes={'input': {0: 'batch'}}))"
        )
    if not 1 <= features.shape[1] <= MAX_FEATURE_DIM:
        raise CheckpointError(
            f"{name} returns {features.shape[1]} values per image; f(x) must be a pooled "
            f"vector of at most {MAX_FEATURE_DIM} (pool the feature map before export)"
        )
    if not torch.isfinite(features).all():
        raise CheckpointError(f"{name} returns non-finite features on random images")
    if not torch.allclose(alone, features[:1], rtol=1e-4, atol=1e-5):
        raise CheckpointError(
            f"{name}: the features of an image depend on the other images in its batch "
            "(batch statistics?); export it in eval mode"
        )
    return int(features.shape[1])


def _check_gradient(model: OnnxClassifier, name: str) -> None:
    """The attacks differentiate f(x) w.r.t. x: the gradient must reach the input, finite."""
    x = torch.rand(1, *model.input_shape, generator=torch.Generator().manual_seed(1))
    x.requires_grad_(True)
    try:
        (grad,) = torch.autograd.grad(model.features(x).square().sum(), x)
    except RuntimeError as error:
        raise CheckpointError(f"{name}: f(x) is not differentiable in x: {error}") from error
    if not torch.isfinite(grad).all() or not grad.abs().sum() > 0:
        raise CheckpointError(
            f"{name}: the gradient of f(x) with respect to x is zero or not finite"
        )
