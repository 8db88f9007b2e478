"""How long one training step of a configuration takes on this machine's device, for the time-budget planner.

A step is timed as training runs it: the network the registry builds, the training loss on every
deep-supervision output, backward and an SGD (Nesterov) step, on a batch of the planned patch and batch size
(random intensities and labels: a convolution's speed does not depend on the values). One untimed step warms
up (allocations, kernel selection), then :data:`TIMED_STEPS` are timed and their mean kept.

Timing a large 3D network on a CPU costs minutes, so a configuration is only timed when it could fit: the FLOPs
of its step (:func:`autoseg.planning.speed.step_flops`) over the rate measured on the last configuration timed
give an estimate, and one more than :data:`TIME_ONLY_WITHIN` times the allowed step is taken as estimated.
Narrow networks run at a lower rate than wide ones (measured on the 2-core CI CPU: 29 GFLOP/s at 8 base
features against 45 at 16-32, one thread), which the margin covers.

Times are cached in a JSON file (``~/.cache/autoseg/step_times.json`` unless given) per machine (device
name, processor, threads, torch version) and per configuration (network topology, patch, batch, channels,
outputs), so planning again on the same machine times nothing. A device that is not here (``--device cuda``
on a machine without a GPU) is not timed: its steps are estimated from the FLOPs at the stated default
throughput of :mod:`autoseg.planning.speed` and marked ``assumed``.
"""

from __future__ import annotations

import json
import math
import platform
import time
from pathlib import Path

from autoseg.jsonio import write_json
from autoseg.planning import memory, speed
from autoseg.planning.budget import StepTime
from autoseg.planning.plans import Configuration

TIMED_STEPS = 2
TIME_ONLY_WITHIN = 2.0
ASSUMED_FLOPS = {"cpu": speed.CPU_FLOPS, "cuda": speed.GPU_FLOPS, "mps": 2.0e12}
"""FLOP/s of a device that is not here to be timed (``mps``: assumed for an Apple M-series GPU)."""


def default_cache() -> Path:
    return Path.home() / ".cache" / "autoseg" / "step_times.json"


def device_available(device: str) -> bool:
    import torch

    if device == "cpu":
        return True
    if device == "cuda":
        return torch.cuda.is_available()
    return device == "mps" and torch.backends.mps.is_available()


class DeviceTimer:
    """A :data:`autoseg.planning.budget.StepTimer` for ``device`` (see the module docstring)."""

    def __init__(self, device: str, in_channels: int, num_outputs: int, region_based: bool, cache: Path):
        self.device, self.cache = device, Path(cache)
        self.in_channels, self.num_outputs, self.region_based = in_channels, num_outputs, region_based
        self.present = device_available(device)
        self.rate = ASSUMED_FLOPS[device]  # replaced by the measured rate once a step is timed
        self._times = _read_cache(self.cache)

    def __call__(self, config: Configuration, allowed_seconds: float) -> StepTime:
        flops = config.batch_size * speed.step_flops(
            config.network, config.patch_size, self.in_channels, self.num_outputs, self.region_based
        )
        if not self.present:
            return StepTime(flops / self.rate, "assumed")
        key = self._key(config)
        if key in self._times:
            self.rate = flops / self._times[key]
            return StepTime(self._times[key], "cached")
        if flops / self.rate > TIME_ONLY_WITHIN * allowed_seconds:
            return StepTime(flops / self.rate, "estimated")
        seconds = time_step(config, self.device, self.in_channels, self.num_outputs, self.region_based)
        self.rate = flops / seconds
        self._times[key] = seconds
        _write_cache(self.cache, self._times)
        return StepTime(seconds, "measured")

    def _key(self, config: Configuration) -> str:
        net = config.network
        return json.dumps([
            machine(self.device), net.architecture, net.strides, net.kernel_sizes, net.features_per_stage,
            net.n_conv_per_stage, net.deep_supervision, config.patch_size, config.batch_size,
            self.in_channels, self.num_outputs, self.region_based,
        ])  # fmt: skip


def machine(device: str) -> str:
    """What makes step times of ``device`` on this machine comparable: device name, threads, torch."""
    import torch

    if device == "cuda":
        name = torch.cuda.get_device_name(0)
    else:
        name = f"{platform.processor() or platform.machine()} {_cpu_model()}"
    return f"{device}|{name}|threads={torch.get_num_threads()}|torch={torch.__version__}"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.node()


def time_step(config: Configuration, device: str, in_channels: int, num_outputs: int, region_based: bool) -> float:
    """Mean seconds of :data:`TIMED_STEPS` training steps of ``config`` on ``device`` after one warm-up."""
    import torch

    from autoseg.networks import build_network

    dev = torch.device(device)
    network = build_network(config.network, in_channels, num_outputs).to(dev).train()
    loss_fn = memory.training_loss(num_outputs, region_based)
    optimizer = torch.optim.SGD(network.parameters(), lr=1e-3, momentum=0.99, nesterov=True)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(config.batch_size, in_channels, *config.patch_size, generator=generator).to(dev)
    high = num_outputs + 1 if region_based else num_outputs  # label values (regions unite 1..n)
    y = torch.randint(0, high, (config.batch_size, 1, *config.patch_size), generator=generator).to(dev)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(network(x), y).backward()
        optimizer.step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    step()
    start = time.perf_counter()
    for _ in range(TIMED_STEPS):
        step()
    return (time.perf_counter() - start) / TIMED_STEPS


def _read_cache(path: Path) -> dict[str, float]:
    """The cached step times; an unreadable or foreign file counts as empty (it is only a cache)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: float(v) for k, v in data.items() if isinstance(v, (int, float)) and math.isfinite(v) and v > 0}


def _write_cache(path: Path, times: dict[str, float]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, times)
    except OSError:
        pass  # a read-only home only costs timing again next time
