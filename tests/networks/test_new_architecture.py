"""A new architecture defined only here, registered from this file, is planned (its memory and FLOPs measured
by the planner), trained for one step and predicted, with no change to planning/, training/ or inference/."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from torch import nn

from autoseg import api
from autoseg.checkpoint_io import load_checkpoint
from autoseg.layout import WorkDir
from autoseg.networks import ARCHITECTURES, build_network
from autoseg.planning import memory, speed
from autoseg.planning.plans import NetworkTopology, Plans
from autoseg.settings import InferenceSettings
from tests.conftest import shrink_network


class Tiny3(nn.Module):
    """Three stages whatever the topology's count: a convolution at full resolution, then two strided
    convolutions (the topology's first two strides); the decoder adds the skips back after each transposed
    convolution. One 1×1 head per decoder stage; deep supervision gives both, highest resolution first."""

    def __init__(self, topo: NetworkTopology, in_channels: int, num_classes: int):
        super().__init__()
        conv = {2: nn.Conv2d, 3: nn.Conv3d}[topo.dim]
        up = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[topo.dim]
        f, (s1, s2) = topo.features_per_stage, topo.strides[1:3]
        k = topo.kernel_sizes[0]
        self.deep_supervision = topo.deep_supervision
        self.enc0 = conv(in_channels, f[0], k, padding=[x // 2 for x in k])
        self.enc1 = conv(f[0], f[1], s1, stride=s1)
        self.enc2 = conv(f[1], f[2], s2, stride=s2)
        self.up2 = up(f[2], f[1], s2, stride=s2)
        self.up1 = up(f[1], f[0], s1, stride=s1)
        self.head1 = conv(f[1], num_classes, 1)
        self.head0 = conv(f[0], num_classes, 1)

    def forward(self, x: torch.Tensor):
        a = torch.relu(self.enc0(x))
        b = torch.relu(self.enc1(a))
        c = torch.relu(self.enc2(b))
        d1 = torch.relu(self.up2(c) + b)
        d0 = torch.relu(self.up1(d1) + a)
        if self.training and self.deep_supervision:
            return [self.head0(d0), self.head1(d1)]
        return self.head0(d0)


def build_tiny3(topo: NetworkTopology, in_channels: int, num_classes: int) -> nn.Module:
    return Tiny3(topo, in_channels, num_classes)


@pytest.fixture()
def tiny3(monkeypatch):
    monkeypatch.setitem(ARCHITECTURES, "tiny3", build_tiny3)
    return "tiny3"


def test_a_network_registered_from_a_test_is_planned_trained_and_predicted(tiny3, phantom_dataset, tmp_path):
    work = WorkDir(tmp_path / "work")
    plans = api.plan(
        phantom_dataset, work.root, workers=1, configurations=("3d_fullres",), architecture=tiny3
    )
    c = plans.configurations["3d_fullres"]
    assert c.network.architecture == "tiny3" and c.network.n_stages >= 3
    # the planner's figures are the tiny network's own: its weights, its activations, its FLOPs
    net = build_network(c.network, 2, 3)
    assert isinstance(net, Tiny3)
    assert plans.parameter_count("3d_fullres") == sum(p.numel() for p in net.parameters())
    est = memory.estimate_step_bytes(c.network, c.patch_size, c.batch_size, 2, 3)
    assert c.estimated_memory_gb == round(est / 1024**3, 3)
    flops = speed.step_flops(c.network, c.patch_size, 2, 3) * c.batch_size
    assert c.estimated_step_seconds["cpu"] == round(flops / speed.CPU_FLOPS, 3)
    assert any(
        r.startswith("3d_fullres: ") and "tiny3 measured on the meta device" in r for r in plans.reasons
    )

    shrink_network(work, base=4, cap=8)  # narrow, so one CPU step takes no time
    fold = api.train(
        work.root,
        "3d_fullres",
        0,
        device="cpu",
        epochs=1,
        iters_per_epoch=1,
        val_iters=1,
        loader_workers=0,
        compile=False,
        mirroring=False,
    )
    ckpt = load_checkpoint(fold / "checkpoint_final.pt")
    narrow = Plans.load(work.plans).configuration("3d_fullres").network
    assert set(ckpt["network"]) == set(build_tiny3(narrow, 2, 3).state_dict())
    log = [json.loads(line) for line in (fold / "log.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in log] == [1]

    image = phantom_dataset / "imagesTr" / "phantom_000_0000.nii.gz"
    out = tmp_path / "out"
    api.predict(
        work.root,
        [image, image.with_name("phantom_000_0001.nii.gz")],
        out,
        folds=[0],
        settings=InferenceSettings(mirroring=False),
    )
    (seg_path,) = out.glob("*.nii.gz")
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(seg_path)))
    ref = sitk.GetArrayFromImage(sitk.ReadImage(str(image)))
    assert seg.shape == ref.shape and set(np.unique(seg)) <= {0, 1, 2}
