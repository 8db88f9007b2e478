"""Other CPU kernels for the sliding window: a fold's network exported to ONNX, run by ONNX Runtime or OpenVINO.

``predict --backend onnxruntime`` (or ``openvino``) runs the same float32 tiles through an ONNX Runtime
``InferenceSession`` (CPU provider) or an OpenVINO model compiled for the CPU (float32 inference precision)
instead of torch. The network is exported once per fold, when the predictor loads it, at the one tile shape
the sliding window uses (``(tile_batch, C, *patch)``: a fixed shape lets every network export, also those
whose graph bakes in the batch size, such as swin_unetr, and lets the engine plan its memory once). A
smaller last batch is topped up with repeats of its last tile and cut back. Only the full-resolution output
is exported (deep supervision is off in eval mode). The model is kept in an export cache folder
(``InferenceSettings.export_cache``, by default ``~/.cache/autoseg/onnx``) under a key made of everything
that shapes the graph (:func:`export_key`), so a later run with the same fold loads it without exporting;
with no cache folder it is written to a temporary folder and deleted once loaded. Nothing is written beside
the user's inputs or into WORK. Both engines are optional extras (``pip install 'autoseg[onnx]'`` or ``'autoseg[openvino]'``);
the ``torch`` backend needs nothing more.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from autoseg.errors import AutosegError
from autoseg.settings import BACKENDS

_log = logging.getLogger("autoseg")

_NEEDS = {"onnxruntime": ("onnxruntime", "onnx"), "openvino": ("openvino", "onnx")}
"""The Python packages (import names) each non-torch backend needs: its engine and the ONNX exporter's."""
_EXTRA = {"onnxruntime": "onnx", "openvino": "openvino"}
"""The optional extra of ``pyproject.toml`` that installs them."""


def check_backend(backend: str, device: torch.device) -> None:
    """Refuse, in one line, a backend that is unknown, whose packages are missing, or that cannot run on
    ``device`` (the ONNX engines run here on the CPU only)."""
    if backend not in BACKENDS:
        raise AutosegError(f"--backend {backend}: unknown backend (use {', '.join(BACKENDS)})")
    if backend == "torch":
        return
    for name in _NEEDS[backend]:
        try:
            importlib.import_module(name)
        except ImportError:
            raise AutosegError(
                f"--backend {backend} needs the {name} package: pip install 'autoseg[{_EXTRA[backend]}]'"
            ) from None
    if device.type != "cpu":
        raise AutosegError(f"--backend {backend} runs on the CPU only: add --device cpu")


class _FullResolution(torch.nn.Module):
    """The network's full-resolution logits alone (the first output of a deep-supervision list)."""

    def __init__(self, network: torch.nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.network(x)
        return out[0] if isinstance(out, (list, tuple)) else out


def write_onnx(network: torch.nn.Module, example: torch.Tensor, path: Path, dynamic_batch: bool) -> None:
    """Export ``network`` (eval mode, full-resolution output) to one self-contained ONNX file ``path`` for
    inputs shaped like ``example``; ``dynamic_batch``: any batch size (else exactly ``example``'s). The
    TorchScript-based exporter is tried first (seconds, where the dynamo exporter takes tens of them), the
    dynamo exporter when it fails (swin_unetr: its layer norms take their shape from the tensor)."""
    model = _FullResolution(network).eval()
    axes = {"image": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None
    # one self-contained file: external weights would name the (temporary) file they were written beside
    args = dict(input_names=["image"], output_names=["logits"], dynamic_axes=axes, external_data=False)
    with torch.no_grad(), warnings.catch_warnings(), _quiet("torch.onnx"):
        warnings.simplefilter("ignore")  # the exporters' deprecation and instance-norm notes
        try:
            with _stdout_discarded():  # where it fails, it prints the whole graph to the process's stdout
                torch.onnx.export(model, (example,), str(path), dynamo=False, verbose=False, **args)
        except Exception:
            torch.onnx.export(model, (example,), str(path), dynamo=True, verbose=False, **args)


@contextlib.contextmanager
def _stdout_discarded():
    """File descriptor 1 goes to the null device meanwhile (it catches what C++ code prints, too)."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


@contextlib.contextmanager
def _quiet(name: str):
    """Only errors from the logger ``name`` meanwhile (the dynamo exporter warns about missing torchvision)."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


class OnnxRunner:
    """Callable ``runner(x) -> logits`` (float32, CPU) for batches of at most ``tile_shape[0]`` tiles of
    shape ``tile_shape[1:]``: ``network`` exported to ONNX, run by ``engine`` ("onnxruntime" or "openvino")
    on ``threads`` threads. The interface the sliding window uses of
    :class:`autoseg.inference.runner.TileRunner` (never compiled: ``mode`` is "off")."""

    mode = "off"
    is_compiled = False

    def __init__(
        self,
        network: torch.nn.Module,
        tile_shape: tuple[int, ...],
        threads: int,
        engine: str = "onnxruntime",
        cache: Path | None = None,
        description: str = "",
    ):
        self.tile_shape = tuple(int(s) for s in tile_shape)
        threads = max(1, int(threads))
        start = time.perf_counter()
        self.cached = False
        if cache is not None:
            self._run, self.cached = _cached_engine(
                network, self.tile_shape, threads, engine, cache, description
            )
        else:
            self._run = _temporary_engine(network, self.tile_shape, threads, engine)
        _log.info(
            "network %s for a %s tile batch and loaded in %s (%d thread(s), %.1f s)",
            "taken from the export cache" if self.cached else "exported to ONNX",
            "x".join(map(str, self.tile_shape)),
            engine,
            threads,
            time.perf_counter() - start,
        )

    def expect(self, passes: int) -> None:
        """Nothing to prepare: the engine was set up for the one tile shape."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if tuple(x.shape[1:]) != self.tile_shape[1:] or n > self.tile_shape[0]:
            raise ValueError(f"tiles {tuple(x.shape)} do not fit the exported shape {self.tile_shape}")
        if n < self.tile_shape[0]:  # the exported graph has a fixed batch: repeat the last tile
            x = torch.cat([x, x[-1:].expand(self.tile_shape[0] - n, *x.shape[1:])])
        logits = self._run(x.detach().to("cpu", torch.float32).contiguous().numpy())
        return torch.from_numpy(np.ascontiguousarray(logits[:n], dtype=np.float32))


EXPORT_CACHE_FILES = 40
"""The export cache keeps this many models, the most recently used (each is about the size of its weights)."""


def export_key(network: torch.nn.Module, tile_shape: tuple[int, ...], description: str = "") -> str:
    """What the exported graph depends on, hashed: the network's class, every parameter and buffer (name,
    dtype, shape, bytes), the tile shape, ``description`` (the caller's topology, for what holds no weight,
    such as strides or a window size) and the torch and exporter versions. 32 hex digits."""
    h = hashlib.sha256()
    kind = type(network)
    h.update(
        repr((kind.__module__, kind.__qualname__, tuple(tile_shape), description, torch.__version__)).encode()
    )
    for name, tensor in network.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def _cached_engine(network, tile_shape, threads: int, engine: str, cache: Path, description: str):
    """``(run, taken from the cache)``: the engine on ``cache/<export_key>.onnx``, exported there first (to a
    temporary name, then renamed) when missing. A cached file the engine cannot load is exported again; a
    cache folder that cannot be written falls back to a temporary export, with a warning."""
    path = Path(cache).expanduser() / f"{export_key(network, tile_shape, description)}.onnx"
    if path.is_file():
        try:
            run = _ENGINES[engine](path, threads)
        except Exception as exc:  # a truncated or foreign file: export it again
            _log.warning("%s: cached ONNX model not loadable (%s); exporting again", path, type(exc).__name__)
        else:
            with contextlib.suppress(OSError):  # a read-only shared cache still serves
                os.utime(path)  # most recently used
            return run, True
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".onnx.tmp", delete=False) as fh:
            tmp = Path(fh.name)
    except OSError as exc:
        _log.warning("%s: export cache not writable (%s); exporting to a temporary folder", path.parent, exc)
        return _temporary_engine(network, tile_shape, threads, engine), False
    try:
        write_onnx(network.eval(), torch.zeros(tile_shape), tmp, dynamic_batch=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _prune(path.parent)
    return _ENGINES[engine](path, threads), False


def _temporary_engine(network, tile_shape, threads: int, engine: str):
    """The engine on the network exported to a temporary folder, deleted once the engine has loaded it."""
    with tempfile.TemporaryDirectory(prefix="autoseg-onnx-") as folder:
        path = Path(folder) / "network.onnx"
        write_onnx(network.eval(), torch.zeros(tile_shape), path, dynamic_batch=False)
        return _ENGINES[engine](path, threads)


def _prune(folder: Path, keep: int = EXPORT_CACHE_FILES) -> None:
    """Delete all but the ``keep`` most recently used ``*.onnx`` files of ``folder``."""
    used = []
    for f in folder.glob("*.onnx"):
        with contextlib.suppress(OSError):  # another predict may prune the same folder
            used.append((f.stat().st_mtime, f))
    for _, old in sorted(used, reverse=True)[keep:]:
        with contextlib.suppress(OSError):
            old.unlink()


def _onnxruntime(path: Path, threads: int):
    """``run(image) -> logits`` by an ONNX Runtime session of the model at ``path`` (CPU provider)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda image: session.run(["logits"], {"image": image})[0]


def _openvino(path: Path, threads: int):
    """``run(image) -> logits`` by OpenVINO's CPU plugin, in float32 (its default on CPUs with bf16 would be
    bf16) on ``threads`` threads."""
    import openvino as ov

    config = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"}
    compiled = ov.Core().compile_model(ov.Core().read_model(str(path)), "CPU", config)
    request = compiled.create_infer_request()
    return lambda image: request.infer({0: image})[compiled.output(0)]


_ENGINES = {"onnxruntime": _onnxruntime, "openvino": _openvino}
