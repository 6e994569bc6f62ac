"""Feature extractors exported with ``torch.export``: any architecture, loaded without running
anything of the uploader's.

A ``.pt2`` archive (``torch.export.save``) is a zip holding a graph of aten operators as JSON
and the weights as raw bytes, so no Python class is needed to run it. ``torch.export.load``
must not be used on an untrusted one. In the pinned torch (2.13) it treats the members so:

- ``data/weights/*`` and ``data/constants/tensor_*`` with ``use_pickle`` in their payload
  config, and the legacy ``data/weights/<model>.pt`` / ``data/constants/<model>.pt``:
  torch's full unpickler, ``weights_only=False`` (the legacy files through
  ``deserialize_torch_artifact``, which falls back to ``weights_only=False`` when the safe
  load fails): a pickle that can run anything.
- ``data/sample_inputs/<model>.pt``: the same fallback to ``weights_only=False``.
- ``data/constants/custom_obj_*``: ``torch._C._pickle_load_obj`` (TorchScript objects);
  ``data/constants/opaque_obj_*``: ``pickle.loads``.
- ``data/aotinductor/<model>/*``: compiled shared libraries, loaded as native code.
- ``models/<model>.json``: every ``expr_str`` of a symbolic shape goes to ``sympy.sympify``,
  which is ``eval`` (builtins such as ``exec`` and ``chr`` are in its namespace); node and
  input names are pasted into Python source that FX compiles with ``exec`` while the graph
  module is built; ``guards_code`` is compiled with ``exec`` by ``ExportedProgram.module()``;
  a tree spec's ``__enum__`` context makes ``importlib`` import any module by name; a node's
  target may name any attribute of ``torch``, ``math`` or ``operator`` to call.

This module therefore never calls ``torch.export.load`` or ``ExportedProgram.module()``. It
reads the file once into memory (:func:`read_archive`) and, from those same bytes:

1. checks the zip from its end record and central directory before inflating anything
   (:func:`open_archive`): member count, declared and compressed sizes, names, file types;
2. accepts only the members of the PT2 layout: raw weights and tensor constants, the JSON
   graph and payload configs, the sample inputs (loaded with ``weights_only=True`` only, after
   their own zip is checked), ``extra/`` text files (never read); anything else (pickled,
   legacy, custom or opaque objects, native code, a second program) is refused by name;
3. walks the JSON graph (:func:`check_program`) before deserializing: names are plain
   identifiers, symbolic expressions are parsed with ``ast`` and only sympy constructors of
   ``s<N>`` symbols pass, tree specs hold only tuples, lists and dicts, every node calls an
   operator of :data:`ALLOWED_OPS` with plain arguments, eval-only operators run in eval mode,
   and the signature has one image input and one tensor output and mutates nothing. Metadata
   and ``guards_code`` are dropped;
4. deserializes with torch's own deserializer, given tensors it built from the raw bytes;
5. walks the deserialized FX graph again (:func:`check_graph`): only ``call_function`` nodes
   of the allowlist, and no in-place operator on a weight or on the input;
6. propagates shapes through it on fake tensors (no memory: every intermediate tensor is
   capped), then runs it on a batch of the declared shape: finite features, one image's
   features independent of the rest of its batch, and a gradient that reaches the input (the
   attacks differentiate through the program).

The result, :class:`ExportedClassifier`, is a :class:`core.models.FeatureClassifier`:
``normalize`` -> the program -> f(x) (N, D) -> ``head``. With ``output="features"`` the
program's output is f(x) and there is no trained head (``num_classes`` 0: every audit
re-trains a fresh one); with ``output="logits"`` the program must end in a linear layer,
whose input becomes f(x) and whose weight and bias become ``head``.
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import keyword
import math
import operator
import re
import stat
import struct
import sys
import warnings
import zipfile
import zlib
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import fx, nn

from core.checkpoint import (
    EXPORTED_NAME,
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    CheckpointError,
    LoadedExtractor,
    library_versions,
    model_facts,
)
from core.models import FeatureClassifier, Normalize

Output = Literal["features", "logits"]
EXPORTED_KIND = "exported-extractor"  # the manifest's ``kind`` of a stored exported model
MAX_FEATURE_DIM = 1 << 16  # a wider f(x) is a spatial map, not a pooled feature vector
# Elements of any one intermediate tensor for a batch of two images (128 MiB in float32; an
# audit's batches of up to 256 images scale it): a ViT-L/16 or a ResNet-50 at 224 px needs
# under 2e6; a program asking for more is refused before it allocates anything.
MAX_INTERMEDIATE_ELEMENTS = 1 << 25


class ExportError(CheckpointError):
    """A ``.pt2`` archive or program refused; the message names the member, node or field."""


# ---- limits ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArchiveLimits:
    """What a ``.pt2`` archive may hold. Sizes in bytes; all checked before inflating."""

    max_archive_bytes: int = 1 << 30  # the file itself (1 GiB: a ViT-L is about 1.2 GB in fp16)
    max_members: int = 4096  # a weight per member: a ResNet-50 has about 320
    max_total_bytes: int = 1 << 30  # declared inflated size of all members together
    max_ratio: float = 100.0  # inflated / compressed size of one member
    ratio_exempt_bytes: int = 1 << 20  # members smaller than this may compress better
    max_json_bytes: int = 64 << 20  # models/model.json and each payload config


_DIRECTORY_BYTES_PER_MEMBER = 4096  # central directory bytes a member may need, on average


# ---- the operator allowlist ------------------------------------------------------------------


# What common CNNs and ViTs export to, in torch.export's training IR (``export``) and after
# ``run_decompositions()``. Names are ``namespace.op.overload``; "_operator.*" are the Python
# operators that act on symbolic sizes and on multi-output results.
def _words(names: str) -> frozenset[str]:
    return frozenset(names.split())


OP_GROUPS: dict[str, frozenset[str]] = {
    "convolution and linear": _words(
        """aten.conv2d.default aten.conv2d.padding aten.convolution.default aten.linear.default
        aten.addmm.default aten.mm.default aten.bmm.default aten.baddbmm.default
        aten.matmul.default aten.t.default"""
    ),
    "normalization": _words(  # batch_norm and native_batch_norm with training=False only
        """aten.batch_norm.default aten.native_batch_norm.default
        aten._native_batch_norm_legit_no_training.default aten.layer_norm.default
        aten.native_layer_norm.default aten.group_norm.default aten.native_group_norm.default"""
    ),
    "activations": _words(
        """aten.relu.default aten.relu_.default aten.gelu.default aten.silu.default
        aten.silu_.default aten.sigmoid.default aten.tanh.default aten.hardtanh.default
        aten.hardtanh_.default aten.hardswish.default aten.hardswish_.default
        aten.hardsigmoid.default aten.leaky_relu.default aten.leaky_relu_.default
        aten.elu.default aten.softplus.default aten.mish.default aten.erf.default
        aten.clamp.default aten.clamp_min.default aten.clamp_max.default"""
    ),
    "pooling": _words(
        """aten.max_pool2d.default aten.max_pool2d_with_indices.default aten.avg_pool2d.default
        aten.adaptive_avg_pool2d.default aten._adaptive_avg_pool2d.default
        aten.adaptive_max_pool2d.default"""
    ),
    "arithmetic": _words(
        """aten.add.Tensor aten.add.Scalar aten.add_.Tensor aten.sub.Tensor aten.sub.Scalar
        aten.rsub.Scalar aten.mul.Tensor aten.mul.Scalar aten.mul_.Tensor aten.div.Tensor
        aten.div.Scalar aten.neg.default aten.sqrt.default aten.rsqrt.default aten.exp.default
        aten.pow.Tensor_Scalar"""
    ),
    "reductions": _words(
        """aten.mean.dim aten.mean.default aten.sum.dim_IntList aten.sum.default
        aten.amax.default aten.var_mean.correction"""
    ),
    "softmax and attention": _words(  # scaled_dot_product_attention with dropout_p=0 only
        """aten.softmax.int aten._softmax.default aten.log_softmax.int aten._log_softmax.default
        aten.scaled_dot_product_attention.default"""
    ),
    "attention masks": _words(
        """aten.eq.Scalar aten.any.dim aten.logical_not.default aten.where.self
        aten.full_like.default"""
    ),
    "shape": _words(
        """aten.view.default aten._unsafe_view.default aten.reshape.default
        aten.flatten.using_ints aten.unflatten.int aten.permute.default aten.transpose.int
        aten.expand.default aten.cat.default aten.slice.Tensor aten.select.int
        aten.unsqueeze.default aten.squeeze.dim aten.squeeze.dims aten.squeeze.default
        aten.clone.default aten.contiguous.default aten.split.Tensor
        aten.split_with_sizes.default aten.chunk.default aten.unbind.int aten.alias.default
        aten.constant_pad_nd.default"""
    ),
    "eval-mode dropout": _words("aten.dropout.default"),  # train=False only
    "tensor constants": _words("aten.lift_fresh_copy.default"),
    "graph plumbing": _words(
        """aten.sym_size.int _operator.getitem _operator.add _operator.sub _operator.mul
        _operator.floordiv"""
    ),
}
ALLOWED_OPS: frozenset[str] = frozenset().union(*OP_GROUPS.values())

# Operators allowed only with one argument at one value (eval mode, no random dropout).
EVAL_ONLY: dict[str, tuple[str, object]] = {
    "aten.batch_norm.default": ("training", False),
    "aten.native_batch_norm.default": ("training", False),
    "aten.dropout.default": ("train", False),
    "aten.scaled_dot_product_attention.default": ("dropout_p", 0.0),
}
# Batch norm in eval mode without running statistics normalizes by the batch's own: one
# image's features would depend on the others in its batch.
RUNNING_STATS: dict[str, tuple[str, ...]] = {
    "aten.batch_norm.default": ("running_mean", "running_var"),
    "aten.native_batch_norm.default": ("running_mean", "running_var"),
}

# Operators whose output may share memory with their first input (in-place checks follow it).
_VIEWS = OP_GROUPS["shape"] - {"aten.cat.default", "aten.clone.default"} | {
    "aten.t.default",
    "aten.dropout.default",  # eval-mode dropout may return its input itself
    "_operator.getitem",
}


def _resolve(name: str) -> object | None:
    """The callable an allowlist name stands for (None if this torch lacks the overload)."""
    namespace, _, rest = name.partition(".")
    if namespace == "_operator":
        return getattr(operator, rest)
    packet, _, overload = rest.rpartition(".")
    try:
        return getattr(getattr(getattr(torch.ops, namespace), packet), overload)
    except AttributeError:
        return None


_OP_NAMES: dict[object, str] = {}
for _entry in sorted(ALLOWED_OPS):
    _op = _resolve(_entry)
    if _op is not None:
        _OP_NAMES[_op] = _entry


def _serialized_target(name: str) -> str:
    """How torch.export's JSON spells an allowlist name."""
    return name if name.startswith("_operator.") else f"torch.ops.{name}"


_ALLOWED_TARGETS: dict[str, str] = {_serialized_target(n): n for n in ALLOWED_OPS}


# ---- reading the archive ---------------------------------------------------------------------


def read_archive(path: str | Path, limits: ArchiveLimits | None = None) -> bytes:
    """The file's bytes, read once; refused past ``max_archive_bytes`` before reading."""
    limits = limits or ArchiveLimits()
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"no exported program at {path}")
    size = path.stat().st_size
    if size > limits.max_archive_bytes:
        raise ExportError(
            f"{path.name} is {size} bytes; exported programs are accepted up to "
            f"{limits.max_archive_bytes} bytes"
        )
    with path.open("rb") as handle:
        data = handle.read(limits.max_archive_bytes + 1)
    if len(data) > limits.max_archive_bytes:  # the file grew while it was read
        raise ExportError(f"{path.name} is larger than {limits.max_archive_bytes} bytes")
    return data


@dataclass(frozen=True)
class Archive:
    """A checked zip: its members by name below the archive's root folder."""

    zip: zipfile.ZipFile
    root: str
    members: dict[str, zipfile.ZipInfo]  # "models/model.json" -> its entry

    def read(self, name: str) -> bytes:
        """A member's inflated bytes (bounded by its declared size, CRC checked)."""
        try:
            return self.zip.read(self.members[name])
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as error:
            raise ExportError(f"member {name!r} is corrupt: {error}") from None


_MEMBER_PART = re.compile(r"[A-Za-z0-9._+\- ]+")


def _end_record(data: bytes) -> tuple[int, int]:
    """(members, central directory bytes) the zip's end record declares, before parsing it."""
    tail_start = max(0, len(data) - (22 + 0xFFFF))
    at = data.rfind(b"PK\x05\x06", tail_start)
    if at < 0 or len(data) - at < 22:
        raise ExportError("not a zip archive: no end-of-central-directory record")
    entries, directory_bytes = struct.unpack("<2xHI", data[at + 8 : at + 16])
    locator = data[at - 20 : at] if at >= 20 else b""
    if (entries == 0xFFFF or directory_bytes == 0xFFFFFFFF) and locator[:4] == b"PK\x06\x07":
        (offset,) = struct.unpack("<Q", locator[8:16])
        record = data[offset : offset + 56]
        if record[:4] == b"PK\x06\x06" and len(record) == 56:
            entries, directory_bytes = struct.unpack("<QQ", record[32:48])
    return entries, directory_bytes


def open_archive(data: bytes, limits: ArchiveLimits | None = None) -> Archive:
    """The zip in ``data``, every entry checked from the central directory; nothing inflated.

    Refused: more than ``max_members`` entries (counted from the end record before the
    directory is parsed), a declared total past ``max_total_bytes``, a member inflating more
    than ``max_ratio`` times (past ``ratio_exempt_bytes``), an encrypted member, a method other
    than stored or deflated, a link, folder or special file, an absolute name, a ``..`` or
    empty component, a backslash, NUL or control character, a duplicate name, and members not
    all under one root folder (``torch.export.save`` writes ``<root>/...``).
    """
    limits = limits or ArchiveLimits()
    if len(data) > limits.max_archive_bytes:
        raise ExportError(
            f"the archive is {len(data)} bytes; at most {limits.max_archive_bytes} are accepted"
        )
    entries, directory_bytes = _end_record(data)
    if entries > limits.max_members:
        raise ExportError(
            f"the zip declares {entries} members; at most {limits.max_members} are accepted"
        )
    if directory_bytes > limits.max_members * _DIRECTORY_BYTES_PER_MEMBER:
        raise ExportError(
            f"the zip's central directory is {directory_bytes} bytes, more than "
            f"{limits.max_members} members can need"
        )
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
        raise ExportError(f"not a readable zip archive: {error}") from None
    infos = archive.infolist()
    if len(infos) > limits.max_members:
        raise ExportError(f"the zip holds {len(infos)} members; at most {limits.max_members}")
    members: dict[str, zipfile.ZipInfo] = {}
    roots: set[str] = set()
    total = 0
    for info in infos:
        name = _check_entry(info, limits)
        root, _, rest = name.partition("/")
        roots.add(root)
        if rest in members or not rest:
            problem = "a second member of that name" if rest else "a file outside a root folder"
            raise ExportError(f"member {info.orig_filename!r}: {problem}")
        members[rest] = info
        total += info.file_size
        if total > limits.max_total_bytes:
            raise ExportError(
                f"member {name!r}: the members declare more than {limits.max_total_bytes} "
                "bytes in all"
            )
    if len(roots) != 1:
        raise ExportError(
            f"members lie under {len(roots)} root folders ({', '.join(sorted(roots)[:3])}); "
            "torch.export.save writes one"
        )
    return Archive(zip=archive, root=roots.pop(), members=members)


def _check_entry(info: zipfile.ZipInfo, limits: ArchiveLimits) -> str:
    """One central directory entry's name, or :class:`ExportError` naming its problem."""
    raw = info.orig_filename
    if raw != info.filename or "\x00" in raw:
        raise ExportError(f"member {raw!r}: a NUL byte in its name")
    if raw.startswith("/") or "\\" in raw or re.match(r"[A-Za-z]:", raw):
        raise ExportError(f"member {raw!r}: an absolute or Windows path")
    parts = raw.split("/")
    if ".." in parts:
        raise ExportError(f"member {raw!r}: a '..' component (it would land outside)")
    if any(part in ("", ".") for part in parts):
        raise ExportError(f"member {raw!r}: an empty or '.' component (or a folder entry)")
    if not all(_MEMBER_PART.fullmatch(part) for part in parts):
        raise ExportError(f"member {raw!r}: characters outside letters, digits and ._+- ")
    mode = info.external_attr >> 16
    if info.create_system == 3 and stat.S_IFMT(mode) and not stat.S_ISREG(mode):
        raise ExportError(f"member {raw!r}: not a regular file (Unix mode {oct(mode)})")
    if info.flag_bits & 0x1:
        raise ExportError(f"member {raw!r}: encrypted")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise ExportError(
            f"member {raw!r}: compression method {info.compress_type}; only stored and "
            "deflated members are read"
        )
    if info.file_size > limits.ratio_exempt_bytes and (
        info.compress_size == 0 or info.file_size > limits.max_ratio * info.compress_size
    ):
        raise ExportError(
            f"member {raw!r}: declares {info.file_size} bytes from {info.compress_size} "
            f"compressed, more than {limits.max_ratio:g} times (a zip bomb)"
        )
    if info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size:
        raise ExportError(f"member {raw!r}: stored, but its two declared sizes differ")
    return raw


# ---- the PT2 layout --------------------------------------------------------------------------

PROGRAM_JSON = "models/model.json"
WEIGHTS_CONFIG = "data/weights/model_weights_config.json"
CONSTANTS_CONFIG = "data/constants/model_constants_config.json"
SAMPLE_INPUTS = "data/sample_inputs/model.pt"
_WEIGHT_FILE = re.compile(r"data/weights/(weight_\d{1,6})")
_CONSTANT_FILE = re.compile(r"data/constants/(tensor_\d{1,6})")
_HOUSEKEEPING = _words("archive_format archive_version byteorder .data/version")
_REFUSED_MEMBERS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"data/(weights|constants)/[^/]+\.pt"), "legacy pickled weights or constants"),
    (re.compile(r"data/constants/custom_obj_.*"), "a TorchScript custom object (a pickle)"),
    (re.compile(r"data/constants/opaque_obj_.*"), "an opaque Python object (a pickle)"),
    (re.compile(r"data/aotinductor/.*"), "AOTInductor compiled native code"),
    (re.compile(r"data/executorch/.*|data/mtia.*"), "a backend's compiled program"),
    (re.compile(r"xl_model_weights/.*"), "externally stored weights"),
    (re.compile(r"models/.*"), "a second exported program (only models/model.json is read)"),
    (re.compile(r"serialized_.*|version"), "the torch 2.7 archive format, whose parts pickle"),
)


def check_layout(archive: Archive) -> None:
    """Every member is a part of the PT2 layout that is read without unpickling."""
    names = set(archive.members)
    for required in ("archive_format", PROGRAM_JSON, WEIGHTS_CONFIG, CONSTANTS_CONFIG):
        if required not in names:
            raise ExportError(
                f"not a torch.export archive: no {archive.root}/{required} "
                "(save the program with torch.export.save)"
            )
    for name in sorted(names):
        if (
            name in _HOUSEKEEPING
            or name in (PROGRAM_JSON, WEIGHTS_CONFIG, CONSTANTS_CONFIG, SAMPLE_INPUTS)
            or name == ".data/serialization_id"
            or _WEIGHT_FILE.fullmatch(name)
            or _CONSTANT_FILE.fullmatch(name)
            or name.startswith("extra/")  # text files torch only hands back; never read here
        ):
            continue
        reason = next((why for rule, why in _REFUSED_MEMBERS if rule.fullmatch(name)), None)
        raise ExportError(
            f"member {archive.root}/{name}: "
            + (f"{reason}, which torch.export.load would unpickle or run" if reason else "")
            + ("" if reason else "not a part of an exported program")
        )
    if archive.read("archive_format") != b"pt2":
        raise ExportError("archive_format is not 'pt2': not a torch.export archive")
    from torch.export.pt2_archive.constants import ARCHIVE_VERSION_VALUE

    version = archive.read("archive_version") if "archive_version" in names else b"0"
    if version.decode("ascii", "replace") != ARCHIVE_VERSION_VALUE:
        raise ExportError(
            f"archive_version {version[:16]!r}; this torch reads version {ARCHIVE_VERSION_VALUE}"
        )
    if "byteorder" in names and archive.read("byteorder") != sys.byteorder.encode():
        raise ExportError(f"the weights are not {sys.byteorder}-endian")


def _json_member(archive: Archive, name: str, limits: ArchiveLimits) -> Any:
    if archive.members[name].file_size > limits.max_json_bytes:
        raise ExportError(f"{name} is larger than {limits.max_json_bytes} bytes")
    try:
        return json.loads(archive.read(name))
    except (ValueError, RecursionError) as error:
        raise ExportError(f"{name} is not JSON: {error}") from None


# ---- checking the JSON program ---------------------------------------------------------------

_SYMBOL = re.compile(r"s\d{1,9}")
_FQN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")
_SYMPY_CALLS = _words(
    """Symbol Integer Add Mul Min Max FloorDiv CeilDiv CleanDiv Mod PythonMod IntTrueDiv
    FloorToInt CeilToInt"""
)
_SYMBOL_ASSUMPTIONS = _words("positive integer nonnegative real finite")
_MAX_EXPR = 2000  # characters of one symbolic expression
_MAX_INT = 1 << 62
_TREESPEC_TYPES = frozenset({None, "builtins.tuple", "builtins.list", "builtins.dict"})
_ARGUMENT_KINDS = _words(  # no graphs, custom objects, operators, devices or symbolic floats
    """as_none as_tensor as_tensors as_optional_tensors as_int as_ints as_float as_floats
    as_bool as_bools as_string as_sym_int as_sym_ints as_scalar_type as_memory_format as_layout"""
)
_OUTPUT_KINDS = _words("as_tensor as_tensors as_sym_int as_none")
_DTYPES: dict[int, torch.dtype] = {
    1: torch.uint8,
    2: torch.int8,
    3: torch.int16,
    4: torch.int32,
    5: torch.int64,
    6: torch.float16,
    7: torch.float32,
    8: torch.float64,
    12: torch.bool,
    13: torch.bfloat16,
}
_STRIDED = 7  # schema.Layout.Strided


def _fail(where: str, problem: str) -> ExportError:
    return ExportError(f"{PROGRAM_JSON}: {where}: {problem}")


def _dict(value: Any, where: str, keys: frozenset[str]) -> dict[str, Any]:
    """An object whose fields are among ``keys``."""
    if not isinstance(value, dict):
        raise _fail(where, f"expected an object, got {type(value).__name__}")
    unknown = set(value) - keys
    if unknown:
        raise _fail(where, f"unexpected fields {sorted(unknown)[:5]}")
    return value


def _mapping(value: Any, where: str) -> dict[str, Any]:
    """An object with any field names (checked by the caller)."""
    if not isinstance(value, dict):
        raise _fail(where, f"expected an object, got {type(value).__name__}")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise _fail(where, f"expected a list, got {type(value).__name__}")
    return value


def _union(value: Any, where: str) -> tuple[str, Any]:
    """A schema union: an object with exactly one field."""
    if not isinstance(value, dict) or len(value) != 1:
        raise _fail(where, "expected an object with one field")
    ((kind, inner),) = value.items()
    return kind, inner


def _int(value: Any, where: str) -> int:
    if type(value) is not int or abs(value) > _MAX_INT:
        raise _fail(where, f"expected an integer, got {value!r:.40}")
    return value


def _name(value: Any, where: str) -> str:
    """A node or argument name: pasted into the Python source FX compiles, so an identifier."""
    if (
        not isinstance(value, str)
        or not value.isascii()
        or not value.isidentifier()
        or keyword.iskeyword(value)
        or value.startswith("__")
        or len(value) > 200
    ):
        raise _fail(where, f"{value!r:.60} is not a plain identifier")
    return value


def _fqn(value: Any, where: str) -> str:
    if not isinstance(value, str) or len(value) > 500 or not _FQN.fullmatch(value):
        raise _fail(where, f"{value!r:.60} is not a dotted attribute name")
    return value


def check_expression(expr: Any, where: str = "expression") -> str:
    """A symbolic size as torch writes it (``Mul(Integer(2), Symbol('s77', positive=True))``).

    torch hands it to ``sympy.sympify``, which evaluates it as Python; so it is parsed here
    with ``ast`` (parsing runs nothing) and must consist of calls to sympy constructors, integer
    literals, ``s<N>`` symbols (by name or ``Symbol('s<N>', <assumption>=True)``) and ``+ - *
    // %`` between them.
    """
    if not isinstance(expr, str) or len(expr) > _MAX_EXPR:
        raise _fail(where, f"a symbolic expression longer than {_MAX_EXPR} characters")
    try:
        tree = ast.parse(expr, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise _fail(where, f"{expr!r:.80} is not an expression") from None
    symbol_names: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            if not isinstance(func, ast.Name) or func.id not in _SYMPY_CALLS:
                raise _fail(where, f"{expr!r:.80} calls something other than sympy constructors")
            if func.id == "Symbol":
                first = node.args[0] if len(node.args) == 1 else None
                if not (
                    isinstance(first, ast.Constant)
                    and isinstance(first.value, str)
                    and _SYMBOL.fullmatch(first.value)
                ):
                    raise _fail(where, f"{expr!r:.80}: a symbol must be named s<N>")
                symbol_names.add(id(first))
                for assumption in node.keywords:
                    value = assumption.value
                    if assumption.arg not in _SYMBOL_ASSUMPTIONS or not (
                        isinstance(value, ast.Constant) and isinstance(value.value, bool)
                    ):
                        raise _fail(where, f"{expr!r:.80}: an unexpected symbol assumption")
            elif node.keywords:
                raise _fail(where, f"{expr!r:.80}: keyword arguments outside Symbol(...)")
        elif isinstance(node, ast.Name):
            if node.id not in _SYMPY_CALLS and not _SYMBOL.fullmatch(node.id):
                raise _fail(where, f"{expr!r:.80} names {node.id!r}")
        elif isinstance(node, ast.Constant):
            literal = node.value
            if isinstance(literal, str) and id(node) in symbol_names:
                continue
            if not isinstance(literal, int) or abs(literal) > _MAX_INT:
                raise _fail(where, f"{expr!r:.80}: a literal other than a small integer")
        elif not isinstance(
            node,
            ast.Expression
            | ast.Load
            | ast.keyword
            | ast.BinOp
            | ast.UnaryOp
            | ast.Add
            | ast.Sub
            | ast.Mult
            | ast.FloorDiv
            | ast.Mod
            | ast.USub,
        ):
            raise _fail(where, f"{expr!r:.80}: {type(node).__name__} is not allowed")
    return expr


def _sym_int(value: Any, where: str) -> None:
    kind, inner = _union(value, where)
    if kind == "as_int":
        _int(inner, where)
    elif kind == "as_expr":
        inner = _dict(inner, where, _words("expr_str hint"))
        check_expression(inner.get("expr_str"), where)
        if inner.get("hint") is not None:
            hint_kind, hint = _union(inner["hint"], f"{where}.hint")
            if hint_kind != "as_int":
                raise _fail(where, "a symbolic size hint that is not an integer")
            _int(hint, f"{where}.hint")
    else:
        raise _fail(where, f"a symbolic integer of kind {kind!r}")


def _tensor_meta(value: Any, where: str) -> dict[str, Any]:
    meta = _dict(
        value,
        where,
        _words("dtype sizes requires_grad device strides storage_offset layout"),
    )
    if meta.get("dtype") not in _DTYPES:
        raise _fail(where, f"dtype {meta.get('dtype')!r} is not a real or integer dtype")
    if meta.get("layout") != _STRIDED:
        raise _fail(where, "only strided (dense) tensors are read")
    if not isinstance(meta.get("requires_grad"), bool):
        raise _fail(where, "requires_grad must be a boolean")
    device = _dict(meta.get("device"), f"{where}.device", _words("type index"))
    if device.get("type") not in ("cpu", "cuda", "meta") or device.get("index") not in (
        None,
        *range(64),
    ):
        raise _fail(where, f"device {device!r:.60}")
    for field in ("sizes", "strides"):
        for index, size in enumerate(_list(meta.get(field), f"{where}.{field}")):
            _sym_int(size, f"{where}.{field}[{index}]")
    _sym_int(meta.get("storage_offset"), f"{where}.storage_offset")
    return meta


def _argument(value: Any, where: str, kinds: frozenset[str] = _ARGUMENT_KINDS) -> tuple[str, Any]:
    """One ``Argument``: a tensor, a list of them, a plain scalar or a symbolic size."""
    kind, inner = _union(value, where)
    if kind not in kinds:
        raise _fail(where, f"an argument of kind {kind!r} (refused: graphs, objects, devices...)")
    if kind == "as_tensor":
        _name(_dict(inner, where, _words("name")).get("name"), where)
    elif kind == "as_tensors":
        for index, item in enumerate(_list(inner, where)):
            _name(_dict(item, where, _words("name")).get("name"), f"{where}[{index}]")
    elif kind == "as_optional_tensors":
        for index, item in enumerate(_list(inner, where)):
            _argument(item, f"{where}[{index}]", _words("as_tensor as_none"))
    elif kind == "as_sym_int":
        _sym_int_argument(inner, where)
    elif kind == "as_sym_ints":
        for index, item in enumerate(_list(inner, where)):
            _sym_int_argument(item, f"{where}[{index}]")
    elif kind in ("as_int", "as_scalar_type", "as_memory_format", "as_layout"):
        _int(inner, where)
    elif kind == "as_ints":
        for index, item in enumerate(_list(inner, where)):
            _int(item, f"{where}[{index}]")
    elif kind == "as_float":
        if not _is_float(inner):
            raise _fail(where, "expected a number")
    elif kind == "as_floats":
        if not all(_is_float(v) for v in _list(inner, where)):
            raise _fail(where, "expected numbers")
    elif kind == "as_bool" or kind == "as_none":
        if not isinstance(inner, bool):
            raise _fail(where, "expected a boolean")
    elif kind == "as_bools":
        if not all(isinstance(v, bool) for v in _list(inner, where)):
            raise _fail(where, "expected booleans")
    elif kind == "as_string" and (not isinstance(inner, str) or len(inner) > 64):
        raise _fail(where, "expected a short string")
    return kind, inner


def _is_float(value: Any) -> bool:
    """A JSON number, or the strings torch writes for infinities and NaN."""
    return type(value) in (int, float) or value in ("Infinity", "-Infinity", "NaN")


def _sym_int_argument(value: Any, where: str) -> None:
    kind, inner = _union(value, where)
    if kind == "as_name":
        _name(inner, where)
    elif kind == "as_int":
        _int(inner, where)
    else:
        raise _fail(where, f"a symbolic size argument of kind {kind!r}")


def _treespec(text: Any, where: str) -> None:
    """A pytree spec holds only tuples, lists, dicts and leaves (an ``__enum__`` context would
    make torch import a module by name)."""
    try:
        protocol, spec = json.loads(text)
    except (TypeError, ValueError, RecursionError):
        raise _fail(where, "not a serialized tree spec") from None
    if protocol != 1:
        raise _fail(where, f"tree spec protocol {protocol!r}")
    stack = [spec]
    while stack:
        node = _dict(stack.pop(), where, _words("type context children_spec"))
        if node.get("type") not in _TREESPEC_TYPES:
            raise _fail(where, f"a tree spec of type {node.get('type')!r:.60}")
        context = node.get("context")
        if context is not None:
            try:
                decoded = json.loads(context)
            except (TypeError, ValueError, RecursionError):
                raise _fail(where, "a tree spec context that is not JSON") from None
            if decoded is not None and not (
                isinstance(decoded, list) and all(isinstance(k, str | int) for k in decoded)
            ):
                raise _fail(where, "a tree spec context other than a list of keys")
        stack.extend(_list(node.get("children_spec"), where))


@dataclass(frozen=True)
class ProgramFacts:
    """What the JSON program says, once checked."""

    operators: Counter[str]  # allowlist name -> nodes calling it
    input_name: str  # the image input's placeholder
    user_input_meta: dict[str, Any]  # its tensor meta (sizes as serialized)


def check_program(program: Any) -> ProgramFacts:
    """Check a ``models/model.json`` and strip what is never needed, in place.

    Raises :class:`ExportError` naming the field of anything outside the rules in this
    module's docstring. Node metadata (stack traces, module paths), the graph module's
    metadata and ``guards_code`` are emptied: the first two are only informational and the
    last is Python source that only ``ExportedProgram.module()`` compiles, which is never
    called here.
    """
    top = _dict(
        program,
        "program",
        _words(
            """graph_module opset_version range_constraints schema_version verifiers
            torch_version guards_code"""
        ),
    )
    verifiers = _list(top.get("verifiers", []), "verifiers")
    if not set(verifiers) <= {"ATEN", "TRAINING", ""}:
        raise _fail("verifiers", f"unknown dialects {verifiers!r:.80}")
    for name, version in _dict(
        top.get("opset_version", {}), "opset_version", _words("aten")
    ).items():
        _int(version, f"opset_version.{name}")
    if not isinstance(top.get("torch_version", ""), str):
        raise _fail("torch_version", "expected a string")
    _dict(top.get("schema_version"), "schema_version", _words("major minor"))
    for symbol, bounds in _mapping(top.get("range_constraints", {}), "range_constraints").items():
        if not _SYMBOL.fullmatch(symbol):
            raise _fail("range_constraints", f"{symbol!r:.40} is not a size symbol s<N>")
        bounds = _dict(bounds, f"range_constraints.{symbol}", _words("min_val max_val"))
        for bound in bounds.values():
            if bound is not None:
                _int(bound, f"range_constraints.{symbol}")
    top["guards_code"] = []

    module = _dict(
        top.get("graph_module"),
        "graph_module",
        _words("graph signature module_call_graph metadata treespec_namedtuple_fields"),
    )
    module["metadata"] = {}
    module["treespec_namedtuple_fields"] = {}
    graph = _dict(
        module.get("graph"),
        "graph",
        _words(
            """inputs outputs nodes tensor_values sym_int_values sym_bool_values
            sym_float_values custom_obj_values is_single_tensor_return"""
        ),
    )
    for field in ("sym_bool_values", "sym_float_values", "custom_obj_values"):
        if graph.get(field):
            raise _fail(f"graph.{field}", "symbolic booleans, floats and custom objects")
    tensor_values = _mapping(graph.get("tensor_values", {}), "graph.tensor_values")
    for name, meta in tensor_values.items():
        _tensor_meta(meta, f"graph.tensor_values.{_name(name, 'graph.tensor_values')}")
    for name, value in _mapping(graph.get("sym_int_values", {}), "graph.sym_int_values").items():
        _sym_int(value, f"graph.sym_int_values.{_name(name, 'graph.sym_int_values')}")
    if not isinstance(graph.get("is_single_tensor_return", False), bool):
        raise _fail("graph.is_single_tensor_return", "expected a boolean")
    for index, value in enumerate(_list(graph.get("inputs"), "graph.inputs")):
        _argument(value, f"graph.inputs[{index}]", _words("as_tensor"))
    outputs = _list(graph.get("outputs"), "graph.outputs")
    for index, value in enumerate(outputs):
        _argument(value, f"graph.outputs[{index}]", _words("as_tensor"))

    operators: Counter[str] = Counter()
    for index, node in enumerate(_list(graph.get("nodes"), "graph.nodes")):
        operators[_check_node(node, f"graph.nodes[{index}]")] += 1

    input_name = _check_signature(module.get("signature"), len(outputs))
    for index, entry in enumerate(_list(module.get("module_call_graph"), "module_call_graph")):
        _check_call_entry(entry, f"module_call_graph[{index}]")
    meta = tensor_values.get(input_name)
    if meta is None:
        raise _fail("graph.tensor_values", f"no shape for the input {input_name!r}")
    return ProgramFacts(operators=operators, input_name=input_name, user_input_meta=meta)


def _check_node(node: Any, where: str) -> str:
    node = _dict(
        node,
        where,
        _words("target inputs outputs metadata is_hop_single_tensor_return name"),
    )
    target = node.get("target")
    op = _ALLOWED_TARGETS.get(target) if isinstance(target, str) else None
    if op is None:
        raise _fail(
            where,
            f"operator {target!r:.80} is not in Bulwark's operator allowlist (standard aten "
            "layers of CNNs and ViTs; no custom, higher-order or unknown operators)",
        )
    where = f"{where} ({op})"
    if node.get("name") is not None:
        _name(node["name"], where)
    if node.get("is_hop_single_tensor_return") not in (None, False):
        raise _fail(where, "a higher-order operator's return")
    node["metadata"] = {}
    for index, named in enumerate(_list(node.get("inputs"), f"{where}.inputs")):
        named = _dict(named, f"{where}.inputs[{index}]", _words("name arg kind"))
        _name(named.get("name"), f"{where}.inputs[{index}].name")
        if named.get("kind") not in (None, 1, 2):
            raise _fail(where, f"argument kind {named.get('kind')!r}")
        kind, value = _argument(named.get("arg"), f"{where}.inputs.{named['name']}")
        rule = EVAL_ONLY.get(op)
        if rule is not None and named["name"] == rule[0] and value != rule[1]:
            raise _fail(where, f"{rule[0]}={value!r}: only {rule[0]}={rule[1]!r} (eval mode)")
        if named["name"] in RUNNING_STATS.get(op, ()) and kind != "as_tensor":
            raise _fail(where, f"no {named['name']}: batch norm by each batch's own statistics")
    for index, value in enumerate(_list(node.get("outputs"), f"{where}.outputs")):
        _argument(value, f"{where}.outputs[{index}]", _OUTPUT_KINDS)
    return op


def _check_signature(value: Any, outputs: int) -> str:
    """The image input's name; one image input, only weights besides, one tensor output."""
    signature = _dict(value, "signature", _words("input_specs output_specs"))
    user_inputs = []
    for index, spec in enumerate(_list(signature.get("input_specs"), "signature.input_specs")):
        where = f"signature.input_specs[{index}]"
        kind, inner = _union(spec, where)
        if kind == "user_input":
            inner = _dict(inner, where, _words("arg"))
            _, arg = _argument(inner.get("arg"), where, _words("as_tensor"))
            user_inputs.append(arg["name"])
        elif kind == "parameter":
            inner = _dict(inner, where, _words("arg parameter_name"))
            _fqn(inner.get("parameter_name"), where)
        elif kind == "buffer":
            inner = _dict(inner, where, _words("arg buffer_name persistent"))
            _fqn(inner.get("buffer_name"), where)
            if not isinstance(inner.get("persistent"), bool):
                raise _fail(where, "persistent must be a boolean")
        elif kind == "tensor_constant":
            inner = _dict(inner, where, _words("arg tensor_constant_name"))
            _fqn(inner.get("tensor_constant_name"), where)
        else:
            raise _fail(where, f"an input of kind {kind!r} (only one image input and weights)")
        if kind != "user_input":
            _name(_dict(inner.get("arg"), where, _words("name")).get("name"), where)
    if len(user_inputs) != 1:
        raise _fail("signature.input_specs", f"{len(user_inputs)} inputs; one image batch needed")
    specs = _list(signature.get("output_specs"), "signature.output_specs")
    if len(specs) != 1 or outputs != 1:
        raise _fail("signature.output_specs", "the program must return exactly one tensor")
    kind, inner = _union(specs[0], "signature.output_specs[0]")
    if kind != "user_output":
        raise _fail("signature.output_specs[0]", f"an output of kind {kind!r} (a mutation)")
    inner = _dict(inner, "signature.output_specs[0]", _words("arg"))
    _argument(inner.get("arg"), "signature.output_specs[0]", _words("as_tensor"))
    return str(user_inputs[0])


def _check_call_entry(entry: Any, where: str) -> None:
    entry = _dict(entry, where, _words("fqn signature"))
    if entry.get("fqn") != "":
        _fqn(entry.get("fqn"), where)
    signature = entry.get("signature")
    if signature is None:
        return
    signature = _dict(
        signature,
        where,
        _words("inputs outputs in_spec out_spec forward_arg_names"),
    )
    for field in ("inputs", "outputs"):
        for index, value in enumerate(_list(signature.get(field), f"{where}.{field}")):
            _argument(value, f"{where}.{field}[{index}]", _words("as_tensor"))
    _treespec(signature.get("in_spec"), f"{where}.in_spec")
    _treespec(signature.get("out_spec"), f"{where}.out_spec")
    for name in signature.get("forward_arg_names") or []:
        _name(name, f"{where}.forward_arg_names")


# ---- tensors from raw bytes ------------------------------------------------------------------


def read_payloads(
    archive: Archive, config_name: str, pattern: re.Pattern[str], limits: ArchiveLimits
) -> dict[str, torch.Tensor | nn.Parameter]:
    """The tensors a payload config describes, built from raw bytes (``use_pickle`` refused)."""
    config = _json_member(archive, config_name, limits)
    if (
        not isinstance(config, dict)
        or set(config) != {"config"}
        or not isinstance(config["config"], dict)
    ):
        raise ExportError(f"{config_name}: expected {{'config': {{...}}}}")
    directory = config_name.rpartition("/")[0]
    tensors: dict[str, torch.Tensor | nn.Parameter] = {}
    storages: dict[str, torch.Tensor] = {}
    for fqn, meta in config["config"].items():
        where = f"{config_name}: {fqn!r:.60}"
        if not isinstance(fqn, str) or not _FQN.fullmatch(fqn):
            raise ExportError(f"{where}: not a dotted attribute name")
        if not isinstance(meta, dict) or set(meta) - {
            "path_name",
            "is_param",
            "use_pickle",
            "tensor_meta",
        }:
            raise ExportError(f"{where}: unexpected fields")
        if meta.get("use_pickle") is not False:
            raise ExportError(
                f"{where}: stored as a pickle (use_pickle), which torch.export.load would "
                "unpickle with weights_only=False; re-export plain tensors"
            )
        path = f"{directory}/{meta.get('path_name')}"
        if not pattern.fullmatch(path) or path not in archive.members:
            raise ExportError(f"{where}: names a missing or unexpected member {path!r:.80}")
        tensor_meta = _tensor_meta(meta.get("tensor_meta"), where)
        dtype = _DTYPES[tensor_meta["dtype"]]
        sizes = [_static(s, where) for s in tensor_meta["sizes"]]
        strides = [_static(s, where) for s in tensor_meta["strides"]]
        offset = _static(tensor_meta["storage_offset"], where)
        if path not in storages:
            raw = bytearray(archive.read(path))
            itemsize = torch.empty((), dtype=dtype).element_size()
            if len(raw) % itemsize:
                raise ExportError(f"{where}: {len(raw)} bytes are not whole {dtype} elements")
            storages[path] = (
                torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
            )
        storage = storages[path]
        if storage.dtype != dtype:
            raise ExportError(f"{where}: its member is shared with a tensor of another dtype")
        if len(sizes) != len(strides) or min([*strides, offset, *sizes], default=0) < 0:
            raise ExportError(f"{where}: sizes {sizes} and strides {strides} do not match")
        extent = offset + sum(
            (size - 1) * stride for size, stride in zip(sizes, strides, strict=True)
        )
        if math.prod(sizes) and (extent >= storage.numel() or math.prod(sizes) > storage.numel()):
            raise ExportError(
                f"{where}: sizes {sizes} and strides {strides} reach past, or repeat, its "
                f"{storage.numel()} stored elements"
            )
        tensor = torch.as_strided(storage, sizes, strides, offset).clone()
        is_param = meta.get("is_param")
        if not isinstance(is_param, bool):
            raise ExportError(f"{where}: is_param must be a boolean")
        tensors[fqn] = nn.Parameter(tensor, requires_grad=False) if is_param else tensor
    return tensors


def _static(value: dict[str, Any], where: str) -> int:
    kind, inner = _union(value, where)
    if kind != "as_int":
        raise ExportError(f"{where}: a stored tensor with a symbolic size")
    return int(inner)


def read_sample_inputs(archive: Archive, limits: ArchiveLimits) -> tuple[Any, ...] | None:
    """The sample inputs, proven plain: their own zip is checked, then ``torch.load`` reads them
    with ``weights_only=True`` (tensors and containers only; a pickle calling anything else is
    refused without running). torch.export.load would fall back to ``weights_only=False``."""
    if SAMPLE_INPUTS not in archive.members:
        return None
    data = archive.read(SAMPLE_INPUTS)
    inner_limits = ArchiveLimits(
        max_archive_bytes=len(data), max_members=64, max_total_bytes=len(data)
    )
    try:
        inner = open_archive(data, inner_limits)
    except ExportError as error:
        raise ExportError(f"member {archive.root}/{SAMPLE_INPUTS}: {error}") from None
    if any(info.compress_type != zipfile.ZIP_STORED for info in inner.members.values()):
        raise ExportError(f"member {archive.root}/{SAMPLE_INPUTS}: compressed torch.save records")
    try:
        loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # the weights-only unpickler raises UnpicklingError and others
        raise ExportError(
            f"member {archive.root}/{SAMPLE_INPUTS} does not load with weights_only=True, "
            f"which torch.export.load would retry with weights_only=False: {error}"
        ) from None
    if not (
        isinstance(loaded, tuple)
        and len(loaded) == 2
        and isinstance(loaded[0], tuple)
        and isinstance(loaded[1], dict)
    ):
        raise ExportError(f"member {archive.root}/{SAMPLE_INPUTS}: not (args, kwargs)")
    return loaded


# ---- checking the deserialized graph ---------------------------------------------------------


def check_graph(graph: fx.Graph) -> Counter[str]:
    """The deserialized graph: only allowlisted ``call_function`` nodes, eval-mode arguments,
    and no in-place operator on a placeholder (a weight or the input) or a view of one."""
    operators: Counter[str] = Counter()
    aliases_input: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder":
            aliases_input.add(node)
            continue
        if node.op == "output":
            continue
        if node.op != "call_function":
            raise ExportError(f"graph node {node.name}: a {node.op} node (only operator calls)")
        name = _OP_NAMES.get(node.target)
        if name is None:
            raise ExportError(f"graph node {node.name}: {node.target} is not in the allowlist")
        operators[name] += 1
        rule = EVAL_ONLY.get(name)
        if rule is not None and _argument_value(node, rule[0]) != rule[1]:
            raise ExportError(f"graph node {node.name}: {name} with {rule[0]} other than eval")
        for stats in RUNNING_STATS.get(name, ()):
            if not isinstance(_argument_value(node, stats), fx.Node):
                raise ExportError(f"graph node {node.name}: {name} without {stats}")
        first = node.args[0] if node.args else None
        packet = name.split(".")[1]
        if packet.endswith("_") and not packet.startswith("_") and first in aliases_input:
            raise ExportError(
                f"graph node {node.name}: {name} writes into a weight or the input in place"
            )
        if name in _VIEWS and first in aliases_input:
            aliases_input.add(node)
    return operators


def _argument_value(node: fx.Node, name: str) -> object:
    if name in node.kwargs:
        return node.kwargs[name]
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return None
    for index, argument in enumerate(schema.arguments):
        if argument.name == name:
            if index < len(node.args):
                return node.args[index]
            return argument.default_value if argument.has_default_value() else None
    return None


# ---- the model -------------------------------------------------------------------------------


class ExportedBody(nn.Module):
    """An exported program's graph with its weights as frozen tensors: (N, C, H, W) -> (N, D).

    A program exported with a static batch size B runs on chunks of B images (the last chunk
    padded and its padding dropped); one with a dynamic batch runs on chunks within its
    ``[min, max]`` range. Images of another (C, H, W) than ``input_shape`` are refused.
    """

    def __init__(
        self,
        program: fx.GraphModule,
        lifted: Sequence[torch.Tensor],
        *,
        input_shape: Sequence[int],
        batch_range: tuple[int, int],
        feature_dim: int = 0,
    ) -> None:
        super().__init__()
        self.program = program
        self.input_shape = tuple(int(v) for v in input_shape)
        self.batch_range = batch_range
        self.feature_dim = feature_dim
        self._lifted: list[str] = []
        for index, tensor in enumerate(lifted):
            name = f"lifted_{index}"
            if isinstance(tensor, nn.Parameter):
                self.register_parameter(name, nn.Parameter(tensor.detach(), requires_grad=False))
            else:
                self.register_buffer(name, tensor)
            self._lifted.append(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.input_shape:
            raise ExportError(
                f"the exported program takes images of shape {list(self.input_shape)} "
                f"(C, H, W); got {list(x.shape[1:])}: audit it on a dataset of that shape"
            )
        if len(x) == 0:
            return x.new_zeros(0, self.feature_dim)
        lifted = [getattr(self, name) for name in self._lifted]
        smallest, largest = self.batch_range
        outputs = []
        for start in range(0, len(x), largest):
            chunk = x[start : start + largest]
            count = len(chunk)
            if count < smallest:
                padding = chunk.new_zeros(smallest - count, *chunk.shape[1:])
                chunk = torch.cat([chunk, padding])
            (result,) = self.program(*lifted, chunk)
            outputs.append(result[:count])
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


class ExportedClassifier(FeatureClassifier):
    """normalize -> an exported program -> f(x) -> head; ``arch`` is ``"exported"``."""

    body: ExportedBody

    def __init__(
        self,
        body: ExportedBody,
        feature_dim: int,
        num_classes: int,
        normalize: Normalize,
        *,
        output: Output,
    ) -> None:
        with warnings.catch_warnings():  # a feature-only model's head has no rows
            warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
            super().__init__("exported", body, feature_dim, num_classes, normalize)
        self.output = output

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.body.input_shape


def load_exported(
    source: str | Path | bytes,
    *,
    input_shape: Sequence[int] | None = None,
    output: Output = "features",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    classes: Sequence[str] | None = None,
    limits: ArchiveLimits | None = None,
) -> ExportedClassifier:
    """An exported program as an :class:`ExportedClassifier`, checked as this module describes.

    Args:
        source: the ``.pt2`` file, or its bytes (read once by :func:`read_archive`).
        input_shape: (C, H, W) of the images; None takes the program's own static shape.
        output: ``"features"`` when the program returns f(x) (N, D) (or (N, D, 1, 1));
            ``"logits"`` when it ends in a linear layer, split off as ``head``.
        mean, std: per-channel pixel statistics the program expects its input normalized by
            (pixels in [0,1]); None for a program that takes raw [0,1] pixels.
        classes: names of the head's classes (``"logits"``), checked against its size.

    Returns the model in eval mode on the CPU, its program's parameters frozen. Raises
    :class:`ExportError` for anything refused.
    """
    limits = limits or ArchiveLimits()
    data = source if isinstance(source, bytes) else read_archive(source, limits)
    archive = open_archive(data, limits)
    check_layout(archive)
    program_json = _json_member(archive, PROGRAM_JSON, limits)
    facts = check_program(program_json)
    state_dict = read_payloads(archive, WEIGHTS_CONFIG, _WEIGHT_FILE, limits)
    constants = read_payloads(archive, CONSTANTS_CONFIG, _CONSTANT_FILE, limits)
    sample_inputs = read_sample_inputs(archive, limits)
    program = _deserialize(program_json, state_dict, constants, sample_inputs)
    check_graph(program.graph)
    shape, batch_range = _input_shape(program, facts, input_shape)
    graph_module, lifted = _lifted_program(program)
    head: tuple[torch.Tensor, torch.Tensor] | None = None
    if output == "logits":
        head = _split_head(graph_module, lifted)
    elif output != "features":
        raise ExportError(f"output must be 'features' or 'logits', got {output!r}")
    _check_sizes(graph_module, lifted, shape, batch_range)
    body = ExportedBody(graph_module, lifted, input_shape=shape, batch_range=batch_range)
    normalize = _normalize(shape[0], mean, std)
    feature_dim = _measure(body, normalize, shape, batch_range)
    body.feature_dim = feature_dim
    num_classes = 0 if head is None else int(head[0].shape[0])
    if head is not None and head[0].shape[1] != feature_dim:
        raise ExportError(
            f"the final linear layer takes {head[0].shape[1]} features but gets {feature_dim}"
        )
    if classes is not None and head is not None and len(classes) != num_classes:
        raise ExportError(f"classes: {len(classes)} names for a head of {num_classes} classes")
    model = ExportedClassifier(body, feature_dim, num_classes, normalize, output=output)
    if head is not None:
        with torch.no_grad():
            model.head.weight.copy_(head[0])
            model.head.bias.copy_(head[1])
    _check_gradient(model, shape, batch_range)
    return model.eval()


def _deserialize(
    program_json: dict[str, Any],
    state_dict: dict[str, torch.Tensor | nn.Parameter],
    constants: dict[str, torch.Tensor | nn.Parameter],
    sample_inputs: tuple[Any, ...] | None,
) -> torch.export.ExportedProgram:
    """torch's own deserializer on the checked JSON and the tensors built from raw bytes."""
    from torch._export.serde import schema
    from torch._export.serde.serialize import ExportedProgramDeserializer, _dict_to_dataclass

    try:
        serialized = _dict_to_dataclass(schema.ExportedProgram, program_json)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ExportedProgramDeserializer().deserialize(
                serialized, state_dict, constants, sample_inputs
            )
    except Exception as error:  # the deserializer raises many types for a bad program
        raise ExportError(f"the program does not deserialize: {str(error)[:500]}") from None


def _lifted_program(
    program: torch.export.ExportedProgram,
) -> tuple[fx.GraphModule, list[torch.Tensor]]:
    """The graph module (weights as its leading inputs) and those weights, in order."""
    from torch.export.graph_signature import InputKind

    lifted: list[torch.Tensor] = []
    placeholders = [n.name for n in program.graph.nodes if n.op == "placeholder"]
    specs = program.graph_signature.input_specs
    if placeholders != [spec.arg.name for spec in specs]:
        raise ExportError("the graph's inputs do not follow its signature")
    for spec in specs:
        if spec.kind == InputKind.USER_INPUT:
            if spec is not specs[-1]:
                raise ExportError("the image input must be the program's last input")
            continue
        assert spec.target is not None
        table = program.state_dict if spec.target in program.state_dict else program.constants
        value = table.get(spec.target)
        if not isinstance(value, torch.Tensor):
            raise ExportError(f"no stored tensor for {spec.target!r}")
        if value.is_floating_point() and value.dtype != torch.float32:
            value = value.float()  # the audit runs in float32 (autocast where it is faster)
        lifted.append(value)
    return program.graph_module, lifted


def _input_shape(
    program: torch.export.ExportedProgram,
    facts: ProgramFacts,
    declared: Sequence[int] | None,
) -> tuple[tuple[int, int, int], tuple[int, int]]:
    """(C, H, W) of the images and the batch sizes the program runs on, [smallest, largest]."""
    node = next(n for n in program.graph.nodes if n.name == facts.input_name)
    value = node.meta.get("val")
    if not isinstance(value, torch.Tensor) or value.ndim != 4:
        raise ExportError("the program's input is not an image batch (N, C, H, W)")
    dims: list[tuple[int, int]] = []
    for size in value.shape:
        if isinstance(size, int):
            dims.append((size, size))
        else:
            bounds = program.range_constraints.get(size.node.expr)
            low = int(bounds.lower) if bounds is not None and bounds.lower.is_finite else 1
            high = (
                int(bounds.upper) if bounds is not None and bounds.upper.is_finite else sys.maxsize
            )
            dims.append((max(1, low), high))
    batch = (dims[0][0], min(dims[0][1], 1024))
    if declared is None:
        if any(low != high for low, high in dims[1:]):
            raise ExportError("the program takes images of any size: give input_shape")
        return (dims[1][0], dims[2][0], dims[3][0]), batch
    shape = tuple(int(v) for v in declared)
    if len(shape) != 3 or min(shape) < 1:
        raise ExportError(f"input_shape must be [channels, height, width], got {list(shape)}")
    for axis, (size, (low, high)) in enumerate(zip(shape, dims[1:], strict=True)):
        if not low <= size <= high:
            expected = low if low == high else f"{low}..{high}"
            raise ExportError(
                f"input_shape {list(shape)}: the program takes {expected} at "
                f"{('channels', 'height', 'width')[axis]}"
            )
    return (shape[0], shape[1], shape[2]), batch


def _split_head(
    graph_module: fx.GraphModule, lifted: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut the program's final linear layer off; its input becomes the program's output.

    Recognized: ``linear(f, W, b)``, ``addmm(b, f, W^T)``, ``mm(f, W^T) + b`` and ``mm(f, W^T)``,
    where W and b are stored weights. Returns (W (K, D), b (K,)); ``lifted`` loses the
    weights only the cut layer used.
    """
    graph = graph_module.graph
    output = next(n for n in graph.nodes if n.op == "output")
    (result,) = output.args[0]
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    values = dict(zip(placeholders, lifted, strict=False))
    found = _final_linear(result, values)
    if found is None:
        raise ExportError(
            "output=logits needs a program that ends in a linear layer (linear, addmm or mm + "
            f"add on stored weights); this one ends in {_OP_NAMES.get(result.target, result.op)}"
            ": export the features instead and upload with output=features"
        )
    features, weight_node, bias_node = found
    weight = values[weight_node].detach().float()
    bias = (
        values[bias_node].detach().float()
        if bias_node is not None
        else torch.zeros(weight.shape[0])
    )
    if weight.ndim != 2 or bias.shape != (weight.shape[0],):
        raise ExportError(
            f"the final linear layer's weight {tuple(weight.shape)} and bias "
            f"{tuple(bias.shape)} are not (classes, features) and (classes,)"
        )
    output.args = ((features,),)
    graph.eliminate_dead_code()
    for index in reversed(range(len(placeholders) - 1)):  # the last is the image input
        if not placeholders[index].users:
            graph.erase_node(placeholders[index])
            del lifted[index]
    graph.lint()
    graph_module.recompile()
    return weight.clone(), bias.clone()


def _final_linear(
    node: fx.Node, values: Mapping[fx.Node, torch.Tensor]
) -> tuple[fx.Node, fx.Node, fx.Node | None] | None:
    """(features, weight, bias) of a final linear layer ending at ``node``, or None."""
    name = _OP_NAMES.get(node.target)

    def stored(arg: object) -> fx.Node | None:
        return arg if isinstance(arg, fx.Node) and arg in values else None

    def transposed(arg: object) -> fx.Node | None:
        if not isinstance(arg, fx.Node):
            return None
        kind = _OP_NAMES.get(arg.target)
        if kind == "aten.t.default" or (
            kind == "aten.permute.default" and list(arg.args[1]) == [1, 0]  # type: ignore[arg-type]
        ):
            return stored(arg.args[0])
        if kind == "aten.transpose.int" and sorted(arg.args[1:3]) == [0, 1]:  # type: ignore[type-var]
            return stored(arg.args[0])
        return None

    args = node.args
    if name == "aten.linear.default" and isinstance(args[0], fx.Node) and stored(args[1]):
        bias = args[2] if len(args) > 2 else node.kwargs.get("bias")
        if bias is None or stored(bias):
            return args[0], stored(args[1]), stored(bias)  # type: ignore[return-value]
    if name == "aten.addmm.default" and not node.kwargs and len(args) == 3:
        weight = transposed(args[2])
        if weight is not None and stored(args[0]) and isinstance(args[1], fx.Node):
            return args[1], weight, stored(args[0])
    if name == "aten.add.Tensor" and len(args) == 2 and not node.kwargs:
        for product, bias in ((args[0], args[1]), (args[1], args[0])):
            if (
                isinstance(product, fx.Node)
                and _OP_NAMES.get(product.target) == "aten.mm.default"
                and len(product.users) == 1
                and stored(bias)
            ):
                weight = transposed(product.args[1])
                if weight is not None and isinstance(product.args[0], fx.Node):
                    return product.args[0], weight, stored(bias)
    if name == "aten.mm.default":
        weight = transposed(args[1])
        if weight is not None and isinstance(args[0], fx.Node):
            return args[0], weight, None
    return None


class _SizeCheck(fx.Interpreter):
    """Runs a graph on fake tensors (shapes only, no memory) and refuses huge intermediates."""

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        values = result if isinstance(result, tuple | list) else (result,)
        for value in values:
            if isinstance(value, torch.Tensor) and value.numel() > MAX_INTERMEDIATE_ELEMENTS:
                raise ExportError(
                    f"graph node {n.name} makes a tensor of shape {list(value.shape)} for "
                    f"two images; at most {MAX_INTERMEDIATE_ELEMENTS} elements are allowed"
                )
        return result


def _check_sizes(
    graph_module: fx.GraphModule,
    lifted: Sequence[torch.Tensor],
    shape: Sequence[int],
    batch_range: tuple[int, int],
) -> None:
    """Every intermediate tensor's size on a probe batch, computed without allocating it
    (``FakeTensorMode``), so that a program cannot exhaust memory when it first runs."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    count = max(batch_range[0], min(2, batch_range[1]))
    try:
        with FakeTensorMode() as mode:
            fake = [mode.from_tensor(tensor) for tensor in lifted]
            _SizeCheck(graph_module).run(*fake, torch.empty(count, *shape))
    except ExportError:
        raise
    except Exception as error:  # the program's own failure on this shape
        raise ExportError(
            f"the program fails on a batch of shape {[count, *shape]}: {str(error)[:300]}"
        ) from None


def _normalize(
    channels: int, mean: Sequence[float] | None, std: Sequence[float] | None
) -> Normalize:
    mean = [0.0] * channels if mean is None else list(mean)
    std = [1.0] * channels if std is None else list(std)
    if len(mean) != channels or len(std) != channels or min(std) <= 0:
        raise ExportError(f"mean and std need {channels} values each (std > 0)")
    return Normalize(mean, std)


def _probe(shape: Sequence[int], batch_range: tuple[int, int]) -> torch.Tensor:
    count = max(batch_range[0], min(2, batch_range[1]))
    generator = torch.Generator().manual_seed(0)
    return torch.rand(count, *shape, generator=generator)


def _measure(
    body: ExportedBody, normalize: Normalize, shape: Sequence[int], batch_range: tuple[int, int]
) -> int:
    """f(x)'s width, from one batch of the declared shape; refuses non-finite features."""
    x = _probe(shape, batch_range)
    try:
        with torch.no_grad():
            features = torch.flatten(body(normalize(x)), 1)
    except ExportError:
        raise
    except Exception as error:  # the program's own failure on this shape
        raise ExportError(
            f"the program fails on a batch of shape {list(x.shape)}: {str(error)[:300]}"
        ) from None
    if len(features) != len(x):
        raise ExportError(f"the program returns {len(features)} rows for {len(x)} images")
    if not 1 <= features.shape[1] <= MAX_FEATURE_DIM:
        raise ExportError(
            f"the program returns {features.shape[1]} values per image; f(x) must be a "
            f"pooled vector of at most {MAX_FEATURE_DIM} (pool the feature map before export)"
        )
    if not torch.isfinite(features).all():
        raise ExportError("the program returns non-finite features on random images")
    with torch.no_grad():  # one image alone (padded to the smallest batch) as in the batch
        alone = torch.flatten(body(normalize(x[:1])), 1)
    if len(x) > 1 and not torch.allclose(alone, features[:1], rtol=1e-4, atol=1e-5):
        raise ExportError(
            "the program's features of an image depend on the other images in its batch "
            "(batch statistics?); export it in eval mode"
        )
    return int(features.shape[1])


def _check_gradient(
    model: ExportedClassifier, shape: Sequence[int], batch_range: tuple[int, int]
) -> None:
    """The attacks differentiate f(x) w.r.t. x: the gradient must reach the input, finite."""
    x = _probe(shape, batch_range).requires_grad_(True)
    try:
        features = model.features(x)
        (grad,) = torch.autograd.grad(features.square().sum(), x)
    except RuntimeError as error:
        raise ExportError(f"f(x) is not differentiable w.r.t. x: {str(error)[:300]}") from None
    if not torch.isfinite(grad).all() or not grad.abs().sum() > 0:
        raise ExportError("the gradient of f(x) w.r.t. x is zero or not finite")


# ---- stored exported models ------------------------------------------------------------------


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def exported_manifest(model: ExportedClassifier, data: bytes) -> dict[str, Any]:
    """The manifest fields of a stored exported model (its facts and the program's sha256)."""
    return {
        "format": MANIFEST_FORMAT,
        "kind": EXPORTED_KIND,
        **model_facts(model),
        "input_shape": list(model.input_shape),
        "output": model.output,
        "head": "trained" if model.num_classes else "none",
        "batch_range": list(model.body.batch_range),
        "weights_file": EXPORTED_NAME,
        "weights_sha256": _sha256(data),
        "versions": library_versions(),
    }


def save_exported(
    source: str | Path | bytes,
    out_dir: Path,
    *,
    input_shape: Sequence[int] | None = None,
    output: Output = "features",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    classes: Sequence[str] | None = None,
    manifest: Mapping[str, Any] | None = None,
    limits: ArchiveLimits | None = None,
) -> LoadedExtractor:
    """Check and load ``source``, then write ``out_dir/model.pt2`` (the very bytes checked,
    untouched) and ``out_dir/manifest.json``. ``manifest`` adds provenance fields."""
    limits = limits or ArchiveLimits()
    data = source if isinstance(source, bytes) else read_archive(source, limits)
    model = load_exported(
        data,
        input_shape=input_shape,
        output=output,
        mean=mean,
        std=std,
        classes=classes,
        limits=limits,
    )
    full = {
        **(manifest or {}),
        **({"classes": list(classes)} if classes else {}),
        **exported_manifest(model, data),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / EXPORTED_NAME).write_bytes(data)
    (out_dir / MANIFEST_NAME).write_text(json.dumps(full, indent=2, sort_keys=True) + "\n")
    return LoadedExtractor(model=model, manifest=full)


def load_exported_checkpoint(
    path: Path, manifest: Mapping[str, Any] | None = None, limits: ArchiveLimits | None = None
) -> LoadedExtractor:
    """A stored exported model (a folder with ``model.pt2`` and ``manifest.json``) or a bare
    ``.pt2`` file (with the program's own input shape, ``output="features"``, no
    normalization, unless ``manifest`` says otherwise). The sha256 in the manifest is checked
    against the bytes that are then loaded."""
    limits = limits or ArchiveLimits()
    program = path / EXPORTED_NAME if path.is_dir() else path
    if manifest is None and path.is_dir() and (path / MANIFEST_NAME).is_file():
        manifest = json.loads((path / MANIFEST_NAME).read_text())
    described = dict(manifest or {})
    data = read_archive(program, limits)
    expected = described.get("weights_sha256")
    if expected and _sha256(data) != expected:
        raise ExportError(
            f"{program} sha256 {_sha256(data)} does not match the manifest's {expected}"
        )
    norm = described.get("normalization") or {}
    model = load_exported(
        data,
        input_shape=described.get("input_shape"),
        output=described.get("output", "features"),
        mean=norm.get("mean"),
        std=norm.get("std"),
        classes=described.get("classes") if described.get("output") == "logits" else None,
        limits=limits,
    )
    facts = exported_manifest(model, data)
    for key in ("feature_dim", "num_classes", "in_channels"):
        if key in described and described[key] != facts[key]:
            raise ExportError(
                f"manifest says {key}={described[key]!r}, the program gives {facts[key]!r}"
            )
    return LoadedExtractor(model=model, manifest={**facts, **described})


__all__ = [
    "ALLOWED_OPS",
    "EXPORTED_KIND",
    "OP_GROUPS",
    "ArchiveLimits",
    "ExportError",
    "ExportedBody",
    "ExportedClassifier",
    "check_expression",
    "check_graph",
    "check_program",
    "load_exported",
    "load_exported_checkpoint",
    "open_archive",
    "read_archive",
    "save_exported",
]
