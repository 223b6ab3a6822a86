"""One small module per upstream target. Each exposes ``PATCH`` (a ``registry.Patch``).

The list below is the order in which they are registered. Patch modules are imported when
df_mps patches, but they import neither torch nor df at module level: wrappers import what
they need when they run.
"""

PATCH_MODULES = (
    "libdf",
    "torchaudio_compat",
    "device",
    "audio_io",
    "deep_filter",
    "post_filter",
    "dfop",
    "stoi",
)
