"""Audio files for df_mps: formats, subtypes, quantising, reading, and the one atomic writer.

Everything df_mps reads or writes for a user goes through here: the command line (whole files
and streamed ones), the ``df.io.load_audio``/``save_audio`` patch, the model cache's directories
and the shipped sample. soundfile (libsndfile) does the audio I/O; a WAV whose header declares
no data length (a recorder that died before finalising it) is read from its data chunk to the
end of the file, as RAW (``open_audio``, ``audio_info``).

The writer (``new_temp``, ``publish``, ``discard``; ``atomic_output`` and ``AudioFileWriter``
on top of them): the output is first a temporary file or directory in the target's directory,
written, fsynced, renamed onto the target, and then the directory itself is fsynced, so a crash
leaves either the complete old output or the complete new one. Any failure, KeyboardInterrupt
included, removes the temporary. Its name is short and independent of the target's
(``.<pid>-<6 hex>.df-mps-tmp``), so any legal output name can be written; the PID lets a later
model build remove what a killed one left (``remove_stale_temps``). A temporary file is
created with ``os.open(..., O_CREAT | O_EXCL, 0o666)``: the kernel applies the process's umask
of that moment, and nothing reads the umask. Replacing a file (``overwrite``) keeps its mode.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import secrets
import shutil
import stat
import struct
import time
from typing import Iterator, List, Optional

import numpy as np

from .errors import os_reason, sndfile_reason, system_cause
from .util import PathLike, one_line

__all__ = [
    "EXTENSION_FORMATS",
    "FLOAT_SUBTYPES",
    "PCM_BITS",
    "STALE_TEMP_SECONDS",
    "TEMP_SUFFIX",
    "AudioFileError",
    "AudioFileWriter",
    "atomic_output",
    "audio_info",
    "choose_subtype",
    "declared_frames",
    "discard",
    "format_for_path",
    "is_temp_name",
    "new_temp",
    "no_length",
    "open_audio",
    "open_error",
    "open_for_writing",
    "publish",
    "quantize",
    "read_audio",
    "read_blocks",
    "refuse_input_as_output",
    "remove_stale_temps",
    "same_file",
    "temp_directory",
    "truncation",
    "write_audio",
    "write_error",
]

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

# Bits of the linear PCM subtypes that df_mps quantises itself (libsndfile's own float -> int
# conversion scales by 2**(n-1) - 1 on write but divides by 2**(n-1) on read, and wraps around
# instead of clipping unless told otherwise).
PCM_BITS = {"PCM_S8": 8, "PCM_U8": 8, "PCM_16": 16, "PCM_24": 24, "PCM_32": 32}
FLOAT_SUBTYPES = ("FLOAT", "DOUBLE")

# Every temporary file or directory the writer makes is named ".<pid>-<6 hex>" + TEMP_SUFFIX.
TEMP_SUFFIX = ".df-mps-tmp"
# .PID-RANDOM-TAG.df-mps-tmp: at most 31 characters (a PID has at most 7 digits), whatever the
# target's name. Names without a tag (df-mps 0.1's six random digits) are recognised too.
_TEMP_NAME = re.compile(r"\.(\d+)-[0-9a-f]{4,6}(?:-([0-9a-f]{6}))?" + re.escape(TEMP_SUFFIX))
# A temporary older than this is left from a dead process even where its PID lives again.
STALE_TEMP_SECONDS = 3600.0

# What libsndfile raises for a file it can't make sense of (rather than an OS error).
_SOUNDFILE_ERRORS = (RuntimeError, ValueError, TypeError)  # LibsndfileError is a RuntimeError


class AudioFileError(Exception):
    """A file that can't be read as audio, or written; the message is one line for the user."""


# -- formats ---------------------------------------------------------------------------------
def format_for_path(path: PathLike, source_format: Optional[str] = None) -> str:
    """The libsndfile major format that ``path``'s extension asks for.

    ``source_format``: the input's format. An RF64 or W64 input (often named ``.wav``) keeps its
    container in a ``.wav`` output: plain WAV can't hold more than 4 GiB.
    """
    import soundfile as sf

    ext = os.path.splitext(os.fspath(path))[1].lower().lstrip(".")
    fmt = EXTENSION_FORMATS.get(ext, ext.upper())
    if not ext or fmt not in sf.available_formats():
        raise AudioFileError(
            f"can't tell an audio format from the extension of '{path}'; use .wav, .flac or .ogg"
        )
    if fmt == "WAV" and source_format in LARGE_WAV_FORMATS:
        return source_format
    return fmt


LARGE_WAV_FORMATS = ("RF64", "W64")
# The most audio bytes a plain WAV's 32-bit sizes hold, less room for its header chunks.
WAV_MAX_DATA_BYTES = 0xFFFFFFFF - (1 << 16)
_BYTES_PER_SAMPLE = {"PCM_S8": 1, "PCM_U8": 1, "ULAW": 1, "ALAW": 1, "PCM_16": 2, "PCM_24": 3}
_BYTES_PER_SAMPLE.update(PCM_32=4, FLOAT=4, DOUBLE=8)


def open_for_writing(name, sample_rate: int, channels: int, subtype: str, fmt: str, frames=None):
    """A soundfile ``SoundFile`` open for writing ``name`` (bytes or str).

    A WAV whose ``frames`` could pass 4 GiB is opened as RF64 with libsndfile's auto-downgrade
    (``SFC_RF64_AUTO_DOWNGRADE``): it is written as plain WAV if it ends up small enough, and
    as RF64 otherwise, instead of a WAV whose sizes wrap around.
    """
    import soundfile as sf

    if fmt == "WAV" and frames is not None and int(frames) > 0:
        size = int(frames) * int(channels) * _BYTES_PER_SAMPLE.get(subtype, 8)
        if size > WAV_MAX_DATA_BYTES and sf.check_format("RF64", subtype):
            f = sf.SoundFile(name, "w", int(sample_rate), int(channels), subtype, format="RF64")
            # soundfile has no wrapper for sf_command; its cffi handles are private names. If
            # they are gone, the file stays RF64, which holds any size.
            with contextlib.suppress(Exception):
                sf._snd.sf_command(f._file, 0x1210, sf._ffi.NULL, 1)  # SFC_RF64_AUTO_DOWNGRADE
            return f
    return sf.SoundFile(name, "w", int(sample_rate), int(channels), subtype, format=fmt)


def choose_subtype(fmt: str, wanted: Optional[str], path: Optional[PathLike] = None) -> str:
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
    # float32 holds every integer of up to 24 bits and scaling by a power of two is exact, so
    # float32 samples round the same in float32 as in float64 up to 24-bit PCM, at half the
    # memory traffic (an encode of a step's pieces is on the critical path at a corpus's end).
    # float64 samples stay float64: narrowing them first would round twice.
    data = np.asarray(data)
    narrow = bits <= 24 and data.dtype.kind == "f" and data.dtype.itemsize <= 4
    dtype = np.float32 if narrow else np.float64
    with np.errstate(over="ignore"):  # beyond float32's range: inf, clipped below as before
        q = np.asarray(data, dtype=dtype) * dtype(scale)
    np.round(q, out=q)
    np.clip(q, -scale, scale - 1, out=q)
    if bits == 16:
        return q.astype(np.int16)
    # libsndfile takes the top bits of an int32 for 8- and 24-bit files.
    return (q.astype(np.int64) << (32 - bits)).astype(np.int32)


# -- reading ---------------------------------------------------------------------------------
def read_audio(
    path: PathLike,
    *,
    frame_offset: int = 0,
    num_frames: int = -1,
    dtype: str = "float32",
):
    """(samples [T, C] as ``dtype``, soundfile info) of an audio file.

    A WAV whose header declares no length (a recorder that stopped before finalising it) is
    read to the end of the file (``open_audio``). Raises ``AudioFileError`` with a one-line
    reason for a file that is missing, empty, not audio, or unreadable.
    """
    path = os.fspath(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise AudioFileError(f"'{path}': no such file") from None
    except OSError as exc:  # a directory on the way that can't be searched: permission denied
        raise AudioFileError(f"'{path}': {os_reason(exc)}") from None
    if stat.S_ISDIR(st.st_mode):
        raise AudioFileError(f"'{path}': is a directory, not an audio file")
    size = st.st_size
    if size == 0:
        raise AudioFileError(f"'{path}': empty file")
    try:
        with open_audio(path) as f:
            info = audio_info(path)
            if frame_offset:
                f.seek(frame_offset)
            data = f.read(frames=num_frames, dtype=dtype, always_2d=True)
    except _SOUNDFILE_ERRORS as exc:
        raise open_error(path, exc) from None
    except OSError as exc:
        raise AudioFileError(f"'{path}': {os_reason(exc)}") from None
    return data, info


def open_error(path: PathLike, exc: BaseException) -> AudioFileError:
    """The one-line ``AudioFileError`` for a file soundfile could not open for reading: the
    plain cause of an OS error (libsndfile's "System error" hides it: permission denied, ...),
    else "not a readable audio file". Call it right after the failing call, in its thread."""
    cause = system_cause(exc) or (os_reason(exc) if isinstance(exc, OSError) else None)
    if cause:
        return AudioFileError(f"'{path}': {cause}")
    return AudioFileError(f"'{path}': not a readable audio file ({one_line(exc)})")


def read_blocks(
    path: PathLike, block_frames: int, *, dtype: str = "float32"
) -> Iterator[np.ndarray]:
    """The samples of ``path`` in blocks of ``block_frames`` ([frames, channels]; the last may
    be shorter). The file is opened here, so a file that can't be opened raises at once;
    ``AudioFileError`` (one line) for that and for a read that fails later. Close the
    generator (``contextlib.closing``) to close the file early."""
    path = os.fspath(path)
    try:
        reader = open_audio(path)
    except (*_SOUNDFILE_ERRORS, OSError) as exc:
        raise open_error(path, exc) from None
    return _blocks(reader, path, max(1, int(block_frames)), dtype)


def _blocks(reader, path: str, block_frames: int, dtype: str) -> Iterator[np.ndarray]:
    with reader:
        done = 0
        while True:
            try:
                data = reader.read(frames=block_frames, dtype=dtype, always_2d=True)
            except (*_SOUNDFILE_ERRORS, OSError) as exc:
                raise AudioFileError(
                    f"'{path}': read failed at {done / reader.samplerate:.2f} s "
                    f"({sndfile_reason(exc)})"
                ) from None
            if data.shape[0] == 0:
                return
            done += data.shape[0]
            yield data
            if data.shape[0] < block_frames:
                return


# -- headers: what a WAV, RF64, W64 or AIFF header declares, and where its samples start -------
# Sony Wave64: RIFF's layout with 16-byte GUIDs for chunk names and 8-byte little-endian sizes
# that count the chunk's own 24-byte header; chunks start 8-byte aligned.
_W64_TAIL = bytes.fromhex("f3acd3118cd100c04f8edb8a")
_W64_RIFF = b"riff" + bytes.fromhex("2e91cf11a5d628db04c10000")
_W64_WAVE, _W64_FMT, _W64_DATA = b"wave" + _W64_TAIL, b"fmt " + _W64_TAIL, b"data" + _W64_TAIL
# Data lengths that say "not known": what a recorder writes before it finalises the header.
_NO_LENGTH = (0, 0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF)


@dataclasses.dataclass(frozen=True)
class _Header:
    declared: Optional[int]  # frames the header declares; None where it declares no length
    data_offset: Optional[int] = None  # where the samples start (WAV, RF64, W64)
    block_align: int = 0  # bytes of one frame
    big_endian: bool = False
    no_length: bool = False  # the data length is 0 or 0xFFFFFFFF (...): not finalised
    empty_data: bool = False  # a RIFF data length of 0 (a real empty chunk, or not finalised)


def _data_header(block_align, data_size, offset, big=False, riff=True) -> Optional[_Header]:
    if not block_align or data_size is None:
        return None
    if data_size in _NO_LENGTH:
        return _Header(None, offset, block_align, big, True, riff and data_size == 0)
    return _Header(data_size // block_align, offset, block_align, big)


def _header(path: PathLike) -> Optional[_Header]:
    """The header of a WAV (RIFF, RIFX, RF64), W64 or AIFF file; None for another format or a
    header that can't be parsed."""
    try:
        with open(os.fsencode(path), "rb") as f:
            head = f.read(40)
            if len(head) >= 40 and head[:16] == _W64_RIFF and head[24:40] == _W64_WAVE:
                return _w64_header(f)
            if len(head) < 12:
                return None
            kind, form = head[:4], head[8:12]
            f.seek(12)
            if kind in (b"RIFF", b"RIFX", b"RF64") and form == b"WAVE":
                return _wav_header(f, kind == b"RF64", ">" if kind == b"RIFX" else "<")
            if kind == b"FORM" and form in (b"AIFF", b"AIFC"):
                return _aiff_header(f)
    except (OSError, struct.error):
        return None
    return None


def _wav_header(f, rf64: bool, order: str) -> Optional[_Header]:
    block_align = ds64_size = None
    while True:
        chunk = f.read(8)
        if len(chunk) < 8:
            return None
        cid, size = chunk[:4], struct.unpack(order + "I", chunk[4:])[0]
        body = b""
        if cid == b"ds64" and rf64:
            body = f.read(min(size, 16))
            ds64_size = struct.unpack("<Q", body[8:16])[0]
        elif cid == b"fmt ":
            body = f.read(min(size, 16))
            block_align = struct.unpack(order + "H", body[12:14])[0]
        elif cid == b"data":
            data_size = ds64_size if rf64 and ds64_size is not None else size
            return _data_header(block_align, data_size, f.tell(), order == ">")
        f.seek(size - len(body) + (size & 1), 1)


def _w64_header(f) -> Optional[_Header]:
    block_align = None
    at = 40
    while True:
        f.seek(at)
        chunk = f.read(24)
        if len(chunk) < 24:
            return None
        guid, size = chunk[:16], struct.unpack("<Q", chunk[16:])[0]
        if guid == _W64_FMT:
            block_align = struct.unpack("<H", f.read(16)[12:14])[0]
        elif guid == _W64_DATA:
            data_size = size - 24 if size >= 24 and size not in _NO_LENGTH else 0
            return _data_header(block_align, data_size, at + 24, riff=False)
        if size < 24:
            return None
        at += (size + 7) & ~7


def _aiff_header(f) -> Optional[_Header]:
    while True:
        chunk = f.read(8)
        if len(chunk) < 8:
            return None
        cid, size = chunk[:4], struct.unpack(">I", chunk[4:])[0]
        if cid == b"COMM":
            frames = struct.unpack(">I", f.read(6)[2:6])[0]
            if frames in _NO_LENGTH:  # libsndfile reads an AIFF's sound data to its end
                return _Header(None, no_length=True)
            return _Header(frames)
        f.seek(size + (size & 1), 1)


def declared_frames(path: PathLike) -> Optional[int]:
    """The frames a WAV (RIFF, RIFX, RF64), W64 or AIFF header declares, or None.

    None where the header declares no usable length: another format, a header that can't be
    parsed, or a length of 0 or 0xFFFFFFFF (a recorder that stopped before finalising it).
    """
    header = _header(path)
    return None if header is None else header.declared


# -- truncation: what a header declares against what the file holds ---------------------------
def truncation(path: PathLike) -> Optional[str]:
    """How a WAV, W64 or AIFF file falls short of what its header declares, in words, or None.

    A download that was cut, say: "truncated: header declares 10.0 s, file holds 1.04 s".
    """
    import soundfile as sf

    declared = declared_frames(path)
    if declared is None:
        return None
    try:
        info = sf.info(os.fsencode(path))
    except Exception:  # not readable at all: read_audio says why
        return None
    held, rate = int(info.frames), float(info.samplerate)
    if held >= declared or rate <= 0:
        return None
    return (
        f"truncated: header declares {declared / rate:.1f} s, file holds {held / rate:.2f} s "
        f"({held} of {declared} frames)"
    )


def no_length(path: PathLike) -> Optional[str]:
    """Words for a WAV, W64 or AIFF whose header declares no length (0 or 0xFFFFFFFF: a
    recorder that stopped before finalising it) and that holds samples, or None. Such a file
    is read to its end (``open_audio``), not taken for a truncated one."""
    header = _header(path)
    if header is None or not header.no_length:
        return None
    try:
        info = audio_info(path)
    except Exception:  # not readable at all: read_audio says why
        return None
    if info.frames <= 0 or info.samplerate <= 0:
        return None
    return (
        "header declares no length (not finalised); reading to the end of the file: "
        f"{info.frames / info.samplerate:.2f} s"
    )


# -- opening for reading: libsndfile, or its RAW reader where the header has no length ---------
@dataclasses.dataclass(frozen=True)
class _OpenEnded:
    offset: int  # where the samples start
    frames: int  # the whole frames from there to the end of the file
    samplerate: int
    channels: int
    subtype: str
    endian: str


def _open_ended(name: bytes, opened) -> Optional[_OpenEnded]:
    """Where the samples of a WAV whose header declares no data length start, when libsndfile
    (``opened``: its SoundFile or info) sees fewer frames there than the file holds: a data
    length of 0 reads as no samples at all. None for every other file."""
    import soundfile as sf

    header = _header(name)
    if header is None or not header.no_length or header.data_offset is None:
        return None
    width = _BYTES_PER_SAMPLE.get(opened.subtype)
    if width is None or header.block_align != width * int(opened.channels):
        return None  # a compressed subtype, or a layout RAW would not read as libsndfile does
    size = os.stat(name).st_size
    frames = (size - header.data_offset) // header.block_align
    if frames <= int(opened.frames):
        return None  # libsndfile reads them all already (0xFFFFFFFF: to the end of the file)
    order = ">" if header.big_endian else "<"
    if header.empty_data and _chunks_to_the_end(name, header.data_offset, size, order):
        return None  # a real empty data chunk with chunks after it, not samples
    endian = "BIG" if header.big_endian else "LITTLE"
    if not sf.check_format("RAW", opened.subtype, endian):
        return None
    rate, channels = int(opened.samplerate), int(opened.channels)
    return _OpenEnded(header.data_offset, frames, rate, channels, opened.subtype, endian)


def _chunks_to_the_end(name: bytes, at: int, size: int, order: str) -> bool:
    """True when the bytes from ``at`` are RIFF chunks (printable names, sizes that fit) that end
    at the end of the file."""
    with open(name, "rb") as f:
        while at < size:
            f.seek(at)
            chunk = f.read(8)
            if len(chunk) < 8 or not all(32 <= c < 127 for c in chunk[:4]):
                return False
            length = struct.unpack(order + "I", chunk[4:])[0]
            at += 8 + length + (length & 1)
            if at > size + (length & 1):
                return False
    return True


class _DataWindow:
    """The bytes of an open file from ``start`` to its end, as a file object of their own, for
    libsndfile's virtual I/O. Its methods never raise (cffi would print the traceback and go on
    with a short read): what they meet is kept in ``error``, for the reader to raise."""

    def __init__(self, raw, start: int):
        self._raw, self._start = raw, start
        self.error: Optional[BaseException] = None

    def seek(self, offset: int, whence: int = 0) -> int:
        try:
            if whence == 0:
                self._raw.seek(self._start + max(0, offset))
            else:
                self._raw.seek(offset, whence)
            return self._raw.tell() - self._start
        except BaseException as exc:  # noqa: BLE001 - raised by the reader instead
            self.error = self.error or exc
            return -1

    def tell(self) -> int:
        try:
            return self._raw.tell() - self._start
        except BaseException as exc:  # noqa: BLE001
            self.error = self.error or exc
            return -1

    def readinto(self, buffer) -> int:
        try:
            return self._raw.readinto(buffer) or 0
        except BaseException as exc:  # noqa: BLE001
            self.error = self.error or exc
            return 0


def _open_ended_reader(name: bytes, where: _OpenEnded):
    """A soundfile SoundFile reading ``where``'s samples as RAW, to the end of the file; it
    closes the file with itself and raises what the file's reads met."""
    import soundfile as sf

    class OpenEndedReader(sf.SoundFile):
        def read(self, *args, **kwargs):
            data = super().read(*args, **kwargs)
            self._raise_error()
            return data

        def seek(self, *args, **kwargs):
            position = super().seek(*args, **kwargs)
            self._raise_error()
            return position

        def _raise_error(self):
            error, window.error = window.error, None
            if error is not None:
                raise error

        def close(self):
            try:
                super().close()
            finally:
                raw.close()

    raw = open(name, "rb")  # noqa: SIM115 - the reader closes it
    window = _DataWindow(raw, where.offset)
    try:
        reader = OpenEndedReader(
            window, "r", where.samplerate, where.channels, where.subtype, where.endian, "RAW"
        )
    except BaseException:
        raw.close()
        raise
    reader._raise_error()
    return reader


def open_audio(path: PathLike):
    """A soundfile ``SoundFile`` reading ``path``: libsndfile's own, except for a WAV whose
    header declares no data length (0, or 0xFFFFFFFF where libsndfile sees too few frames),
    whose samples are read from the data chunk to the end of the file, as RAW with the
    header's subtype, channels, rate and byte order. Raises what ``sf.SoundFile`` raises, and
    ``OSError``."""
    import soundfile as sf

    # Bytes: soundfile encodes a str strictly, and a Linux name need not be UTF-8.
    name = os.fsencode(path)
    f = sf.SoundFile(name)
    try:
        where = _open_ended(name, f)
    except BaseException:
        f.close()
        raise
    if where is None:
        return f
    f.close()
    return _open_ended_reader(name, where)


def audio_info(path: PathLike):
    """soundfile's info of ``path``, with the frames ``open_audio`` reads (a WAV whose header
    declares no length holds what is there to the end of the file)."""
    import soundfile as sf

    name = os.fsencode(path)
    info = sf.info(name)
    where = _open_ended(name, info)
    if where is not None:
        info.frames = where.frames
        info.duration = where.frames / where.samplerate
    return info


# -- which file is which ---------------------------------------------------------------------
def same_file(a: PathLike, b: PathLike) -> bool:
    """True when ``a`` and ``b`` name one file: the same real path, or the same inode (a hard
    link); False where either is missing or can't be looked at."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def refuse_input_as_output(source: PathLike, target: PathLike) -> None:
    """``AudioFileError`` when writing ``target`` would replace the input ``source``."""
    if same_file(source, target):
        raise AudioFileError(f"'{source}': the output path is the input file itself; refused")


# -- the atomic writer -----------------------------------------------------------------------
def is_temp_name(name: str) -> bool:
    """True for the name of a temporary file or directory the writer makes."""
    return name.startswith(".") and name.endswith(TEMP_SUFFIX)


def temp_tag(target: PathLike) -> str:
    """6 hex digits of the target's name: ties a temporary to its target at a fixed length
    (a name of the target's own length could pass the filesystem's limit)."""
    import hashlib

    return hashlib.sha1(os.fsencode(os.path.basename(os.fspath(target)))).hexdigest()[:6]


def temps_of(target: PathLike) -> List[str]:
    """The writer's temporaries for ``target`` (any process's) in its directory."""
    parent = os.path.dirname(os.path.abspath(os.fspath(target)))
    tag = temp_tag(target)
    try:
        names = os.listdir(parent)
    except OSError:
        return []
    found = []
    for name in names:
        match = _TEMP_NAME.fullmatch(name)
        if match is not None and match.group(2) == tag:
            found.append(os.path.join(parent, name))
    return found


def new_temp(target: PathLike, *, directory: bool = False) -> str:
    """Create an empty temporary file (or directory) in ``target``'s directory; its path.

    The mode is the kernel's: 0o666 (0o777 for a directory) less the umask of this moment.
    """
    parent = os.path.dirname(os.path.abspath(os.fspath(target)))
    tag = temp_tag(target)
    while True:
        tmp = os.path.join(parent, f".{os.getpid()}-{secrets.token_hex(2)}-{tag}{TEMP_SUFFIX}")
        try:
            if directory:
                os.mkdir(tmp)
            else:
                flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_CLOEXEC", 0)
                os.close(os.open(tmp, flags, 0o666))
        except FileExistsError:
            continue  # 65,536 names per PID and target; try another
        return tmp


def publish(tmp: PathLike, target: PathLike, *, overwrite: bool = False) -> None:
    """Make the finished temporary file or directory ``tmp`` the ``target``.

    ``tmp``'s data (every file, for a directory) is fsynced, ``tmp`` is renamed onto
    ``target`` and ``target``'s directory is fsynced. A file replaces an existing ``target``
    only with ``overwrite`` (``FileExistsError`` otherwise, with no window in which another
    writer could slip in) and takes the replaced file's permission bits. A directory never
    replaces anything but an empty directory (``OSError``).
    """
    tmp, target = os.fspath(tmp), os.fspath(target)
    if os.path.isdir(tmp):
        _fsync_tree(tmp)
        if os.path.isdir(target) and not os.listdir(target):
            os.rmdir(target)
        os.rename(tmp, target)
    else:
        _fsync(tmp)
        if overwrite:
            _keep_mode(tmp, target)
            os.replace(tmp, target)
        else:
            _link_into_place(tmp, target)
    _fsync(os.path.dirname(os.path.abspath(target)), directory=True)


def discard(tmp: PathLike) -> None:
    """Remove a temporary file or directory; nothing where it is gone already."""
    tmp = os.fspath(tmp)
    if os.path.isdir(tmp) and not os.path.islink(tmp):
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_output(
    target: PathLike, *, overwrite: bool = False, directory: bool = False
) -> Iterator[str]:
    """``with atomic_output(target) as tmp:`` write ``tmp``; it becomes ``target`` when the
    block ends normally (``publish``) and is removed when it raises."""
    tmp = new_temp(target, directory=directory)
    try:
        yield tmp
        publish(tmp, target, overwrite=overwrite)
    except BaseException:
        discard(tmp)
        raise


@contextlib.contextmanager
def temp_directory(target: PathLike) -> Iterator[str]:
    """A scratch directory next to ``target`` (same filesystem, so what is built in it can be
    ``publish``-ed as ``target``), removed with what is left in it when the block ends."""
    tmp = new_temp(target, directory=True)
    try:
        yield tmp
    finally:
        discard(tmp)


def remove_stale_temps(directory: PathLike, *, max_age: float = STALE_TEMP_SECONDS) -> List[str]:
    """Remove the writer's temporaries in ``directory`` that a dead process left: those whose
    PID is not running on this machine, or older than ``max_age`` seconds. Returns their paths.

    For directories only df_mps writes into (the model cache): a user's folder is left alone.
    """
    directory = os.fspath(directory)
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    removed = []
    now = time.time()
    for name in names:
        match = _TEMP_NAME.fullmatch(name)
        if match is None:
            continue
        path = os.path.join(directory, name)
        try:
            age = now - os.lstat(path).st_mtime
        except OSError:
            continue
        if age > max_age or not _process_exists(int(match.group(1))):
            discard(path)
            removed.append(path)
    return removed


def _process_exists(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if os.name == "nt":  # os.kill would terminate it there; the age alone decides
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, and belongs to someone else
        return True
    return True


def _link_into_place(tmp: str, target: str) -> None:
    try:
        # link() fails if `target` exists, with no window in which another writer could slip in.
        os.link(tmp, target)
    except FileExistsError:
        raise
    except OSError:
        # Filesystems without hard links (FAT, some network shares): check, then rename.
        if os.path.lexists(target):
            raise FileExistsError(17, "File exists", target) from None
        os.replace(tmp, target)
        return
    os.unlink(tmp)


def _keep_mode(tmp: str, target: str) -> None:
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)
    except OSError:  # nothing to replace (or nothing we can see): the new file's mode stays
        return
    os.chmod(tmp, mode)


def _fsync(path: str, *, directory: bool = False) -> None:
    try:
        flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
        fd = os.open(path, flags)
    except OSError:
        if directory:  # some platforms (Windows) can't open a directory; the rename stands
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


def _fsync_tree(root: str) -> None:
    for current, _, files in os.walk(root):
        for name in files:
            _fsync(os.path.join(current, name))
        _fsync(current, directory=True)


def write_error(target: PathLike, exc: OSError) -> AudioFileError:
    """The one-line ``AudioFileError`` for an OS error while writing ``target``."""
    if isinstance(exc, FileExistsError):
        return AudioFileError(f"'{target}': output exists (use --overwrite to replace it)")
    return AudioFileError(f"'{target}': can't write: {os_reason(exc)}")


# -- writing audio ---------------------------------------------------------------------------
def write_audio(
    path: PathLike,
    samples: np.ndarray,
    sample_rate: int,
    *,
    subtype: Optional[str] = None,
    overwrite: bool = True,
    source_format: Optional[str] = None,
) -> str:
    """Write ``samples`` ([T, C] float, full scale 1.0; or int16) to ``path`` atomically.

    Through ``atomic_output``: readers never see a partial file, and an interrupted write (an
    exception, KeyboardInterrupt) removes the temporary file. With ``overwrite=False`` an
    existing ``path`` is never replaced (``FileExistsError``). Returns the subtype written.
    ``source_format``: the input's container (RF64 and W64 stay so in a ``.wav``); a WAV that
    could pass 4 GiB is written as RF64 (``open_for_writing``).
    """
    path = os.fspath(path)
    fmt = format_for_path(path, source_format)
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
    with atomic_output(path, overwrite=overwrite) as tmp:
        try:
            name = os.fsencode(tmp)
            with open_for_writing(name, sample_rate, data.shape[1], subtype, fmt, len(data)) as f:
                f.write(data)
        except _SOUNDFILE_ERRORS as exc:
            cause = system_cause(exc)  # disk full, file too large, ...
            if cause:
                raise AudioFileError(f"'{path}': can't write: {cause}") from None
            raise AudioFileError(
                f"'{path}': could not write {fmt} {subtype} at {sample_rate} Hz ({one_line(exc)})"
            ) from None
    return subtype


class AudioFileWriter:
    """An audio file written block by block, atomically: a context manager.

    ``write(samples)`` appends float samples [frames, channels] (quantised for the subtype),
    and sends what was written to the disk every ``SYNC_BYTES`` of samples (libsndfile's
    flush, an fsync): the commit's fsync then writes only the last of it. A batch of files
    that end together (the engine's last step) otherwise spends its commits writing whole
    files out: on an H200 the write threads spent about half their samples after the last
    step of 64 files of 30 s in that flush, and on an H100 the early flushes took that span
    from 0.142 to 0.126 s (fp32) and 0.158 to 0.135 s (bf16), single runs (docs/performance.md).
    The earlier flushes happen in the engine's write threads while the next steps run.

    ``commit()`` closes the file and ``publish``-es it as ``path`` (never replacing an existing
    file unless ``overwrite``). ``source_format``: the input's container (RF64 and W64 stay so
    in a ``.wav``); ``frames``: the length expected, so that a WAV that could pass 4 GiB opens
    as RF64 (``open_for_writing``). Leaving the ``with`` block without ``commit()`` (an exception)
    removes the temporary file. Every failure is an ``AudioFileError`` with a one-line message.
    """

    def __init__(
        self,
        path: PathLike,
        sample_rate: int,
        channels: int,
        subtype: Optional[str] = None,
        *,
        overwrite: bool = False,
        source_format: Optional[str] = None,
        frames: Optional[int] = None,
    ):
        self.path = os.fspath(path)
        self.format = format_for_path(self.path, source_format)
        self.subtype = choose_subtype(self.format, subtype, self.path)
        self.overwrite = overwrite
        self._committed = False
        self._unsynced = 0  # bytes written since the last flush to disk
        try:
            self.temp = new_temp(self.path)
        except OSError as exc:
            raise write_error(self.path, exc) from None
        try:
            self._file = open_for_writing(
                os.fsencode(self.temp), sample_rate, channels, self.subtype, self.format, frames
            )
        except _SOUNDFILE_ERRORS as exc:
            discard(self.temp)
            cause = system_cause(exc)
            if cause:
                raise AudioFileError(f"'{self.path}': can't write: {cause}") from None
            raise AudioFileError(
                f"'{self.path}': could not write {self.format} {self.subtype} at {sample_rate} "
                f"Hz ({one_line(exc)})"
            ) from None
        except BaseException:
            discard(self.temp)
            raise

    def write(self, samples: np.ndarray) -> None:
        if not samples.shape[0]:
            return
        try:
            data = quantize(samples, self.subtype)
            self._file.write(data)
            self._unsynced += data.nbytes
            if self._unsynced >= self.SYNC_BYTES:
                self._file.flush()
                self._unsynced = 0
        except (*_SOUNDFILE_ERRORS, OSError) as exc:
            # libsndfile says "System error" for a full disk or a file too large: the errno
            # says which.
            raise AudioFileError(f"'{self.path}': can't write: {sndfile_reason(exc)}") from None

    SYNC_BYTES = 1 << 19

    def commit(self) -> None:
        try:
            self._file.close()  # it flushes: a full disk shows up here too
            publish(self.temp, self.path, overwrite=self.overwrite)
        except _SOUNDFILE_ERRORS as exc:
            raise AudioFileError(f"'{self.path}': can't write: {sndfile_reason(exc)}") from None
        except OSError as exc:
            raise write_error(self.path, exc) from None
        self._committed = True

    def close(self) -> None:
        """Abandon the file unless committed (what leaving the ``with`` block does)."""
        with contextlib.suppress(Exception):
            self._file.close()
        if not self._committed:
            discard(self.temp)

    def __enter__(self) -> AudioFileWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.close()
        return False
