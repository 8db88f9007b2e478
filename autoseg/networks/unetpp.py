"""UNet++ (Zhou et al. 2018) built from a :class:`NetworkTopology` (2D or 3D, anisotropic strides/kernels):
nested, dense skip pathways, deep supervision over the nested full-resolution heads, and the paper's two
inference modes."""

from __future__ import annotations

import torch
from torch import nn

from autoseg.networks.blocks import StackedConvs, conv_cls, network_outputs, transp_conv_cls
from autoseg.planning.network_topology import NetworkTopology

INFERENCE_MODES = ("accurate", "fast")


class UNetPlusPlus(nn.Module):
    """Nodes ``X[i][j]``: depth ``i`` (stage ``i`` of the topology, its width and kernel), column ``j``.

    ``X[i][0]`` is the encoder (as :class:`autoseg.networks.unet.UNet`'s: :class:`StackedConvs`, strided first
    convolution). For ``j >= 1``, ``X[i][j] = convs(concat(X[i][0], ..., X[i][j-1], up(X[i+1][j-1])))`` where
    ``up`` is a transposed convolution (kernel = stride of stage ``i + 1``) to stage ``i``'s width, one per
    node. With ``L = n_stages - 1``, the ``L`` nested full-resolution nodes ``X[0][1..L]`` each have a 1×1
    head.

    ``forward(x)``:
    - training, deep supervision: the ``L`` heads' logits, all at full resolution, deepest (``X[0][L]``) first
      (the loss weighs outputs of one resolution equally, as the paper);
    - training without deep supervision: the deepest head's logits;
    - eval, ``inference == "accurate"``: the mean of the ``L`` heads' logits (the paper averages the heads);
    - eval, ``inference == "fast"``: the network pruned at ``prune_depth`` (``1..L``): only the nodes
      ``X[i][j]`` with ``i + j <= prune_depth`` are computed, and the head of ``X[0][prune_depth]`` answers.
    Both modes assume training with deep supervision (otherwise the shallower heads are untrained). They are
    attributes, set at construction or later (``net.inference = "fast"; net.prune_depth = 2``).
    """

    def __init__(
        self,
        topo: NetworkTopology,
        in_channels: int,
        num_classes: int,
        inference: str = "accurate",
        prune_depth: int | None = None,
    ):
        super().__init__()
        dim, feats, n = topo.dim, topo.features_per_stage, topo.n_conv_per_stage
        self.depth = topo.n_stages - 1
        self.deep_supervision = topo.deep_supervision
        self.inference = inference
        self.prune_depth = self.depth if prune_depth is None else prune_depth
        check_inference(inference, self.prune_depth, self.depth)
        cin = in_channels
        self.encoder = nn.ModuleList()
        for s in range(topo.n_stages):
            self.encoder.append(StackedConvs(dim, cin, feats[s], topo.kernel_sizes[s], topo.strides[s], n))
            cin = feats[s]
        self.up = nn.ModuleDict()
        self.nodes = nn.ModuleDict()
        for j in range(1, self.depth + 1):
            for i in range(self.depth - j + 1):
                st = topo.strides[i + 1]
                self.up[f"{i}_{j}"] = transp_conv_cls(dim)(feats[i + 1], feats[i], st, stride=st)
                self.nodes[f"{i}_{j}"] = StackedConvs(
                    dim, (j + 1) * feats[i], feats[i], topo.kernel_sizes[i], [1] * dim, n
                )
        self.heads = nn.ModuleList(conv_cls(dim)(feats[0], num_classes, 1) for _ in range(self.depth))

    def set_inference(self, inference: str, prune_depth: int | None = None) -> None:
        """Choose the eval-mode answer: ``"accurate"`` or ``"fast"`` pruned at ``prune_depth`` (None: the
        deepest); a :class:`ValueError` naming what is allowed otherwise. Training mode is not affected."""
        depth = self.depth if prune_depth is None else prune_depth
        check_inference(inference, depth, self.depth)
        self.inference, self.prune_depth = inference, depth

    def forward(self, x: torch.Tensor):
        pruned = not self.training and self.inference == "fast"
        depth = self.prune_depth if pruned else self.depth
        grid: list[list[torch.Tensor]] = []
        for stage in self.encoder[: depth + 1]:
            x = stage(x)
            grid.append([x])
        for j in range(1, depth + 1):
            for i in range(depth - j + 1):
                up = self.up[f"{i}_{j}"](grid[i + 1][j - 1])
                grid[i].append(self.nodes[f"{i}_{j}"](torch.cat([*grid[i], up], dim=1)))
        if self.training:
            logits = [self.heads[j - 1](grid[0][j]) for j in range(depth, 0, -1)]
            return network_outputs(logits, self.deep_supervision)
        if pruned:
            return self.heads[depth - 1](grid[0][depth])
        return torch.stack([self.heads[j - 1](grid[0][j]) for j in range(1, depth + 1)]).mean(0)


def check_inference(inference: str, prune_depth: int, depth: int) -> None:
    if inference not in INFERENCE_MODES:
        raise ValueError(
            f"UNet++ inference mode {inference!r} unknown (use one of {', '.join(INFERENCE_MODES)})"
        )
    if not 1 <= prune_depth <= depth:
        raise ValueError(
            f"UNet++ prune depth {prune_depth} out of range (this network has depths 1..{depth})"
        )


def build_unetpp(topo: NetworkTopology, in_channels: int, num_classes: int) -> nn.Module:
    return UNetPlusPlus(topo, in_channels, num_classes)
