"""A rough model of the time of one training step, for ``autoseg plan --explain``.

The FLOPs of one training sample (forward with deep supervision, loss, backward) are measured on the network
that will be trained, built on the meta device (:func:`autoseg.networks.measure.step_flops`: convolutions and
matrix products, 2 per multiply-add), and divided by one effective throughput per device class:

- ``CPU_FLOPS`` was measured on this project's 2-core CI machine: a 16 M-parameter 5-stage U-Net, patch
  24×80×80, batch 2, ran a step in 4.3 s, i.e. 1.1e11 FLOP/s. Its measured FLOPs differ by less than 0.3 %
  from the per-layer count the figure was first derived with (3× the forward), so the figure stands;
- ``GPU_FLOPS`` is an assumed effective rate for mixed-precision 3D convolutions on a current data-centre GPU,
  not measured (no GPU was lent to the sessions that wrote this).

Like the memory model, the count is measured once per network at the two reference patches
(:func:`autoseg.planning.memory.reference_patches`) and extended affinely in the patch's voxel count, exact for
a fully convolutional network at a patch divisible by its total stride (layers on globally pooled vectors,
as squeeze-and-excitation, are the constant term); a network whose cost is not affine in the voxels (the
transformers, :func:`autoseg.planning.memory.affine_in_voxels`) is measured at the patch itself. Treat the
seconds as an order of magnitude.
"""

from __future__ import annotations

import functools
import math

from autoseg.networks import measure
from autoseg.planning import memory
from autoseg.planning.plans import NetworkTopology

CPU_FLOPS = 1.1e11  # measured, 2 cores (see module docstring)
GPU_FLOPS = 3.0e13  # assumed, not measured


def step_flops(
    topo: NetworkTopology,
    patch_size: list[int],
    in_channels: int,
    num_classes: int,
    region_based: bool = False,
) -> int:
    """FLOPs of forward + backward of one training sample of ``topo``'s network at ``patch_size``."""
    memory.check_patch(patch_size, topo)
    builder, key = memory.registered_builder(topo), memory.cache_key(topo)
    if not memory.affine_in_voxels(memory.meta_network(builder, key, in_channels, num_classes)):
        patch = tuple(int(p) for p in patch_size)
        return _flops_at(builder, key, in_channels, num_classes, region_based, patch)
    v0, v1 = (math.prod(p) for p in memory.reference_patches(topo))
    f0, f1 = _reference_flops(builder, key, in_channels, num_classes, region_based)
    # affine in the voxel count, as the saved activations: layers on globally pooled vectors (squeeze-and-
    # excitation, image pooling) cost the same at every patch
    return f0 + (f1 - f0) * (math.prod(patch_size) - v0) // (v1 - v0)


@functools.lru_cache(maxsize=256)
def _reference_flops(
    builder, key: tuple, in_channels: int, num_classes: int, region_based: bool
) -> tuple[int, int]:
    topo = memory.topology_from_key(key)
    network = measure.on_meta(lambda: builder(topo, in_channels, num_classes))
    loss = memory.training_loss(num_classes, region_based)
    f0, f1 = (measure.step_flops(network, in_channels, p, loss) for p in memory.reference_patches(topo))
    return f0, f1


@functools.lru_cache(maxsize=1024)
def _flops_at(
    builder, key: tuple, in_channels: int, num_classes: int, region_based: bool, patch: tuple
) -> int:
    network = memory.meta_network(builder, key, in_channels, num_classes)
    return measure.step_flops(
        network, in_channels, list(patch), memory.training_loss(num_classes, region_based)
    )


def estimate_step_seconds(flops_per_sample: float, batch_size: int, device: str) -> float:
    """Seconds per training step of ``batch_size`` samples of ``flops_per_sample`` (forward + backward) on
    ``device`` (``cpu`` or a GPU)."""
    rate = CPU_FLOPS if device == "cpu" else GPU_FLOPS
    return flops_per_sample * batch_size / rate
