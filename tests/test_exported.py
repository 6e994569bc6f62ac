"""``torch.export`` programs (``core.exported``): any architecture, loaded without unpickling or
running anything of the uploader's.

The model is a torchvision-style ResNet-18 written here (7x7 stride-2 stem, max-pool, four
stages of two BasicBlocks, adaptive average pool, fc; narrow stages keep it fast), exported
with a static batch of one so the loader's batching is exercised too. Malicious archives are
built from its real archive; where torch.export.load would run their payload, the test shows
that it does (the payload is live) and that Bulwark's loader refuses it with the file never
created.
"""

from __future__ import annotations

import io
import json
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torchvision_style import SHAPE, Penultimate, ResNet18, export, resnet

from catalog import SplitConfig
from core.audit import crafting_model, run_audit
from core.checkpoint import LoadedExtractor, load_extractor
from core.config import AuditConfig
from core.data import ImageDataset
from core.errors import BulwarkError, ErrorKind
from core.exported import (
    ALLOWED_OPS,
    ArchiveLimits,
    ExportedClassifier,
    ExportError,
    check_expression,
    load_exported,
    save_exported,
)
from core.models import FeatureClassifier


@pytest.fixture(scope="module")
def net() -> ResNet18:
    return resnet()


@pytest.fixture(scope="module")
def logits_pt2(net: ResNet18) -> bytes:
    """The whole classifier exported on (1, 3, 32, 32): a static batch of one."""
    return export(net)


@pytest.fixture(scope="module")
def features_pt2(net: ResNet18) -> bytes:
    return export(Penultimate(net))


def images(count: int = 5, seed: int = 1) -> torch.Tensor:
    return torch.rand(count, *SHAPE, generator=torch.Generator().manual_seed(seed))


# ---- loading real programs ---------------------------------------------------------------------


def test_features_match_the_eager_penultimate_output(net, features_pt2) -> None:
    model = load_exported(features_pt2, input_shape=SHAPE)
    assert isinstance(model, FeatureClassifier) and model.arch == "exported"
    assert (model.feature_dim, model.num_classes, model.output) == (64, 0, "features")
    assert model.body.batch_range == (1, 1)  # exported on one image: five run one by one
    assert torch.equal(model.normalize.mean.flatten(), torch.zeros(3))
    assert torch.equal(model.normalize.std.flatten(), torch.ones(3))
    x = images()
    with torch.no_grad():
        assert torch.allclose(model.features(x), net.penultimate(x), atol=1e-5)
    assert not model.training and not any(p.requires_grad for p in model.body.parameters())


def test_the_input_shape_comes_from_the_program_and_must_agree(features_pt2) -> None:
    assert load_exported(features_pt2).input_shape == SHAPE
    with pytest.raises(ExportError, match="the program takes 32 at height"):
        load_exported(features_pt2, input_shape=(3, 28, 32))
    model = load_exported(features_pt2)
    with pytest.raises(ExportError, match="audit it on a dataset of that shape"):
        model.features(torch.rand(2, 3, 28, 28))


def test_logits_split_at_the_final_linear_layer(net, logits_pt2) -> None:
    classes = [f"c{i}" for i in range(10)]
    model = load_exported(logits_pt2, input_shape=SHAPE, output="logits", classes=classes)
    assert (model.feature_dim, model.num_classes, model.output) == (64, 10, "logits")
    assert torch.equal(model.head.weight, net.fc.weight)
    assert torch.equal(model.head.bias, net.fc.bias)
    x = images()
    with torch.no_grad():
        assert torch.allclose(model.features(x), net.penultimate(x), atol=1e-5)
        assert torch.allclose(model(x), net(x), atol=1e-5)
    # The cut layer's weights are not kept in the program.
    assert len(list(model.body.parameters())) == len(list(net.parameters())) - 2
    with pytest.raises(ExportError, match="3 names for a head of 10"):
        load_exported(logits_pt2, output="logits", classes=classes[:3])


def test_logits_split_after_decomposition_and_a_refusal_without_a_linear_layer(
    net, features_pt2
) -> None:
    program = torch.export.export(net, (torch.rand(2, *SHAPE),)).run_decompositions()
    ops = {str(node.target) for node in program.graph.nodes}
    assert "aten.addmm.default" in ops and "aten.convolution.default" in ops
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    model = load_exported(buffer.getvalue(), output="logits")
    x = images()
    with torch.no_grad():
        assert torch.allclose(model(x), net(x), atol=1e-5)
    with pytest.raises(ExportError, match=r"ends in a linear layer.*output=features"):
        load_exported(features_pt2, output="logits")


@pytest.mark.slow  # seconds of CPU or a subprocess: out of make test-fast
def test_a_dynamic_batch_and_a_vision_transformer(net) -> None:
    dynamic = {"x": {0: torch.export.Dim("batch", min=1, max=64)}}
    model = load_exported(export(Penultimate(net), (2, *SHAPE), dynamic_shapes=dynamic))
    assert model.body.batch_range == (1, 64)
    x = images(70)  # more than the largest batch: two chunks
    with torch.no_grad():
        assert torch.allclose(model.features(x), net.penultimate(x), atol=1e-5)

    class ViT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.patch = nn.Conv2d(3, 16, 8, 8)
            self.cls = nn.Parameter(torch.randn(1, 1, 16))
            self.pos = nn.Parameter(torch.randn(1, 17, 16) * 0.1)
            layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, norm_first=True)
            self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.patch(x).flatten(2).transpose(1, 2)
            x = torch.cat([self.cls.expand(len(x), -1, -1), x], 1) + self.pos
            return self.norm(self.encoder(x))[:, 0]

    torch.manual_seed(0)
    vit = ViT().eval()
    model = load_exported(export(vit, (2, *SHAPE)))
    x = images(3)
    with torch.no_grad():
        assert torch.allclose(model.features(x), vit(x), atol=1e-5)


def test_normalization_is_the_models_first_layer(net, features_pt2) -> None:
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    model = load_exported(features_pt2, mean=mean, std=std)
    x = images()
    normalized = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(model.features(x), net.penultimate(normalized), atol=1e-5)
    with pytest.raises(ExportError, match="need 3 values"):
        load_exported(features_pt2, mean=[0.5], std=[0.2])


def test_gradients_reach_the_input_through_the_crafting_copy(net, features_pt2) -> None:
    """The attacks differentiate f(x) w.r.t. x through ``core.audit.crafting_model``'s
    eval-mode, channels_last copy: same features, same input gradient as the eager net."""
    model = load_exported(features_pt2)
    attacker, channels_last = crafting_model(model, torch.device("cpu"), torch.float32)
    assert channels_last and not any(p.requires_grad for p in attacker.parameters())
    x = images(3).requires_grad_(True)
    (grad,) = torch.autograd.grad(attacker.features(x).square().sum(), x)
    x_ref = x.detach().clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(net.penultimate(x_ref).square().sum(), x_ref)
    assert grad.abs().sum() > 0 and torch.allclose(grad, expected, atol=1e-5)


def test_a_stored_exported_model_is_a_checkpoint_folder(net, features_pt2, tmp_path) -> None:
    source = tmp_path / "hub.pt2"
    source.write_bytes(features_pt2)
    stored = save_exported(source, tmp_path / "model", manifest={"source_file": "hub.pt2"})
    assert (tmp_path / "model" / "model.pt2").read_bytes() == features_pt2  # untouched
    manifest = json.loads((tmp_path / "model" / "manifest.json").read_text())
    assert manifest["kind"] == "exported-extractor" and manifest["arch"] == "exported"
    assert manifest["input_shape"] == list(SHAPE) and manifest["head"] == "none"
    assert (manifest["feature_dim"], manifest["num_classes"], manifest["in_channels"]) == (64, 0, 3)
    assert manifest == stored.manifest and manifest["source_file"] == "hub.pt2"

    loaded = load_extractor(tmp_path / "model")
    assert isinstance(loaded, LoadedExtractor) and isinstance(loaded.model, ExportedClassifier)
    x = images()
    with torch.no_grad():
        assert torch.allclose(loaded.model.features(x), net.penultimate(x), atol=1e-5)
    assert load_extractor(source).model.feature_dim == 64  # a bare .pt2 file

    manifest["weights_sha256"] = "0" * 64
    (tmp_path / "model" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match="does not match the manifest"):
        load_extractor(tmp_path / "model")


def _dataset(classes: int = 4, train: int = 30, test: int = 10) -> ImageDataset:
    """Synthetic 3x32x32 images with learnable structure: each class its own colour and
    stripe orientation, plus noise."""
    generator = torch.Generator().manual_seed(0)

    def draw(per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        rows = torch.arange(32).view(32, 1).expand(32, 32)
        cols = rows.T
        for label in range(classes):
            colour = torch.rand(3, 1, 1, generator=generator)
            stripes = ((rows if label % 2 else cols) // (2 + label) % 2).float()
            base = 0.6 * colour + 0.3 * stripes
            noise = 0.15 * torch.rand(per_class, 3, 32, 32, generator=generator)
            xs.append(((base + noise).clamp(0, 1) * 255).to(torch.uint8))
            ys.append(torch.full((per_class,), label))
        return torch.cat(xs), torch.cat(ys)

    train_x, train_y = draw(train)
    test_x, test_y = draw(test)
    names = tuple(f"class{i}" for i in range(classes))
    return ImageDataset("synthetic", train_x, train_y, test_x, test_y, names, flip=False)


@pytest.mark.slow  # a CLI subprocess or a whole audit: out of make test-fast
def test_an_audit_runs_on_an_exported_resnet(features_pt2, tmp_path) -> None:
    source = tmp_path / "hub.pt2"
    source.write_bytes(features_pt2)
    save_exported(source, tmp_path / "model")
    config = AuditConfig(
        model=str(tmp_path / "model"),
        dataset="cifar10",  # the name on the report; the images are the synthetic set below
        split=SplitConfig(pretrain=0, retrain=20, pool=10),
        attacks=("fc", "bp"),
        attack_settings={"bp": {"poisons": 2}},
        pairs=((0, 1),),
        targets_per_pair=2,
        iterations=3,
        retrain_epochs=2,
        retrain_milestones=(1,),
        screen_images=40,  # the whole test set: every class
        screen_steps=2,
        precision="float32",
        device="cpu",
    )
    report = run_audit(config, dataset=_dataset(), poisons_dir=tmp_path / "poisons")
    assert report.model.arch == "exported" and report.model.feature_dim == 64
    assert report.head_init == "fresh" and report.pre_acc is None  # no head of its own
    assert report.model.weights_sha256 is not None
    for name in ("fc", "bp"):
        result = report.attacks[name]
        assert result.instances == 2 and 0.0 <= result.asr <= 1.0
        assert result.max_linf <= config.delta + 1e-6
        assert 0.0 <= result.re_acc.mean <= 1.0 and len(result.rows) == 2
    assert report.screen is not None and report.screen.separation > 0
    assert (tmp_path / "poisons" / "bp.png").is_file()


# ---- refused archives: nothing of the uploader's runs --------------------------------------------


class CreatesAFile:
    """Unpickling this creates ``path``: the proof that an upload's code ran."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (str(self.path), "w"))


def members(data: bytes) -> dict[str, bytes]:
    """The archive's members by their name below its root folder."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return {info.filename.split("/", 1)[1]: archive.read(info) for info in archive.infolist()}


def rewrite(data: bytes, change: Callable[[dict[str, bytes]], None]) -> bytes:
    """The archive with its members changed by ``change``, written by torch's own PT2 writer
    (so that torch.export.load reads it)."""
    from torch.export.pt2_archive._package import PT2ArchiveWriter

    contents = members(data)
    change(contents)
    buffer = io.BytesIO()
    with PT2ArchiveWriter(buffer) as writer:
        for name, value in contents.items():
            if name not in (".data/version", "byteorder", ".data/serialization_id"):
                writer.write_bytes(name, value)
    return buffer.getvalue()


def edit_program(data: bytes, edit: Callable[[dict[str, Any]], None]) -> bytes:
    def change(contents: dict[str, bytes]) -> None:
        program = json.loads(contents["models/model.json"])
        edit(program)
        contents["models/model.json"] = json.dumps(program).encode()

    return rewrite(data, change)


def torch_save(value: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _pickled_sample_inputs(marker: Path) -> Callable[[dict[str, bytes]], None]:
    def change(contents: dict[str, bytes]) -> None:
        contents["data/sample_inputs/model.pt"] = torch_save(CreatesAFile(marker))

    return change


def _pickled_weight(marker: Path) -> Callable[[dict[str, bytes]], None]:
    """fc.bias stored as a pickle (``use_pickle``), which torch loads with weights_only=False."""

    def change(contents: dict[str, bytes]) -> None:
        config = json.loads(contents["data/weights/model_weights_config.json"])
        meta = config["config"]["fc.bias"]
        meta["use_pickle"] = True
        contents[f"data/weights/{meta['path_name']}"] = torch_save(CreatesAFile(marker))
        contents["data/weights/model_weights_config.json"] = json.dumps(config).encode()

    return change


def _legacy_weights(marker: Path) -> Callable[[dict[str, bytes]], None]:
    def change(contents: dict[str, bytes]) -> None:
        contents["data/weights/model.pt"] = torch_save(CreatesAFile(marker))

    return change


@pytest.mark.parametrize(
    ("payload", "words"),
    [
        (_pickled_sample_inputs, "does not load with weights_only=True"),
        (_pickled_weight, "stored as a pickle"),
        (_legacy_weights, "legacy pickled weights"),
    ],
)
def test_a_pickle_that_would_run_code_is_refused_and_never_runs(
    logits_pt2, tmp_path, payload, words
) -> None:
    marker = tmp_path / "pwned"
    archive = rewrite(logits_pt2, payload(marker))
    with pytest.raises(ExportError, match=words) as refused:
        load_exported(archive)
    assert isinstance(refused.value, BulwarkError)
    assert refused.value.kind == ErrorKind.BAD_CHECKPOINT
    assert not marker.exists()
    # The payload is live: torch.export.load on the same bytes runs it.
    with pytest.raises(Exception):  # noqa: B017 (torch fails after unpickling, in varied ways)
        torch.export.load(io.BytesIO(archive))
    assert marker.exists()


@torch.library.custom_op("bulwark_test::double", mutates_args=())
def double(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@double.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def test_a_custom_operator_is_refused(net) -> None:
    class WithCustomOp(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return double(self.net.penultimate(x))

    archive = export(WithCustomOp())
    assert torch.export.load(io.BytesIO(archive)) is not None  # a valid program otherwise
    with pytest.raises(ExportError, match=r"'torch\.ops\.bulwark_test\.double\.default' is not in"):
        load_exported(archive)


def _node(program: dict[str, Any], target: str) -> dict[str, Any]:
    return next(n for n in program["graph_module"]["graph"]["nodes"] if n["target"] == target)


def _set_target(target: str) -> Callable[[dict[str, Any]], None]:
    def edit(program: dict[str, Any]) -> None:
        _node(program, "torch.ops.aten.relu_.default")["target"] = target

    return edit


def _rename_input(name: str) -> Callable[[dict[str, Any]], None]:
    def edit(program: dict[str, Any]) -> None:
        program["graph_module"]["graph"]["inputs"][-1]["as_tensor"]["name"] = name

    return edit


def _symbolic_size(expr: str) -> Callable[[dict[str, Any]], None]:
    def edit(program: dict[str, Any]) -> None:
        values = program["graph_module"]["graph"]["tensor_values"]
        values["conv2d"]["sizes"][0] = {"as_expr": {"expr_str": expr, "hint": {"as_int": 1}}}

    return edit


def _enum_treespec(program: dict[str, Any]) -> None:
    signature = program["graph_module"]["module_call_graph"][0]["signature"]
    context = json.dumps({"__enum__": True, "fqn": "antigravity:X", "name": "a"})
    signature["out_spec"] = json.dumps(
        [1, {"type": "builtins.dict", "context": context, "children_spec": []}]
    )


def _training_batch_norm(program: dict[str, Any]) -> None:
    node = _node(program, "torch.ops.aten.batch_norm.default")
    next(i for i in node["inputs"] if i["name"] == "training")["arg"] = {"as_bool": True}


def _mutated_buffer(program: dict[str, Any]) -> None:
    specs = program["graph_module"]["signature"]["output_specs"]
    specs.append(
        {"buffer_mutation": {"arg": {"name": "conv2d"}, "buffer_name": "bn1.running_mean"}}
    )


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (_set_target("torch.ops.aten.totally_unknown.default"), "not in Bulwark's operator"),
        (_set_target("torch.load"), "'torch.load' is not in Bulwark's operator allowlist"),
        (_set_target("torch.ops.higher_order.cond"), "not in Bulwark's operator allowlist"),
        (_rename_input("x=open('pwned','w')"), "is not a plain identifier"),
        (_symbolic_size("exec(chr(112)+chr(114))"), "calls something other than sympy"),
        (_symbolic_size("Symbol('s0').__class__"), "Attribute is not allowed"),
        (_enum_treespec, "a tree spec context other than a list of keys"),
        (_training_batch_norm, "training=True: only training=False"),
        (_mutated_buffer, "exactly one tensor"),
    ],
)
def test_a_program_outside_the_rules_is_refused_before_deserializing(
    logits_pt2, edit, words
) -> None:
    with pytest.raises(ExportError, match=words):
        load_exported(edit_program(logits_pt2, edit))


def test_symbolic_sizes_as_torch_writes_them_pass() -> None:
    for expr in (
        "Symbol('s77', positive=True, integer=True)",
        "Mul(Integer(17), Symbol('s77', positive=True, integer=True))",
        "Min(Integer(16), Mul(Integer(16), Symbol('s3', positive=True, integer=True)))",
        "2*s0 + 1",
    ):
        assert check_expression(expr) == expr
    for expr in ("Symbol('os')", "s0.__class__", "__import__('os')", "(lambda: 1)()", "1.5"):
        with pytest.raises(ExportError):
            check_expression(expr)


def test_only_the_members_of_an_exported_program_are_read(logits_pt2) -> None:
    def aot(contents: dict[str, bytes]) -> None:
        contents["data/aotinductor/model/model.so"] = b"\x7fELF"

    def opaque(contents: dict[str, bytes]) -> None:
        contents["data/constants/opaque_obj_0"] = b"\x80\x02."

    def second_program(contents: dict[str, bytes]) -> None:
        contents["models/other.json"] = contents["models/model.json"]

    for change, words in (
        (aot, "AOTInductor compiled native code"),
        (opaque, "an opaque Python object"),
        (second_program, "a second exported program"),
    ):
        with pytest.raises(ExportError, match=words):
            load_exported(rewrite(logits_pt2, change))
    extra = rewrite(logits_pt2, lambda c: c.update({"extra/notes.txt": b"trained on X"}))
    assert load_exported(extra).feature_dim == 10  # extra/ text files are allowed, unread


def _zip(entries: list[tuple[zipfile.ZipInfo | str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for info, data in entries:
            archive.writestr(info, data)
    return buffer.getvalue()


def _symlink(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = 0o120777 << 16
    return info


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("archive/../../evil.json", "'..' component"),
        ("/etc/cron.d/evil", "absolute"),
        ("archive\\..\\evil", "absolute or Windows path"),
        ("C:/evil", "absolute or Windows path"),
        ("archive//models/model.json", "empty or '.' component"),
        (_symlink("archive/data/weights/weight_0"), "not a regular file"),
        ("archive/models/model.json", "a second member of that name"),  # which one is read?
    ],
)
def test_path_traversal_and_links_are_refused(logits_pt2, name, words) -> None:
    entries: list[tuple[zipfile.ZipInfo | str, bytes]] = [
        (f"archive/{n}", data)
        for n, data in members(logits_pt2).items()
        if n != "data/weights/weight_0"
    ]
    archive = _zip([*entries, (name, b"payload")])
    with pytest.raises(ExportError, match=words):
        load_exported(archive)


def test_oversized_archives_and_zip_bombs_are_refused_before_inflating(
    logits_pt2, tmp_path
) -> None:
    path = tmp_path / "big.pt2"
    path.write_bytes(logits_pt2)
    with pytest.raises(ExportError, match="accepted up to 10000 bytes"):
        load_exported(path, limits=ArchiveLimits(max_archive_bytes=10_000))
    with pytest.raises(ExportError, match="at most 5 are accepted"):
        load_exported(logits_pt2, limits=ArchiveLimits(max_members=5))

    entries = [(f"archive/{n}", data) for n, data in members(logits_pt2).items()]
    bomb = zipfile.ZipInfo("archive/extra/bomb")
    bomb.compress_type = zipfile.ZIP_DEFLATED
    with pytest.raises(ExportError, match="a zip bomb"):
        load_exported(_zip([*entries, (bomb, bytes(64 << 20))]))

    # A member whose central directory entry declares 3 GiB: refused from the directory.
    archive = bytearray(_zip([*entries, ("archive/extra/big", b"x" * 1000)]))
    entry = archive.rfind(b"PK\x01\x02")  # the last member's central directory entry
    struct.pack_into("<I", archive, entry + 24, 3 << 30)  # its uncompressed size
    with pytest.raises(ExportError, match=r"declares 3221225472 bytes|more than 1073741824"):
        load_exported(bytes(archive))


def test_features_that_depend_on_the_rest_of_the_batch_are_refused() -> None:
    """An audit puts a target, poisons and clean images in one batch: one image's features
    must not depend on the others (batch-norm statistics, a mean over the batch)."""

    class BatchStatistics(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.norm = nn.BatchNorm2d(4, track_running_stats=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.norm(self.conv(x)).mean((2, 3))

    class BatchMean(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            features = self.conv(x).mean((2, 3))
            return features - features.mean(0, keepdim=True)

    with pytest.raises(ExportError, match="no running_mean: batch norm by each batch's own"):
        load_exported(export(BatchStatistics(), (2, *SHAPE)))
    with pytest.raises(ExportError, match="depend on the other images in its batch"):
        load_exported(export(BatchMean(), (2, *SHAPE)))


def test_a_program_that_would_exhaust_memory_is_refused_before_it_allocates() -> None:
    class Huge(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            copies = x.unsqueeze(1).expand(-1, 100_000, -1, -1, -1).clone()  # 1.2 GB a batch
            return copies.mean((1, 3, 4))

    with pytest.raises(ExportError, match=r"makes a tensor of shape \[2, 100000, 3, 32, 32\]"):
        load_exported(export(Huge(), (2, *SHAPE)))


def test_every_allowlisted_operator_exists_in_this_torch() -> None:
    from core.exported import _OP_NAMES

    assert set(_OP_NAMES.values()) == ALLOWED_OPS


@pytest.mark.slow  # a CLI subprocess or a whole audit: out of make test-fast
def test_the_cli_audits_a_pt2_file(tmp_path, capsys) -> None:
    """``bulwark audit --model model.pt2`` on digits (1x8x8 images; the input shape is the
    program's own, or given)."""
    from bulwark.cli import main

    digits_net = resnet(widths=(8, 8, 16, 16), in_channels=1)
    program = tmp_path / "digits.pt2"
    program.write_bytes(export(Penultimate(digits_net), (1, 1, 8, 8)))
    out = tmp_path / "report.json"
    argv = [
        "audit",
        "--model",
        str(program),
        "--dataset",
        "digits",
        "--input-shape",
        "1,8,8",
        "--attacks",
        "fc",
        "--pairs",
        "0:7",
        "--targets-per-pair",
        "2",
        "--iterations",
        "3",
        "--retrain-epochs",
        "2",
        "--eval-images",
        "50",
        "--set",
        "screen_images=20",
        "--out",
        str(out),
    ]
    assert main(argv) == 0, capsys.readouterr().err
    report = json.loads(out.read_text())
    assert report["model"]["arch"] == "exported" and report["model"]["path"] == str(program)
    assert report["config"]["model"] == str(program) and report["head_init"] == "fresh"
    assert main([*argv, "--output", "logits"]) == 2
    assert "ends in a linear layer" in capsys.readouterr().err
