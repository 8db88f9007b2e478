"""Deployment exports of one fold's network: TorchScript (``torch.jit.trace``) or ONNX.

The exported model maps an image patch ``(B, C, *patch)`` (preprocessed: cropped, normalised, resampled as in
the plans) to full-resolution logits ``(B, K, *patch)``. Sliding windows, mirroring, resampling and export back
to the image geometry stay with the caller; use ``autoseg predict`` for whole images.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from autoseg.checkpoint_io import check_compatible, check_finite, check_weights, load_checkpoint
from autoseg.errors import AutosegError
from autoseg.inference.backends import write_onnx
from autoseg.inference.predictor import topology_key
from autoseg.jsonio import temp_path_for
from autoseg.layout import WorkDir
from autoseg.networks import build_network
from autoseg.planning.plans import Plans

FORMATS = ("torchscript", "onnx")


def load_fold_network(work: WorkDir, config: str, fold: int | str) -> tuple[torch.nn.Module, list[int], int]:
    """The network of ``config``/``fold`` in eval mode (single full-resolution output), its patch size and
    number of input channels."""
    plans = Plans.load(work.plans)
    cfg = plans.configuration(config)
    in_ch = plans.input_channels(config)
    network = build_network(cfg.network, in_ch, plans.num_outputs)
    path = work.checkpoint(config, fold)
    ckpt = load_checkpoint(path)
    check_compatible(ckpt, path, config, topology_key(plans, config))
    check_weights(ckpt, path, network.state_dict())
    check_finite(ckpt, path)
    network.load_state_dict(ckpt["network"])
    network.deep_supervision = False
    return network.eval(), list(cfg.patch_size), in_ch


def export_network(
    workdir: str | os.PathLike,
    config: str,
    fold: int | str,
    output: str | os.PathLike,
    fmt: str = "torchscript",
) -> Path:
    """Write one fold's network to ``output`` (atomically) as TorchScript or ONNX."""
    if fmt not in FORMATS:
        raise AutosegError(f"unknown export format '{fmt}' (use one of {', '.join(FORMATS)})")
    network, patch, in_ch = load_fold_network(WorkDir(Path(workdir)), config, fold)
    example = torch.zeros((1, in_ch, *patch))
    output = Path(output)
    tmp = temp_path_for(output, output.suffix or ".tmp")
    try:
        with torch.no_grad():
            if fmt == "torchscript":
                torch.jit.trace(network, example).save(str(tmp))
            else:
                try:
                    import onnx  # noqa: F401
                except ImportError:
                    raise AutosegError(
                        "ONNX export needs the onnx package (pip install onnx onnxscript)"
                    ) from None
                write_onnx(network, example, tmp, dynamic_batch=True)
        os.replace(tmp, output)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return output
