"""Property-based fuzzing of the input checks: whatever a user hands autoseg, it answers with a result or with
:class:`~autoseg.errors.AutosegError` (one line naming the file), never with another exception.

(1) ``parse_dataset_json`` on arbitrary JSON-like values and on mutations of a valid ``dataset.json``;
(2) the volume readers and ``check_case_geometry`` on NIfTI files with random headers: spacing (0, negative,
NaN, Inf, huge), direction matrices (random, singular), qform/sform codes and shapes of 1 to 4 dimensions
(size-1 axes included). Files are written byte by byte (header + data), so no writer "fixes" the header first.
"""

from __future__ import annotations

import copy
import gzip
import math
from pathlib import Path

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is not installed (pip install -e '.[dev]')")
import tempfile  # noqa: E402

import nibabel as nib  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.configuration import set_hypothesis_home_dir  # noqa: E402

from autoseg.errors import AutosegError, DatasetError  # noqa: E402
from autoseg.io.dataset import Case, DatasetSpec, check_case_geometry, parse_dataset_json  # noqa: E402
from autoseg.io.volume import read_header, read_volume  # noqa: E402

# hypothesis keeps a cache under .hypothesis/ in the working directory: keep it out of the repository
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "autoseg-hypothesis")
FUZZ = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,  # the same examples every run: a CI failure reproduces locally
    database=None,  # no .hypothesis/ folder in the repository
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

# ------------------------------------------------------------------------------------ dataset.json

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-3, max_value=300)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from(["", "0", "00", " 1", "background", "ignore", ".nii.gz", ".png", "1.5", "-1"])
    | st.text(max_size=6)
)
json_values = st.recursive(
    _scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(_scalars.map(str), children, max_size=4)
    ),
    max_leaves=12,
)

VALID = {
    "channel_names": {"0": "T1", "1": "T2"},
    "labels": {"background": 0, "organ": 1, "lesion": 2},
    "numTraining": 2,
    "file_ending": ".nii.gz",
    "name": "Phantom",
}
KEYS = [*VALID, "regions", "brats_regions", "regions_class_order"]


@st.composite
def mutated_dataset_json(draw) -> dict:
    """A valid dataset.json with some top-level keys dropped or replaced, and some entries of ``labels`` or
    ``channel_names`` replaced or added (region syntax, ignore labels and odd channel keys included)."""
    d = copy.deepcopy(VALID)
    for key in draw(st.lists(st.sampled_from(KEYS), max_size=3, unique=True)):
        if draw(st.booleans()):
            d.pop(key, None)
        else:
            d[key] = draw(json_values)
    if draw(st.integers(0, 3)) == 0:  # channel indices written oddly ("00", " 1", "-1")
        keys = st.sampled_from(["0", "00", " 1", "1", "-1", "01", "1.0"])
        d["channel_names"] = draw(st.dictionaries(keys, st.text(max_size=3), min_size=1, max_size=3))
    for section in ("labels", "channel_names"):
        if isinstance(d.get(section), dict):
            for _ in range(draw(st.integers(0, 2))):
                name = draw(st.sampled_from(["background", "organ", "ignore", "0", "1", "01", "2", "x"]))
                odd = st.sampled_from([math.inf, -math.inf, math.nan, 1.5, 2.0, True, "1", 1e300, -0.0])
                d[section][name] = draw(
                    odd | json_values | st.lists(st.integers(-1, 4), max_size=3) | st.integers(-1, 5)
                )
    return d


def _parse(raw) -> None:
    try:
        spec = parse_dataset_json(raw, "fuzz/dataset.json")
    except AutosegError as exc:
        msg = str(exc)
        assert msg.startswith("fuzz/dataset.json: ") and "\n" not in msg, msg
        return
    assert isinstance(spec, DatasetSpec)
    assert spec.num_channels >= 1 and 0 in spec.labels.values()
    parse_dataset_json(spec.to_json())  # what autoseg writes back parses again


@FUZZ
@given(json_values)
def test_parse_dataset_json_on_arbitrary_json(raw):
    _parse(raw)


@FUZZ
@given(mutated_dataset_json())
def test_parse_dataset_json_on_mutated_valid_file(raw):
    _parse(raw)


# ------------------------------------------------------------------------------------- volume headers

_good_spacing = st.floats(min_value=0.01, max_value=50.0)
_spacings = st.one_of(  # mostly plausible, so that many examples get past the header checks
    _good_spacing,
    _good_spacing,
    _good_spacing,
    st.sampled_from([0.0, -1.0, math.nan, math.inf, 1e-9, 1e6, 1e38]),
)
_finite_entry = st.floats(min_value=-2, max_value=2)
_matrix_entries = st.one_of(
    _finite_entry, _finite_entry, _finite_entry, st.sampled_from([0.0, math.nan, math.inf])
)


@st.composite
def nifti_header(draw) -> tuple[tuple[int, ...], nib.Nifti1Header]:
    """A random shape (1-4 dims, size-1 axes allowed) and a NIfTI-1 header with random spacing and
    direction (identity, random or singular), qform and sform codes."""
    any_shape = st.lists(st.integers(1, 4), min_size=1, max_size=4)
    shape = tuple(draw(st.one_of(st.lists(st.integers(1, 4), min_size=3, max_size=3), any_shape)))
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(draw(st.sampled_from([np.float32, np.int16, np.uint8])))
    spacing = [draw(_spacings) for _ in range(3)]
    pixdim = hdr["pixdim"]
    pixdim[1 : 1 + min(len(shape), 3)] = spacing[: min(len(shape), 3)]
    hdr["pixdim"] = pixdim
    kind = draw(st.sampled_from(["identity", "random", "singular"]))
    if kind == "identity":
        direction = np.eye(3)
    elif kind == "random":
        direction = np.array([[draw(_matrix_entries) for _ in range(3)] for _ in range(3)])
    else:
        direction = np.zeros((3, 3))
        direction[0, 0] = 1.0
    with np.errstate(all="ignore"):
        affine = np.eye(4)
        affine[:3, :3] = direction * np.array(spacing)
        affine[:3, 3] = [draw(st.floats(-1e3, 1e3)) for _ in range(3)]
    hdr["sform_code"] = draw(st.sampled_from([0, 1, 2]))
    hdr["srow_x"], hdr["srow_y"], hdr["srow_z"] = affine[0], affine[1], affine[2]
    hdr["qform_code"] = draw(st.sampled_from([0, 1]))
    hdr["quatern_b"], hdr["quatern_c"], hdr["quatern_d"] = (draw(_matrix_entries) for _ in range(3))
    hdr["pixdim"][0] = draw(st.sampled_from([1.0, -1.0, 0.0]))  # qfac
    hdr["vox_offset"] = 352
    return shape, hdr


def _write(path: Path, shape: tuple[int, ...], hdr: nib.Nifti1Header) -> Path:
    data = np.zeros(shape, dtype=hdr.get_data_dtype())
    raw = hdr.binaryblock + b"\0" * 4 + data.tobytes(order="F")  # 348-byte header, empty extension flag
    path.write_bytes(gzip.compress(raw, compresslevel=1))
    return path


def _survives(call) -> None:
    try:
        call()
    except DatasetError as exc:
        assert "\n" not in str(exc), str(exc)


@settings(FUZZ, max_examples=40)  # each example writes two files and reads them five times
@given(image=nifti_header(), label=nifti_header())
def test_volume_checks_on_random_headers(image, label, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    img = _write(folder / "case_0000.nii.gz", *image)
    seg = _write(folder / "case.nii.gz", *label)
    _survives(lambda: read_header(img))
    _survives(lambda: read_volume(img))
    _survives(lambda: read_volume(img, orientation="LPS"))
    _survives(lambda: check_case_geometry(Case("case", (img,), seg)))
    _survives(lambda: check_case_geometry(Case("case", (img,), img)))
