"""Augmentation additions of issue 17: elastic deformation, 90° rotations and transposes among axes of similar
spacing, their settings. Every batch here is small and built by hand so the expected result is known."""

from __future__ import annotations

import random
from itertools import permutations
from pathlib import Path

import numpy as np
import pytest

from autoseg.cli import main
from autoseg.errors import AutosegError
from autoseg.planning.plans import Plans
from autoseg.settings import AugmentationSettings, TrainSettings, load_settings
from autoseg.training.augmentation import (
    InPlaneElasticTransform,
    augmentation_patch_size,
    axis_augmentation_note,
    build_train_transforms,
    interchangeable_axes,
)
from autoseg.training.dataloader import BatchMaker, LoaderSpec

ISO = (1.0, 1.0, 1.0)
ANISO = (3.0, 0.5, 0.5)
TODAY = [  # the pipeline before issue 17, in order
    "SpatialTransform",
    "GaussianNoiseTransform",
    "GaussianBlurTransform",
    "BrightnessMultiplicativeTransform",
    "ContrastAugmentationTransform",
    "SimulateLowResolutionTransform",
    "GammaTransform",
    "GammaTransform",
    "MirrorTransform",
]
OFF = dict(
    p_rotation=0.0, p_scale=0.0, p_noise=0.0, p_blur=0.0, p_brightness=0.0, p_contrast=0.0, p_lowres=0.0,
    p_gamma=0.0, p_gamma_inverted=0.0, p_mirror=0.0,
)  # fmt: skip
"""Every existing transform off: the pipeline is a centre crop (here of a batch already at the patch size)."""


@pytest.mark.parametrize(
    "spacing, patch, axes",
    [
        (ISO, (64, 64, 64), (0, 1, 2)),  # isotropic cube: every axis
        (ANISO, (16, 160, 160), (1, 2)),  # thick slices: in-plane only (3.0 / 0.5 = 6)
        (ISO, (64, 96, 96), (1, 2)),  # isotropic, but axis 0 shorter: only the equal pair
        (ISO, (64, 96, 128), ()),  # no two extents equal
        ((1.0, 1.2, 1.0), (32, 32, 32), (0, 1, 2)),  # ratio exactly 1.2 is within the tolerance
        ((1.0, 1.25, 1.0), (32, 32, 32), (0, 2)),  # 1.25 is not: the pair of equal spacing
        ((1.0, 1.1, 1.3), (32, 32, 32), (0, 1)),  # 1.1 and 1.18 qualify, 1.3 not: the most similar pair
        ((2.0, 0.8, 0.8), (256, 256), (0, 1)),  # 2D: the two in-plane axes (spacing's last two)
        ((2.0, 0.5, 0.8), (256, 256), ()),  # 2D, in-plane ratio 1.6
        ((2.0, 0.8, 0.8), (256, 224), ()),  # 2D, unequal patch
    ],
)
def test_interchangeable_axes_worked_out_by_hand(spacing, patch, axes):
    assert interchangeable_axes(spacing, patch) == axes


def test_axis_note_names_the_axes_or_why_there_are_none():
    assert axis_augmentation_note([16, 160, 160], ANISO, AugmentationSettings()) is None  # both off
    on = AugmentationSettings(p_rot90=0.5)
    assert axis_augmentation_note([16, 160, 160], ANISO, on).endswith("among patch axes (1, 2)")
    none = axis_augmentation_note([64, 96, 128], ISO, on)
    assert none.startswith(
        "90-degree rotations and transposes off: no two patch axes have spacings within 1.2x"
    )


def _names(settings: AugmentationSettings, patch=(16, 32, 32), spacing=ISO) -> list[str]:
    return [type(t).__name__ for t in build_train_transforms(list(patch), settings, spacing).transforms]


def _marked_batch(patch, n=2, seed=0):
    """Smooth random images with a bright asymmetric corner marker; seg = image > 0.5 (labels 0/1)."""
    rng = np.random.default_rng(seed)
    data = rng.random((n, 1, *patch)).astype(np.float32)
    data[(slice(None), slice(None)) + tuple(slice(1, 3 + i) for i in range(len(patch)))] = 5.0
    return {"data": data, "seg": (data > 0.5).astype(np.float32)}


def test_new_settings_off_leave_todays_pipeline():
    """The defaults (p_elastic, p_rot90, p_transpose 0) build the transforms of before, with the spatial
    transform's elastic deformation off, whatever the spacing; and the same batch comes out."""
    defaults = AugmentationSettings()
    assert _names(defaults) == _names(defaults, spacing=ANISO) == TODAY
    assert _names(defaults, patch=(8, 64, 64)) == TODAY  # anisotropic patch: no in-plane elastic either
    assert build_train_transforms([16, 32, 32], defaults, ISO).transforms[0].do_elastic_deform is False
    outs = []
    for spacing in (ISO, ANISO):
        np.random.seed(3)
        random.seed(3)  # batchgenerators draws from both
        outs.append(build_train_transforms([16, 32, 32], defaults, spacing)(**_marked_batch((20, 40, 40))))
    np.testing.assert_array_equal(outs[0]["data"], outs[1]["data"])
    with_new = AugmentationSettings(p_elastic=0.2, p_rot90=0.3, p_transpose=0.3)
    assert _names(with_new) == TODAY[:1] + ["Rot90Transform", "TransposeAxesTransform"] + TODAY[1:]
    assert _names(with_new, patch=(8, 64, 64))[:2] == ["InPlaneElasticTransform", "SpatialTransform"]
    assert "Rot90Transform" not in _names(with_new, patch=(16, 32, 48))  # no two equal extents


def _rotations(x: np.ndarray, axes: tuple[int, ...]) -> list[np.ndarray]:
    """Every 90/180/270-degree rotation of ``x`` (c, *spatial) in a plane of two of ``axes`` (spatial)."""
    pairs = [(a, b) for a in axes for b in axes if a < b]
    return [np.rot90(x, k, (a + 1, b + 1)) for a, b in pairs for k in (1, 2, 3)]


@pytest.mark.parametrize("spacing, patch, axes", [(ISO, (8, 8, 8), (0, 1, 2)), (ANISO, (4, 12, 12), (1, 2))])
def test_rot90_turns_image_and_labels_together_among_similar_axes(spacing, patch, axes):
    transforms = build_train_transforms(list(patch), AugmentationSettings(**OFF, p_rot90=1.0), spacing)
    seen = set()
    for seed in range(12):
        batch = _marked_batch(patch, seed=seed)
        before = {k: v.copy() for k, v in batch.items()}
        np.random.seed(seed)
        out = transforms(**batch)
        for b in range(2):
            candidates = _rotations(before["data"][b], axes)
            match = [i for i, c in enumerate(candidates) if np.array_equal(out["data"][b], c)]
            assert len(match) == 1, "the image is one rotation in a plane of the interchangeable axes"
            seen.add(match[0])
            np.testing.assert_array_equal(out["seg"][b], _rotations(before["seg"][b], axes)[match[0]])
            np.testing.assert_array_equal(out["seg"][b], out["data"][b] > 0.5)  # still aligned
    assert len(seen) >= 3  # several angles and planes drawn, never the identity


@pytest.mark.parametrize("spacing, patch, axes", [(ISO, (8, 8, 8), (0, 1, 2)), (ANISO, (4, 12, 12), (1, 2))])
def test_transpose_permutes_image_and_labels_together_among_similar_axes(spacing, patch, axes):
    transforms = build_train_transforms(list(patch), AugmentationSettings(**OFF, p_transpose=1.0), spacing)
    fixed = [a for a in range(3) if a not in axes]
    orders = [(0,) + tuple(a + 1 for a in p) for p in permutations(range(3)) if all(p[a] == a for a in fixed)]
    seen = set()
    for seed in range(12):
        batch = _marked_batch(patch, seed=seed)
        before = {k: v.copy() for k, v in batch.items()}
        np.random.seed(seed)
        out = transforms(**batch)
        for b in range(2):
            match = [o for o in orders if np.array_equal(out["data"][b], before["data"][b].transpose(o))]
            assert len(match) == 1, "the image is one permutation of the interchangeable axes"
            seen.add(match[0])
            np.testing.assert_array_equal(out["seg"][b], before["seg"][b].transpose(match[0]))
            np.testing.assert_array_equal(out["seg"][b], out["data"][b] > 0.5)
    assert len(seen) == len(orders)  # every permutation drawn (the identity included) in 24 samples


def _smooth_batch(patch, n=2):
    """A ball of radius ~patch/4 (labels: 2 core, 1 rim) in a smooth image: seg = thresholds of the image."""
    grid = np.meshgrid(*[np.linspace(-1, 1, s) for s in patch], indexing="ij")
    image = np.exp(-sum(g**2 for g in grid) * 4).astype(np.float32)
    seg = (image > 0.3).astype(np.float32) + (image > 0.7)
    return {"data": np.stack([image[None]] * n), "seg": np.stack([seg[None]] * n)}


def test_elastic_changes_the_image_and_keeps_labels_and_alignment():
    patch = [24, 24, 24]
    batch = _smooth_batch(patch)
    settings = AugmentationSettings(**OFF, p_elastic=1.0, elastic_alpha_min=600.0, elastic_alpha_max=900.0)
    np.random.seed(0)
    out = build_train_transforms(patch, settings, ISO)(**{k: v.copy() for k, v in batch.items()})
    assert out["data"].shape == batch["data"].shape and out["seg"].shape == batch["seg"].shape
    moved = np.abs(out["data"] - batch["data"]).max()
    assert moved > 0.05, f"elastic deformation at p=1 left the image as it was (max change {moved})"
    assert set(np.unique(out["seg"])) <= {0.0, 1.0, 2.0}
    assert not np.array_equal(out["seg"], batch["seg"])
    relabelled = (out["data"] > 0.3).astype(np.float32) + (out["data"] > 0.7)
    assert np.mean(relabelled == out["seg"]) > 0.97  # cubic image, nearest labels: same deformation


def test_elastic_alpha_is_for_a_3d_field_and_two_ninths_of_it_for_a_2d_one():
    """batchgenerators' 2D field moves voxels about 4x as far as its 3D one at the same alpha: 2D patches and
    the planes of thick-slice patches take nnU-Net v1's 2D range, 0-200 for 0-900."""
    on = AugmentationSettings(p_elastic=0.5, elastic_alpha_min=90.0)
    assert build_train_transforms([32, 32, 32], on, ISO).transforms[0].alpha == (90.0, 900.0)
    assert build_train_transforms([64, 64], on, ISO).transforms[0].alpha == pytest.approx((20.0, 200.0))
    thick = build_train_transforms([8, 64, 64], on, ANISO).transforms
    assert thick[0].kwargs["alpha"] == pytest.approx((20.0, 200.0)) and not thick[1].do_elastic_deform


def test_elastic_on_thick_slices_is_the_same_in_every_slice():
    """An anisotropic patch is deformed in-plane only: identical slices stay identical (nothing moves along
    axis 0, each sample's planes share one field), unlike a 3D deformation of the same batch."""
    plane = _smooth_batch([32, 32])
    batch = {k: np.repeat(v[:, :, None], 12, axis=2) for k, v in plane.items()}  # (2, 1, 12, 32, 32)
    settings = AugmentationSettings(**OFF, p_elastic=1.0, elastic_alpha_min=200.0)
    np.random.seed(1)
    out = InPlaneElasticTransform(settings)(**{k: v.copy() for k, v in batch.items()})
    assert not np.allclose(out["data"], batch["data"], atol=0.05)
    for key in ("data", "seg"):
        for z in range(1, 12):
            np.testing.assert_array_equal(out[key][:, :, z], out[key][:, :, 0])
    assert set(np.unique(out["seg"])) <= {0.0, 1.0, 2.0}
    np.random.seed(1)
    full = build_train_transforms([12, 32, 32], settings, ISO)  # 32 / 12 < 3, not anisotropic: a 3D field
    assert full.transforms[0].do_elastic_deform
    out3d = full(**{k: v.copy() for k, v in batch.items()})
    assert not np.allclose(out3d["data"][:, :, 4], out3d["data"][:, :, 7], atol=0.01)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("p_elastic = 1.5", "[augmentation] p_elastic = 1.5: must be in [0, 1] (a probability)"),
        ("p_rot90 = -0.1", "[augmentation] p_rot90 = -0.1: must be in [0, 1] (a probability)"),
        ("p_transpose = 2", "[augmentation] p_transpose = 2.0: must be in [0, 1] (a probability)"),
        ("elastic_alpha_min = -1", "[augmentation] elastic_alpha_min = -1.0: must be >= 0"),
        ("elastic_alpha_min = 1000", "[augmentation] elastic_alpha_max = 900.0: must be >= 1000 (at least elastic_alpha_min)"),
        ("elastic_sigma_min = 0", "[augmentation] elastic_sigma_min = 0.0: must be > 0 (voxels)"),
        ("elastic_sigma_max = 5", "[augmentation] elastic_sigma_max = 5.0: must be >= 9 (at least elastic_sigma_min)"),
        ('p_rot90 = "often"', '[augmentation] p_rot90 = "often": must be a number'),
    ],
)  # fmt: skip
def test_bad_new_settings_are_refused_in_one_line(tmp_path: Path, capfd, text, expected):
    path = tmp_path / "bad.toml"
    path.write_text(f"[augmentation]\n{text}\n", encoding="utf-8")
    with pytest.raises(AutosegError) as err:
        load_settings(path)
    assert str(err.value) == f"{path}: {expected}"
    assert main(["train", str(tmp_path / "work"), "3d_fullres", "0", "--config-file", str(path)]) == 2
    lines = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert lines == [f"error: {path}: {expected}"]
    assert not (tmp_path / "work").exists()


def test_resolved_augmentation_is_recorded_with_the_run_settings(tmp_path: Path):
    path = tmp_path / "aug.toml"
    path.write_text(
        "[augmentation]\np_elastic = 0.2\np_rot90 = 0.5\nelastic_sigma_max = 15\n", encoding="utf-8"
    )
    train, _ = load_settings(path)
    recorded = train.to_json()["augmentation"]  # what settings.json holds
    assert (
        recorded["p_elastic"] == 0.2 and recorded["p_rot90"] == 0.5 and recorded["elastic_sigma_max"] == 15.0
    )
    assert recorded["p_transpose"] == 0.0 and recorded["elastic_alpha_max"] == 900.0
    assert TrainSettings(augmentation=AugmentationSettings(**recorded)) == train


@pytest.mark.parametrize("patch", [None, (16, 48, 48)])
def test_batch_maker_takes_the_plans_spacing(planned_phantom, patch):
    """The loader's workers build the transforms from the configuration's spacing (the phantom's 3 x 1 x 1 mm):
    with every new transform on, batches come out at the patch size with labels of the plan. The planned patch
    (28 x 80 x 64) has no two equal extents, so no 90-degree transforms; a 16 x 48 x 48 patch gets them on
    axes 1, 2."""
    plans = Plans.load(planned_phantom.plans)
    config = plans.configuration("3d_fullres")
    patch = patch or tuple(config.patch_size)
    settings = AugmentationSettings(p_elastic=1.0, p_rot90=1.0, p_transpose=1.0)
    data = planned_phantom.preprocessed(config.data_identifier)
    spec = LoaderSpec(
        data_dir=data,
        case_ids=tuple(sorted(p.stem for p in data.glob("*.json"))),
        previous_dir=None,
        extract_size=tuple(augmentation_patch_size(list(patch), settings)),
        patch_size=patch,
        batch_size=2,
        dim=3,
        oversample_foreground=1.0,
        augmentation=settings,
        spacing=tuple(config.spacing),
        num_classes=plans.num_classes,
        seed=5,
        fold_index=0,
    )
    maker = BatchMaker(spec)
    names = [type(t).__name__ for t in maker.transforms.transforms]
    axes = interchangeable_axes(config.spacing, patch)
    assert axes == ((1, 2) if patch == (16, 48, 48) else ()), (config.spacing, patch)
    assert ("Rot90Transform" in names) == ("TransposeAxesTransform" in names) == bool(axes)
    batch = maker.make(0, 0)
    assert batch["data"].shape[2:] == patch and batch["seg"].shape[2:] == patch
    assert set(np.unique(batch["seg"])) <= set(range(plans.num_classes))
    np.testing.assert_array_equal(maker.make(0, 0)["data"], batch["data"])  # still one batch per seed
