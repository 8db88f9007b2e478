"""Calibration metrics and temperature scaling (issue 18, items 1 and 3; done-means 2)."""

from __future__ import annotations

import numpy as np
import pytest

from autoseg.evaluation.calibration import (
    ZONES,
    CalibrationStats,
    apply_zone_temperatures,
    brier_score,
    case_statistics,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
    predicted_foreground,
    relevant_voxels,
    structure_channels,
    temperature_scale,
    zone_map,
)
from autoseg.evaluation.probabilities import choose_calibration
from autoseg.inference.calibrate import apply_temperature, calibrator, describe


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=0, keepdims=True))
    return e / e.sum(axis=0, keepdims=True)


def test_softmax_temperature_is_recovered_from_synthetic_logits():
    """Labels drawn from softmax(z); the model reports softmax(2.5 z): the fit finds T = 2.5 within 2 %."""
    rng = np.random.default_rng(0)
    n, k = 200_000, 3
    z = rng.normal(0, 2.0, size=(k, n))
    true = _softmax(z)
    labels = (rng.random(n)[None] > np.cumsum(true, axis=0)).sum(axis=0)
    t = fit_temperature(_softmax(2.5 * z), labels)
    assert t == pytest.approx(2.5, rel=0.02)
    # calibrated data needs no temperature, an under-confident model a sharpening one
    assert fit_temperature(true, labels) == pytest.approx(1.0, rel=0.02)
    assert fit_temperature(_softmax(0.5 * z), labels) == pytest.approx(0.5, rel=0.02)


def test_sigmoid_temperature_is_recovered_from_synthetic_logits():
    rng = np.random.default_rng(1)
    z = rng.normal(0, 3.0, size=150_000)
    labels = rng.random(z.size) < 1 / (1 + np.exp(-z))
    t = fit_temperature(1 / (1 + np.exp(-2.5 * z)), labels, sigmoid=True)
    assert t == pytest.approx(2.5, rel=0.02)


def test_ece_brier_and_nll_by_hand_on_a_tiny_map():
    """Four voxels: p = 0.1, 0.2 (bin 1 of 15 and bin 3), 0.9, 0.95 (bins 13 and 14); labels 0, 1, 1, 1.

    ECE = (|0 - 0.1| + |1 - 0.2| + |1 - 0.9| + |1 - 0.95|) / 4 = (0.1 + 0.8 + 0.1 + 0.05) / 4 = 0.2625
    Brier = (0.01 + 0.64 + 0.01 + 0.0025) / 4 = 0.165625
    NLL = -(log 0.9 + log 0.2 + log 0.9 + log 0.95) / 4
    """
    p = np.array([[0.1, 0.2], [0.9, 0.95]])
    y = np.array([[0, 1], [1, 1]])
    assert expected_calibration_error(p, y) == pytest.approx(0.2625)
    assert brier_score(p, y) == pytest.approx(0.165625)
    nll = -(np.log(0.9) + np.log(0.2) + np.log(0.9) + np.log(0.95)) / 4
    assert negative_log_likelihood(p, y) == pytest.approx(nll)
    # two voxels in one bin average before the difference: |mean(y) - mean(p)|, not the mean of differences
    assert expected_calibration_error([0.5, 0.52], [1, 0]) == pytest.approx(abs(0.5 - 0.51))
    # 2 bins: p = 1.0 goes to the last bin
    assert expected_calibration_error([0.25, 1.0], [0, 1], n_bins=2) == pytest.approx(0.125)
    assert expected_calibration_error([], []) is None


def test_stats_pool_voxels_across_cases_and_give_reliability_bins():
    s = CalibrationStats().add([0.1, 0.2], [0, 1]).add([0.9, 0.95], [1, 1])
    assert s.ece() == pytest.approx(0.2625)
    rel = s.reliability()
    assert rel["count"][1] == 1 and rel["count"][13] == 1 and rel["count"][0] == 0
    assert rel["confidence"][1] == pytest.approx(0.1) and rel["accuracy"][3] == 1.0
    assert rel["confidence"][0] is None
    with pytest.raises(ValueError, match="within"):
        CalibrationStats().add([1.5], [1])


def test_relevant_voxels_are_both_masks_and_a_band():
    ref = np.zeros((1, 20, 20), bool)
    ref[0, 5, 5] = True
    pred = np.zeros_like(ref)
    pred[0, 15, 15] = True
    mask = relevant_voxels(ref, pred, band=2)
    assert mask[0, 5, 5] and mask[0, 7, 7] and mask[0, 15, 15] and mask[0, 13, 17]
    assert not mask[0, 8, 5] and not mask[0, 10, 10]
    assert mask.sum() == 2 * 25
    assert not relevant_voxels(np.zeros_like(ref), np.zeros_like(ref)).any()


def test_case_statistics_use_structures_of_labels_and_regions():
    probs = np.zeros((3, 1, 1, 12), np.float32)
    probs[0] = 1.0
    probs[:, 0, 0, 5] = [0.1, 0.6, 0.3]
    reference = np.zeros((1, 1, 12), np.uint8)
    reference[0, 0, 5] = 2
    structures = structure_channels({"a": 1, "b": 2}, {"ab": [1, 2]}, region_based=False)
    assert structures["ab"] == ((1, 2), (1, 2))
    stats = case_statistics(probs, reference, structures)
    # voxel 5 plus a band of 3 on each side: 7 relevant voxels, the others certain background
    assert stats["b"].voxels == 7
    assert stats["b"].ece() == pytest.approx(0.7 / 7)  # one voxel: p(b) 0.3 where b is
    assert stats["ab"].brier() == pytest.approx(0.1**2 / 7)


def test_temperature_keeps_the_argmax_and_region_decisions():
    rng = np.random.default_rng(2)
    probs = _softmax(rng.normal(0, 3, size=(4, 6, 7, 8))).astype(np.float16)
    for t in (0.3, 1.0, 2.5, 10.0):
        out = apply_temperature(probs, t)
        assert out.dtype == np.float16 and out.shape == probs.shape
        np.testing.assert_array_equal(np.argmax(out, 0), np.argmax(probs, 0))
        np.testing.assert_allclose(out.astype(np.float32).sum(0), 1.0, atol=4e-3)
        np.testing.assert_allclose(out, temperature_scale(probs, t), atol=2e-3)
    assert apply_temperature(probs, 1.0) is probs
    sig = rng.random((2, 5, 5, 5)).astype(np.float16)
    out = apply_temperature(sig, [2.0, 0.5], region_based=True)
    np.testing.assert_array_equal(out > 0.5, sig > 0.5)
    assert np.abs(out[0] - 0.5).max() < np.abs(sig[0] - 0.5).max()  # T > 1 softens
    assert np.abs(out[1].astype(np.float32) - 0.5).mean() > np.abs(sig[1].astype(np.float32) - 0.5).mean()


def test_temperature_scaling_is_what_it_says():
    p = np.array([[0.8], [0.2]], np.float32)
    out = apply_temperature(p, 2.0)
    want = np.sqrt([0.8, 0.2]) / np.sqrt([0.8, 0.2]).sum()
    np.testing.assert_allclose(out[:, 0], want, rtol=1e-5)
    sig = apply_temperature(np.array([[0.9]], np.float32), [2.0], region_based=True)
    assert sig[0, 0] == pytest.approx(1 / (1 + np.exp(-np.log(9) / 2)), rel=1e-5)


def test_calibrator_from_instructions():
    assert calibrator({}, False) is None and calibrator(None, True, ["a"]) is None
    f = calibrator({"temperature": {"wt": 2.0, "et": 1.0}}, True, ["wt", "et"])
    p = np.full((2, 3), 0.9, np.float32)
    out = f(p)
    assert out[0, 0] < 0.9 and out[1, 0] == pytest.approx(0.9)
    with pytest.raises(ValueError):
        apply_temperature(p, 0.0)


def test_calibrator_refuses_a_region_without_temperature():
    with pytest.raises(ValueError, match=r"no value for region\(s\) \['et'\]"):
        calibrator({"temperature": {"wt": 2.0}}, True, ["wt", "et"])
    f = calibrator({"temperature": 2.0}, True, ["wt", "et"])  # one number: every region
    out = f(np.full((2, 1), 0.9, np.float32))
    assert out[0, 0] == out[1, 0] < 0.9


def test_weights_stand_for_repeated_voxels():
    """A voxel with weight 3 counts as three copies of it in the fit."""
    rng = np.random.default_rng(2)
    z = rng.normal(0, 2.0, size=(2, 400))
    labels = rng.integers(0, 2, size=400)
    p = _softmax(3.0 * z)
    repeated = np.concatenate([np.arange(400), np.arange(100), np.arange(100)])
    weights = np.ones(400)
    weights[:100] = 3.0
    assert fit_temperature(p, labels, weights=weights) == pytest.approx(
        fit_temperature(p[:, repeated], labels[repeated]), rel=1e-4
    )


def _near_wrong_far_right(rng, shape=(40, 40, 40)):
    """A cube; near it (its relevant band) 20 % of voxels wrong at confidence 0.99, far away right at 0.999: a
    model over-confident near the structure and right far from it. ``(reference, relevant, probs (2, N))``."""
    reference = np.zeros(shape, np.int64)
    reference[15:25, 15:25, 15:25] = 1
    relevant = relevant_voxels(reference == 1, reference == 1)
    wrong = relevant & (rng.random(shape) < 0.2)
    truth_side = np.where(relevant, 0.99, 0.999)
    fg = np.where((reference == 1) ^ wrong, truth_side, 1 - truth_side)
    return reference, relevant, np.stack([1 - fg, fg]).reshape(2, -1)


def test_stratified_sample_stands_for_the_whole_case_and_each_zone():
    """find-best's sample: an equal share from each (zone, relevant or not) stratum, each voxel weighted by its
    stratum's size; its fit is the fit on every voxel of the case (not the fit on the relevant voxels alone),
    and its fit within a zone is the fit on every voxel of that zone."""
    from autoseg.evaluation.probabilities import _stratified

    rng = np.random.default_rng(3)
    reference, relevant, probs = _near_wrong_far_right(rng)
    zones = zone_map(probs[1].reshape(reference.shape) > 0.5)
    idx, w, z = _stratified(relevant, zones, np.ones(reference.shape, bool), 20_000, rng)
    assert w.sum() == pytest.approx(reference.size)
    np.testing.assert_array_equal(z, zones.ravel()[idx])
    labels = reference.ravel()
    everything = fit_temperature(probs, labels)
    assert fit_temperature(probs[:, idx], labels[idx], weights=w) == pytest.approx(everything, rel=0.03)
    near = fit_temperature(probs[:, relevant.ravel()], labels[relevant.ravel()])
    assert near > 1.5 * everything
    for k in range(len(ZONES)):
        whole = zones.ravel() == k
        if whole.sum() > 1000:
            sampled = fit_temperature(probs[:, idx[z == k]], labels[idx[z == k]], weights=w[z == k])
            assert sampled == pytest.approx(fit_temperature(probs[:, whole], labels[whole]), rel=0.05), ZONES[
                k
            ]


def test_zone_map_by_hand():
    """A 7-voxel cube in a 21-voxel box, band 3: inside is the one centre voxel (3 erosions of a 7-cube), inner
    the other 342 of the cube, outer the 13-cube (3 cube dilations) minus the cube, far the rest; a mask on the
    image edge has no border there; nothing predicted is all far."""
    pred = np.zeros((21, 21, 21), bool)
    pred[7:14, 7:14, 7:14] = True
    zones = zone_map(pred, band=3)
    assert np.bincount(zones.ravel(), minlength=4).tolist() == [21**3 - 13**3, 13**3 - 7**3, 7**3 - 1, 1]
    assert (
        zones[10, 10, 10] == 3 and zones[7, 10, 10] == 2 and zones[6, 10, 10] == 1 and zones[3, 10, 10] == 0
    )
    edge = np.zeros((10, 10, 10), bool)
    edge[:7] = True  # touches the image's first face: deep voxels there stay inside
    assert zone_map(edge, band=3)[0, 5, 5] == 3 and zone_map(edge, band=3)[6, 5, 5] == 2
    assert not zone_map(np.zeros((4, 4, 4), bool)).any()


def test_zone_temperatures_keep_the_argmax_and_reduce_to_one_temperature():
    rng = np.random.default_rng(4)
    probs = _softmax(rng.normal(0, 3, size=(3, 12, 12, 12))).astype(np.float32)
    same = apply_zone_temperatures(probs, [2.0] * 4)
    np.testing.assert_allclose(same, apply_temperature(probs, 2.0), atol=1e-6)
    mixed = apply_zone_temperatures(probs, {"far": 0.5, "outer": 3.0, "inner": 8.0, "inside": 1.0})
    np.testing.assert_array_equal(np.argmax(mixed, 0), np.argmax(probs, 0))
    np.testing.assert_allclose(mixed.sum(0), 1.0, atol=1e-5)
    zones = zone_map(predicted_foreground(probs))
    for k, t in enumerate((0.5, 3.0, 8.0, 1.0)):  # each voxel has its zone's temperature
        np.testing.assert_allclose(
            mixed[:, zones == k], temperature_scale(probs[:, zones == k], t), atol=1e-5
        )
    sig = rng.random((2, 9, 9, 9)).astype(np.float32)
    sig[1] = 0.3 * sig[1]
    sig[1, 1:8, 1:8, 1:8] += 0.6  # a 7-cube predicted: its centre voxel is inside
    out = apply_zone_temperatures(sig, [[2.0] * 4, [1.0, 1.0, 1.0, 4.0]], region_based=True)
    np.testing.assert_array_equal(out > 0.5, sig > 0.5)
    np.testing.assert_allclose(out[0], apply_temperature(sig[:1], [2.0], region_based=True)[0], atol=1e-6)
    deep = zone_map(sig[1] > 0.5) == 3
    assert deep.any()
    np.testing.assert_allclose(out[1][~deep], sig[1][~deep], atol=1e-6)
    with pytest.raises(ValueError, match="4 positive numbers"):
        apply_zone_temperatures(probs, [1.0, 2.0])
    with pytest.raises(ValueError, match=r"no value for zone\(s\) \['inside'\]"):
        apply_zone_temperatures(probs, {"far": 1, "outer": 1, "inner": 1})


def test_calibrator_applies_stored_zones_and_describes_them():
    zones = {"band": 3, "temperature": {"far": 1.0, "outer": 2.0, "inner": 2.0, "inside": 1.0}}
    f = calibrator({"temperature": 1.5, "zones": zones}, False)
    probs = np.zeros((2, 11, 11, 11), np.float32)
    probs[1] = 0.02
    probs[1, 4:7, 4:7, 4:7] = 0.97
    probs[0] = 1 - probs[1]
    out = f(probs)
    assert out[1, 0, 0, 0] == pytest.approx(0.02)  # far: T = 1
    assert out[1, 5, 5, 5] < 0.97 and out[1, 3, 5, 5] > 0.02  # inner and outer band softened
    assert "zone temperatures (far/outer/inner/inside, band 3 voxels) 1/2/2/1" in describe(
        {"temperature": 1.5, "zones": zones}
    )
    regional = {"band": 3, "temperature": {"wt": zones["temperature"], "tc": zones["temperature"]}}
    g = calibrator({"zones": regional}, True, ["wt", "tc"])
    assert g(np.concatenate([probs[1:]] * 2))[0, 5, 5, 5] < 0.97
    assert describe({"zones": regional}).endswith("band 3 voxels) wt 1/2/2/1, tc 1/2/2/1")
    with pytest.raises(ValueError, match=r"no temperatures for region\(s\) \['et'\]"):
        calibrator({"zones": {"temperature": {"wt": zones["temperature"]}}}, True, ["wt", "et"])


def test_the_kept_calibration_raises_no_structure():
    """choose_calibration: the lowest mean ECE among the candidates that make no structure worse; the identity
    (ECE as before) when every fit makes one worse; a structure without voxels (None) is not compared."""
    before = {"a": 0.10, "b": 0.05, "c": None}
    assert (
        choose_calibration(
            before,
            {"temperature": {"a": 0.08, "b": 0.05, "c": None}, "zones": {"a": 0.02, "b": 0.06, "c": None}},
        )
        == "temperature"
    )
    assert (
        choose_calibration(before, {"temperature": {"a": 0.08, "b": 0.04}, "zones": {"a": 0.02, "b": 0.03}})
        == "zones"
    )
    assert (
        choose_calibration(before, {"temperature": {"a": 0.11, "b": 0.01}, "zones": {"a": 0.02, "b": 0.06}})
        == "identity"
    )


def test_fit_keeps_zone_temperatures_for_a_model_over_confident_near_the_structure(tmp_path):
    """fit_calibration (what find-best runs) on two cases of a model over-confident near the structure and right
    far from it: one temperature cannot serve both, the zone temperatures can; they are kept, soften the band
    and sharpen the far background, and lower the relevant-voxel ECE below the one temperature's."""
    from autoseg.evaluation.probabilities import fit_calibration
    from autoseg.io.dataset import DatasetSpec
    from autoseg.io.volume import Geometry, write_volume
    from autoseg.jsonio import save_npz

    spec = DatasetSpec(channel_names=("MRI",), labels={"background": 0, "cord": 1}, file_ending=".nii.gz")
    rng = np.random.default_rng(5)
    items = []
    for case in ("a", "b"):
        reference, _, probs = _near_wrong_far_right(rng)
        geometry = Geometry(reference.shape, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
        write_volume(reference.astype(np.uint8), geometry, tmp_path / f"{case}.nii.gz")
        save_npz(
            tmp_path / f"{case}.npz", probabilities=probs.reshape(2, *reference.shape).astype(np.float16)
        )
        items.append((case, tmp_path / f"{case}.nii.gz", [tmp_path / f"{case}.npz"]))
    cal = fit_calibration(items, spec)
    assert cal["kept"] == "zones" and cal["zones"]["band"] == 3
    zt = cal["zones"]["temperature"]
    # the 20 % wrong voxels riddle the predicted cube: its band (inner) is where the model is wrong, and no
    # voxel is 3 deep (inside), which then takes the one temperature
    assert zt["inner"] > 5 * cal["temperature"] and zt["far"] < 0.5 * cal["temperature"]
    assert zt["inside"] == cal["temperature"]
    one = cal["candidates"]["temperature"]["ece_after"]["cord"]
    assert cal["ece_after"]["cord"] < 0.5 * one < cal["ece_before"]["cord"]
    assert cal["candidates"]["identity"]["ece_after"] == cal["ece_before"]
