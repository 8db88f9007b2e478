"""A rough model of the time of one training step, for ``autoseg plan --explain``.

Counts the multiply-adds of every convolution of the U-Net topology (forward; backward costs about twice the
forward, so a step is 3× the forward), then divides by an effective throughput per device class. The CPU
figure was measured on this project's 2-core CI machine (a 16 M-parameter 5-stage U-Net, patch 24×80×80,
batch 2, 2.4e11 FLOP per step: 4.3 s, i.e. 1.1e11 FLOP/s); the GPU figure is an assumed effective rate for
mixed-precision 3D convolutions on a current data-centre GPU and has not been measured yet (no GPU was lent to
the session that wrote this). Residual encoders and V-Nets are counted with the same formula on their own
kernel sizes, which underestimates their extra convolutions. Treat the result as an order of magnitude.
"""

from __future__ import annotations

import math

CPU_FLOPS = 1.1e11  # measured, 2 cores (see module docstring)
GPU_FLOPS = 3.0e13  # assumed, not measured


def forward_flops(
    patch_size: list[int],
    strides: list[list[int]],
    kernels: list[list[int]],
    features: list[int],
    in_channels: int,
    num_classes: int,
    n_conv: int = 2,
) -> float:
    """Floating-point operations (2 per multiply-add) of one sample's forward pass through the plain U-Net."""
    size = list(patch_size)
    total = 0.0
    prev = in_channels
    sizes = []
    for stride, kernel, f in zip(strides, kernels, features):
        size = [max(1, s // st) for s, st in zip(size, stride)]
        vox = math.prod(size)
        kvol = math.prod(kernel)
        total += 2 * vox * kvol * prev * f + 2 * vox * kvol * f * f * (n_conv - 1)
        prev = f
        sizes.append(vox)
    for s in range(len(features) - 1, 0, -1):
        vox = sizes[s - 1]
        kvol = math.prod(kernels[s - 1])
        f_lo, f_hi = features[s - 1], features[s]
        total += 2 * vox * f_hi * f_lo  # transposed conv (kernel = stride: one input per output voxel)
        total += 2 * vox * kvol * 2 * f_lo * f_lo + 2 * vox * kvol * f_lo * f_lo * (n_conv - 1)
        total += 2 * vox * f_lo * num_classes
    return total


def estimate_step_seconds(flops_forward: float, batch_size: int, device: str) -> float:
    """Seconds per training step (forward + backward ≈ 3 × forward) on ``device`` (``cpu`` or a GPU)."""
    rate = CPU_FLOPS if device == "cpu" else GPU_FLOPS
    return 3 * flops_forward * batch_size / rate
