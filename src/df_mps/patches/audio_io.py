"""``df.io.load_audio`` and ``df.io.save_audio`` through soundfile.

deepfilternet 0.5.6 reads and writes through ``torchaudio.info/load/save``. On today's stack
``torchaudio.info`` is gone and ``load``/``save`` need torchcodec plus FFmpeg; its int16 path
(``(audio * 32768).to(torch.int16)``) also wraps samples beyond full scale around instead of
clipping them. The wrappers here keep upstream's signatures and return types but never call the
original: soundfile (libsndfile) does the I/O, int16 is rounded and clipped, and every write goes
to a temporary file in the target directory that is renamed into place only when complete.

The helpers (``read_audio``, ``write_audio``, ``choose_subtype``) are what the df-mps command
line uses too, so a user's files go through one tested path.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import threading
from typing import Optional, Tuple

import numpy as np

from ..registry import Patch, Target

# File extension -> libsndfile major format, where the name differs from the format's.
EXTENSION_FORMATS = {
    "wav": "WAV",
    "wave": "WAV",
    "flac": "FLAC",
    "ogg": "OGG",
    "oga": "OGG",
    "opus": "OGG",
    "aif": "AIFF",
    "aiff": "AIFF",
    "aifc": "AIFF",
    "mp3": "MP3",
    "snd": "AU",
    "sf": "IRCAM",
}

# soundfile subtype -> (bits_per_sample, encoding) as torchaudio's AudioMetaData reported them.
SUBTYPE_METADATA = {
    "PCM_S8": (8, "PCM_S"),
    "PCM_U8": (8, "PCM_U"),
    "PCM_16": (16, "PCM_S"),
    "PCM_24": (24, "PCM_S"),
    "PCM_32": (32, "PCM_S"),
    "FLOAT": (32, "PCM_F"),
    "DOUBLE": (64, "PCM_F"),
    "ULAW": (8, "ULAW"),
    "ALAW": (8, "ALAW"),
    "VORBIS": (0, "VORBIS"),
    "OPUS": (0, "OPUS"),
    "MPEG_LAYER_III": (0, "MP3"),
}

# Bits of the linear PCM subtypes that df_mps quantises itself (libsndfile's own float -> int
# conversion scales by 2**(n-1) - 1 on write but divides by 2**(n-1) on read, and wraps around
# instead of clipping unless told otherwise).
PCM_BITS = {"PCM_S8": 8, "PCM_U8": 8, "PCM_16": 16, "PCM_24": 24, "PCM_32": 32}
FLOAT_SUBTYPES = ("FLOAT", "DOUBLE")

TEMP_SUFFIX = ".df-mps-tmp"


class AudioFileError(Exception):
    """A file that can't be read as audio, or written; the message is one line for the user."""


# -- formats ---------------------------------------------------------------------------------
def format_for_path(path) -> str:
    """The libsndfile major format that ``path``'s extension asks for."""
    import soundfile as sf

    ext = os.path.splitext(os.fspath(path))[1].lower().lstrip(".")
    fmt = EXTENSION_FORMATS.get(ext, ext.upper())
    if not ext or fmt not in sf.available_formats():
        raise AudioFileError(
            f"can't tell an audio format from the extension of '{path}'; use .wav, .flac or .ogg"
        )
    return fmt


def choose_subtype(fmt: str, wanted: Optional[str], path=None) -> str:
    """``wanted`` where ``fmt`` can hold it, else the closest subtype it can.

    Float data going into a format without float samples (FLAC) becomes 24-bit PCM; everything
    else falls back to the format's default (WAV: PCM_16, OGG: Vorbis). A ``.opus`` file is Opus.
    """
    import soundfile as sf

    ext = os.path.splitext(os.fspath(path))[1].lower() if path is not None else ""
    if fmt == "OGG" and ext == ".opus":
        return "OPUS"
    if wanted and sf.check_format(fmt, wanted):
        return wanted
    if wanted in FLOAT_SUBTYPES + ("PCM_32",) and sf.check_format(fmt, "PCM_24"):
        return "PCM_24"
    return sf.default_subtype(fmt)


def quantize(data: np.ndarray, subtype: str) -> np.ndarray:
    """Float samples (full scale 1.0) as the array libsndfile should write for ``subtype``.

    Linear PCM is rounded and clipped here to [-2**(n-1), 2**(n-1) - 1], the scale libsndfile
    uses when it reads the file back as float; float subtypes are kept as they are; lossy and
    companded codecs get samples clipped to [-1, 1].
    """
    bits = PCM_BITS.get(subtype)
    if bits is None:
        if subtype == "DOUBLE":
            return np.asarray(data, dtype=np.float64)
        data = np.asarray(data, dtype=np.float32)
        return data if subtype == "FLOAT" else np.clip(data, -1.0, 1.0)
    scale = float(1 << (bits - 1))
    q = np.clip(np.round(np.asarray(data, dtype=np.float64) * scale), -scale, scale - 1)
    if bits == 16:
        return q.astype(np.int16)
    # libsndfile takes the top bits of an int32 for 8- and 24-bit files.
    return (q.astype(np.int64) << (32 - bits)).astype(np.int32)


# -- reading ---------------------------------------------------------------------------------
def read_audio(
    path,
    *,
    frame_offset: int = 0,
    num_frames: int = -1,
    dtype: str = "float32",
):
    """(samples [T, C] as ``dtype``, soundfile info) of an audio file.

    Raises ``AudioFileError`` with a one-line reason for a file that is missing, empty, not
    audio, or unreadable.
    """
    import soundfile as sf

    path = os.fspath(path)
    if not os.path.exists(path):
        raise AudioFileError(f"'{path}': no such file")
    if os.path.isdir(path):
        raise AudioFileError(f"'{path}': is a directory, not an audio file")
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        raise AudioFileError(f"'{path}': {exc.strerror or exc}") from None
    if size == 0:
        raise AudioFileError(f"'{path}': empty file")
    try:
        with sf.SoundFile(path) as f:
            info = sf.info(path)
            if frame_offset:
                f.seek(frame_offset)
            data = f.read(frames=num_frames, dtype=dtype, always_2d=True)
    except (sf.LibsndfileError, RuntimeError, ValueError, TypeError) as exc:
        raise AudioFileError(f"'{path}': not a readable audio file ({_one_line(exc)})") from None
    except OSError as exc:
        raise AudioFileError(f"'{path}': {exc.strerror or _one_line(exc)}") from None
    return data, info


def metadata(info):
    """An ``AudioMetaData`` as upstream's ``torchaudio.info`` returned it, from a soundfile info.

    Uses the class ``df.io`` imported (torchaudio's own where it has one, else df_mps's
    stand-in), so ``isinstance`` checks against upstream's annotation hold.
    """
    from .torchaudio_compat import AudioMetaData as Fallback

    bits, encoding = SUBTYPE_METADATA.get(info.subtype, (0, "UNKNOWN"))
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


# -- writing ---------------------------------------------------------------------------------
_umask_lock = threading.Lock()
_umask: Optional[int] = None


def _current_umask() -> int:
    global _umask
    with _umask_lock:
        if _umask is None:
            _umask = os.umask(0)
            os.umask(_umask)
    return _umask


def write_audio(
    path,
    samples: np.ndarray,
    sample_rate: int,
    *,
    subtype: Optional[str] = None,
    overwrite: bool = True,
) -> str:
    """Write ``samples`` ([T, C] float, full scale 1.0; or int16) to ``path`` atomically.

    The data goes to a temporary file in the same directory, which is fsynced and then renamed
    onto ``path``: readers never see a partial file, and an interrupted write (an exception,
    KeyboardInterrupt) removes the temporary file. With ``overwrite=False`` an existing ``path``
    is never replaced (``FileExistsError``). Returns the subtype written.
    """
    import soundfile as sf

    path = os.fspath(path)
    fmt = format_for_path(path)
    subtype = choose_subtype(fmt, subtype, path)
    samples = np.asarray(samples)
    if samples.ndim == 1:
        samples = samples[:, None]
    if samples.dtype == np.int16 and subtype == "PCM_16":
        data = samples
    else:
        if samples.dtype == np.int16:
            samples = samples.astype(np.float32) / 32768.0
        data = quantize(samples, subtype)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(
        prefix="." + os.path.basename(path) + ".", suffix=TEMP_SUFFIX, dir=directory
    )
    os.close(fd)
    try:
        try:
            sf.write(tmp, data, int(sample_rate), format=fmt, subtype=subtype)
        except (sf.LibsndfileError, RuntimeError, ValueError, TypeError) as exc:
            raise AudioFileError(
                f"'{path}': could not write {fmt} {subtype} at {sample_rate} Hz ({_one_line(exc)})"
            ) from None
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        # mkstemp makes the file private (0600); give it the mode a plain open() would.
        os.chmod(tmp, 0o666 & ~_current_umask())
        _publish(tmp, path, overwrite)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return subtype


def _publish(tmp: str, path: str, overwrite: bool) -> None:
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        # link() fails if `path` exists, with no window in which another writer could slip in.
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:
        # Filesystems without hard links (FAT, some network shares): check, then rename.
        if os.path.lexists(path):
            raise FileExistsError(17, "File exists", path) from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def _one_line(exc: BaseException) -> str:
    # libsndfile's own reason, without soundfile's "Error opening '<path>': " around it.
    text = getattr(exc, "error_string", None) or str(exc)
    text = " ".join(text.split()).rstrip(".")
    return text or type(exc).__name__


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

        info = sf.info(os.fspath(file))
    except Exception as exc:
        raise RuntimeError(f"Failed to load audio from {file}: {_one_line(exc)}") from None
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


def load_audio_wrapper(wrapped, instance, args, kwargs):
    return load_audio(*args, **kwargs)


def save_audio_wrapper(wrapped, instance, args, kwargs):
    return save_audio(*args, **kwargs)


PATCH = Patch(
    name="audio_io",
    # df.io defines both; the registry gives the wrappers to every module that bound them by name
    # (df.enhance, df.evaluation_utils, several df.scripts). df.multiframe imports them inside
    # functions, so it reads df.io's (patched) attribute at call time.
    targets=[
        Target("df.io", "load_audio", load_audio_wrapper),
        Target("df.io", "save_audio", save_audio_wrapper),
    ],
)
