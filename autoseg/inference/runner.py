"""Run one fold's network on tiles: eagerly, or through ``torch.compile`` once that pays for itself.

Compiling (TorchInductor with frozen weights: weights are folded into the compiled graph as constants and
pre-packed for the convolution library, and the normalisation and activation layers are fused into generated
kernels) makes a CPU forward pass of a 3D U-Net 1.2× (AVX2) to 1.7× (AVX-512) faster, but costs tens of seconds
once per network.
So the ``"auto"`` mode runs the first pass eagerly and compiles once the network time would clearly exceed
that cost: when the eager time already spent plus what the current volume still needs at the measured pace
exceeds :data:`COMPILE_AFTER_SECONDS`. ``"on"`` compiles before the first pass, ``"off"``
never. Apple MPS is never compiled. If compiling fails (no C++ compiler, an unsupported operation), a warning
says so and the passes continue eagerly: the result never depends on it beyond float rounding.

The weights are frozen into the compiled graph, so a runner's network must not be given new weights after it
has compiled: use one runner per fold.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import platform
import sys
import threading
import time

import torch

_log = logging.getLogger("autoseg")

COMPILE_MODES = ("auto", "on", "off")
COMPILE_AFTER_SECONDS = 30.0
"""In ``"auto"`` mode, compile once this much eager network time is spent or certainly ahead."""


class _GlibcHeap:
    """Keep the pages one CPU forward pass frees for the next pass (glibc only; elsewhere it does nothing).

    A forward pass of a 3D U-Net allocates gigabytes of activations. glibc serves every large allocation
    with a fresh ``mmap`` and unmaps it on ``free``, so each pass page-faults all of it in again and the
    kernel zeroes every page: on a 2-core machine about 0.7 M faults and a tenth of a compiled pass. While a
    pass runs, :meth:`during_pass` turns ``mmap`` off (one arena, no trimming), so the activations come from
    the heap and stay there, free, for the next pass; outside passes large allocations are mapped as
    before. :meth:`release` hands the retained memory back to the system (``malloc_trim``); the predictor
    calls it when a volume's sliding window is done. The settings are process-wide: a lock and a count of
    passes in flight keep concurrent runners consistent.
    """

    _M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
    _DEFAULT_MMAP_MAX, _DEFAULT_TRIM = 65536, 128 * 1024
    _NO_TRIM = 2**31 - 1  # a C int

    def __init__(self) -> None:
        self.libc = None
        if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
            try:
                libc = ctypes.CDLL("libc.so.6")
                libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
                libc.malloc_trim.argtypes = [ctypes.c_size_t]
                self.libc = libc
            except (OSError, AttributeError):
                self.libc = None
        self._lock = threading.Lock()
        self._passes = 0
        self._holding = False

    @contextlib.contextmanager
    def during_pass(self):
        if self.libc is None:
            yield
            return
        with self._lock:
            if not self._holding:
                self.libc.mallopt(self._M_ARENA_MAX, 1)
                self.libc.mallopt(self._M_TRIM_THRESHOLD, self._NO_TRIM)
                self._holding = True
            self._passes += 1
            self.libc.mallopt(self._M_MMAP_MAX, 0)
        try:
            yield
        finally:
            with self._lock:
                self._passes -= 1
                if self._passes == 0:
                    self.libc.mallopt(self._M_MMAP_MAX, self._DEFAULT_MMAP_MAX)

    def release(self) -> None:
        """Give the memory kept between passes back to the system (between volumes)."""
        if self.libc is None:
            return
        with self._lock:
            if not self._holding or self._passes:
                return
            self.libc.mallopt(self._M_TRIM_THRESHOLD, self._DEFAULT_TRIM)
            self.libc.mallopt(self._M_ARENA_MAX, 0)
            self.libc.malloc_trim(0)
            self._holding = False


HEAP = _GlibcHeap()
"""The process's heap policy for CPU forward passes (see :class:`_GlibcHeap`)."""

PRECISIONS = ("auto", "fp32", "bf16")
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
"""x86 CPU flags (``/proc/cpuinfo``) of native bfloat16 arithmetic (oneDNN then runs bf16 convolutions on
AVX512-BF16 or AMX tiles). ``torch.backends.cpu.get_cpu_capability()`` only names the vector width (AVX512),
not bf16, so it cannot tell."""


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU reports native bf16 (:data:`BF16_CPU_FLAGS` in the ``flags`` of ``/proc/cpuinfo``,
    or in ``cpuinfo`` when given). False where there is no ``/proc/cpuinfo`` (macOS, Windows)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
                cpuinfo = fh.read()
        except OSError:
            return False
    for line in cpuinfo.splitlines():
        if line.startswith("flags") and ":" in line:
            flags = set(line.split(":", 1)[1].split())
            return any(f in flags for f in BF16_CPU_FLAGS)
    return False


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of forward passes on ``device`` for the ``precision`` setting (None: float32).

    ``"auto"``: float16 on CUDA (as training), bfloat16 on a CPU with native bf16
    (:func:`cpu_has_native_bf16`), float32 elsewhere (MPS, CPUs that would emulate bf16 slowly)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None


class TileRunner:
    """Callable ``runner(x) -> logits`` for batches of tiles of a fixed shape, eager or compiled."""

    def __init__(
        self,
        network: torch.nn.Module,
        device: torch.device,
        compile: str = "auto",
        amp: bool = False,
        reuse_heap: bool = True,
        dtype: torch.dtype | None = None,
    ):
        """``amp``: forward passes under autocast, in ``dtype`` (None: the device's autocast default, float16
        on CUDA and bfloat16 on a CPU)."""
        if compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {COMPILE_MODES}, got {compile!r}")
        self.network = network.eval()
        self.device = device
        self.reuse_heap = reuse_heap
        self.amp = amp
        self.dtype = dtype
        self.mode = "off" if device.type == "mps" else compile
        self.compiled = None
        self.eager_seconds = 0.0
        self.eager_passes = 0
        self._failed = False
        self._compile_timed = False
        self._remaining = 0

    @property
    def is_compiled(self) -> bool:
        return self.compiled is not None

    def expect(self, passes: int) -> None:
        """Called before a volume's ``passes`` forward passes: compiles now when ``"on"``, or in ``"auto"``
        mode when the eager pace measured so far says they would take longer than the compile threshold."""
        self._remaining = passes
        self._maybe_compile()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.compiled is not None:
            start = time.perf_counter()
            try:
                out = self._run(self.compiled, x)
            except Exception as exc:  # compilation happens lazily, on the first call
                self._give_up(exc)
            else:
                if not self._compile_timed:
                    self._compile_timed = True
                    _log.info("compiled in %.0f s (with the first pass)", time.perf_counter() - start)
                return out
        start = time.perf_counter()
        out = self._run(self.network, x)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.eager_seconds += time.perf_counter() - start
        self.eager_passes += 1
        self._remaining = max(0, self._remaining - 1)
        self._maybe_compile()
        return out

    def _maybe_compile(self) -> None:
        """Compile when asked to, or ("auto") when the eager time spent plus the passes still expected at
        the measured pace exceed :data:`COMPILE_AFTER_SECONDS` (decided from the first pass on)."""
        if self.compiled is not None or self._failed or self.mode == "off":
            return
        if self.mode == "on":
            self._compile("asked for")
        elif self.eager_passes:
            ahead = self._remaining * self.eager_seconds / self.eager_passes
            if self.eager_seconds + ahead > COMPILE_AFTER_SECONDS:
                self._compile(
                    f"{self.eager_seconds:.0f} s of network time so far, about {ahead:.0f} s ahead in this volume"
                )

    def _run(self, net, x: torch.Tensor) -> torch.Tensor:
        with (
            torch.autocast(self.device.type, dtype=self.dtype, enabled=self.amp),
            contextlib.ExitStack() as stack,
        ):
            if self.device.type == "cpu" and self.reuse_heap:
                stack.enter_context(HEAP.during_pass())
            if net is self.compiled:  # compiles on the first call: with the weights frozen in
                from torch._inductor import config as inductor_config

                stack.enter_context(inductor_config.patch(freezing=True))
            out = net(x)
        return out[0] if isinstance(out, (list, tuple)) else out

    def _compile(self, why: str) -> None:
        _log.info("compiling the network with torch.compile (%s); the next pass waits for it", why)
        try:
            self.compiled = torch.compile(self.network, dynamic=False)
        except Exception as exc:
            self._give_up(exc)

    def _give_up(self, exc: Exception) -> None:
        self.compiled = None
        self._failed = True
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        _log.warning("torch.compile failed (%s: %s); predicting without it", type(exc).__name__, first)
