"""TransUNet (Chen et al. 2021), 3D variant (and 2D), built from a :class:`NetworkTopology`: the plain U-Net
(:mod:`.unet`: same encoder stages, decoder, skips, deep supervision) whose deepest encoder map goes through a
transformer before the decoder.

As in the paper's hybrid encoder, the tokens are the voxels of the lowest-resolution feature map (patch size 1):

- a linear embedding of each voxel's ``features_per_stage[-1]`` channels to the hidden width
  ``24 × features_per_stage[0]`` (768 at the planner's default 32: the paper's ViT-B), plus fixed sine-cosine
  position codes of the token grid (the topology does not fix the patch size, so the paper's learnt
  embedding for one grid is not used; :mod:`.transformer`);
- 12 pre-norm transformer layers (12 heads, MLP ratio 4), a final LayerNorm;
- the tokens reshaped to the grid and brought back to ``features_per_stage[-1]`` channels by a convolution with
  the deepest stage's kernel, instance norm and LeakyReLU (the paper's 3×3 convolution + ReLU before the
  cascaded upsampler), which the U-Net decoder then upsamples with the encoder's skips.

There is no size constraint beyond the U-Net's (patch divisible by the total stride).
"""

from __future__ import annotations

import torch
from torch import nn

from autoseg.networks.blocks import ConvNormAct
from autoseg.networks.transformer import TransformerBlock, sincos_position_embedding, tokens_to_grid
from autoseg.networks.unet import UNet
from autoseg.networks.unetr import HIDDEN_PER_BASE_FEATURE, VIT_HEADS, VIT_LAYERS
from autoseg.networks.unetr import RECIPE as UNETR_RECIPE
from autoseg.planning.network_topology import NetworkTopology

RECIPE = dict(UNETR_RECIPE)
"""Training defaults: the transformers' AdamW with warmup and cosine decay (:data:`.unetr.RECIPE`; the paper
trained with SGD at 0.01, momentum 0.9)."""


class TransUNet(UNet):
    """:class:`UNet` with a transformer bottleneck; outputs as U-Net's (deep supervision pyramid)."""

    cost_affine_in_voxels = False  # attention over the deepest map: quadratic in its voxel count

    def __init__(self, topo: NetworkTopology, in_channels: int, num_classes: int):
        super().__init__(topo, in_channels, num_classes)
        deepest = topo.features_per_stage[-1]
        self.hidden = HIDDEN_PER_BASE_FEATURE * topo.features_per_stage[0]
        self.embed = nn.Linear(deepest, self.hidden)
        self.blocks = nn.Sequential(*(TransformerBlock(self.hidden, VIT_HEADS) for _ in range(VIT_LAYERS)))
        self.norm = nn.LayerNorm(self.hidden)
        self.out = ConvNormAct(topo.dim, self.hidden, deepest, topo.kernel_sizes[-1])

    def bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        grid = list(x.shape[2:])
        tokens = self.embed(x.flatten(2).transpose(1, 2))
        tokens = tokens + sincos_position_embedding(grid, self.hidden, x.device, tokens.dtype)
        tokens = self.norm(self.blocks(tokens))
        return self.out(tokens_to_grid(tokens, grid))


def build_transunet(topo: NetworkTopology, in_channels: int, num_classes: int) -> nn.Module:
    return TransUNet(topo, in_channels, num_classes)
