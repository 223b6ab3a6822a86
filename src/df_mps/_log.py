"""Logging through loguru, with once-per-process warnings.

Every warning df_mps gives says what was detected, what df_mps will do, and how to override it.
"""

from __future__ import annotations

import threading

from loguru import logger

__all__ = ["logger", "warn_once", "reset_warnings"]

_seen: set[str] = set()
_lock = threading.Lock()


def warn_once(key: str, message: str) -> bool:
    """Log ``message`` as a warning the first time ``key`` is seen in this process.

    Returns True when the warning was emitted.
    """
    with _lock:
        if key in _seen:
            return False
        _seen.add(key)
    logger.opt(depth=1).warning(message)
    return True


def reset_warnings() -> None:
    """Forget which warnings were given (for tests)."""
    with _lock:
        _seen.clear()
