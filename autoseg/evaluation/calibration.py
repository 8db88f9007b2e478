"""Calibration of predicted probabilities: ECE, Brier score, negative log-likelihood, temperature scaling.

Plain numpy on arrays; the callers (``evaluate --probabilities``, find-best) read the files.

Structures
----------
Metrics are per *structure*, the same ones the overlap metrics score: each foreground label and each region of
``dataset.json``. A structure's probability is, for a softmax output (one channel per class), the sum of the
channels of its label values; for a region-based (sigmoid) output, its own channel. Its reference is the
reference label map's voxels with one of its values. Voxels with the ignore label are left out.

Foreground-relevant voxels
--------------------------
Almost every voxel of a medical image is background far from any structure, predicted with probability ~0 and
correctly so; counted in, they drive every calibration error towards 0 whatever the model does near the
structure. So a structure's metrics (and the temperature fit) use only its **foreground-relevant voxels**: the
union of the reference structure and the predicted structure (its probability > 0.5, i.e. what a softmax argmax
or a region threshold would label, for two classes exactly), dilated by :data:`RELEVANT_BAND` voxels (3x3x3
cube, :data:`RELEVANT_BAND` times: a band of that many voxels around both). A case with neither has no relevant
voxels for that structure and adds nothing.

Definitions (``p`` the structure's probability, ``y`` 1 inside the reference structure, over the ``N`` relevant
voxels, pooled over cases)
---------------------------------------------------------------------------------------------------
* **ECE** (expected calibration error): :data:`N_BINS` = 15 equal-width bins of ``p`` on [0, 1] (bin ``b`` holds
  ``b/15 <= p < (b+1)/15``, the last one also ``p = 1``); ``ECE = sum_b n_b / N * |mean(y in b) - mean(p in b)|``.
  This is the binary (one structure against the rest) reliability, so every probability counts, not only the
  most confident class's.
* **Brier score**: ``mean((p - y)^2)``.
* **NLL**: ``-mean(y log p + (1 - y) log(1 - p))`` with ``p`` clipped to [:data:`EPS`, 1 - :data:`EPS`]
  (saved probabilities are float16: exact 0 and 1 are common).

Temperature scaling
-------------------
A softmax output's probabilities become ``softmax(log(p) / T)``, renormalised over the classes; a sigmoid
region's ``sigmoid(logit(p) / T)``. ``T > 1`` softens, ``T < 1`` sharpens, ``T = 1`` is the identity; the order
of the classes in every voxel, and so the argmax and every ``p > 0.5`` decision, never changes.
:func:`fit_temperature` finds the ``T`` (one scalar) minimising the NLL of sampled voxels: softmax, the
multi-class NLL of the reference class; sigmoid, the binary NLL of one region (fit once per region).

Zone temperatures
-----------------
A trained network is typically over-confident in a band around what it predicts and about right far from it,
and one temperature cannot serve both (docs/calibration.md, measured). :func:`zone_map` splits the voxels by
their distance to the *predicted* structure (computable at prediction, unlike the reference): ``far`` (more than
:data:`RELEVANT_BAND` voxels outside it), ``outer`` (the band outside), ``inner`` (the band inside, from its
border) and ``inside`` (deeper). Each zone has its own temperature, fitted on its own voxels; the whole-image NLL
is the sum of the zones', so the four fits together minimise it. A temperature is still applied per voxel, so
the argmax and every ``p > 0.5`` decision are still unchanged (and with them the zones themselves).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage, optimize

N_BINS = 15
RELEVANT_BAND = 3
"""Voxels of band around the reference and predicted structure that count as foreground-relevant."""
EPS = 1e-7
T_MIN, T_MAX = 0.05, 20.0
"""The temperatures :func:`fit_temperature` searches between."""
ZONES = ("far", "outer", "inner", "inside")
"""The zones of :func:`zone_map`, in the order of their index."""


@dataclass
class CalibrationStats:
    """Running sums for the calibration metrics of one structure: voxels can be added case by case and the
    pooled metrics read at the end (what :func:`expected_calibration_error` and friends compute at once)."""

    n_bins: int = N_BINS
    count: np.ndarray = field(init=False)
    confidence: np.ndarray = field(init=False)  # sum of p per bin
    positives: np.ndarray = field(init=False)  # sum of y per bin
    squared_error: float = 0.0
    log_loss: float = 0.0

    def __post_init__(self):
        if not isinstance(self.n_bins, int) or self.n_bins < 1:
            raise ValueError(f"n_bins must be a positive integer, got {self.n_bins!r}")
        self.count = np.zeros(self.n_bins, dtype=np.int64)
        self.confidence = np.zeros(self.n_bins, dtype=np.float64)
        self.positives = np.zeros(self.n_bins, dtype=np.float64)

    @property
    def voxels(self) -> int:
        return int(self.count.sum())

    def add(self, probs: np.ndarray, labels: np.ndarray) -> CalibrationStats:
        """Add voxels: ``probs`` in [0, 1] and ``labels`` (0/1 or bool) of the same shape."""
        p, y = _binary_pair(probs, labels)
        bins = np.minimum((p * self.n_bins).astype(np.int64), self.n_bins - 1)
        self.count += np.bincount(bins, minlength=self.n_bins)
        self.confidence += np.bincount(bins, weights=p, minlength=self.n_bins)
        self.positives += np.bincount(bins, weights=y, minlength=self.n_bins)
        self.squared_error += float(np.sum((p - y) ** 2))
        q = np.clip(p, EPS, 1 - EPS)
        self.log_loss -= float(np.sum(y * np.log(q) + (1 - y) * np.log1p(-q)))
        return self

    def merge(self, other: CalibrationStats) -> CalibrationStats:
        """Add another set of sums (another case's voxels, say)."""
        self.count += other.count
        self.confidence += other.confidence
        self.positives += other.positives
        self.squared_error += other.squared_error
        self.log_loss += other.log_loss
        return self

    def ece(self) -> float | None:
        n = self.voxels
        if n == 0:
            return None
        return float(np.sum(np.abs(self.positives - self.confidence)) / n)

    def brier(self) -> float | None:
        return self.squared_error / self.voxels if self.voxels else None

    def nll(self) -> float | None:
        return self.log_loss / self.voxels if self.voxels else None

    def reliability(self) -> dict:
        """Per bin: ``count``, mean predicted probability ``confidence`` and observed frequency ``accuracy``
        (``None`` for an empty bin): the points of a reliability diagram."""

        def mean(s):
            return [float(a / c) if c else None for a, c in zip(s, self.count)]

        return {
            "count": self.count.tolist(),
            "confidence": mean(self.confidence),
            "accuracy": mean(self.positives),
        }

    def to_json(self) -> dict:
        return {"ece": self.ece(), "brier": self.brier(), "nll": self.nll(), "voxels": self.voxels}


def _binary_pair(probs, labels) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(probs, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel()
    if p.shape != y.shape:
        raise ValueError(f"probabilities ({np.shape(probs)}) and labels ({np.shape(labels)}) differ in shape")
    if p.size and not (np.all(np.isfinite(p)) and p.min() >= 0 and p.max() <= 1):
        raise ValueError("probabilities must be finite and within [0, 1]")
    return p, (y != 0).astype(np.float64)


def expected_calibration_error(probs, labels, n_bins: int = N_BINS) -> float | None:
    """ECE of binary probabilities ``probs`` against ``labels`` (see the module docstring); ``None`` without
    voxels. The caller selects the voxels (e.g. :func:`relevant_voxels`)."""
    return CalibrationStats(n_bins).add(probs, labels).ece()


def brier_score(probs, labels) -> float | None:
    """Mean squared difference of binary probabilities and 0/1 labels; ``None`` without voxels."""
    return CalibrationStats().add(probs, labels).brier()


def negative_log_likelihood(probs, labels) -> float | None:
    """Mean binary negative log-likelihood (probabilities clipped to [EPS, 1 - EPS]); ``None`` without voxels."""
    return CalibrationStats().add(probs, labels).nll()


def relevant_voxels(reference: np.ndarray, predicted: np.ndarray, band: int = RELEVANT_BAND) -> np.ndarray:
    """Foreground-relevant voxels: the union of the ``reference`` and ``predicted`` masks dilated by ``band``
    voxels (3x3x... cube, ``band`` times). Work is limited to the union's bounding box plus the band."""
    union = np.asarray(reference, dtype=bool) | np.asarray(predicted, dtype=bool)
    out = np.zeros(union.shape, dtype=bool)
    where = np.nonzero(union)
    if not where[0].size:
        return out
    box = tuple(
        slice(max(int(w.min()) - band, 0), min(int(w.max()) + band + 1, n))
        for w, n in zip(where, union.shape)
    )
    if band > 0:
        cube = ndimage.generate_binary_structure(union.ndim, union.ndim)
        out[box] = ndimage.binary_dilation(union[box], cube, iterations=band)
    else:
        out[box] = union[box]
    return out


def zone_map(predicted: np.ndarray, band: int = RELEVANT_BAND) -> np.ndarray:
    """int8 index into :data:`ZONES` per voxel of the ``predicted`` mask: 0 ``far`` (more than ``band`` voxels
    outside it), 1 ``outer`` (within ``band`` voxels outside: 3x3x... cube dilation), 2 ``inner`` (inside,
    within ``band`` voxels of its border; the image edge is not a border), 3 ``inside``. Work is limited to
    the mask's bounding box plus the band."""
    pred = np.asarray(predicted, dtype=bool)
    out = np.zeros(pred.shape, dtype=np.int8)
    where = np.nonzero(pred)
    if not where[0].size:
        return out
    box = tuple(
        slice(max(int(w.min()) - band, 0), min(int(w.max()) + band + 1, n)) for w, n in zip(where, pred.shape)
    )
    sub = pred[box]
    if band > 0:
        cube = ndimage.generate_binary_structure(sub.ndim, sub.ndim)
        near = ndimage.binary_dilation(sub, cube, iterations=band)
        deep = ndimage.binary_erosion(sub, cube, iterations=band, border_value=1)
    else:
        near, deep = sub, sub
    zones = near.astype(np.int8)
    zones[sub] = 2
    zones[deep] = 3
    out[box] = zones
    return out


def predicted_foreground(probs: np.ndarray) -> np.ndarray:
    """Softmax ``probs`` ``(K, ...)``: where the argmax is a foreground class (ties go to background, as
    ``argmax`` picks the first), without an index volume."""
    best_fg = probs[1].copy() if probs.shape[0] == 2 else probs[1:].max(axis=0)
    return best_fg > probs[0]


def structure_channels(
    labels: Mapping[str, int], regions: Mapping[str, Sequence[int]], region_based: bool
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """``{structure: (channels, label values)}``: which probability channels sum to the structure's
    probability, and which reference values are inside it. ``labels`` are the foreground labels (background
    and ignore excluded); ``regions`` in output-channel order for a region-based output."""
    if region_based:
        return {name: ((k,), tuple(v)) for k, (name, v) in enumerate(regions.items())}
    out = {name: ((int(v),), (int(v),)) for name, v in labels.items()}
    out.update({name: (tuple(int(x) for x in v), tuple(int(x) for x in v)) for name, v in regions.items()})
    return out


def case_statistics(
    probs: np.ndarray,
    reference: np.ndarray,
    structures: Mapping[str, tuple[tuple[int, ...], tuple[int, ...]]],
    ignore_label: int | None = None,
    n_bins: int = N_BINS,
) -> dict[str, CalibrationStats]:
    """One case's :class:`CalibrationStats` per structure (:func:`structure_channels`) on its relevant voxels.
    ``probs`` ``(K, *reference.shape)``."""
    valid = None if ignore_label is None else reference != ignore_label
    out = {}
    for name, (channels, values) in structures.items():
        p = structure_probability(probs, channels)
        ref = np.isin(reference, values)
        mask = relevant_voxels(ref, p > 0.5)
        if valid is not None:
            mask &= valid
        out[name] = CalibrationStats(n_bins).add(p[mask], ref[mask])
    return out


def structure_probability(probs: np.ndarray, channels: Sequence[int]) -> np.ndarray:
    """The sum of ``probs[channels]`` as float32 (clipped to 1: float16 sums may exceed it slightly)."""
    p = probs[channels[0]].astype(np.float32)
    for k in channels[1:]:
        p += probs[k]
    return np.minimum(p, 1.0, out=p) if len(channels) > 1 else p


def temperature_scale(probs: np.ndarray, temperature: float, sigmoid: bool = False) -> np.ndarray:
    """``probs`` with temperature ``temperature`` applied (module docstring): softmax over axis 0 of
    ``log(p) / T`` (``probs`` ``(K, ...)``), or elementwise ``sigmoid(logit(p) / T)``. float32 result."""
    t = float(temperature)
    if not (np.isfinite(t) and t > 0):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    p = np.clip(np.asarray(probs, dtype=np.float32), EPS, 1 - EPS if sigmoid else 1.0)
    if sigmoid:
        z = (np.log(p) - np.log1p(-p)) / t
        return (1.0 / (1.0 + np.exp(-z))).astype(np.float32)
    z = np.log(p) / t
    z -= z.max(axis=0, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=0, keepdims=True)).astype(np.float32)


def apply_temperature(
    probs: np.ndarray, temperature: float | Sequence[float], region_based: bool = False
) -> np.ndarray:
    """``probs`` ``(K, ...)`` after temperature scaling, in ``probs``' dtype.

    Softmax (``region_based`` False, one scalar): ``softmax(log(p) / T)`` over axis 0, i.e. ``p_k^(1/T)``
    renormalised, computed one channel at a time against the voxel's largest probability, so memory is two
    float32 volumes plus the result whatever the number of classes. Sigmoid: ``sigmoid(logit(p) / T_k)`` per
    channel, ``temperature`` a scalar or one per channel. ``T = 1`` returns ``probs`` itself.
    """
    if region_based:
        temps = (
            [float(temperature)] * probs.shape[0]
            if np.isscalar(temperature)
            else [float(t) for t in temperature]
        )
        if len(temps) != probs.shape[0]:
            raise ValueError(f"{len(temps)} temperatures for {probs.shape[0]} region channels")
    else:
        temps = [float(temperature)]
    if any(not (math.isfinite(t) and t > 0) for t in temps):
        raise ValueError(f"temperatures must be positive numbers, got {temps}")
    if all(t == 1.0 for t in temps):
        return probs
    out = np.empty_like(probs)
    if region_based:
        for k, t in enumerate(temps):
            out[k] = _sigmoid_scaled(probs[k], 1.0 / t)
        return out
    return _softmax_scaled(probs, 1.0 / temps[0], out)


def apply_zone_temperatures(
    probs: np.ndarray, temperatures: Sequence, region_based: bool = False, band: int = RELEVANT_BAND
) -> np.ndarray:
    """``probs`` ``(K, ...)`` after zone temperature scaling (module docstring), in ``probs``' dtype.

    Softmax: ``temperatures`` one per zone of :data:`ZONES`, the zones those of the predicted foreground
    (:func:`predicted_foreground`); each voxel gets its zone's ``softmax(log(p) / T)``, computed as
    :func:`apply_temperature` does (memory flat in the number of classes). Sigmoid: one such sequence per
    region channel, the zones those of the channel's own ``p > 0.5``."""
    per_channel = [_zone_temps(t) for t in temperatures] if region_based else [_zone_temps(temperatures)]
    if region_based and len(per_channel) != probs.shape[0]:
        raise ValueError(f"{len(per_channel)} zone temperature sets for {probs.shape[0]} region channels")
    out = np.empty_like(probs)
    if region_based:
        for k, temps in enumerate(per_channel):
            out[k] = _sigmoid_scaled(probs[k], (1.0 / temps)[zone_map(probs[k] > 0.5, band)])
        return out
    return _softmax_scaled(probs, (1.0 / per_channel[0])[zone_map(predicted_foreground(probs), band)], out)


def _zone_temps(temps) -> np.ndarray:
    """One zone-temperature set as a float32 array of ``len(ZONES)`` positive numbers (``{zone: T}`` or a
    sequence in :data:`ZONES` order); :class:`ValueError` otherwise."""
    if isinstance(temps, Mapping):
        missing = [z for z in ZONES if z not in temps]
        if missing:
            raise ValueError(f"zone temperatures have no value for zone(s) {missing}")
        temps = [temps[z] for z in ZONES]
    values = [float(t) for t in temps]
    if len(values) != len(ZONES) or any(not (math.isfinite(t) and t > 0) for t in values):
        raise ValueError(
            f"zone temperatures must be {len(ZONES)} positive numbers ({', '.join(ZONES)}), got {temps!r}"
        )
    return np.asarray(values, dtype=np.float32)


def _sigmoid_scaled(p: np.ndarray, inv_t: float | np.ndarray) -> np.ndarray:
    """``sigmoid(logit(p) / T)`` in float32 (``inv_t``: ``1/T``, a number or one per voxel)."""
    q = np.clip(p.astype(np.float32), EPS, 1 - EPS)
    return 1.0 / (1.0 + np.exp(-(np.log(q) - np.log1p(-q)) * inv_t))


def _softmax_scaled(probs: np.ndarray, inv_t: float | np.ndarray, out: np.ndarray) -> np.ndarray:
    """``out[k] = p_k^(1/T) / sum_j p_j^(1/T)`` (``inv_t``: ``1/T``, a number or one per voxel), one channel
    at a time against the voxel's largest probability: two float32 volumes besides ``out``."""
    log_max = np.log(np.clip(probs.max(axis=0).astype(np.float32), EPS, 1.0))
    total = np.zeros(probs.shape[1:], dtype=np.float32)
    for k in range(probs.shape[0]):
        total += _scaled(probs[k], log_max, inv_t)
    for k in range(probs.shape[0]):
        out[k] = _scaled(probs[k], log_max, inv_t) / total
    return out


def _scaled(p: np.ndarray, log_max: np.ndarray, inv_t: float | np.ndarray) -> np.ndarray:
    """``(p / p_max)^(1/T)`` in float32, in the log domain (never overflows; the largest class gives 1)."""
    z = np.log(np.clip(p.astype(np.float32), EPS, 1.0))
    z -= log_max
    z *= inv_t
    return np.exp(z, out=z)


def channel_temperatures(temperature, region_based: bool, regions: Sequence[str] = ()) -> float | list[float]:
    """``temperature`` as :func:`apply_temperature` takes it: a number (softmax), or one per region channel
    in ``regions``' order from ``{region: T}`` or one number; :class:`ValueError` naming a missing region."""
    if not region_based:
        return float(temperature)
    if isinstance(temperature, Mapping):
        missing = [r for r in regions if r not in temperature]
        if missing:
            raise ValueError(f"calibration.temperature has no value for region(s) {missing}")
        return [float(temperature[r]) for r in regions]
    return [float(temperature)] * len(regions)


def zone_temperatures(temperatures, region_based: bool, regions: Sequence[str] = ()) -> list:
    """Stored zone temperatures as :func:`apply_zone_temperatures` takes them: softmax ``{zone: T}`` as is;
    region-based ``{region: {zone: T}}`` in ``regions``' order (a :class:`ValueError` naming a missing region),
    each set checked by :func:`_zone_temps`."""
    if not region_based:
        _zone_temps(temperatures)
        return temperatures
    if not isinstance(temperatures, Mapping):
        raise ValueError(
            f"zone temperatures of a region-based output must be {{region: {{zone: T}}}}, got {temperatures!r}"
        )
    missing = [r for r in regions if r not in temperatures]
    if missing:
        raise ValueError(f"calibration.zones has no temperatures for region(s) {missing}")
    return [_zone_temps(temperatures[r]) for r in regions]


def describe_zones(temperatures: Mapping) -> str:
    """Zone temperatures as text, in the order stored (:data:`ZONES`' when find-best wrote them): ``0.5/2/3/1``,
    or per region ``wt 0.5/2/3/1, tc ...`` for ``{region: {zone: T}}``."""

    def one(temps: Mapping) -> str:
        return "/".join(f"{float(t):.3g}" for t in temps.values())

    if temperatures and all(isinstance(v, Mapping) for v in temperatures.values()):
        return ", ".join(f"{k} {one(v)}" for k, v in temperatures.items())
    return one(temperatures)


def fit_temperature(
    probs: np.ndarray, labels: np.ndarray, sigmoid: bool = False, weights: np.ndarray | None = None
) -> float:
    """The temperature minimising the (``weights``-weighted) NLL of sampled voxels, between :data:`T_MIN` and
    :data:`T_MAX`. The weights let a stratified sample stand for every voxel it was drawn from.

    Softmax: ``probs`` ``(K, N)`` class probabilities, ``labels`` ``(N,)`` reference class indices. Sigmoid:
    ``probs`` ``(N,)`` one region's probabilities, ``labels`` ``(N,)`` inside (1) or not (0). A bounded
    one-dimensional search on ``log T`` (the NLL is smooth and unimodal there in practice). No voxels: 1.0.
    """
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels).ravel()
    if (p.shape[-1] if p.ndim else 0) != y.size or (sigmoid and p.ndim != 1) or (not sigmoid and p.ndim != 2):
        raise ValueError(
            f"probabilities {p.shape} and labels {y.shape} do not fit ({'sigmoid' if sigmoid else 'softmax'})"
        )
    if y.size == 0:
        return 1.0
    w = np.ones(y.size) if weights is None else np.asarray(weights, dtype=np.float64).ravel()
    w = w / w.sum()
    if sigmoid:
        q = np.clip(p, EPS, 1 - EPS)
        z = np.log(q) - np.log1p(-q)
        t = (y != 0).astype(np.float64)

        def nll(log_t: float) -> float:
            s = z / np.exp(log_t)
            return float(np.sum(w * (np.logaddexp(0.0, s) - t * s)))
    else:
        z = np.log(np.clip(p, EPS, 1.0))
        z_true = z[y.astype(np.int64), np.arange(y.size)]

        def nll(log_t: float) -> float:
            s = z / np.exp(log_t)
            m = s.max(axis=0)
            return float(np.sum(w * (m + np.log(np.exp(s - m).sum(axis=0)) - z_true / np.exp(log_t))))

    res = optimize.minimize_scalar(
        nll, bounds=(np.log(T_MIN), np.log(T_MAX)), method="bounded", options={"xatol": 1e-5}
    )
    return float(np.exp(res.x))


def sample_indices(mask: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Flat indices of at most ``n`` voxels of ``mask``, drawn uniformly without replacement (sorted)."""
    idx = np.flatnonzero(mask)
    if idx.size > n:
        idx = np.sort(rng.choice(idx, size=n, replace=False))
    return idx
