"""Prediction at full strength on a tiny trained phantom model: inputs (files, 4D), configuration ensembles,
saved probabilities, find-best's instructions applied, and portable model bundles (including hostile ones)."""

from __future__ import annotations

import hashlib
import json
import shutil
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from autoseg import api
from autoseg.api import train_and_validate
from autoseg.bundle import import_model
from autoseg.cli import main
from autoseg.errors import AutosegError, PlansError
from autoseg.layout import WorkDir
from autoseg.postprocessing import Postprocessing
from autoseg.settings import InferenceSettings, TrainSettings

# six steps: PyTorch's initialisation (no output prior) so the label maps the export tests compare are not all
# background yet
TINY = TrainSettings(epochs=2, iters_per_epoch=3, val_iters=1, seed=5, loader_workers=0, output_prior=False)
FAST = dict(device="cpu", settings=InferenceSettings(mirroring=False))


@pytest.fixture(scope="module")
def trained(planned_phantom, tmp_path_factory) -> WorkDir:
    """fold 0 of 2d and 3d_fullres, trained for a few iterations (enough for non-trivial outputs)."""
    root = tmp_path_factory.mktemp("trained") / "work"
    shutil.copytree(planned_phantom.root, root, ignore=shutil.ignore_patterns("results"))
    work = WorkDir(root)
    for config in ("2d", "3d_fullres"):
        train_and_validate(
            work, config, 0, TINY, torch.device("cpu"), inference=InferenceSettings(mirroring=False)
        )
    return work


@pytest.fixture(scope="module")
def one_case(phantom_dataset, tmp_path_factory) -> Path:
    """A folder with the two channel files of one phantom case."""
    src = phantom_dataset / "imagesTr"
    case = sorted(p.name[: -len("_0000.nii.gz")] for p in src.glob("*_0000.nii.gz"))[1]
    folder = tmp_path_factory.mktemp("input")
    for f in src.glob(f"{case}_000*.nii.gz"):
        shutil.copy(f, folder / f.name)
    return folder


def _labels(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_file_list_and_4d_input_give_the_folder_result(trained, one_case, tmp_path):
    ref = api.predict(trained.root, one_case, tmp_path / "a", configs=["3d_fullres"], **FAST)
    files = sorted(one_case.iterdir())
    from_files = api.predict(trained.root, files, tmp_path / "b", configs=["3d_fullres"], **FAST)
    # MSD style: the two channels in the 4th dimension of one file named after the case
    channels = [sitk.ReadImage(str(f)) for f in files]
    four_d = sitk.JoinSeries(channels)
    case = files[0].name[: -len("_0000.nii.gz")]
    path_4d = tmp_path / f"{case}.nii.gz"
    sitk.WriteImage(four_d, str(path_4d))
    from_4d = api.predict(trained.root, path_4d, tmp_path / "c", configs=["3d_fullres"], **FAST)
    assert [p.name for p in ref] == [p.name for p in from_files] == [p.name for p in from_4d]
    np.testing.assert_array_equal(_labels(ref[0]), _labels(from_files[0]))
    np.testing.assert_array_equal(_labels(ref[0]), _labels(from_4d[0]))
    out = sitk.ReadImage(str(from_4d[0]))
    assert out.GetSize() == channels[0].GetSize() and out.GetSpacing() == channels[0].GetSpacing()


def test_configuration_ensemble_averages_saved_probabilities(trained, one_case, tmp_path):
    outs = {}
    for name, configs in {"2d": ["2d"], "3d": ["3d_fullres"], "both": ["2d", "3d_fullres"]}.items():
        (written,) = api.predict(
            trained.root, one_case, tmp_path / name, configs=configs, save_probabilities=True, **FAST
        )
        with np.load(written.with_name(written.name.replace(".nii.gz", ".npz"))) as z:
            outs[name] = (z["probabilities"].astype(np.float32), _labels(written))
    p2d, p3d = outs["2d"][0], outs["3d"][0]
    assert p2d.shape == (3, *outs["2d"][1].shape)
    np.testing.assert_allclose(outs["both"][0], (p2d + p3d) / 2, atol=2e-3)
    # each label map is the argmax of its saved probabilities (float16: a few near-ties may flip)
    for probs, labels in (outs["2d"], outs["3d"], outs["both"]):
        assert (probs.argmax(0) == labels).mean() > 0.999


def test_find_best_instructions_choose_configs_and_postprocessing(trained, one_case, tmp_path, caplog):
    """Without -c, predict uses inference_instructions.json: its configurations and its postprocessing."""
    work = WorkDir(tmp_path / "work")
    shutil.copytree(trained.root, work.root)
    instructions = {
        "schema_version": 1,
        "best": "2d",
        "configs": ["2d"],
        "folds": [0],
        "postprocessing": Postprocessing(keep_largest_foreground=True).to_json(),
        "mean_dice": 0.5,
        "mean_dice_postprocessed": 0.6,
        "scores": {},
        "skipped": [],
        "predict": "",
        "dataset_hash": "",
    }
    work.inference_instructions.write_text(json.dumps(instructions))
    with caplog.at_level("INFO", logger="autoseg"):
        (chosen,) = api.predict(work.root, one_case, tmp_path / "chosen", **FAST)
    assert "with 2d; postprocessing: {'keep_largest_foreground': True" in caplog.text
    (raw,) = api.predict(work.root, one_case, tmp_path / "raw", postprocessing=False, **FAST)
    (plain2d,) = api.predict(
        work.root, one_case, tmp_path / "plain", configs=["2d"], postprocessing=False, **FAST
    )
    np.testing.assert_array_equal(_labels(raw), _labels(plain2d))
    from scipy import ndimage

    seg = _labels(chosen)
    assert ndimage.label(seg > 0, structure=np.ones((3, 3, 3)))[1] <= 1
    assert np.isin(seg, [0, *np.unique(_labels(raw))]).all()
    assert ((seg > 0) <= (_labels(raw) > 0)).all()  # postprocessing only removes


def test_bundle_predicts_identically_after_import(trained, one_case, tmp_path, capsys):
    bundle = tmp_path / "model.zip"
    assert main(["export-model", str(trained.root), str(bundle), "-c", "3d_fullres"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["export-model", str(trained.root), str(bundle)]) == 2  # exists: refused without --overwrite
    with zipfile.ZipFile(bundle) as zf:
        names = set(zf.namelist())
        ckpt_bytes = zf.read("results/3d_fullres/fold_0/checkpoint_final.pt")
    assert names == {
        "manifest.json",
        "plans.json",
        "dataset.json",
        "model_card.json",
        "MODEL_CARD.md",
        "results/3d_fullres/fold_0/checkpoint_final.pt",
    }
    (tmp_path / "ck.pt").write_bytes(ckpt_bytes)
    assert "optimizer" not in torch.load(tmp_path / "ck.pt", weights_only=True)

    fresh = import_model(bundle, tmp_path / "fresh")
    a = api.predict(trained.root, one_case, tmp_path / "orig", configs=["3d_fullres"], **FAST)
    b = api.predict(fresh.root, one_case, tmp_path / "imported", configs=["3d_fullres"], **FAST)
    c_code = main(
        ["predict", "--model", str(bundle), str(one_case), str(tmp_path / "direct"), "-c", "3d_fullres"]
        + ["--device", "cpu", "--no-mirroring"]
    )
    assert c_code == 0
    c = sorted((tmp_path / "direct").glob("*.nii.gz"))
    for x, y, z in zip(a, b, c):
        np.testing.assert_array_equal(_labels(x), _labels(y))
        np.testing.assert_array_equal(_labels(x), _labels(z))


def _hostile(
    tmp_path: Path, name: str, members: dict[str, bytes], listed: dict[str, bytes] | None = None, link=None
):
    """A bundle whose manifest lists ``listed`` (default: members) with correct checksums."""
    listed = members if listed is None else listed
    manifest = {
        "schema_version": 1,
        "autoseg_version": "0",
        "configs": [],
        "folds": {},
        "files": {k: hashlib.sha256(v).hexdigest() for k, v in listed.items()},
    }
    path = tmp_path / name
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("manifest.json", json.dumps(manifest))
        for k, v in members.items():
            zf.writestr(k, v)
        if link:
            info = zipfile.ZipInfo(link)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, "/etc/passwd")
    return path


@pytest.mark.parametrize(
    "members, expected",
    [
        ({"../evil.txt": b"x"}, "escapes the target folder"),
        ({"results/../../evil.txt": b"x"}, "escapes the target folder"),
        ({"/tmp/evil.txt": b"x"}, "absolute or Windows path"),
        ({"C:/evil.txt": b"x"}, "absolute or Windows path"),
        ({"sub\\..\\..\\evil.txt": b"x"}, "absolute or Windows path"),
    ],
)
def test_bundle_members_that_escape_are_refused(tmp_path, members, expected):
    bundle = _hostile(tmp_path, "bad.zip", members)
    with pytest.raises(PlansError, match=expected):
        import_model(bundle, tmp_path / "target" / "work")
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "target").exists()


def test_bundle_links_unlisted_files_and_bad_checksums_are_refused(trained, tmp_path):
    with pytest.raises(PlansError, match="is a link"):
        import_model(_hostile(tmp_path, "link.zip", {}, link="plans.json"), tmp_path / "w1")
    with pytest.raises(PlansError, match="not listed in the manifest"):
        import_model(_hostile(tmp_path, "extra.zip", {"plans.json": b"{}"}, listed={}), tmp_path / "w2")
    with pytest.raises(PlansError, match="does not match its checksum"):
        members = {"plans.json": b"{}", "dataset.json": b"{}"}
        import_model(
            _hostile(tmp_path, "sum.zip", members, listed={**members, "plans.json": b"[]"}), tmp_path / "w3"
        )
    with pytest.raises(PlansError, match="no manifest.json"):
        path = tmp_path / "plain.zip"
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("plans.json", "{}")
        import_model(path, tmp_path / "w4")
    # a checkpoint whose network does not match the bundled plans is refused before any use
    good = tmp_path / "good.zip"
    api.export_model(trained.root, good, ["3d_fullres"])
    with zipfile.ZipFile(good) as zf:
        members = {n: zf.read(n) for n in zf.namelist() if n != "manifest.json"}
    plans = json.loads(members["plans.json"])
    plans["configurations"]["3d_fullres"]["network"]["features_per_stage"][0] += 1
    members["plans.json"] = json.dumps(plans).encode()
    with pytest.raises(AutosegError, match="does not match the plans"):
        import_model(_hostile(tmp_path, "mismatch.zip", members), tmp_path / "w5")
    assert not any((tmp_path / f"w{i}").exists() for i in range(1, 6))
    assert not list(tmp_path.glob(".w*"))  # no staging folder left behind


def test_torchscript_export_gives_the_same_logits(trained, tmp_path, capsys):
    from autoseg.inference.deploy import load_fold_network

    path = tmp_path / "net.pt"
    assert main(["export-network", str(trained.root), "3d_fullres", "0", str(path)]) == 0
    network, patch, in_ch = load_fold_network(trained, "3d_fullres", 0)
    x = torch.randn(2, in_ch, *patch, generator=torch.Generator().manual_seed(0))
    loaded = torch.jit.load(str(path))
    with torch.no_grad():
        expected, got = network(x), loaded(x)
    assert got.shape == (2, 3, *patch)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (
        main(["export-network", str(trained.root), "3d_fullres", "0", str(path), "--format", "tflite"]) == 2
    )
    assert "unknown export format 'tflite'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "config",
    [pytest.param("2d", marks=pytest.mark.slow), "3d_fullres"],  # 2d: the same path, 25 s more
)
def test_slab_by_slab_export_gives_the_whole_volume_labels(trained, phantom_dataset, tmp_path, config):
    """With the size limit at 0 every case is exported slab by slab as the window finishes it; the label maps
    (mirroring on, resampled back to each case's own spacing) equal the whole-volume export's."""
    kwargs = dict(configs=[config], device="cpu")
    whole = api.predict(
        trained.root, phantom_dataset / "imagesTr", tmp_path / "whole",
        settings=InferenceSettings(mirror_axes=(0, 1)), **kwargs,
    )  # fmt: skip
    slabs = api.predict(
        trained.root, phantom_dataset / "imagesTr", tmp_path / "slabs",
        settings=InferenceSettings(mirror_axes=(0, 1), slab_export_gb=0), **kwargs,
    )  # fmt: skip
    assert [p.name for p in whole] == [p.name for p in slabs] and len(whole) >= 3
    for a, b in zip(whole, slabs):
        ra, rb = sitk.ReadImage(str(a)), sitk.ReadImage(str(b))
        assert ra.GetSpacing() == rb.GetSpacing() and ra.GetOrigin() == rb.GetOrigin()
        la, lb = sitk.GetArrayFromImage(ra), sitk.GetArrayFromImage(rb)
        assert len(np.unique(la)) > 1  # a real label map, not all background
        assert (la == lb).mean() > 0.9999, a.name


def test_onnx_export_gives_the_same_logits_in_onnxruntime(trained, tmp_path):
    """ONNX export, run by an independent runtime (onnxruntime), at batch 1 and 2 (the batch axis is dynamic)."""
    pytest.importorskip("onnx", reason="ONNX export needs the onnx package (dev extra)")
    pytest.importorskip("onnxscript", reason="torch's ONNX exporter needs onnxscript (dev extra)")
    ort = pytest.importorskip("onnxruntime", reason="the check runs the model in onnxruntime (dev extra)")
    from autoseg.inference.deploy import load_fold_network

    path = tmp_path / "net.onnx"
    assert main(["export-network", str(trained.root), "3d_fullres", "0", str(path), "--format", "onnx"]) == 0
    assert not [p for p in tmp_path.iterdir() if p.name != "net.onnx"]  # no temporary file left
    network, patch, in_ch = load_fold_network(trained, "3d_fullres", 0)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    for batch in (1, 2):
        x = torch.randn(batch, in_ch, *patch, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            expected = network(x).numpy()
        (got,) = session.run(["logits"], {"image": x.numpy()})
        assert got.shape == (batch, 3, *patch)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
@pytest.mark.parametrize("config", ["2d", "3d_fullres"])
def test_predict_with_an_onnx_engine_writes_the_torch_labels(
    trained, one_case, tmp_path, capfd, config, engine
):
    """``predict --backend`` end to end (the fold's network exported at the tile batch, mirrored tiles, a 2D
    network's slices): the same label file as torch, and nothing written into WORK or beside the inputs; a
    second run loads the export from the cache folder and writes the same labels."""
    pytest.importorskip(engine)
    pytest.importorskip("onnx")
    before = sorted(p.relative_to(trained.root) for p in trained.root.rglob("*"))
    inputs = sorted(one_case.iterdir())
    outs = {}
    cache = tmp_path / "export_cache"
    for backend in ("torch", engine, "again"):
        out = tmp_path / backend
        args = ["predict", str(trained.root), str(one_case), str(out), "-c", config, "--device", "cpu"]
        used = engine if backend == "again" else backend
        assert main([*args, "--backend", used, "--mirror-axes", "0,1", "--export-cache", str(cache)]) == 0
        (outs[backend],) = sorted(out.glob("*.nii.gz"))
        err = capfd.readouterr().err
        assert (f"loaded in {engine}" in err) == (backend != "torch")  # it ran the engine
        # the second engine run takes the fold's network from the export cache instead of exporting it
        assert ("taken from the export cache" in err) == (backend == "again")
    assert len(list(cache.glob("*.onnx"))) == 1 and not list(cache.glob("*.tmp"))
    assert (_labels(outs["again"]) == _labels(outs[engine])).all()
    ref, got = _labels(outs["torch"]), _labels(outs[engine])
    assert (ref > 0).any()  # trained enough to segment something
    assert (ref == got).mean() >= 0.995
    assert sorted(p.relative_to(trained.root) for p in trained.root.rglob("*")) == before
    assert sorted(one_case.iterdir()) == inputs


def test_predict_killed_then_continue_gives_the_uninterrupted_outputs(trained, phantom_dataset, tmp_path):
    """SIGKILL during a prediction of six cases leaves only complete outputs (atomic writes); --continue
    then writes the rest, and every file equals an uninterrupted run's."""
    import os
    import random
    import signal
    import subprocess
    import sys
    import time

    inputs = tmp_path / "inputs"
    shutil.copytree(phantom_dataset / "imagesTr", inputs)
    straight = api.predict(trained.root, inputs, tmp_path / "straight", configs=["3d_fullres"], **FAST)
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "autoseg", "predict", str(trained.root), str(inputs), str(out)]
    cmd += ["-c", "3d_fullres", "--device", "cpu", "--no-mirroring"]
    proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)

    def written():  # final names only: pathlib's glob also matches the hidden temp file of a write in flight
        return sorted(f for f in out.glob("*.nii.gz") if not f.name.startswith("."))

    wanted = random.randint(1, 3)
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline and len(written()) < wanted:
        time.sleep(0.02)
    time.sleep(random.uniform(0, 0.5))
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = written()
    assert 0 < len(partial) <= len(straight) and proc.returncode in (-signal.SIGKILL, 0)
    for f in partial:  # whatever is there under its final name is complete
        np.testing.assert_array_equal(_labels(f), _labels(tmp_path / "straight" / f.name))
    subprocess.run(cmd + ["--continue"], check=True, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in straight)  # no temp file left
    for f in straight:
        np.testing.assert_array_equal(_labels(out / f.name), _labels(f))
