"""A model of the peak GPU memory of one training step of a U-Net, used to size patch and batch.

The estimate counts the activations kept for the backward pass:
- encoder, per convolution: conv output, normalisation output, nonlinearity output (3 tensors of
  ``features × voxels``);
- decoder, per stage: transposed-conv output, the concatenated skip (2× features), the convolutions as in the
  encoder, and the deep-supervision head (``classes × voxels``);
stored at 2 bytes with mixed precision (4 without), times ``ACTIVATION_OVERHEAD`` for what autograd and the
allocator add (saved inputs of convolutions, gradient buffers at peak, fragmentation). Parameters cost
16 bytes each (fp32 weights, gradients, SGD momentum, fp16 copy), plus a fixed ``WORKSPACE_BYTES`` for the
CUDA context and cuDNN workspaces.

Calibration: the constants are chosen so that the model reproduces nnU-Net v2's default plans at its 8 GB
target (BraTS-like 128³ at batch 2 with 6 stages: ~7.8 GB; Hippocampus 40×56×40 at batch 9). They have not yet
been checked against ``torch.cuda.max_memory_allocated`` on a GPU; that calibration is tracked in issue 3.
"""

from __future__ import annotations

import math

from autoseg.planning.topology import total_stride

ACTIVATION_OVERHEAD = 1.25
WORKSPACE_BYTES = 1.0 * 1024**3
BYTES_PER_PARAM = 16


def count_parameters(
    dim: int,
    kernels: list[list[int]],
    features: list[int],
    in_channels: int,
    num_classes: int,
    strides: list[list[int]],
    n_conv: int = 2,
) -> int:
    """Number of weights of the plain U-Net in ``autoseg.networks.unet`` (norm affine params included)."""
    total = 0
    prev = in_channels
    for k, f in zip(kernels, features):
        kvol = math.prod(k)
        for i in range(n_conv):
            cin = prev if i == 0 else f
            total += cin * f * kvol + f + 2 * f
        prev = f
    for s in range(len(features) - 1, 0, -1):
        f_hi, f_lo = features[s], features[s - 1]
        total += f_hi * f_lo * math.prod(strides[s]) + f_lo  # transposed conv
        kvol = math.prod(kernels[s - 1])
        for i in range(n_conv):
            cin = 2 * f_lo if i == 0 else f_lo
            total += cin * f_lo * kvol + f_lo + 2 * f_lo
        total += f_lo * num_classes + num_classes  # segmentation head
    return total


def activation_elements(
    patch_size: list[int], strides: list[list[int]], features: list[int], num_classes: int, n_conv: int = 2
) -> int:
    """Activation elements kept for backward for one sample (see module docstring)."""
    size = list(patch_size)
    total = 0
    n = len(features)
    for s, (stride, f) in enumerate(zip(strides, features)):
        size = [max(1, v // st) for v, st in zip(size, stride)]
        vox = math.prod(size)
        total += n_conv * 3 * f * vox  # encoder
        if s < n - 1:  # decoder stage at this resolution
            total += f * vox + 2 * f * vox + n_conv * 3 * f * vox + num_classes * vox
    return total


def estimate_step_bytes(
    patch_size: list[int],
    batch_size: int,
    strides: list[list[int]],
    kernels: list[list[int]],
    features: list[int],
    in_channels: int,
    num_classes: int,
    amp: bool = True,
) -> int:
    """Estimated peak bytes of one training step (forward + backward + optimizer)."""
    if any(p % t for p, t in zip(patch_size, total_stride(strides))):
        raise ValueError(f"patch {patch_size} not divisible by total stride {total_stride(strides)}")
    bytes_per = 2 if amp else 4
    act = activation_elements(patch_size, strides, features, num_classes) * bytes_per * ACTIVATION_OVERHEAD
    params = count_parameters(len(patch_size), kernels, features, in_channels, num_classes, strides)
    return int(batch_size * act + params * BYTES_PER_PARAM + WORKSPACE_BYTES)
