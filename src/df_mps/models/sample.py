"""The noisy speech-like sample shipped with df_mps, and how it is made.

No recording is involved, so the sample has no licence question, and anyone can regenerate it
(``write_sample``).
"""

from __future__ import annotations

from pathlib import Path

from ..audio import atomic_output
from ..util import PathLike

SAMPLE_NAME = "sample_noisy.wav"
SAMPLE_SEED = 20240605


def sample_path() -> Path:
    """A 3 s synthetic noisy speech-like sample (48 kHz mono, 16-bit) shipped with df_mps."""
    return Path(__file__).resolve().parent.parent / "data" / SAMPLE_NAME


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
    with atomic_output(path, overwrite=True) as tmp:
        sf.write(tmp, noisy, 48000, subtype="PCM_16", format="WAV")
    return Path(path)
