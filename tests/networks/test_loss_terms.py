"""Every loss of a loss expression (autoseg.networks.losses.CompositeLoss) against an independent numpy
formula on a small tensor, a float64 gradient check, its minimum at a perfect prediction, ignore-label masking,
deep supervision, and ``dice+ce`` bit for bit as DiceCELoss / RegionDiceBCELoss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from autoseg.loss_spec import parse_loss
from autoseg.networks.losses import (
    CompositeLoss,
    DeepSupervisionLoss,
    DiceCELoss,
    RegionDiceBCELoss,
    lovasz_jaccard_grad,
    signed_distance,
)

S = 1e-5  # the losses' smooth term
ALL = [
    "ce",
    "ce(weights=[0.5,2,3])",
    "dice",
    "dice_sq",
    "gdice",
    "focal(gamma=2)",
    "tversky(alpha=0.3,beta=0.7)",
    "focal_tversky(alpha=0.3,beta=0.7,gamma=1.3333)",
    "lovasz",
    "boundary",
]
REGION = [t for t in ALL if "weights" not in t]
REGIONS = [[1, 2], [2]]


def _loss(text, **kw):
    return CompositeLoss(parse_loss(text), **kw)


def _data(seed=0, k=3, shape=(2, 3, 4, 2), dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn((shape[0], k, *shape[1:]), generator=g, dtype=dtype)
    target = torch.randint(0, k, (shape[0], 1, *shape[1:]), generator=g)
    return logits, target


def _softmax_np(logits):
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _onehot_np(target, k):
    return np.stack([(target[:, 0] == c) for c in range(k)], 1).astype(float)


# --- independent numpy formulas, one voxel / class / sample at a time --------------------------------------


def _ref_ce(p, g, w=None):
    w = np.ones(p.shape[1]) if w is None else np.asarray(w)
    num = den = 0.0
    for b in range(p.shape[0]):
        for idx in np.ndindex(p.shape[2:]):
            c = int(np.argmax(g[(b, slice(None), *idx)]))
            num += -w[c] * math.log(p[(b, c, *idx)])
            den += w[c]
    return num / den


def _per_class(p, g, f, first=1):
    """mean over samples and classes ``first..`` of ``f(p_bc, g_bc)`` (flattened voxel vectors)."""
    return np.mean(
        [f(p[b, c].ravel(), g[b, c].ravel()) for b in range(p.shape[0]) for c in range(first, p.shape[1])]
    )


def _ref_dice(p, g, first=1):
    return -_per_class(p, g, lambda a, t: (2 * (a * t).sum() + S) / (a.sum() + t.sum() + S), first)


def _ref_dice_sq(p, g, first=1):
    return -_per_class(p, g, lambda a, t: (2 * (a * t).sum() + S) / ((a**2).sum() + (t**2).sum() + S), first)


def _ref_tversky_index(a, t, alpha, beta):
    tp, fp, fn = (a * t).sum(), (a * (1 - t)).sum(), ((1 - a) * t).sum()
    return (tp + S) / (tp + alpha * fp + beta * fn + S)


def _ref_gdice(p, g):
    out = []
    for b in range(p.shape[0]):
        vol = np.array([g[b, c].sum() for c in range(p.shape[1])])
        w = np.array([1 / v**2 if v > 0 else 0.0 for v in vol])
        w[vol == 0] = w.max()
        num = sum(w[c] * (p[b, c] * g[b, c]).sum() for c in range(p.shape[1]))
        den = sum(w[c] * (p[b, c].sum() + g[b, c].sum()) for c in range(p.shape[1]))
        out.append(2 * num / den)
    return 1 - np.mean(out)


def _ref_focal(p_true, gamma):
    return float(np.mean([-((1 - q) ** gamma) * math.log(q) for q in p_true.ravel()]))


def _ref_lovasz(p, g):
    """By the definition: sum over voxels sorted by decreasing error e of e_i (J(S_i) - J(S_{i-1})), with
    J(S) = |S| / |G u S| the Jaccard loss of mispredicting the set S (G: the class's voxels)."""
    losses = []
    for c in range(p.shape[1]):
        a, t = p[:, c].ravel(), g[:, c].ravel()
        if t.sum() == 0:
            continue
        err = np.abs(t - a)
        order = sorted(range(len(a)), key=lambda i: -err[i])
        fg = {i for i in range(len(a)) if t[i] == 1}
        total, prev, chosen = 0.0, 0.0, set()
        for i in order:
            chosen.add(i)
            jac = len(chosen) / len(fg | chosen)
            total += err[i] * (jac - prev)
            prev = jac
        losses.append(total)
    return np.mean(losses)


def _flat(a):
    """``(B, C, *spatial)`` → ``(voxels, C)``."""
    return np.moveaxis(a, 1, -1).reshape(-1, a.shape[1])


def _ref_sdm(mask):
    """Signed distances by brute force: outside, the distance to the nearest mask voxel; inside, minus (the
    distance to the nearest voxel outside, less 1); zeros without a boundary."""
    if mask.all() or not mask.any():
        return np.zeros(mask.shape)
    idx = np.argwhere(np.ones(mask.shape, bool))
    inside, outside = idx[mask.ravel()], idx[~mask.ravel()]
    out = np.zeros(mask.shape)
    for q in idx:
        if mask[tuple(q)]:
            out[tuple(q)] = -(np.sqrt(((outside - q) ** 2).sum(1)).min() - 1)
        else:
            out[tuple(q)] = np.sqrt(((inside - q) ** 2).sum(1)).min()
    return out


def _ref_boundary(p, g, first=1):
    phi = np.zeros_like(g)
    for b in range(g.shape[0]):
        for c in range(g.shape[1]):
            phi[b, c] = _ref_sdm(g[b, c] > 0.5)
    return (p[:, first:] * phi[:, first:]).mean()


def _reference(text, logits, target):
    x, t = logits.numpy(), target.numpy()
    p, g = _softmax_np(x), _onehot_np(t, x.shape[1])
    p_true = (p * g).sum(1)
    tv = lambda a, b: _per_class(p, g, lambda u, v: _ref_tversky_index(u, v, a, b))  # noqa: E731
    return {
        "ce": lambda: _ref_ce(p, g),
        "ce(weights=[0.5,2,3])": lambda: _ref_ce(p, g, [0.5, 2, 3]),
        "dice": lambda: _ref_dice(p, g),
        "dice_sq": lambda: _ref_dice_sq(p, g),
        "gdice": lambda: _ref_gdice(p, g),
        "focal(gamma=2)": lambda: _ref_focal(p_true, 2.0),
        "tversky(alpha=0.3,beta=0.7)": lambda: 1 - tv(0.3, 0.7),
        "focal_tversky(alpha=0.3,beta=0.7,gamma=1.3333)": lambda: _per_class(
            p, g, lambda u, v: (1 - _ref_tversky_index(u, v, 0.3, 0.7)) ** (1 / 1.3333)
        ),
        "lovasz": lambda: _ref_lovasz(_flat(p), _flat(g)),
        "boundary": lambda: _ref_boundary(p, g),
    }[text]()


@pytest.mark.parametrize("text", ALL)
def test_value_matches_an_independent_formula(text):
    logits, target = _data(seed=1)
    got = float(_loss(text)(logits, target))
    assert got == pytest.approx(_reference(text, logits, target), rel=1e-9, abs=1e-12)


def _ref_region(text, logits, target):
    x, t = logits.numpy(), target.numpy()
    p = 1 / (1 + np.exp(-x))
    g = np.stack([np.isin(t[:, 0], r) for r in REGIONS], 1).astype(float)
    bce = -(g * np.log(p) + (1 - g) * np.log(1 - p))
    tv = lambda a, b: _per_class(p, g, lambda u, v: _ref_tversky_index(u, v, a, b), 0)  # noqa: E731
    return {
        "ce": lambda: bce.mean(),
        "dice": lambda: _ref_dice(p, g, 0),
        "dice_sq": lambda: _ref_dice_sq(p, g, 0),
        "gdice": lambda: _ref_gdice(p, g),
        "focal(gamma=2)": lambda: float(np.mean((1 - np.exp(-bce)) ** 2 * bce)),
        "tversky(alpha=0.3,beta=0.7)": lambda: 1 - tv(0.3, 0.7),
        "focal_tversky(alpha=0.3,beta=0.7,gamma=1.3333)": lambda: _per_class(
            p, g, lambda u, v: (1 - _ref_tversky_index(u, v, 0.3, 0.7)) ** (1 / 1.3333), 0
        ),
        "lovasz": lambda: _ref_lovasz(_flat(p), _flat(g)),
        "boundary": lambda: _ref_boundary(p, g, 0),
    }[text]()


@pytest.mark.parametrize("text", REGION)
def test_region_value_matches_an_independent_formula(text):
    logits, target = _data(seed=2, k=2)
    got = float(_loss(text, regions=REGIONS)(logits, target))
    assert got == pytest.approx(_ref_region(text, logits, target), rel=1e-9, abs=1e-12)


def test_lovasz_gradient_worked_by_hand():
    # truth ordered by decreasing error [1, 0, 1]: Jaccard losses of the first 1, 2, 3 voxels 1/2, 2/3, 3/3
    grad = lovasz_jaccard_grad(torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64))
    assert grad.tolist() == pytest.approx([1 / 2, 1 / 6, 1 / 3])
    assert float(torch.tensor([0.9, 0.5, 0.2], dtype=torch.float64) @ grad) == pytest.approx(0.6)


def test_worked_by_hand_on_one_binary_volume():
    """Two classes, four voxels, probabilities of class 1 p = (0.8, 0.6, 0.3, 0.1), truth g = (1, 1, 0, 0)."""
    p1 = torch.tensor([0.8, 0.6, 0.3, 0.1], dtype=torch.float64)
    logits = torch.stack([torch.zeros(4, dtype=torch.float64), torch.log(p1 / (1 - p1))])[None]
    target = torch.tensor([[[1, 1, 0, 0]]])
    # TP = 1.4, FP = 0.4, FN = 0.6, sum p = 1.8, sum g = 2, sum p^2 = 1.1
    assert float(_loss("dice")(logits, target)) == pytest.approx(-(2.8 + S) / (3.8 + S))
    assert float(_loss("dice_sq")(logits, target)) == pytest.approx(-(2.8 + S) / (3.1 + S))
    ti = (1.4 + S) / (1.4 + 0.3 * 0.4 + 0.7 * 0.6 + S)
    assert float(_loss("tversky")(logits, target)) == pytest.approx(1 - ti)
    ce = -(math.log(0.8) + math.log(0.6) + math.log(0.7) + math.log(0.9)) / 4
    assert float(_loss("ce")(logits, target)) == pytest.approx(ce)
    focal = (
        -(0.2**2 * math.log(0.8) + 0.4**2 * math.log(0.6) + 0.3**2 * math.log(0.7) + 0.1**2 * math.log(0.9))
        / 4
    )
    assert float(_loss("focal(gamma=2)")(logits, target)) == pytest.approx(focal)
    # lovasz: both classes have errors (0.2, 0.4, 0.3, 0.1) per voxel; sorted: voxels 2, 3, 1, 4.
    # class 1 (G = {1, 2}): J(S) = |S| / |G u S| = 1/2, 2/3, 3/3, 4/4 -> 0.4/2 + 0.3/6 + 0.2/3 + 0.1*0
    # class 0 (G = {3, 4}): J = 1/3, 2/3, 3/4, 4/4 -> 0.4/3 + 0.3/3 + 0.2/12 + 0.1/4
    one = (0.4 / 2 + 0.3 / 6 + 0.2 / 3 + 0.4 / 3 + 0.3 / 3 + 0.2 / 12 + 0.1 / 4) / 2
    assert float(_loss("lovasz")(logits, target)) == pytest.approx(one)


def test_special_cases_agree():
    logits, target = _data(seed=3)
    assert float(_loss("focal(gamma=0)")(logits, target)) == pytest.approx(float(_loss("ce")(logits, target)))
    assert float(_loss("ce(weights=[2,2,2])")(logits, target)) == pytest.approx(
        float(_loss("ce")(logits, target))
    )
    # Tversky with alpha = beta = 1/2 is the Dice index (up to the smooth term), and gamma = 1 takes no power
    tv = float(_loss("tversky(alpha=0.5,beta=0.5)")(logits, target))
    assert tv == pytest.approx(1 + float(_loss("dice")(logits, target)), abs=1e-4)
    ftv = float(_loss("focal_tversky(alpha=0.5,beta=0.5,gamma=1)")(logits, target))
    assert ftv == pytest.approx(tv)
    two = float(_loss("0.25*dice+2*ce")(logits, target))
    assert two == pytest.approx(
        0.25 * float(_loss("dice")(logits, target)) + 2 * float(_loss("ce")(logits, target))
    )


@pytest.mark.parametrize("text", ALL)
def test_gradcheck_float64(text):
    logits, target = _data(seed=4, shape=(1, 2, 3))
    target = torch.tensor([[[[0, 1, 2], [2, 1, 0]]]])
    x = logits.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: _loss(text)(v, target), (x,))


@pytest.mark.parametrize("text", REGION)
def test_gradcheck_float64_regions(text):
    logits, _ = _data(seed=5, k=2, shape=(1, 2, 3))
    target = torch.tensor([[[[0, 1, 2], [2, 1, 0]]]])
    x = logits.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: _loss(text, regions=REGIONS)(v, target), (x,))


MINIMUM = {"dice": -1.0, "dice_sq": -1.0}


@pytest.mark.parametrize("text", ALL)
def test_perfect_prediction_gives_the_minimum(text):
    _, target = _data(seed=6)
    onehot = torch.nn.functional.one_hot(target[:, 0], 3).movedim(-1, 1).double()
    perfect = 30 * (2 * onehot - 1)
    loss = _loss(text)
    best = float(loss(perfect, target))
    minimum = (
        _ref_boundary(onehot.numpy(), onehot.numpy())
        if text == "boundary"
        else MINIMUM.get(text.split("(")[0], 0.0)
    )
    assert best == pytest.approx(minimum, abs=1e-5)
    for seed in range(10):
        assert float(loss(_data(seed=100 + seed)[0] * 3, target)) > best


@pytest.mark.parametrize("text", REGION)
def test_perfect_region_prediction_gives_the_minimum(text):
    _, target = _data(seed=7)
    truth = torch.stack([torch.isin(target[:, 0], torch.tensor(r)) for r in REGIONS], 1).double()
    loss = _loss(text, regions=REGIONS)
    best = float(loss(30 * (2 * truth - 1), target))
    minimum = (
        _ref_boundary(truth.numpy(), truth.numpy(), 0)
        if text == "boundary"
        else MINIMUM.get(text.split("(")[0], 0.0)
    )
    assert best == pytest.approx(minimum, abs=1e-5)
    assert float(loss(_data(seed=8, k=2)[0], target)) > best


@pytest.mark.parametrize("regions", [None, REGIONS])
@pytest.mark.parametrize("text", ALL)
def test_ignore_label_voxels_count_in_no_term(text, regions):
    if regions is not None and "weights" in text:
        pytest.skip("class weights are for softmax classes")
    k = 3 if regions is None else 2
    logits, target = _data(seed=9, k=k)
    target[0, 0, 0] = 3  # a row of ignored voxels
    target[1, 0, :, 1] = 3
    loss = _loss(text, regions=regions, ignore_label=3)
    other = logits.clone()
    other[:, :, 0][0] += 5 * torch.randn_like(other[:, :, 0][0])
    other[1, :, :, 1] = -other[1, :, :, 1] * 3
    assert float(loss(other, target)) == pytest.approx(float(loss(logits, target)), rel=1e-12)


def test_ignore_label_per_voxel_losses_are_means_over_the_valid_voxels():
    logits, target = _data(seed=10)
    target[:, :, 0] = 3
    for text in ("ce", "focal(gamma=2)", "ce(weights=[0.5,2,3])"):
        masked = float(_loss(text, ignore_label=3)(logits, target))
        kept = float(_loss(text)(logits[:, :, 1:], target[:, :, 1:]))
        assert masked == pytest.approx(kept, rel=1e-12)


@pytest.mark.parametrize("text", ALL)
def test_under_deep_supervision(text):
    logits, target = _data(seed=11, shape=(2, 4, 4, 2))
    low = logits[:, :, ::2, ::2, ::2].clone()
    lowest = logits[:, :, ::4, ::4, ::2].clone()
    inner = _loss(text)
    ds = DeepSupervisionLoss(inner)
    want = (inner(logits, target) * 4 / 6) + (inner(low, target[:, :, ::2, ::2, ::2]) * 2 / 6)
    assert float(ds([logits, low, lowest], target)) == pytest.approx(float(want), rel=1e-12)


# --- dice+ce is today's loss, bit for bit --------------------------------------------------------------


@pytest.mark.parametrize("ignore", [None, 3])
@pytest.mark.parametrize("batch_dice", [False, True])
def test_dice_ce_is_dice_ce_loss_bit_for_bit(ignore, batch_dice):
    logits, target = _data(seed=12, k=3, shape=(2, 8, 8, 6), dtype=torch.float32)
    if ignore is not None:
        target[0, 0, :3] = ignore
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    new = DeepSupervisionLoss(_loss("dice+ce", batch_dice=batch_dice, ignore_label=ignore))
    old = DeepSupervisionLoss(DiceCELoss(batch_dice=batch_dice, ignore_label=ignore))
    low = lambda x: x[:, :, ::2, ::2, ::2]  # noqa: E731
    la, lb = new([a, low(a), low(low(a))], target), old([b, low(b), low(low(b))], target)
    assert torch.equal(la, lb)
    la.backward()
    lb.backward()
    assert torch.equal(a.grad, b.grad)
    plain = target.clamp_max(2)
    assert torch.equal(_loss("ce+dice")(logits, plain), DiceCELoss()(logits, plain))


@pytest.mark.parametrize("ignore", [None, 3])
def test_region_dice_ce_is_region_dice_bce_loss_bit_for_bit(ignore):
    logits, target = _data(seed=13, k=2, shape=(2, 8, 8, 6), dtype=torch.float32)
    if ignore is not None:
        target[1, 0, :, :2] = ignore
    new = _loss("dice+ce", regions=REGIONS, ignore_label=ignore)
    old = RegionDiceBCELoss(REGIONS, ignore_label=ignore)
    assert torch.equal(new(logits, target), old(logits, target))


def test_dice_ce_under_cpu_autocast_is_dice_ce_loss_bit_for_bit():
    logits, target = _data(seed=14, k=3, shape=(2, 8, 8, 6), dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = torch.nn.functional.conv3d(logits, torch.eye(3).reshape(3, 3, 1, 1, 1))
        assert torch.equal(_loss("dice+ce")(x, target), DiceCELoss()(x, target))


def test_signed_distance_by_hand():
    mask = np.array([[0, 0, 1, 1, 1, 0, 0]], bool)
    assert signed_distance(mask).tolist() == [[2, 1, 0, -1, 0, 1, 2]]
    assert (
        not signed_distance(np.zeros((3, 3), bool)).any() and not signed_distance(np.ones((3, 3), bool)).any()
    )
    rng = np.random.default_rng(0)
    blob = rng.random((5, 6, 4)) < 0.3
    assert np.allclose(signed_distance(blob), _ref_sdm(blob))


def test_boundary_with_a_dice_term_prefers_the_truth():
    """Beside a region loss (as it is meant to be used) the perfect prediction still gives the least loss."""
    _, target = _data(seed=15)
    onehot = torch.nn.functional.one_hot(target[:, 0], 3).movedim(-1, 1).double()
    loss = _loss("dice+0.01*boundary")
    best = float(loss(30 * (2 * onehot - 1), target))
    assert all(float(loss(_data(seed=200 + i)[0] * 3, target)) > best for i in range(5))
