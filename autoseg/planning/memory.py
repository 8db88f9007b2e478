"""A model of the peak GPU memory of one training step of a U-Net-like network, used to size patch and batch.

The estimate counts the activations kept for the backward pass, per architecture (``unet``, ``resenc``,
``vnet``; their structure rules are the constants below, which the networks import):
- ``unet`` encoder, per convolution: conv output, normalisation output, nonlinearity output (3 tensors of
  ``features × voxels``); decoder, per stage: transposed-conv output, the concatenated skip (2× features), the
  convolutions as in the encoder, and the deep-supervision head (``classes × voxels``);
- ``resenc`` encoder, per residual block: 2 convolutions (3 tensors each) plus the residual sum (7 tensors),
  and 2 more per stage for the shortcut of its first block (pooled/projected input, its norm); decoder as unet;
- ``vnet`` per residual stage of ``n`` convolutions: ``3n + 1`` tensors (the sum before the last PReLU), plus
  3 for the strided down-convolution (encoder) or for the transposed convolution (decoder), 2× features for the
  concatenated skip and the head in the decoder (the 1×1 input projection of stage 0 counts as 1);
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

ARCHITECTURES = ("unet", "resenc", "vnet")
# residual blocks per encoder stage of "resenc" (as nnU-Net's ResEnc presets); stages past the list repeat 6
RESENC_BLOCKS_PER_STAGE = (1, 3, 4, 6, 6, 6)
# convolutions per residual stage of "vnet" (Milletari et al. 2016: 1, 2, 3, 3, 3); decoder stages mirror them
VNET_CONVS_PER_STAGE = (1, 2, 3)
VNET_KERNEL = 5  # replaces every kernel entry > 1 of the topology; 1 (an axis still too coarse) stays 1


def resenc_blocks_per_stage(n_stages: int) -> list[int]:
    """``[1, 3, 4, 6, 6, 6, ...]`` truncated or extended (with 6) to ``n_stages`` entries."""
    return [RESENC_BLOCKS_PER_STAGE[min(s, len(RESENC_BLOCKS_PER_STAGE) - 1)] for s in range(n_stages)]


def vnet_convs_per_stage(n_stages: int) -> list[int]:
    """``[1, 2, 3, 3, ...]`` truncated or extended (with 3) to ``n_stages`` entries."""
    return [VNET_CONVS_PER_STAGE[min(s, len(VNET_CONVS_PER_STAGE) - 1)] for s in range(n_stages)]


def vnet_kernel(kernel: list[int]) -> list[int]:
    """The topology's kernel with every entry > 1 widened to ``VNET_KERNEL`` (``[1, 3, 3]`` -> ``[1, 5, 5]``)."""
    return [1 if k == 1 else VNET_KERNEL for k in kernel]


def _check_architecture(architecture: str) -> None:
    if architecture not in ARCHITECTURES:
        raise ValueError(
            f"no memory model for architecture {architecture!r} (known: {', '.join(ARCHITECTURES)})"
        )


def _conv_norm(cin: int, cout: int, kvol: int) -> int:
    """Conv with bias + affine instance norm."""
    return cin * cout * kvol + cout + 2 * cout


def count_parameters(
    dim: int,
    kernels: list[list[int]],
    features: list[int],
    in_channels: int,
    num_classes: int,
    strides: list[list[int]],
    n_conv: int = 2,
    architecture: str = "unet",
) -> int:
    """Number of weights of the network that ``autoseg.networks`` builds for ``architecture`` (norm affine and
    PReLU parameters included). ``n_conv`` is the convolutions per stage of the unet encoder/decoder and of the
    resenc decoder; vnet ignores it."""
    _check_architecture(architecture)
    if architecture == "vnet":
        return _count_vnet(kernels, features, in_channels, num_classes, strides)
    total = 0
    prev = in_channels
    if architecture == "unet":
        for k, f in zip(kernels, features):
            kvol = math.prod(k)
            for i in range(n_conv):
                total += _conv_norm(prev if i == 0 else f, f, kvol)
            prev = f
    else:  # resenc
        for k, f, blocks in zip(kernels, features, resenc_blocks_per_stage(len(features))):
            kvol = math.prod(k)
            for b in range(blocks):
                cin = prev if b == 0 else f
                total += _conv_norm(cin, f, kvol) + _conv_norm(f, f, kvol)
                if cin != f:  # 1×1 projection (no bias) + norm on the shortcut
                    total += cin * f + 2 * f
            prev = f
    for s in range(len(features) - 1, 0, -1):
        f_hi, f_lo = features[s], features[s - 1]
        total += f_hi * f_lo * math.prod(strides[s]) + f_lo  # transposed conv
        kvol = math.prod(kernels[s - 1])
        for i in range(n_conv):
            total += _conv_norm(2 * f_lo if i == 0 else f_lo, f_lo, kvol)
        total += f_lo * num_classes + num_classes  # segmentation head
    return total


def _count_vnet(
    kernels: list[list[int]],
    features: list[int],
    in_channels: int,
    num_classes: int,
    strides: list[list[int]],
) -> int:
    convs = vnet_convs_per_stage(len(features))
    total = 0
    prev = in_channels
    for s, (k, f, n) in enumerate(zip(kernels, features, convs)):
        kvol = math.prod(vnet_kernel(k))
        if s == 0:
            cin = in_channels
            if in_channels != f:
                total += in_channels * f  # 1×1 projection of the input onto the residual path (no bias)
        else:
            total += _conv_norm(prev, f, math.prod(strides[s])) + f  # strided down-conv + PReLU
            cin = f
        for i in range(n):
            total += _conv_norm(cin if i == 0 else f, f, kvol)
        total += n * f  # PReLU after each conv but the last, and after the residual sum
        prev = f
    for s in range(len(features) - 1, 0, -1):
        f_hi, f_lo, n = features[s], features[s - 1], convs[s - 1]
        total += f_hi * f_lo * math.prod(strides[s]) + f_lo + 2 * f_lo + f_lo  # transposed conv, norm, PReLU
        kvol = math.prod(vnet_kernel(kernels[s - 1]))
        for i in range(n):
            total += _conv_norm(2 * f_lo if i == 0 else f_lo, f_lo, kvol)
        total += n * f_lo  # PReLUs
        total += f_lo * num_classes + num_classes  # segmentation head
    return total


def activation_elements(
    patch_size: list[int],
    strides: list[list[int]],
    features: list[int],
    num_classes: int,
    n_conv: int = 2,
    architecture: str = "unet",
) -> int:
    """Activation elements kept for backward for one sample (see module docstring)."""
    _check_architecture(architecture)
    size = list(patch_size)
    total = 0
    n = len(features)
    blocks = resenc_blocks_per_stage(n)
    convs = vnet_convs_per_stage(n)
    for s, (stride, f) in enumerate(zip(strides, features)):
        size = [max(1, v // st) for v, st in zip(size, stride)]
        vox = math.prod(size)
        if architecture == "unet":
            total += n_conv * 3 * f * vox
        elif architecture == "resenc":
            total += (7 * blocks[s] + 2) * f * vox
        else:  # vnet: down-conv (or input projection), residual convs
            total += ((3 if s > 0 else 1) + 3 * convs[s] + 1) * f * vox
        if s < n - 1:  # decoder stage at this resolution
            if architecture == "vnet":
                total += (3 * f + 2 * f + (3 * convs[s] + 1) * f + num_classes) * vox
            else:
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
    architecture: str = "unet",
) -> int:
    """Estimated peak bytes of one training step (forward + backward + optimizer) of ``architecture``."""
    if any(p % t for p, t in zip(patch_size, total_stride(strides))):
        raise ValueError(f"patch {patch_size} not divisible by total stride {total_stride(strides)}")
    bytes_per = 2 if amp else 4
    act = activation_elements(patch_size, strides, features, num_classes, architecture=architecture)
    act_bytes = act * bytes_per * ACTIVATION_OVERHEAD
    params = count_parameters(
        len(patch_size), kernels, features, in_channels, num_classes, strides, architecture=architecture
    )
    return int(batch_size * act_bytes + params * BYTES_PER_PARAM + WORKSPACE_BYTES)


def estimate_inference_bytes(
    patch_size: list[int], tiles: int, features: list[int], in_channels: int, num_outputs: int, n_params: int
) -> int:
    """A lower bound of the memory one sliding-window forward pass of ``tiles`` tiles needs: float32 weights,
    and per tile voxel the input, the logits and their softmax, and two feature maps of the first stage (a
    convolution's input and output). Used to refuse plans whose prediction cannot fit before allocating."""
    per_voxel = in_channels + 2 * num_outputs + 2 * features[0]
    return 4 * (n_params + tiles * math.prod(patch_size) * per_voxel)
