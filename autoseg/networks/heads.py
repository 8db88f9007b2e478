"""The layers that give a network's logits, and setting their bias to a prior.

A network's output layers are those whose bias is, unchanged, the bias of its logits: ``network.output_layers()``
where a network defines it, else every module in its ``heads`` list, its ``head`` or its ``classifier`` (the
names the registered architectures use). A network whose logits pass through a learnt, bias-free mixing of the
classes after its last biased layer (FCN-8s: fused scores upsampled by transposed convolutions) declares
``output_layers() -> []``: no bias can set its initial output.

:func:`set_output_bias` writes a bias vector into every output layer. Training uses it for the *prior
initialisation* of Lin et al. 2017 (focal loss): the initial logits are the log class frequencies, so the first
steps do not spend themselves, and overshoot, learning that most voxels are background.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

OUTPUT_ATTRIBUTES = ("heads", "head", "classifier")


def output_layers(network: nn.Module) -> list[nn.Module]:
    """The layers whose bias is the bias of ``network``'s logits (see the module docstring)."""
    declared = getattr(network, "output_layers", None)
    if callable(declared):
        return list(declared())
    layers: list[nn.Module] = []
    for name in OUTPUT_ATTRIBUTES:
        module = getattr(network, name, None)
        if isinstance(module, nn.ModuleList):
            layers.extend(module)
        elif isinstance(module, nn.Module):
            layers.append(module)
    return layers


def set_output_bias(network: nn.Module, bias: Sequence[float]) -> int:
    """Write ``bias`` (one value per output channel) into every output layer; returns how many layers took
    it (0: the network has none, or none with a bias of that length)."""
    n = 0
    with torch.no_grad():
        for layer in output_layers(network):
            b = getattr(layer, "bias", None)
            if isinstance(b, torch.Tensor) and b.shape == (len(bias),):
                b.copy_(torch.as_tensor(list(bias), dtype=b.dtype))
                n += 1
    return n
