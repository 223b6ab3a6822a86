"""``df.io.load_audio`` and ``df.io.save_audio`` through soundfile.

deepfilternet 0.5.6 reads and writes through ``torchaudio.info/load/save``. On today's stack
``torchaudio.info`` is gone and ``load``/``save`` need torchcodec plus FFmpeg; its int16 path
(``(audio * 32768).to(torch.int16)``) also wraps samples beyond full scale around instead of
clipping them. The wrappers here keep upstream's signatures and return types but never call the
original: ``df_mps.audio`` does the I/O (soundfile), int16 is rounded and clipped, and every
write goes to a temporary file in the target directory that is renamed into place only when
complete. The df-mps command line uses ``df_mps.audio`` too, so a user's files go through one
tested path.
"""

from __future__ import annotations

import os
import sys
from typing import Optional, Tuple

import numpy as np

# Re-exported: this module was their home before df_mps.audio.
from ..audio import (  # noqa: F401
    EXTENSION_FORMATS,
    PCM_BITS,
    TEMP_SUFFIX,
    AudioFileError,
    choose_subtype,
    format_for_path,
    quantize,
    read_audio,
    write_audio,
)
from ..registry import Patch, Target, replaced_by
from ..util import one_line

# What torchaudio's AudioMetaData reported as (bits_per_sample, encoding), by soundfile subtype:
# linear PCM by PCM_BITS, and these.
FLOAT_BITS = {"FLOAT": 32, "DOUBLE": 64}
COMPANDED = ("ULAW", "ALAW")  # 8 bits, encoding as the subtype
LOSSY_ENCODINGS = {"VORBIS": "VORBIS", "OPUS": "OPUS", "MPEG_LAYER_III": "MP3"}  # 0 bits


def subtype_metadata(subtype: str) -> Tuple[int, str]:
    """(bits_per_sample, encoding) of a soundfile subtype, as torchaudio's info gave them."""
    if subtype in PCM_BITS:
        return PCM_BITS[subtype], "PCM_U" if subtype == "PCM_U8" else "PCM_S"
    if subtype in FLOAT_BITS:
        return FLOAT_BITS[subtype], "PCM_F"
    if subtype in COMPANDED:
        return 8, subtype
    return 0, LOSSY_ENCODINGS.get(subtype, "UNKNOWN")


def metadata(info):
    """An ``AudioMetaData`` as upstream's ``torchaudio.info`` returned it, from a soundfile info.

    Uses the class ``df.io`` imported (torchaudio's own where it has one, else df_mps's
    stand-in), so ``isinstance`` checks against upstream's annotation hold.
    """
    from .torchaudio_compat import AudioMetaData as Fallback

    bits, encoding = subtype_metadata(info.subtype)
    if info.format == "FLAC":
        encoding = "FLAC"
    fields = dict(
        sample_rate=int(info.samplerate),
        num_frames=int(info.frames),
        num_channels=int(info.channels),
        bits_per_sample=bits,
        encoding=encoding,
    )
    cls = getattr(sys.modules.get("df.io"), "AudioMetaData", None) or Fallback
    try:
        return cls(**fields)
    except TypeError:  # a torchaudio class with another constructor
        return Fallback(**fields)


# -- the wrappers ----------------------------------------------------------------------------
_LOAD_KWARGS = ("format", "backend", "buffer_size", "frame_offset", "num_frames")


def load_audio(file, sr: Optional[int] = None, verbose=True, **kwargs) -> Tuple[object, object]:
    """Upstream's ``df.io.load_audio``, reading through soundfile.

    Returns (audio [C, T] float32 tensor, AudioMetaData of the file as stored). ``sr`` resamples
    with ``df.io.resample`` (``method=`` as upstream). torchaudio's ``format``, ``backend`` and
    ``buffer_size`` are accepted and not needed: libsndfile reads the format from the content.
    """
    import torch

    method = kwargs.pop("method", None)
    channels_first = kwargs.pop("channels_first", True)
    normalize = kwargs.pop("normalize", True)
    unknown = sorted(set(kwargs) - set(_LOAD_KWARGS))
    if unknown:
        raise TypeError(f"load_audio() got unexpected keyword argument(s): {', '.join(unknown)}")
    frame_offset = int(kwargs.get("frame_offset", 0))
    num_frames = int(kwargs.get("num_frames", -1))
    try:
        import soundfile as sf

        info = sf.info(os.fsencode(file))
    except Exception as exc:
        raise RuntimeError(f"Failed to load audio from {file}: {one_line(exc)}") from None
    if "num_frames" in kwargs and sr is not None:
        # As upstream: num_frames counts frames at the target rate.
        num_frames *= info.samplerate // sr
    dtype = "float32"
    if not normalize:  # torchaudio returned the stored integers then
        dtype = {"PCM_16": "int16", "PCM_24": "int32", "PCM_32": "int32"}.get(
            info.subtype, "float32"
        )
    try:
        data, info = read_audio(file, frame_offset=frame_offset, num_frames=num_frames, dtype=dtype)
    except AudioFileError as exc:
        raise RuntimeError(f"Failed to load audio: {exc}") from None
    audio = torch.from_numpy(np.ascontiguousarray(data.T))
    orig_sr = int(info.samplerate)
    if sr is not None and orig_sr != sr:
        from df import io as df_io

        if verbose:
            from df.logger import warn_once

            warn_once(
                f"Audio sampling rate does not match model sampling rate ({orig_sr}, {sr}). "
                "Resampling..."
            )
        rkwargs = {"method": method} if method is not None else {}
        audio = df_io.resample(audio, orig_sr, sr, **rkwargs)
    if not channels_first:
        audio = audio.T
    return audio.contiguous(), metadata(info)


def save_audio(
    file,
    audio,
    sr: int,
    output_dir: Optional[str] = None,
    suffix: Optional[str] = None,
    log: bool = False,
    dtype=None,
):
    """Upstream's ``df.io.save_audio``, writing through soundfile, atomically.

    Same output path rules as upstream (``suffix`` before the extension, ``output_dir`` keeps
    the basename). ``dtype=torch.int16`` (upstream's default) writes 16-bit PCM, rounded and
    clipped to [-32768, 32767]; ``torch.float32`` writes 32-bit float (FLAC, which has no float
    samples: 24-bit PCM). int16 input is taken as int16 full scale, float input as 1.0.
    """
    import torch
    from loguru import logger

    if dtype is None:
        dtype = torch.int16
    outpath = os.fspath(file)
    if suffix is not None:
        stem, ext = os.path.splitext(outpath)
        outpath = stem + f"_{suffix}" + ext
    if output_dir is not None:
        outpath = os.path.join(output_dir, os.path.basename(outpath))
    if log:
        logger.info(f"Saving audio file '{outpath}'")
    audio = torch.as_tensor(audio).detach().cpu()
    if audio.ndim == 1:
        audio = audio.unsqueeze(0)
    if dtype == torch.int16:
        subtype = "PCM_16"
    elif dtype == torch.float64:
        subtype = "DOUBLE"
    elif dtype == torch.float32:
        subtype = "FLOAT"
    else:
        subtype = None
    samples = audio.numpy().T
    if samples.dtype != np.int16:
        samples = samples.astype(np.float32, copy=False)
    try:
        write_audio(outpath, samples, sr, subtype=subtype)
    except AudioFileError as exc:
        raise RuntimeError(str(exc)) from None


PATCH = Patch(
    name="audio_io",
    # df.io defines both; the registry gives the wrappers to every module that bound them by name
    # (df.enhance, df.evaluation_utils, several df.scripts). df.multiframe imports them inside
    # functions, so it reads df.io's (patched) attribute at call time.
    targets=[
        Target("df.io", "load_audio", replaced_by(load_audio)),
        Target("df.io", "save_audio", replaced_by(save_audio)),
    ],
)
