"""TileRunner: when it compiles, that compiling changes nothing but rounding, and that a failure falls back."""

from __future__ import annotations

import logging
import shutil
import time

import numpy as np
import pytest
import torch

from autoseg.inference import runner as runner_mod
from autoseg.inference.runner import TileRunner
from autoseg.inference.sliding_window import predict_sliding_window
from autoseg.networks import build_network
from autoseg.planning.plans import NetworkTopology
from autoseg.settings import InferenceSettings, load_settings

CPU = torch.device("cpu")


def _unet(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    topo = NetworkTopology(
        architecture="unet",
        dim=3,
        strides=[[1, 1, 1], [2, 2, 2], [1, 2, 2]],
        kernel_sizes=[[3, 3, 3]] * 3,
        features_per_stage=[4, 8, 16],
        n_conv_per_stage=2,
        deep_supervision=True,
    )
    return build_network(topo, 2, 3).eval()


class FakeCompile:
    """Stands in for torch.compile: records what it was given and runs the module eagerly (or raises)."""

    def __init__(self, fail: bool = False):
        self.fail, self.compiled, self.shapes = fail, [], []

    def __call__(self, module, **kwargs):
        self.compiled.append(module)

        def run(x):
            if self.fail:
                raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore detail")
            self.shapes.append(tuple(x.shape))
            return module(x)

        return run


class Slow(torch.nn.Module):
    """A 'network' whose every pass takes ``seconds``: two logits from the first channel."""

    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds

    def forward(self, x):
        time.sleep(self.seconds)
        return torch.cat([-x[:, :1], x[:, :1]], dim=1)


def test_auto_compiles_once_the_network_time_ahead_exceeds_the_threshold(monkeypatch):
    fake = FakeCompile()
    monkeypatch.setattr(torch, "compile", fake)
    monkeypatch.setattr(runner_mod, "COMPILE_AFTER_SECONDS", 1.0)
    r = TileRunner(Slow(0.05), CPU, "auto")
    x = torch.zeros(1, 1, 2, 2, 2)
    r.expect(5)  # nothing measured yet: no guess, no compile
    assert not r.is_compiled
    r(x)  # 0.05 s spent + 4 passes × 0.05 s ahead < 1 s: not worth it
    assert not r.is_compiled and r.eager_passes == 1
    r.expect(100)  # ~5 s ahead: compile now
    assert r.is_compiled and len(fake.compiled) == 1
    r(x)
    assert r.eager_passes == 1 and fake.shapes == [(1, 1, 2, 2, 2)]


def test_auto_decides_after_the_first_pass_of_a_large_volume(monkeypatch):
    fake = FakeCompile()
    monkeypatch.setattr(torch, "compile", fake)
    monkeypatch.setattr(runner_mod, "COMPILE_AFTER_SECONDS", 1.0)
    r = TileRunner(Slow(0.05), CPU, "auto")
    r.expect(100)
    r(torch.zeros(1, 1, 2, 2, 2))
    assert r.is_compiled and r.eager_passes == 1


def test_auto_compiles_after_enough_eager_time_even_without_a_forecast(monkeypatch):
    fake = FakeCompile()
    monkeypatch.setattr(torch, "compile", fake)
    monkeypatch.setattr(runner_mod, "COMPILE_AFTER_SECONDS", 0.25)
    r = TileRunner(Slow(0.1), CPU, "auto")
    for _ in range(3):
        r(torch.zeros(1, 1, 2, 2, 2))
    assert r.is_compiled and r.eager_passes == 3


@pytest.mark.parametrize("mode", ["off", "auto"])
def test_off_never_compiles_and_auto_not_for_small_work(monkeypatch, mode):
    fake = FakeCompile()
    monkeypatch.setattr(torch, "compile", fake)
    r = TileRunner(Slow(0.0), CPU, mode)
    r.expect(1000)
    for _ in range(5):
        r(torch.zeros(1, 1, 2, 2, 2))
    r.expect(1000)
    assert not r.is_compiled and fake.compiled == []


def test_mps_is_never_compiled():
    assert TileRunner(Slow(0.0), torch.device("mps"), "on").mode == "off"


def test_a_failing_compile_warns_once_and_predicts_the_same_eagerly(monkeypatch, caplog):
    monkeypatch.setattr(torch, "compile", FakeCompile(fail=True))
    net = _unet()
    image = np.random.default_rng(0).normal(size=(2, 12, 20, 20)).astype(np.float32)
    eager = predict_sliding_window(net, image, [8, 16, 16], 3, CPU, mirror_axes=(0, 1, 2))
    with caplog.at_level(logging.WARNING, logger="autoseg"):
        got = predict_sliding_window(
            TileRunner(net, CPU, "on"), image, [8, 16, 16], 3, CPU, mirror_axes=(0, 1, 2)
        )
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "torch.compile failed (RuntimeError: InvalidCxxCompiler: No working C++ compiler found); "
        "predicting without it"
    ]
    np.testing.assert_allclose(got, eager, atol=1e-6)


def test_a_runner_that_may_compile_only_ever_sees_full_batches(monkeypatch):
    fake = FakeCompile()
    monkeypatch.setattr(torch, "compile", fake)
    net = _unet()
    image = np.random.default_rng(1).normal(size=(2, 8, 40, 16)).astype(np.float32)  # 3 tiles along Y
    plain = predict_sliding_window(net, image, [8, 16, 16], 3, CPU, tile_batch=2)
    got = predict_sliding_window(TileRunner(net, CPU, "on"), image, [8, 16, 16], 3, CPU, tile_batch=2)
    assert fake.shapes == [(2, 2, 8, 16, 16)] * 2  # 3 tiles → two passes of 2 (the last topped up)
    np.testing.assert_allclose(got, plain, atol=1e-6)


@pytest.mark.slow  # ~30 s on 2 cores (TorchInductor compiles the network); the fake-compile tests stay in CI
@pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None,
    reason="torch.compile on CPU needs a C++ compiler (c++/g++), and there is none on PATH",
)
def test_compiled_network_gives_the_eager_probabilities():
    """The real thing: TorchInductor with frozen weights on a small 3D U-Net, mirroring on."""
    net = _unet(seed=3)
    image = np.random.default_rng(2).normal(size=(2, 14, 24, 20)).astype(np.float32)
    eager = predict_sliding_window(net, image, [8, 16, 16], 3, CPU, mirror_axes=(0, 1, 2))
    r = TileRunner(_unet(seed=3), CPU, "on")
    got = predict_sliding_window(r, image, [8, 16, 16], 3, CPU, mirror_axes=(0, 1, 2))
    assert r.is_compiled
    np.testing.assert_allclose(got, eager, atol=1e-4)
    assert (got.argmax(0) == eager.argmax(0)).mean() > 0.999


def test_compile_setting_accepts_toml_booleans_and_rejects_others(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text("[inference]\ncompile = false\n[train]\ncompile = true\n")
    train, infer = load_settings(f)
    assert infer.compile == "off" and train.compile is True
    _, infer = load_settings(f, compile=False)  # the command-line override is training's
    assert infer.compile == "off"
    with pytest.raises(Exception, match="compile = 'sometimes': must be auto, on or off"):
        InferenceSettings(compile="sometimes")


@pytest.mark.skipif(runner_mod.HEAP.libc is None, reason="the heap policy needs Linux with glibc")
def test_cpu_passes_reuse_their_freed_pages_and_give_them_back():
    """With heap reuse, a pass's 64 MB activations come from pages the previous pass freed (few page faults);
    without it every pass maps and faults them in anew. Same logits either way; release() hands memory back."""
    import resource

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv3d(1, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv3d(16, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv3d(16, 2, 1),
    )
    x = torch.randn(1, 1, 64, 128, 128)  # each 16-channel activation: 64 MB, above glibc's mmap threshold

    def faults_per_pass(reuse: bool) -> tuple[float, torch.Tensor]:
        run = TileRunner(net, CPU, "off", reuse_heap=reuse)
        with torch.inference_mode():
            out = run(x)  # warm-up: the heap grows once
            start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(3):
                out = run(x)
            faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start) / 3
        runner_mod.HEAP.release()
        return faults, out

    try:
        fresh, out_fresh = faults_per_pass(False)
        reused, out_reused = faults_per_pass(True)
    finally:
        runner_mod.HEAP.release()
    assert fresh > 2 * 64 * 2**20 / 4096  # at least two activations faulted in per pass without reuse
    assert reused < fresh / 4, (reused, fresh)
    torch.testing.assert_close(out_reused, out_fresh, rtol=0, atol=0)
    assert not runner_mod.HEAP._holding and runner_mod.HEAP._passes == 0


@pytest.mark.skipif(runner_mod.HEAP.libc is None, reason="the heap policy needs Linux with glibc")
def test_sliding_window_hands_the_kept_memory_back_when_done_or_abandoned():
    """Any caller of the window, a bare network included, ends with the heap policy released."""
    from autoseg.inference.sliding_window import probability_slabs

    net, image = _unet(), np.random.default_rng(0).normal(size=(2, 24, 40, 40)).astype(np.float32)
    args = dict(patch_size=[16, 32, 32], num_classes=3, device=CPU, tile_batch=1)
    predict_sliding_window(net, image, **args)
    assert not runner_mod.HEAP._holding
    slabs = probability_slabs(net, image, **args)
    next(slabs)
    assert runner_mod.HEAP._holding  # passes ran, their memory is kept for the next ones
    slabs.close()
    assert not runner_mod.HEAP._holding


def test_tiles_per_pass_defaults_by_device_and_honours_a_set_batch():
    assert InferenceSettings().tiles_per_pass("cuda") == 2
    assert InferenceSettings().tiles_per_pass("cpu") == 1
    assert InferenceSettings().tiles_per_pass("mps") == 1
    assert InferenceSettings(tile_batch=3).tiles_per_pass("cuda") == 3
