"""``predict --backend onnxruntime|openvino``: the setting and its one-line refusals, the ONNX tile runner of
each engine, and its agreement with the torch path on a real case (labels >= 99.5 % equal, Dice change <=
0.002)."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

from autoseg.errors import AutosegError
from autoseg.inference.backends import check_backend
from autoseg.settings import InferenceSettings, SettingError
from tests.test_bad_input import _error_line, _run

CPU = torch.device("cpu")


def test_an_unknown_backend_is_refused_in_one_line_before_anything_runs(capfd, tmp_path):
    assert InferenceSettings().backend == "torch"
    with pytest.raises(SettingError):
        InferenceSettings(backend="tensorrt")
    code, _, err = _run(
        capfd, "predict", tmp_path / "w", tmp_path / "in", tmp_path / "out", "--backend", "tvm"
    )
    line = _error_line(code, err)
    assert "--backend" in line and "tvm" in line and "torch, onnxruntime or openvino" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("engine, extra", [("onnxruntime", "onnx"), ("openvino", "openvino")])
def test_a_missing_engine_is_one_clear_line(monkeypatch, capfd, phantom_dataset, tmp_path, engine, extra):
    monkeypatch.setitem(sys.modules, engine, None)  # `import <engine>` now raises ImportError
    with pytest.raises(AutosegError, match=rf"needs the {engine} package: pip install 'autoseg\[{extra}\]'"):
        check_backend(engine, CPU)
    check_backend("torch", CPU)  # torch needs nothing more
    args = ["predict", tmp_path / "w", phantom_dataset / "imagesTr", tmp_path / "out", "--device", "cpu"]
    code, _, err = _run(capfd, *args, "--backend", engine)
    assert f"pip install 'autoseg[{extra}]'" in _error_line(code, err)
    assert not (tmp_path / "out").exists()


def test_onnxruntime_runs_on_the_cpu_only():
    pytest.importorskip("onnxruntime")
    with pytest.raises(AutosegError, match="--backend onnxruntime runs on the CPU only"):
        check_backend("onnxruntime", torch.device("cuda"))


def test_inference_imports_no_engine_for_the_torch_backend():
    import subprocess

    engines = "{'onnxruntime', 'openvino'}"
    code = f"import sys, autoseg.inference.predictor, autoseg.api; print({engines} & set(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "set()"


class _DeepSupervised(torch.nn.Module):
    """A small 3D conv net that answers, like a deep-supervision network in training mode, with a list:
    full-resolution logits first, then a coarser output that must not be exported."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(
            torch.nn.Conv3d(2, 8, 3, padding=1),
            torch.nn.InstanceNorm3d(8, affine=True),
            torch.nn.LeakyReLU(0.01),
            torch.nn.Conv3d(8, 3, 1),
        )

    def forward(self, x):
        y = self.body(x)
        return [y, torch.nn.functional.avg_pool3d(y, 2)]


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_the_onnx_runner_gives_the_torch_logits_for_any_batch_up_to_its_own(engine):
    pytest.importorskip(engine)
    pytest.importorskip("onnx")
    from autoseg.inference.backends import OnnxRunner

    net = _DeepSupervised().eval()
    runner = OnnxRunner(net, (3, 2, 8, 12, 16), threads=1, engine=engine)
    x = torch.randn(3, 2, 8, 12, 16)
    with torch.no_grad():
        ref = net(x)[0]
    for n in (3, 1, 2):  # a last batch smaller than the exported one is topped up and cut back
        out = runner(x[:n])
        assert out.shape == (n, 3, 8, 12, 16) and out.dtype == torch.float32
        torch.testing.assert_close(out, ref[:n], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="do not fit the exported shape"):
        runner(torch.randn(4, 2, 8, 12, 16))


# ---- agreement on real data


def _real_case() -> np.ndarray:
    """The first SpinalCordTiny image ``(1, Z, Y, X)``, z-scored (its own mean and std)."""
    from autoseg.io.volume import read_volume
    from tests.conftest import real_dataset

    folder = real_dataset("Dataset003_SpinalCordTiny")
    first = sorted((folder / "imagesTr").glob("*_0000.nii.gz"))[0]
    raw = read_volume(first).array.astype(np.float32)
    return ((raw - raw.mean()) / raw.std()).astype(np.float32)[None]


def _unet() -> torch.nn.Module:
    """A narrow planner-style 3D U-Net (instance norm, leaky ReLU, strided and transposed convolutions,
    skip concatenations), deterministically initialised, in eval mode."""
    from autoseg.networks import build_network
    from autoseg.planning.network_topology import NetworkTopology

    torch.manual_seed(0)
    topo = NetworkTopology("unet", 3, [[1, 1, 1], [1, 2, 2], [2, 2, 2]], [[3, 3, 3]] * 3, [4, 8, 16])
    return build_network(topo, 1, 2).eval()


class _Threshold(torch.nn.Module):
    """A confident smooth "segmenter": foreground where the 3x3x3 mean intensity exceeds ``threshold``. Every
    voxel of its own reference lies at the decision boundary: the worst case for any rounding."""

    def __init__(self, threshold: float):
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 1, 3, padding=1, bias=False)
        torch.nn.init.constant_(self.conv.weight, 1 / 27)
        self.threshold = threshold

    def forward(self, x):
        fg = 8 * (self.conv(x) - self.threshold)
        return torch.cat([-fg, fg], 1)


@pytest.mark.realdata
@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_each_engine_agrees_with_torch_on_a_real_case(engine):
    """A real spinal-cord volume through the same weights in torch and in ``engine`` (tiles of 16x64x64 in
    batches of 3, the last of its 16 tiles alone, topped up): labels >= 99.5 % equal, Dice change <= 0.002."""
    pytest.importorskip(engine)
    pytest.importorskip("onnx")
    from autoseg.inference.backends import OnnxRunner
    from autoseg.inference.runner import TileRunner
    from autoseg.inference.sliding_window import predict_sliding_window
    from tests.inference.test_speed_levers import _agreement

    image = _real_case()
    patch = [16, 64, 64]
    cut = float(np.percentile(image[0], 90))
    seg = (image[0] > cut).astype(np.int16)  # the threshold network's own answer, up to its smoothing
    for net in (_Threshold(cut), _unet()):
        ref = predict_sliding_window(TileRunner(net, CPU, "off"), image, patch, 2, CPU, tile_batch=3)
        runner = OnnxRunner(net, (3, 1, *patch), torch.get_num_threads(), engine)
        other = predict_sliding_window(runner, image, patch, 2, CPU, tile_batch=3)
        same, dice_change = _agreement(ref, other, seg, [[1]])
        assert same >= 0.995 and dice_change <= 0.002, (type(net).__name__, same, dice_change)
        assert np.abs(ref - other).max() < 1e-3  # float32 in both: rounding, not another answer


def _architectures():
    from autoseg.networks.registry import ARCHITECTURES

    # swin_unetr only exports through the dynamo exporter (tens of seconds)
    return [pytest.param(a, marks=pytest.mark.slow) if a == "swin_unetr" else a for a in ARCHITECTURES]


@pytest.mark.parametrize("arch", _architectures())
def test_every_architecture_exports_at_its_tile_batch_and_agrees(arch):
    """Each registered network, built small, gives through ONNX Runtime the torch logits, for a full and a
    short last batch."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from autoseg.inference.backends import OnnxRunner
    from autoseg.networks import build_network
    from autoseg.planning.network_topology import NetworkTopology

    torch.manual_seed(0)
    topo = NetworkTopology(arch, 3, [[1, 1, 1]] + [[2, 2, 2]] * 3, [[3, 3, 3]] * 4, [4, 8, 16, 32])
    net = build_network(topo, 2, 3).eval()
    x = torch.randn(2, 2, 32, 32, 32)
    with torch.no_grad():
        ref = net(x)
    runner = OnnxRunner(net, (2, 2, 32, 32, 32), threads=1)
    torch.testing.assert_close(runner(x), ref, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(runner(x[1:]), ref[1:], rtol=1e-3, atol=1e-4)


def test_the_export_cache_reuses_a_fold_export_and_recovers_from_a_broken_file(tmp_path, caplog):
    """cache=FOLDER: the first runner exports into it, a second one with the same network and tile loads the
    file without exporting; other weights or another tile shape are another key; a truncated cached file is
    exported again (one warning); only the most recently used files are kept."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from autoseg.inference import backends
    from autoseg.inference.backends import OnnxRunner, export_key

    net = _DeepSupervised().eval()
    tile = (1, 2, 8, 12, 16)
    x = torch.randn(*tile)
    first = OnnxRunner(net, tile, threads=1, cache=tmp_path, description="topology A")
    assert not first.cached
    (cached,) = tmp_path.glob("*.onnx")
    assert cached.name == f"{export_key(net, tile, 'topology A')}.onnx"
    second = OnnxRunner(net, tile, threads=1, cache=tmp_path, description="topology A")
    assert second.cached
    torch.testing.assert_close(second(x), first(x))
    other = _DeepSupervised().eval()
    with torch.no_grad():
        other.body[0].weight.add_(0.01)
    keys = {
        export_key(other, tile, "topology A"),
        export_key(net, (2, *tile[1:]), "topology A"),
        export_key(net, tile, "topology B"),
    }
    assert len(keys | {export_key(net, tile, "topology A")}) == 4
    cached.write_bytes(cached.read_bytes()[:100])  # truncated
    with caplog.at_level("WARNING", logger="autoseg"):
        third = OnnxRunner(net, tile, threads=1, cache=tmp_path, description="topology A")
    assert not third.cached and "not loadable" in caplog.text
    torch.testing.assert_close(third(x), first(x))
    for k in range(3):  # older files beyond the limit are deleted, the newest kept
        (tmp_path / f"old{k}.onnx").write_bytes(b"x")
        os.utime(tmp_path / f"old{k}.onnx", (k, k))
    backends._prune(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.glob("*.onnx")) == sorted([cached.name, "old2.onnx"])


def test_a_read_only_export_cache_still_serves_its_files(tmp_path, caplog, monkeypatch):
    """A shared cache the user may read but not touch: the cached model is used as it is (no 'not loadable'
    warning, no second export); a file that vanishes while the folder is pruned is not an error."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from autoseg.inference import backends
    from autoseg.inference.backends import OnnxRunner

    net = _DeepSupervised().eval()
    tile = (1, 2, 8, 12, 16)
    OnnxRunner(net, tile, threads=1, cache=tmp_path)

    def refuse(*_args, **_kwargs):
        raise PermissionError("read-only")

    monkeypatch.setattr(backends.os, "utime", refuse)
    monkeypatch.setattr(backends, "write_onnx", lambda *a, **k: pytest.fail("exported again"))
    caplog.clear()
    with caplog.at_level("WARNING", logger="autoseg"):
        again = OnnxRunner(net, tile, threads=1, cache=tmp_path)
    assert again.cached and [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == []
    monkeypatch.undo()
    gone = tmp_path / "gone.onnx"
    gone.write_bytes(b"x")
    real_stat = type(gone).stat

    def vanishing(path, *args, **kwargs):
        if path.name == "gone.onnx":
            raise FileNotFoundError(path)
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(type(gone), "stat", vanishing)
    backends._prune(tmp_path, keep=1)  # no FileNotFoundError
