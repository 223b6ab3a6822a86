"""Upstream's pretrained models from GitHub, installed atomically into upstream's cache."""

from __future__ import annotations

import contextlib
import shutil
import zipfile
from pathlib import Path
from typing import Optional

from .._log import logger
from ..audio import remove_stale_temps, temp_directory
from ..util import one_line
from .cache import DownloadError, install_model_dir, is_model_dir, upstream_cache_dir

UPSTREAM_MODEL_URL = "https://github.com/Rikorose/DeepFilterNet/raw/main/models/{name}.zip"


def download_upstream_model(name: str, *, url: Optional[str] = None, timeout: float = 60.0) -> Path:
    """Upstream's model zip from GitHub, installed atomically into upstream's cache directory.

    Unlike upstream's ``download_file`` it never calls ``exit()``: failures raise DownloadError.
    ``url`` replaces upstream's address (a mirror, or a file:// URL). What a killed download
    left in the cache directory is removed first (``df_mps.audio.remove_stale_temps``).
    """
    import urllib.request

    cache = upstream_cache_dir()
    if cache is None:
        raise DownloadError("upstream has no cache directory on this platform")
    dest = cache / name
    url = url or UPSTREAM_MODEL_URL.format(name=name)
    with contextlib.ExitStack() as stack:
        try:
            cache.mkdir(parents=True, exist_ok=True)
            remove_stale_temps(cache)
            tmp = Path(stack.enter_context(temp_directory(dest)))
        except OSError as exc:
            raise DownloadError(f"cannot write to {cache}: {one_line(exc)}") from None
        archive = tmp / f"{name}.zip"
        logger.info(f"df_mps: downloading {url}")
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(archive, "wb") as f:
                shutil.copyfileobj(response, f)
        except Exception as exc:  # URLError, HTTPError, timeouts, resets
            raise DownloadError(f"{url}: {one_line(exc)}") from None
        extract = tmp / "extract"
        try:
            with zipfile.ZipFile(archive) as zf:
                check_zip_members(zf, extract)
                zf.extractall(extract)
        except zipfile.BadZipFile:
            raise DownloadError(f"{url} did not give a zip archive") from None
        found = extract / name
        if not is_model_dir(found):
            raise DownloadError(f"{url} holds no {name}/config.ini with checkpoints")
        return install_model_dir(found, dest, reuse_existing=True)


def check_zip_members(zf: zipfile.ZipFile, target: Path) -> None:
    """``DownloadError`` where a member of ``zf`` would be extracted outside ``target``."""
    root = target.resolve()
    for member in zf.namelist():
        resolved = (target / member).resolve()
        if root != resolved and root not in resolved.parents:
            raise DownloadError(f"zip member {member!r} would land outside {target}")
