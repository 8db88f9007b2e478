"""Peak GPU memory of one training step, from the network that will be trained, used to size patch and batch.

The planner describes no architecture itself: it asks the registry (:mod:`autoseg.networks`) for the network
of a candidate topology, builds it on PyTorch's ``meta`` device and measures one training step — forward with
deep supervision, the training loss on every output, backward — with :mod:`autoseg.networks.measure`:
parameters, and the bytes of activations autograd saves for backward per sample (float32). The peak of a
step of batch ``B`` is then

    B × saved bytes × AMP_FACTOR × ACTIVATION_OVERHEAD + BYTES_PER_PARAM × parameters + WORKSPACE_BYTES

- ``AMP_FACTOR``: 0.5 with mixed precision (activations kept in 16 bits; the loss's float32 softmax is a few
  per cent of the total and is covered by the overhead), 1 without;
- ``ACTIVATION_OVERHEAD``, the one calibration constant of the GPU class: what the backward pass and the
  allocator add to the saved activations (gradients of activations alive at peak, cuDNN workspaces,
  fragmentation). The earlier per-architecture formulas counted 1.25 × 2 bytes per tensor, and for the plain
  U-Net ~1.47 tensors per one autograd keeps (3 per convolution where the in-place activation shares the
  norm's storage); those formulas had been set to reproduce nnU-Net v2's default plans at 8 GB (Hippocampus
  40×56×40 batch 9, BraTS-like 6 stages at batch 2). Every U-Net plan of the golden tests and of
  ``docs/planning.md`` keeps its patch, batch and topology for constants in [1.846, 1.854]: 1.85. Not yet
  fitted to ``torch.cuda.max_memory_allocated`` on a GPU (no GPU was lent to the sessions that wrote this);
- 16 bytes per parameter (fp32 weights, gradients, SGD momentum, fp16 copy) and a fixed ``WORKSPACE_BYTES``
  for the CUDA context.

Measuring a forward on meta at every candidate patch would cost ~0.1–1 s each for the hundreds of patches the
planner tries. Instead each network (topology, input channels, outputs, loss kind) is measured at two small
reference patches (twice and four times the total stride along the first axis, twice along the others) and
the saved bytes are extended linearly in the patch's voxel count: exact for a fully convolutional network at
a patch divisible by its total stride, where every feature map is the patch divided by one stage's stride
(``tests/networks/test_network_description.py`` checks it against a measurement at the planned patch for each
architecture). A network whose saved tensors grow otherwise with the patch (attention over all voxels) needs
a measurement at its patch instead. Measurements are cached per process (``functools.lru_cache``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from autoseg.networks import ARCHITECTURES, measure  # noqa: F401 (ARCHITECTURES: re-exported)
from autoseg.networks.registry import (  # noqa: F401 (re-exported for speed.py and the tests)
    cache_key,
    network_parameters,
    registered_builder,
    topology_from_key,
)
from autoseg.planning.plans import NetworkTopology
from autoseg.planning.topology import total_stride

ACTIVATION_OVERHEAD = 1.85
AMP_FACTOR = 0.5
WORKSPACE_BYTES = 1.0 * 1024**3
BYTES_PER_PARAM = 16


@dataclass(frozen=True)
class NetworkCost:
    """A network's measured cost per training sample: parameters, and saved-activation bytes (float32) at two
    reference patches of ``reference_voxels`` voxels, from which :meth:`saved_bytes` extends to any patch."""

    parameters: int
    reference_voxels: tuple[int, int]
    reference_saved_bytes: tuple[int, int]
    at_patch: Callable[[tuple[int, ...]], int] | None = field(default=None, compare=False, repr=False)
    """Measures one sample at a patch, for a network whose cost is not affine in the voxels (else None)."""

    def saved_bytes(self, patch_size: list[int]) -> int:
        """Saved-activation bytes of one sample at ``patch_size`` (linear in its voxel count, or measured at
        it when :attr:`at_patch` is set)."""
        if self.at_patch is not None:
            return self.at_patch(tuple(int(p) for p in patch_size))
        (v0, v1), (s0, s1) = self.reference_voxels, self.reference_saved_bytes
        return s0 + (s1 - s0) * (math.prod(patch_size) - v0) // (v1 - v0)


def training_loss(num_classes: int, region_based: bool = False):
    """The loss a training step uses (:func:`autoseg.training.loop.make_loss` without the ignore label's
    masks): the planner measures network and loss together. Imported here, from the pure-torch
    ``networks/losses.py`` (below planning, beside the networks it trains)."""
    from autoseg.networks.losses import DeepSupervisionLoss, DiceCELoss, RegionDiceBCELoss

    inner = RegionDiceBCELoss([[c + 1] for c in range(num_classes)]) if region_based else DiceCELoss()
    deep_supervision = DeepSupervisionLoss(inner)

    def loss(outputs, target):
        if isinstance(outputs, (list, tuple)) and not outputs:
            return target.new_zeros(())  # a one-stage U-Net has no decoder output: nothing to train
        return deep_supervision(outputs, target)

    return loss


def reference_patches(topo: NetworkTopology) -> tuple[list[int], list[int]]:
    """Two small patches divisible by the total stride: twice it, and the same with the first axis doubled."""
    small = [2 * t for t in total_stride(topo.strides)]
    return small, [2 * small[0], *small[1:]]


def network_cost(
    topo: NetworkTopology, in_channels: int, num_classes: int, region_based: bool = False
) -> NetworkCost:
    """Parameters and saved activations of one training sample of ``topo``'s network (measured, cached)."""
    return _cost(registered_builder(topo), cache_key(topo), in_channels, num_classes, region_based)


def affine_in_voxels(network) -> bool:
    """Whether ``network``'s saved activations and FLOPs are affine in the patch's voxel count (fully
    convolutional networks; a network says otherwise with ``cost_affine_in_voxels = False``)."""
    return bool(getattr(network, "cost_affine_in_voxels", True))


@functools.lru_cache(maxsize=256)
def meta_network(builder, key: tuple, in_channels: int, num_classes: int):
    """The network of ``key`` built on the meta device (cached)."""
    topo = topology_from_key(key)
    return measure.on_meta(lambda: builder(topo, in_channels, num_classes))


@functools.lru_cache(maxsize=256)
def _cost(builder, key: tuple, in_channels: int, num_classes: int, region_based: bool) -> NetworkCost:
    network = meta_network(builder, key, in_channels, num_classes)
    loss = training_loss(num_classes, region_based)
    patches = reference_patches(topology_from_key(key))
    saved = [measure.saved_activation_bytes(network, in_channels, p, loss) for p in patches]
    at_patch = None
    if not affine_in_voxels(network):
        at_patch = functools.lru_cache(maxsize=1024)(
            lambda patch: measure.saved_activation_bytes(network, in_channels, list(patch), loss)
        )
    return NetworkCost(
        measure.count_parameters(network),
        (math.prod(patches[0]), math.prod(patches[1])),
        (saved[0], saved[1]),
        at_patch,
    )


def check_patch(patch_size: list[int], topo: NetworkTopology) -> None:
    if any(p % t for p, t in zip(patch_size, total_stride(topo.strides))):
        raise ValueError(f"patch {patch_size} not divisible by total stride {total_stride(topo.strides)}")


def activation_bytes(
    topo: NetworkTopology,
    patch_size: list[int],
    in_channels: int,
    num_classes: int,
    region_based: bool = False,
) -> int:
    """Measured bytes (float32) that one training sample at ``patch_size`` keeps for backward."""
    check_patch(patch_size, topo)
    return network_cost(topo, in_channels, num_classes, region_based).saved_bytes(patch_size)


def estimate_step_bytes(
    topo: NetworkTopology,
    patch_size: list[int],
    batch_size: int,
    in_channels: int,
    num_classes: int,
    amp: bool = True,
    region_based: bool = False,
) -> int:
    """Estimated peak bytes of one training step (forward + backward + optimizer) of ``topo``'s network."""
    check_patch(patch_size, topo)
    cost = network_cost(topo, in_channels, num_classes, region_based)
    act = cost.saved_bytes(patch_size) * (AMP_FACTOR if amp else 1.0) * ACTIVATION_OVERHEAD
    return int(batch_size * act + cost.parameters * BYTES_PER_PARAM + WORKSPACE_BYTES)


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
    """Weights of the network ``autoseg.networks`` builds for this topology (for ``Plans.parameter_count``)."""
    topo = NetworkTopology(architecture, dim, strides, kernels, features, n_conv)
    return network_parameters(topo, in_channels, num_classes)


def estimate_inference_bytes(
    patch_size: list[int], tiles: int, features: list[int], in_channels: int, num_outputs: int, n_params: int
) -> int:
    """A lower bound of the memory one sliding-window forward pass of ``tiles`` tiles needs: float32 weights,
    and per tile voxel the input, the logits and their softmax, and two feature maps of the first stage (a
    convolution's input and output). Used to refuse plans whose prediction cannot fit before allocating."""
    per_voxel = in_channels + 2 * num_outputs + 2 * features[0]
    return 4 * (n_params + tiles * math.prod(patch_size) * per_voxel)
