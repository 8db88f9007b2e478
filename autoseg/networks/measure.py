"""What one training step of a network costs, measured on PyTorch's ``meta`` device.

On ``meta`` every tensor has a shape and a dtype but no memory, so the real network's forward and backward run
(each operator computes only its output's shape) at any patch size without allocating it. Measured:

- **parameters**: ``sum(p.numel() for p in network.parameters())``;
- **saved activations**: the tensors autograd keeps for the backward pass, seen with
  ``torch.autograd.graph.saved_tensors_hooks`` during the forward of network and loss. Each storage counts
  once at its full size (a view or an in-place result shares its base's storage, and keeps all of it alive),
  and the parameters' storages do not count (weights are counted apart). This is what a step holds at the
  end of its forward, the peak of a training step in a network without checkpointing; what the backward adds
  on top (gradient buffers, workspaces) is left to the calibration in :mod:`autoseg.planning.memory`;
- **FLOPs** of forward + backward with ``torch.utils.flop_counter.FlopCounterMode`` (convolutions and matrix
  products, 2 per multiply-add; normalisation and elementwise operations are not counted).

Why these tools: the saved-tensor hooks see exactly what autograd keeps, whatever the network does (residual
sums, concatenations, in-place activations, the loss's softmax) without a per-layer formula; a meta-device
memory tracker would instead have to model the allocator and when each temporary dies. ``FlopCounterMode``
works on meta tensors and knows the backward of convolutions (no grad-input for a layer whose input needs no
gradient).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

Loss = Callable[[object, torch.Tensor], torch.Tensor]


def on_meta(build: Callable[[], nn.Module]) -> nn.Module:
    """``build()`` with every parameter and buffer on the meta device (no memory), in training mode (built
    outside inference mode even when called inside it, so that autograd can record a step through it)."""
    with torch.inference_mode(False), torch.device("meta"):
        network = build()
    return network.train()


def count_parameters(network: nn.Module) -> int:
    return sum(p.numel() for p in network.parameters())


def _step_inputs(in_channels: int, patch: Sequence[int], batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.empty((batch, in_channels, *patch), device="meta")
    target = torch.zeros((batch, 1, *patch), dtype=torch.long, device="meta")
    return x, target


def saved_activation_bytes(
    network: nn.Module, in_channels: int, patch: Sequence[int], loss: Loss, batch: int = 1
) -> int:
    """Bytes of the distinct storages autograd saves for backward in ``loss(network(x), target)``, with ``x``
    ``(batch, in_channels, *patch)`` float32 and ``target`` ``(batch, 1, *patch)`` int64 (parameters not
    counted). ``network`` must live on the meta device (see :func:`on_meta`)."""
    weights = {p.untyped_storage()._cdata for p in network.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        # keeping ``t`` referenced (autograd holds it until backward) keeps storage addresses unique
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in weights and key not in saved:
            saved[key] = storage.nbytes()
        return t

    with torch.inference_mode(False), torch.enable_grad():
        x, target = _step_inputs(in_channels, patch, batch)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            value = loss(network(x), target)
        del value  # frees the graph
    return sum(saved.values())


def step_flops(network: nn.Module, in_channels: int, patch: Sequence[int], loss: Loss, batch: int = 1) -> int:
    """FLOPs of forward + backward of ``loss(network(x), target)`` (inputs as in
    :func:`saved_activation_bytes`; forward only where the loss needs no gradient); ``network`` on the meta
    device. Parameter gradients are left as None."""
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(False), torch.enable_grad(), counter:
        x, target = _step_inputs(in_channels, patch, batch)
        value = loss(network(x), target)
        if value.requires_grad:
            value.backward()
    network.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())
