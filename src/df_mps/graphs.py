"""CUDA graphs (and, opt-in, torch.compile) for the engine's fixed-shape step.

A DeepFilterNet3 forward is about 10,000 kernel launches whatever the batch (its GRUs step
through every frame), so on a fast GPU the launches, not the math, set the speed of a step.
The engine gives every step one of a few shapes (``df_mps.engine``), so each shape is captured
once as a CUDA graph and replayed:

- **Shape.** (rows, piece frames). Rows are padded up to a power of two (at most the engine's
  batch) with rows at a stream's start (zero inputs, zero states) whose outputs are dropped, so
  a run captures at most log2(batch) + 1 row counts times the engine's few piece lengths.
- **Static inputs.** spec, erb_feat and spec_feat, every recurrent module's stacked h0 and
  output history, and the start-of-stream mask. A graphed step always passes the mask (all
  ones where no row is fresh: multiplying by one is exact), so the computation, hooks
  included, is the same at every replay.
- **Outputs.** The enhanced spectrum, lsnr, new hidden states and histories are copied out of
  the graph's static outputs at each replay (the next replay overwrites them).
- **Capture.** Warm-up on a side stream, then capture, as the PyTorch docs say; all graphs share
  one memory pool (they never run at once, and each one's outputs are copied out before the
  next replay). Shapes are captured ahead by ``warm_up`` (the engine's batch at the full and
  the shortest piece, with the model load), or at their first step. Each graph is compared
  with the eager step before it is trusted: a warmed-up shape on seeded random features and
  carried states (with and without rows at a stream's start), at the warm-up, so neither the
  capture nor the check falls in the first steps of real audio; a shape captured later on its
  first real step (whose eager result is used). Beyond 1e-5 (max abs, spectrum, lsnr and
  states) that shape stays eager, with a warning. A capture that fails leaves its shape eager
  with one debug line.
- **Where.** CUDA only, on by default; ``Enhancer(cuda_graphs=False)`` or ``--no-cuda-graphs``
  turns them off. MPS has no graphs.

``DF_MPS_COMPILE=reduce-overhead|max-autotune-no-cudagraphs|default`` runs the network through
``torch.compile`` instead (never required; where compiling fails the step runs eager, with one
debug line). It is there to be measured against the graphs (``benchmarks/bench_gpu.py``).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Dict, List, Optional, Sequence, Tuple

from ._log import logger, warn_once
from .engine import warm_up_steps

TOLERANCE = 1e-5
STORE_ATTR = "_df_mps_graph_stores"  # on the network: its graphs, per piece geometry
COMPILED_ATTR = "_df_mps_compiled"  # on the network: torch.compile's wrapper, per mode
CACHE_ATTRS = (STORE_ATTR, COMPILED_ATTR)
COMPILE_MODES = ("reduce-overhead", "max-autotune-no-cudagraphs", "default")
_MISSING = object()


def compile_mode() -> Optional[str]:
    """``DF_MPS_COMPILE``: a torch.compile mode, or None (unset, empty, "0" or "off")."""
    value = os.environ.get("DF_MPS_COMPILE", "").strip()
    if value in ("", "0", "off", "no", "none"):
        return None
    if value not in COMPILE_MODES:
        raise ValueError(f"DF_MPS_COMPILE={value!r}: use one of {', '.join(COMPILE_MODES)}")
    return value


def plan(device_type: str, cuda_graphs: bool = True) -> Tuple[str, str]:
    """(what runs the step, why): "cuda graphs", "torch.compile (<mode>)" or "eager"."""
    try:
        mode = compile_mode()
    except ValueError as exc:
        return "eager", str(exc)
    if mode is not None:
        return f"torch.compile ({mode})", "DF_MPS_COMPILE is set"
    if device_type != "cuda":
        return "eager", f"CUDA graphs are CUDA only (device {device_type})"
    if not cuda_graphs:
        return "eager", "CUDA graphs turned off (--no-cuda-graphs / cuda_graphs=False)"
    return "cuda graphs", (
        f"one graph per (rows, piece) shape, kept where it equals eager within {TOLERANCE:g}"
    )


def accelerate(engine, *, cuda_graphs: bool = True):
    """``engine`` with its step run through CUDA graphs or torch.compile where ``plan`` says so
    (its ``model`` replaced by a stand-in with the same ``step``)."""
    batched = engine.model
    how, why = plan(batched.device.type, cuda_graphs)
    if how == "eager":
        if why.startswith("DF_MPS_COMPILE"):
            warn_once("compile-mode", f"df_mps: {why}; running without torch.compile")
        return engine
    if how.startswith("torch.compile"):
        engine.model = compiled_model(batched, compile_mode())
    else:
        engine.model = GraphedModel(batched, max_rows=engine.batch, store=graph_store(batched))
    logger.debug(f"engine step: {how} ({why})")
    return engine


def row_bucket(rows: int, max_rows: int) -> int:
    """``rows`` rounded up to a power of two, at most ``max_rows`` (and at least ``rows``)."""
    return max(rows, min(max_rows, 1 << max(0, rows - 1).bit_length()))


def _pad_rows(x, rows: int):
    import torch

    extra = rows - x.shape[0]
    if extra <= 0:
        return x
    return torch.cat([x, x.new_zeros((extra, *x.shape[1:]))], dim=0)


class _Stand:
    """Delegates what the engine reads (device, dtype, piece, left, right, window) to the
    BatchedModel it stands in for."""

    def __init__(self, batched):
        self.batched = batched

    def __getattr__(self, name):
        return getattr(self.batched, name)


class _Captured:
    """One shape's graph: static inputs in, static outputs out."""

    def __init__(self, graph, inputs, outputs):
        self.graph = graph
        self.inputs = inputs  # spec, erb_feat, spec_feat, mask, h0 list, history list
        self.outputs = outputs  # enhanced, lsnr, new_h list, new_history list
        self.checked = False  # against eager, on the first real step of its shape

    def replay(self, spec, erb_feat, spec_feat, mask, h0, history):
        s_spec, s_erb, s_feat, s_mask, s_h0, s_hist = self.inputs
        s_spec.copy_(spec)
        s_erb.copy_(erb_feat)
        s_feat.copy_(spec_feat)
        s_mask.copy_(mask)
        for static, value in zip(s_h0, h0):
            static.copy_(value)
        for static, value in zip(s_hist, history):
            static.copy_(value)
        self.graph.replay()
        enhanced, lsnr, new_h, new_history = self.outputs
        return (
            enhanced.clone(),
            lsnr.clone(),
            [h.clone() for h in new_h],
            [None if h is None else h.clone() for h in new_history],
        )


def max_difference(a, b) -> float:
    """Max abs difference between two step results (enhanced, lsnr, new_h, new_history)."""
    worst = 0.0
    pairs = [(a[0], b[0]), (a[1], b[1])] + list(zip(a[2], b[2])) + list(zip(a[3], b[3]))
    for x, y in pairs:
        if x is None or y is None:
            if (x is None) != (y is None):
                return float("inf")
            continue
        worst = max(worst, float((x.float() - y.float()).abs().max()))
    return worst


class GraphStore:
    """The graphs of one network at one piece geometry, shared by every engine over it (an
    ``Enhancer`` makes an engine per call: the graphs outlive them)."""

    def __init__(self, tolerance: float = TOLERANCE, warmup: int = 2):
        self.tolerance = tolerance
        self.warmup = warmup
        self.graphs: Dict[Tuple[int, int], Optional[_Captured]] = {}
        self.differences: Dict[Tuple[int, int], float] = {}  # at each shape's first capture
        self.capture_seconds = 0.0
        self.replays = 0
        self.eager_steps = 0
        self.pool = None
        self.lock = threading.Lock()  # one replay at a time: the static buffers are shared

    # The store lives in the network's __dict__: a copy of the network (copy.deepcopy, pickle,
    # torch.save) gets an empty store and captures its own graphs. A CUDA graph, its memory
    # pool and a lock can't be copied, and a copy's parameters are other tensors anyway.
    def __reduce__(self):
        return (GraphStore, (self.tolerance, self.warmup))

    def __deepcopy__(self, memo):
        return GraphStore(self.tolerance, self.warmup)


def graph_store(batched) -> GraphStore:
    """The store kept on ``batched.model`` (so it lives as long as the network) for its
    (left, piece, right) geometry."""
    stores = batched.model.__dict__.setdefault(STORE_ATTR, {})
    key = (batched.left, batched.piece, batched.right)
    if key not in stores:
        stores[key] = GraphStore()
    return stores[key]


class GraphedModel(_Stand):
    """A BatchedModel whose ``step`` replays one CUDA graph per (rows, piece) shape."""

    def __init__(self, batched, *, max_rows: int, store: Optional[GraphStore] = None):
        super().__init__(batched)
        self.max_rows = int(max_rows)
        self.store = store if store is not None else GraphStore()

    @property
    def graphs(self):
        return self.store.graphs

    def step(self, spec, erb_feat, spec_feat, fresh: Sequence[bool], states, piece=None):
        with self.store.lock:
            return self._step(spec, erb_feat, spec_feat, fresh, states, piece)

    def warm_up(self, rows: int, freq_bins: int, erb_bands: int, df_bins: int) -> None:
        """Capture the graphs of ``rows`` rows at the full piece and at the shortest last
        piece on zeros, as ``BatchedModel.warm_up`` pays the device's first-use costs, then
        check each against eager on a random probe: capture and check happen with the model
        load, not in the first steps of real audio. A shape captured later (not warmed up)
        is checked on its first real step instead."""
        before = set(self.store.graphs)
        self._warming = True
        try:
            warm_up_steps(self.step, self.batched, rows, freq_bins, erb_bands, df_bins)
        finally:
            self._warming = False
        t0 = time.perf_counter()
        for key in set(self.store.graphs) - before:
            captured = self.store.graphs[key]
            if captured is not None and not captured.checked:
                self._check_on_probe(key, captured)
        self.store.capture_seconds += time.perf_counter() - t0  # the check is graph set-up too

    def _check_on_probe(self, key, captured) -> None:
        """``_check`` on seeded random inputs of the shape: features and carried states
        (hidden states, output histories) of a stream under way, once with half the rows at
        a stream's start (the start mask applied) and once with none."""
        import torch

        b = self.batched
        rows, piece = key
        generator = torch.Generator(device=b.device).manual_seed(0)

        def noise(like):
            return torch.randn(
                like.shape, generator=generator, device=like.device, dtype=like.dtype
            ).mul_(0.5)

        spec, erb_feat, spec_feat = captured.inputs[:3]
        h0, history = b.stack_states([None] * rows)
        for fresh in ([r % 2 == 0 for r in range(rows)], [False] * rows):
            inputs = (
                noise(spec),
                noise(erb_feat),
                noise(spec_feat),
                b.start_mask(fresh, piece),
                [noise(h) for h in h0],
                [None if h is None else noise(h) for h in history],
            )
            captured.checked = False
            self._check(key, captured, inputs, any(fresh), piece)
            if self.store.graphs.get(key) is None:
                return  # a mismatch: _check warned, and the shape runs eager

    _warming = False

    def _step(self, spec, erb_feat, spec_feat, fresh, states, piece):
        b, store = self.batched, self.store
        piece = int(piece or b.piece)
        rows = spec.shape[0]
        padded = row_bucket(rows, self.max_rows)
        key = (padded, piece)
        captured = store.graphs.get(key, _MISSING)
        if captured is None:
            store.eager_steps += 1
            return b.step(spec, erb_feat, spec_feat, fresh, states, piece)
        fresh = list(fresh) + [True] * (padded - rows)
        states = list(states) + [None] * (padded - rows)
        spec, erb_feat, spec_feat = (_pad_rows(x, padded) for x in (spec, erb_feat, spec_feat))
        mask = b.start_mask(fresh, piece)
        h0, history = b.stack_states(states)
        inputs = (spec, erb_feat, spec_feat, mask, h0, history)
        if captured is _MISSING:
            captured = self._capture(key, *inputs)
            store.graphs[key] = captured
        if captured is None:
            store.eager_steps += 1
            out = b.forward_stacked(spec, erb_feat, spec_feat, h0, history, mask, piece)
        elif captured.checked or self._warming:
            out = captured.replay(*inputs)
            store.replays += 1
        else:
            out = self._check(key, captured, inputs, any(fresh), piece)
        enhanced, lsnr, new_h, new_history = out
        return enhanced[:rows], lsnr[:rows], b.split_states(new_h, new_history, rows)

    def _check(self, key, captured, inputs, any_fresh: bool, piece: int):
        """The eager step's result on these (real) inputs; the graph is kept where its replay
        equals it within the tolerance."""
        b, store = self.batched, self.store
        spec, erb_feat, spec_feat, mask, h0, history = inputs
        # The eager step as the engine runs it (mask only where a row is fresh).
        eager = b.forward_stacked(
            spec, erb_feat, spec_feat, h0, history, mask if any_fresh else None, piece
        )
        try:
            difference = max_difference(eager, captured.replay(*inputs))
        except Exception as exc:  # noqa: BLE001 - a replay that fails: this shape runs eager
            difference = float("inf")
            logger.debug(f"CUDA graph replay of step {key} failed ({_one_line(exc)})")
        store.differences[key] = difference
        if difference <= store.tolerance:
            captured.checked = True
            store.replays += 1
        else:
            # Not a capture failure but a wrong graph: worth a warning (once), not a debug line.
            warn_once(
                f"graph-mismatch-{key}",
                f"df_mps: the CUDA graph of step {key} differs from eager by {difference:.3g} "
                f"(over {store.tolerance:g}); that shape runs eager (--no-cuda-graphs "
                "silences this)",
            )
            store.graphs[key] = None
            store.eager_steps += 1
        return eager

    def _capture(self, key, spec, erb_feat, spec_feat, mask, h0, history):
        """The step's graph for this shape, on static copies of these inputs; None (one debug
        line) where capture fails."""
        import torch

        b, store = self.batched, self.store
        piece = key[1]
        t0 = time.perf_counter()
        try:
            static = (
                spec.clone(),
                erb_feat.clone(),
                spec_feat.clone(),
                mask.clone(),
                [h.clone() for h in h0],
                [h.clone() for h in history],
            )

            def run():
                s_spec, s_erb, s_feat, s_mask, s_h0, s_hist = static
                return b.forward_stacked(s_spec, s_erb, s_feat, s_h0, s_hist, s_mask, piece)

            side = torch.cuda.Stream(device=b.device)
            side.wait_stream(torch.cuda.current_stream(b.device))
            with torch.cuda.stream(side):
                for _ in range(store.warmup):
                    run()
            torch.cuda.current_stream(b.device).wait_stream(side)
            if store.pool is None:
                store.pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            # thread_local: the engine's I/O threads keep running their DSP and pinned copies
            # on other streams meanwhile ("global" would make their syncs fail).
            with torch.cuda.graph(graph, pool=store.pool, capture_error_mode="thread_local"):
                outputs = run()
            return _Captured(graph, static, outputs)
        except Exception as exc:  # noqa: BLE001 - any failure: this shape runs eager
            with contextlib.suppress(Exception):
                torch.cuda.synchronize(b.device)
            logger.debug(
                f"CUDA graph capture of step {key} failed ({_one_line(exc)}); running it eager"
            )
            return None
        finally:
            store.capture_seconds += time.perf_counter() - t0


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"


# -- torch.compile ----------------------------------------------------------------------------
_compiled_lock = threading.Lock()


def compiled_network(model, mode: str):
    """``torch.compile(model, mode=mode)``, one per (model, mode), kept on the model."""
    import torch

    with _compiled_lock:
        cache = model.__dict__.setdefault(COMPILED_ATTR, {})
        if ("network", mode) not in cache:
            options = {} if mode == "default" else {"mode": mode}
            cache["network", mode] = torch.compile(model, dynamic=False, **options)
        return cache["network", mode]


def compiled_model(batched, mode: str) -> CompiledModel:
    """One CompiledModel per (network, mode, piece geometry), shared by every engine over it
    (one step context, so compiled code always sees the same hook and forward functions)."""
    model = batched.model
    with _compiled_lock:
        cache = model.__dict__.setdefault(COMPILED_ATTR, {})
        key = ("step", mode, batched.left, batched.piece, batched.right)
        made = cache.get(key)
    if made is None:
        made = CompiledModel(batched, mode)
        with _compiled_lock:
            made = cache.setdefault(key, made)
    return made


class CompiledModel(_Stand):
    """A BatchedModel whose network runs through torch.compile; eager where compiling fails."""

    def __init__(self, batched, mode: str):
        super().__init__(batched)
        self.mode = mode
        self.failed: Optional[str] = None
        self.compile_seconds = 0.0  # the steps that compiled (first of each shape)
        self._seen: set = set()
        self._eager = batched.model
        batched.model = compiled_network(batched.model, mode)

    def step(self, spec, erb_feat, spec_feat, fresh: Sequence[bool], states, piece=None):
        b = self.batched
        piece = int(piece or b.piece)
        key = (spec.shape[0], piece)
        first = key not in self._seen and self.failed is None
        t0 = time.perf_counter()
        try:
            result = self._run(spec, erb_feat, spec_feat, fresh, states, piece)
        except Exception as exc:  # noqa: BLE001 - compiling failed: eager from now on
            if self.failed is not None:
                raise
            self.failed = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
            logger.debug(f"torch.compile ({self.mode}) failed ({self.failed}); running eager")
            b.model = self._eager
            return b.step(spec, erb_feat, spec_feat, fresh, states, piece)
        if first:
            self._seen.add(key)
            self.compile_seconds += time.perf_counter() - t0
        return result

    def warm_up(self, rows: int, freq_bins: int, erb_bands: int, df_bins: int) -> None:
        """Compile the shapes ahead, with the model load (as ``BatchedModel.warm_up``)."""
        warm_up_steps(self.step, self.batched, rows, freq_bins, erb_bands, df_bins)

    def _run(self, spec, erb_feat, spec_feat, fresh, states, piece):
        # Always with the start-of-stream mask (all ones where no row is fresh): dynamo does
        # not guard on module hooks (torch._dynamo.config.skip_nnmodule_hook_guards), so
        # code compiled with the mask's hooks must never run without them, or the reverse
        # (measured on the CPU: 5e-3 off when a step without hooks reused code with them).
        b = self.batched
        mask = b.start_mask(fresh, piece)
        h0, history = b.stack_states(states)
        enhanced, lsnr, new_h, new_history = b.forward_stacked(
            spec, erb_feat, spec_feat, h0, history, mask, piece
        )
        return enhanced, lsnr, b.split_states(new_h, new_history, spec.shape[0])


def stats(engine) -> Dict[str, object]:
    """What the engine's step ran as, for benchmarks and the doctor."""
    model = engine.model
    if isinstance(model, GraphedModel):
        store = model.store
        return {
            "step": "cuda graphs",
            "shapes_captured": [list(k) for k, v in store.graphs.items() if v is not None],
            "shapes_eager": [list(k) for k, v in store.graphs.items() if v is None],
            "capture_seconds": store.capture_seconds,
            "replays": store.replays,
            "eager_steps": store.eager_steps,
            "max_difference_vs_eager": max(store.differences.values(), default=None),
        }
    if isinstance(model, CompiledModel):
        return {
            "step": f"torch.compile ({model.mode})",
            "compile_seconds": model.compile_seconds,
            "failed": model.failed,
        }
    return {"step": "eager"}


__all__: List[str] = [
    "COMPILE_MODES",
    "CompiledModel",
    "GraphedModel",
    "TOLERANCE",
    "accelerate",
    "compile_mode",
    "plan",
    "row_bucket",
    "stats",
]
