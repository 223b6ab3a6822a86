"""The plain cause of an operating-system error, for one-line messages about a user's file.

``os_reason(exc)`` turns an ``OSError`` into words a user acts on ("permission denied", "disk
full"); ``sndfile_reason(exc)`` does the same for libsndfile's "System error", which hides the
errno that soundfile's C call met.
"""

from __future__ import annotations

import errno
from typing import Optional

__all__ = ["cause_of_errno", "os_reason", "sndfile_reason", "system_cause"]

PLAIN_CAUSES = {
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENOSPC: "disk full",
    errno.EFBIG: "file too large",
    errno.EROFS: "read-only file system",
    errno.ENOENT: "no such file",
    errno.ENOTDIR: "a path component is not a directory",
    errno.EISDIR: "is a directory",
    errno.ENAMETOOLONG: "file name too long",
    errno.ELOOP: "too many levels of symbolic links",
    errno.EIO: "input/output error (a failing disk or a network share that went away)",
    errno.EMFILE: "too many open files",
}
if hasattr(errno, "EDQUOT"):
    PLAIN_CAUSES[errno.EDQUOT] = "disk quota exceeded"


def cause_of_errno(code) -> str:
    """The plain words for an errno value; the system's text for those without any."""
    import os

    if code in PLAIN_CAUSES:
        return PLAIN_CAUSES[code]
    try:
        return os.strerror(code).lower()
    except (TypeError, ValueError):
        return "unknown error"


def os_reason(exc: BaseException) -> str:
    """The plain cause of ``exc`` (an OSError), without the path (the caller names the file)."""
    code = getattr(exc, "errno", None)
    if code is not None:
        return cause_of_errno(code)
    text = getattr(exc, "strerror", None) or " ".join(str(exc).split())
    return text or type(exc).__name__


def system_cause(exc: BaseException) -> Optional[str]:
    """The plain cause behind libsndfile's "System error" in ``exc``, or None.

    Call it right after the failing soundfile call, in the thread that made it: libsndfile
    reports a failed open (permission denied) or write (disk full, file too large) only as
    "System error", and cffi keeps the C errno of the thread's last call.
    """
    if getattr(exc, "code", None) != 2:  # SFE_SYSTEM
        return None
    try:
        import soundfile

        code = soundfile._ffi.errno  # soundfile's cffi handle; a private name, hence guarded
    except Exception:
        return None
    return cause_of_errno(code) if code else None


def sndfile_reason(exc: BaseException) -> str:
    """libsndfile's reason for ``exc``, with the errno behind a "System error" where it has one."""
    cause = system_cause(exc)
    if cause:
        return cause
    if isinstance(exc, OSError):
        return os_reason(exc)
    text = getattr(exc, "error_string", None) or str(exc)
    text = " ".join(text.split()).rstrip(".")
    return text or type(exc).__name__
