"""Emulate a device without complex support (MPS before macOS 14) on any machine.

For df_mps's own tests and for users' tests:

- ``NoComplexMode``: a TorchDispatchMode that raises on any complex tensor going into or coming
  out of an op, as MPS on macOS 13 does.
- ``emulate_no_complex(*models)``: makes the capabilities report that the given device types
  (default: the CPU) can't hold complex tensors, so df_mps routes around them, and applies the
  guard around each model's forward (or around the whole block when no model is given).

    with emulate_no_complex(model):
        enhanced = enhance(model, df_state, audio)   # raises if complex reaches the model

- ``audit(model_or_fn, *inputs, device="mps", macos=(13, 6))`` (from ``df_mps.audit``): every
  aten op the call sends to the device, checked against the installed torch's kernels, the
  target's dtypes and host syncs; returns an ``AuditReport``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import Iterable, Iterator, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from . import capabilities
from .audit import AuditReport, Finding, audit

__all__ = [
    "AuditReport",
    "ComplexNotSupportedError",
    "Finding",
    "audit",
    "NoComplexMode",
    "emulate_no_complex",
    "guard_forward",
    "outside_guard",
    "violations",
]

MESSAGE = "MPS complex types are only supported on MacOS 14.0 or newer"


class ComplexNotSupportedError(RuntimeError):
    """Raised where a complex tensor meets the emulated device, with the real MPS message."""


def _first_complex(tree):
    for leaf in tree_flatten(tree)[0]:
        if isinstance(leaf, torch.Tensor) and leaf.is_complex():
            return leaf
        if isinstance(leaf, torch.dtype) and leaf.is_complex:
            return leaf
    return None


_suspended = threading.local()


@contextlib.contextmanager
def outside_guard() -> Iterator[None]:
    """Leave the emulated device: ops inside run as on the host CPU, unguarded.

    The emulation stands the CPU in for a device without complex support, so df_mps's "run it on
    the CPU" route (STOI) means "outside the guard" while emulating.
    """
    _suspended.depth = getattr(_suspended, "depth", 0) + 1
    try:
        yield
    finally:
        _suspended.depth -= 1


_violations: list = []


def violations() -> list:
    """Messages of every complex op the guard stopped, oldest first.

    TorchScript re-raises errors from inside a scripted module without their message, so tests
    of scripted code read the record here.
    """
    return list(_violations)


class NoComplexMode(TorchDispatchMode):
    """Raise on any op that takes, makes or returns a complex tensor."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(_suspended, "depth", 0):
            return func(*args, **kwargs)
        if _first_complex((args, kwargs)) is not None:
            self._refuse(f"input of {func}")
        out = func(*args, **kwargs)
        if _first_complex(out) is not None:
            self._refuse(f"output of {func}")
        return out

    @staticmethod
    def _refuse(where: str):
        message = f"{MESSAGE} (df_mps emulation: {where})"
        _violations.append(message)
        raise ComplexNotSupportedError(message)


def no_complex_capabilities(
    device_types: Iterable[str] = ("cpu",),
) -> capabilities.Capabilities:
    """The current capabilities, except that ``device_types`` can't hold complex tensors."""
    return dataclasses.replace(
        capabilities.get(),
        devices_without_complex=frozenset(device_types),
        emulated=True,
    )


@contextlib.contextmanager
def guard_forward(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Run ``model``'s forward under ``NoComplexMode`` inside the block."""
    had_own = "forward" in model.__dict__
    own = model.__dict__.get("forward")
    inner = model.forward

    def guarded_forward(*args, **kwargs):
        with NoComplexMode():
            return inner(*args, **kwargs)

    model.forward = guarded_forward
    try:
        yield model
    finally:
        if had_own:
            model.forward = own
        else:
            del model.forward


@contextlib.contextmanager
def emulate_no_complex(
    *models: torch.nn.Module, device_types: Optional[Iterable[str]] = None
) -> Iterator[capabilities.Capabilities]:
    """Emulate devices without complex support.

    Capabilities say ``device_types`` lack complex support, so df_mps's routing avoids complex
    math there; by default that is the device the models' parameters live on (the CPU when no
    model is given). With models given, the guard is active around each model's forward;
    without, it is active for the whole block.
    """
    if device_types is None:
        device_types = {p.device.type for m in models for p in m.parameters()} or {"cpu"}
    with capabilities.override(no_complex_capabilities(device_types)) as caps:
        with contextlib.ExitStack() as stack:
            for model in models:
                stack.enter_context(guard_forward(model))
            if not models:
                stack.enter_context(NoComplexMode())
            yield caps


# -- speech with a known clean reference, and how close an output is to it -----------------------
def si_sdr(estimate, reference) -> float:
    """Scale-invariant signal-to-distortion ratio of ``estimate`` against ``reference`` (dB),
    on 1-D arrays of one length, in float64."""
    import numpy as np

    estimate = np.asarray(estimate, dtype=np.float64).ravel()
    reference = np.asarray(reference, dtype=np.float64).ravel()
    target = (estimate @ reference) / (reference @ reference) * reference
    return float(10 * np.log10((target @ target) / ((estimate - target) @ (estimate - target))))


def made_speech(audio_dir, noise: str, seconds: float, seed: int = 0):
    """(noisy, clean, rate): ``audio_dir``'s clean.wav, each copy reversed or not, rolled and at
    a gain drawn from ``seed``, plus the noise of noisy_<noise>.wav (noisy minus clean), each
    copy rolled by another draw, so that neither repeats in step with anything; ``seconds``
    long. For tests and benchmarks that need a clean reference (../shared/audio has one)."""
    import os

    import numpy as np
    import soundfile as sf

    clean, sr = sf.read(os.path.join(audio_dir, "clean.wav"), dtype="float32")
    noisy, _ = sf.read(os.path.join(audio_dir, f"noisy_{noise}.wav"), dtype="float32")
    noise_take = noisy - clean
    rng = np.random.default_rng(seed)
    n = int(seconds * sr)
    copies = -(-n // len(clean)) + 1
    speech = np.concatenate(
        [
            np.roll(clean[:: rng.choice([1, -1])], int(rng.integers(len(clean))))
            * np.float32(rng.uniform(0.5, 1.2))
            for _ in range(copies)
        ]
    )
    start = int(rng.integers(len(clean)))
    speech = speech[start : start + n]
    noises = [np.roll(noise_take, int(rng.integers(len(noise_take)))) for _ in range(copies)]
    return speech + np.concatenate(noises)[:n], speech, sr
