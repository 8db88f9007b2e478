"""The nnU-Net v2 raw dataset layout: ``dataset.json``, ``imagesTr/``, ``labelsTr/``.

``DatasetSpec`` is what ``dataset.json`` says; ``discover_cases`` pairs image channels with labels and
``validate_dataset`` checks every case's headers (and, optionally, label values) before any work starts, so
a bad file is reported in one line that names it, instead of hours later deep inside numpy.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from autoseg.errors import DatasetError
from autoseg.io.volume import (
    HEADER_ENDINGS,
    SUPPORTED_ENDINGS,
    Geometry,
    channels_in_file,
    file_ending,
    header_data_files,
    read_header,
    read_volume,
)
from autoseg.jsonio import JSONFileError, read_json

_REQUIRED_KEYS = ("channel_names", "labels", "file_ending")
# how closely the channels and the label of one case must agree (check_case_geometry)
SPACING_RTOL = 1e-3
MAX_LABEL_VALUE = 32767
"""The largest label value dataset.json may declare: label maps are read as 16-bit integers (larger values
would wrap negative). Training stores label maps as 8 bits: see :data:`MAX_TRAINING_LABEL_VALUE`."""
MAX_TRAINING_LABEL_VALUE = 255
"""The largest label value ``plan`` accepts (labels, regions, ignore): preprocessed label maps and predictions
are stored as uint8."""
ORIGIN_TOLERANCE_MM = 1e-2
DIRECTION_TOLERANCE = 1e-3


@dataclass(frozen=True)
class DatasetSpec:
    """The parsed ``dataset.json``.

    ``labels`` maps a name to an integer value (``background`` must be 0). ``channel_names`` is ordered by
    channel index. ``regions`` maps a region name to the label values it unites, e.g. BraTS whole tumour
    ``[1, 2, 3, 4]``.

    Two nnU-Net conventions are supported:

    - **Region-based training**: when labels are given as lists of values (``"whole_tumor": [1, 2, 3, 4]``)
      with ``regions_class_order``, every non-background label is a region, the network predicts each region
      with a sigmoid, and predictions are painted back into a label map region by region in that order
      (region ``i`` writes value ``regions_class_order[i]``). ``labels`` then holds only background (and
      ignore). Without list labels, ``regions`` (from a ``regions`` or ``brats_regions`` key) are only
      evaluated as extra structures.
    - **Ignore label**: a label named ``ignore`` (any case) with the largest value marks voxels that are left
      out of the loss and the metrics; it is never predicted.
    """

    channel_names: tuple[str, ...]
    labels: dict[str, int]
    file_ending: str
    num_training: int | None = None
    name: str = ""
    regions: dict[str, tuple[int, ...]] = field(default_factory=dict)
    regions_class_order: tuple[int, ...] = ()
    ignore_label: int | None = None

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    @property
    def region_based(self) -> bool:
        return bool(self.regions_class_order)

    @property
    def allowed_values(self) -> set[int]:
        """Every value a label file may hold."""
        values = set(self.labels.values())
        for vals in self.regions.values():
            values.update(vals)
        return values

    @property
    def foreground_values(self) -> list[int]:
        """Label values that count as foreground (for sampling): not background, not ignore."""
        return sorted(v for v in self.allowed_values if v not in (0, self.ignore_label))

    @property
    def foreground_labels(self) -> dict[str, int]:
        """Named foreground labels (background and ignore excluded)."""
        return {k: v for k, v in self.labels.items() if v not in (0, self.ignore_label)}

    @property
    def num_classes(self) -> int:
        """Number of label-map values a prediction can hold, background included (ignore excluded)."""
        return max(self.foreground_values, default=0) + 1

    def to_json(self) -> dict:
        labels: dict = dict(self.labels)
        if self.region_based:  # nnU-Net's region syntax, so the result parses back to the same spec
            labels.update({k: list(v) for k, v in self.regions.items()})
        d = {
            "channel_names": {str(i): n for i, n in enumerate(self.channel_names)},
            "labels": labels,
            "file_ending": self.file_ending,
            "numTraining": self.num_training,
            "name": self.name,
        }
        if self.region_based:
            d["regions_class_order"] = list(self.regions_class_order)
        elif self.regions:
            d["regions"] = {k: list(v) for k, v in self.regions.items()}
        return d


def load_dataset_json(path: str | Path) -> DatasetSpec:
    """Parse and check ``dataset.json``; raises :class:`DatasetError` naming the file and the problem."""
    path = Path(path)
    if path.is_dir() and path.name != "dataset.json":
        path = path / "dataset.json"
    if path.is_dir():
        raise DatasetError(f"{path}: is a folder; dataset.json must be a file")
    if not path.is_file():
        raise DatasetError(f"{path}: dataset.json not found")
    try:
        raw = read_json(path)
    except JSONFileError as exc:
        raise DatasetError(str(exc)) from None
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: not valid JSON ({exc})") from None
    return parse_dataset_json(raw, path)


def parse_dataset_json(raw: object, path: str | Path = "dataset.json") -> DatasetSpec:
    """Validate a decoded ``dataset.json`` object (see :func:`load_dataset_json`)."""
    if not isinstance(raw, dict):
        raise DatasetError(f"{path}: top level must be a JSON object")
    for key in _REQUIRED_KEYS:
        if key not in raw:
            raise DatasetError(f"{path}: required key '{key}' is missing")
    channel_names = _parse_channel_names(raw["channel_names"], path)
    labels, regions, ignore, region_syntax = _parse_labels(raw["labels"], path)
    values = sorted(v for v in labels.values() if v != ignore)
    if 0 not in values:
        raise DatasetError(f"{path}: 'labels' must contain background with value 0")
    if len(set(labels.values())) != len(labels):
        raise DatasetError(f"{path}: two labels share one value: {labels}")
    order: tuple[int, ...] = ()
    if region_syntax:
        order = _parse_regions_class_order(raw.get("regions_class_order"), len(regions), path)
    elif values != list(range(len(values))):
        raise DatasetError(f"{path}: label values must be consecutive integers from 0, got {values}")
    all_values = set(values) | {v for vals in regions.values() for v in vals}
    if ignore is not None and ignore <= max(all_values):
        raise DatasetError(f"{path}: the 'ignore' label ({ignore}) must have the largest value")
    if not region_syntax:
        _add_evaluation_regions(raw, regions)

    ending = raw["file_ending"]
    if not isinstance(ending, str) or ending.lower() not in SUPPORTED_ENDINGS:
        raise DatasetError(
            f"{path}: file_ending {ending!r} is not supported (use one of {', '.join(SUPPORTED_ENDINGS)})"
        )
    if not (set(values) - {0}) and not regions:
        raise DatasetError(
            f"{path}: 'labels' declares no foreground label (only background{' and ignore' if ignore is not None else ''}); "
            'there is nothing to segment (add e.g. "organ": 1)'
        )
    num = raw.get("numTraining")
    if num is not None and (isinstance(num, bool) or not isinstance(num, int) or num < 0):
        raise DatasetError(f"{path}: 'numTraining' must be a non-negative integer, got {num!r}")
    return DatasetSpec(
        channel_names=channel_names,
        labels=labels,
        file_ending=ending,
        num_training=num,
        name=str(raw.get("name", "")),
        regions=regions,
        regions_class_order=order,
        ignore_label=ignore,
    )


def _parse_channel_names(channels: object, path: str | Path) -> tuple[str, ...]:
    """``channel_names`` ordered by channel index; the keys must be "0", "1", ... without gaps."""
    if not isinstance(channels, dict) or not channels:
        raise DatasetError(f'{path}: \'channel_names\' must be a non-empty object like {{"0": "CT"}}')
    if not all(isinstance(k, str) and k.isdigit() and str(int(k)) == k for k in channels):
        # "00", " 1" or "1.0" would parse as an index but could not be looked up as "0", "1"
        raise DatasetError(
            f'{path}: \'channel_names\' keys must be channel indices "0", "1", ..., got {sorted(map(str, channels))}'
        )
    idx = sorted(int(k) for k in channels)
    if idx != list(range(len(idx))):
        raise DatasetError(f"{path}: 'channel_names' keys must be 0..{len(idx) - 1} without gaps, got {idx}")
    return tuple(str(channels[str(i)]) for i in idx)


def _parse_labels(
    labels_raw: object, path: str | Path
) -> tuple[dict[str, int], dict[str, tuple[int, ...]], int | None, bool]:
    """(labels, regions, ignore value, region syntax) from the ``labels`` object, each value checked.

    With region syntax (some label is a list of values), every non-background label becomes a region.
    """
    if not isinstance(labels_raw, dict) or not labels_raw:
        raise DatasetError(
            f'{path}: \'labels\' must be a non-empty object like {{"background": 0, "organ": 1}}'
        )
    labels: dict[str, int] = {}
    regions: dict[str, tuple[int, ...]] = {}
    ignore: int | None = None
    region_syntax = any(isinstance(v, list) for v in labels_raw.values())
    for name, value in labels_raw.items():
        if isinstance(value, list):
            regions[name] = _region_values(name, value, path)
            continue
        value = _label_value(name, value, path)
        if name.lower() == "ignore":
            ignore = value
        elif region_syntax and value != 0:
            regions[name] = (value,)  # with region syntax, a plain label is a one-value region
            continue
        labels[name] = value
    return labels, regions, ignore, region_syntax


def _region_values(name: str, value: list, path: str | Path) -> tuple[int, ...]:
    """The values of a label given as a list (a region): positive integers up to :data:`MAX_LABEL_VALUE`."""
    if not value or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
        raise DatasetError(f"{path}: label '{name}' must be an integer or a list of positive integers")
    if max(value) > MAX_LABEL_VALUE:
        raise DatasetError(
            f"{path}: label '{name}' lists value {_short_int(max(value))}; label values must be at most "
            f"{MAX_LABEL_VALUE} (label maps are read as 16-bit integers)"
        )
    return tuple(int(v) for v in value)


def _label_value(name: str, value: object, path: str | Path) -> int:
    """A plain label's value: an integer (or integral float) from 0 to :data:`MAX_LABEL_VALUE`."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (isinstance(value, float) and (not np.isfinite(value) or not value.is_integer()))
    ):
        raise DatasetError(f"{path}: label '{name}' has value {value!r}; label values must be integers")
    if int(value) < 0:
        raise DatasetError(f"{path}: label '{name}' has negative value {_short_int(int(value))}")
    if int(value) > MAX_LABEL_VALUE:
        raise DatasetError(
            f"{path}: label '{name}' has value {_short_int(int(value))}; label values must be at most "
            f"{MAX_LABEL_VALUE} (label maps are read as 16-bit integers)"
        )
    return int(value)


def _parse_regions_class_order(raw_order: object, num_regions: int, path: str | Path) -> tuple[int, ...]:
    """``regions_class_order``: one label value (1 to :data:`MAX_LABEL_VALUE`) per region."""
    if not isinstance(raw_order, list) or len(raw_order) != num_regions:
        raise DatasetError(
            f"{path}: labels given as lists (regions) need 'regions_class_order', one label value per region "
            f"({num_regions}), saying which value each predicted region is written as"
        )
    if not all(
        isinstance(v, int) and not isinstance(v, bool) and 0 < v <= MAX_LABEL_VALUE for v in raw_order
    ):
        raise DatasetError(
            f"{path}: 'regions_class_order' must list integers from 1 to {MAX_LABEL_VALUE}, "
            "got [" + ", ".join(_short_int(v) if isinstance(v, int) else repr(v) for v in raw_order) + "]"
        )
    return tuple(int(v) for v in raw_order)


def _add_evaluation_regions(raw: dict, regions: dict[str, tuple[int, ...]]) -> None:
    """Add evaluation-only regions from a 'regions' key, or the 'brats_regions' key of our shared BraTS data.

    Malformed entries are skipped (they are optional extras); a name already in ``regions`` is kept.
    """
    for key in ("regions", "brats_regions"):
        extra = raw.get(key)
        if not isinstance(extra, dict):
            continue
        for name, vals in extra.items():
            if (
                isinstance(vals, list)
                and vals
                and all(
                    isinstance(v, int) and not isinstance(v, bool) and 0 < v <= MAX_LABEL_VALUE for v in vals
                )
            ):
                regions.setdefault(str(name), tuple(int(v) for v in vals))


def _check_link(f: Path) -> None:
    """A symbolic link whose target is missing (or that links back to itself) is named, not read."""
    if f.is_symlink() and not f.exists():
        raise DatasetError(f"{f}: broken symbolic link (its target does not exist, or the link loops)")


def _short_int(v: int) -> str:
    """An integer for a message: digits, or ``about 1e+30`` when it is long."""
    return str(v) if abs(v) < 10**12 else f"about {float(v):.3g}"


def check_training_labels(spec: DatasetSpec, path: str | Path) -> None:
    """Refuse label values that training cannot store: every value (labels, regions, ignore) must be at most
    :data:`MAX_TRAINING_LABEL_VALUE`, since preprocessed label maps and predictions are uint8."""
    named = dict(spec.labels)
    for name, vals in spec.regions.items():
        named[name] = max(vals)
    for i, v in enumerate(spec.regions_class_order):
        named[f"regions_class_order[{i}]"] = v
    for name, value in named.items():
        if value > MAX_TRAINING_LABEL_VALUE:
            raise DatasetError(
                f"{path}: label '{name}' has value {value}; training needs label values from 0 to "
                f"{MAX_TRAINING_LABEL_VALUE} (preprocessed label maps and predictions are 8-bit)"
            )


@dataclass(frozen=True)
class Case:
    """One training case: its id, channel files (ordered by channel index) and label file (or None)."""

    case_id: str
    images: tuple[Path, ...]
    label: Path | None
    four_d: bool = False
    """``images`` is one 4D file holding every channel in its 4th dimension (MSD style)."""


_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<ch>\d{4})$")


def group_images(folder: Path, spec: DatasetSpec, *, strict: bool = True) -> dict[str, tuple[Path, ...]]:
    """Group ``<case>_<cccc><ending>`` files of ``folder`` by case id, checking every channel is there.

    With ``strict``, a file with another ending or not matching the pattern is an error (stray file).
    """
    if not folder.is_dir():
        raise DatasetError(f"{folder}: folder not found")
    ending = spec.file_ending
    found: dict[str, dict[int, Path]] = {}
    data_files = _header_data_files(folder, ending)
    for f in sorted(folder.iterdir()):
        if f.name.startswith(".") or f.name in data_files:
            continue
        _check_link(f)
        if not f.name.endswith(ending):
            if strict:
                raise DatasetError(f"{f}: unexpected file (dataset.json says file_ending is '{ending}')")
            continue
        stem = f.name[: -len(ending)]
        m = _CHANNEL_RE.match(stem)
        if not m:
            if strict:
                raise DatasetError(
                    f"{f}: name must be <case>_<channel as 4 digits>{ending}, e.g. case01_0000{ending}"
                )
            continue
        ch = int(m.group("ch"))
        if ch >= spec.num_channels:
            raise DatasetError(
                f"{f}: channel {ch} but dataset.json declares {spec.num_channels} channel(s) {list(spec.channel_names)}"
            )
        found.setdefault(m.group("case"), {})[ch] = f
    out: dict[str, tuple[Path, ...]] = {}
    for case_id, chans in found.items():
        missing = [c for c in range(spec.num_channels) if c not in chans]
        if missing:
            names = ", ".join(f"{case_id}_{c:04d}{ending}" for c in missing)
            raise DatasetError(f"{folder}: case '{case_id}' is missing channel file(s) {names}")
        out[case_id] = tuple(chans[c] for c in range(spec.num_channels))
    return out


def _header_data_files(folder: Path, ending: str) -> set[str]:
    """Names of the data files that the ``.mhd`` / ``.nhdr`` headers in ``folder`` name (they belong to an
    image, they are not stray files)."""
    if ending.lower() not in HEADER_ENDINGS:
        return set()
    return {
        d.name
        for f in folder.iterdir()
        if f.name.lower().endswith(ending.lower()) and not f.name.startswith(".")
        for d in header_data_files(f)
    }


def discover_cases(dataset_dir: str | Path, spec: DatasetSpec | None = None) -> list[Case]:
    """List the training cases of a raw dataset folder, each with all channels and its label."""
    root = Path(dataset_dir)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder not found")
    spec = spec or load_dataset_json(root / "dataset.json")
    images = group_images(root / "imagesTr", spec)
    labels_dir = root / "labelsTr"
    if not labels_dir.is_dir():
        raise DatasetError(f"{labels_dir}: folder not found")
    label_files = {}
    data_files = _header_data_files(labels_dir, spec.file_ending)
    for f in sorted(labels_dir.iterdir()):
        if f.name.startswith(".") or f.name in data_files:
            continue
        _check_link(f)
        if not f.name.endswith(spec.file_ending):
            raise DatasetError(
                f"{f}: unexpected file (dataset.json says file_ending is '{spec.file_ending}')"
            )
        label_files[f.name[: -len(spec.file_ending)]] = f
    for case_id in images:
        if case_id not in label_files:
            raise DatasetError(
                f"{labels_dir / (case_id + spec.file_ending)}: label file missing for case '{case_id}'"
            )
    for case_id, f in label_files.items():
        if case_id not in images:
            raise DatasetError(f"{f}: label without images (no {case_id}_0000{spec.file_ending} in imagesTr)")
    if not images:
        raise DatasetError(f"{root / 'imagesTr'}: no images found with ending '{spec.file_ending}'")
    if spec.num_training is not None and spec.num_training != len(images):
        raise DatasetError(
            f"{root / 'dataset.json'}: numTraining is {spec.num_training} but imagesTr holds {len(images)} case(s)"
        )
    return [Case(cid, images[cid], label_files[cid]) for cid in sorted(images)]


def check_case_geometry(case: Case) -> Geometry:
    """All channels and the label of ``case`` must share shape; spacing/origin/direction must agree closely.

    Returns the geometry of the first channel. Raises :class:`DatasetError` naming the mismatching file.
    """
    ref = read_header(case.images[0])
    others = list(case.images[1:]) + ([case.label] if case.label is not None else [])
    for f in others:
        g = read_header(f)
        if g.shape != ref.shape:
            raise DatasetError(f"{f}: shape {g.shape} differs from {case.images[0].name} {ref.shape}")
        if not np.allclose(g.spacing_mm, ref.spacing_mm, rtol=SPACING_RTOL, atol=1e-4):
            raise DatasetError(
                f"{f}: spacing {_fmt(g.spacing_mm)} mm differs from {case.images[0].name} {_fmt(ref.spacing_mm)} mm "
                f"(tolerance {SPACING_RTOL:.1%})"
            )
        # an error, not a warning: image and label would be resampled as if they overlapped exactly
        if not np.allclose(g.origin_mm, ref.origin_mm, rtol=0, atol=ORIGIN_TOLERANCE_MM):
            raise DatasetError(
                f"{f}: origin {_fmt(g.origin_mm)} mm differs from {case.images[0].name} {_fmt(ref.origin_mm)} mm "
                f"(tolerance {ORIGIN_TOLERANCE_MM:g} mm)"
            )
        if not np.allclose(g.direction, ref.direction, rtol=0, atol=DIRECTION_TOLERANCE):
            raise DatasetError(
                f"{f}: direction {_fmt(g.direction)} differs from {case.images[0].name} {_fmt(ref.direction)} "
                f"(tolerance {DIRECTION_TOLERANCE:g} per direction cosine)"
            )
    return ref


def load_label(path: Path, allowed: set[int], orientation: str | None = None) -> tuple[np.ndarray, Geometry]:
    """Read a label map as uint8/int16, checking values are integral and declared in dataset.json."""
    vol = read_volume(path, dtype=None, orientation=orientation)
    arr = vol.array
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.isfinite(arr)):
            raise DatasetError(f"{path}: label map contains NaN or Inf")
        rounded = np.rint(arr)
        if not np.array_equal(rounded, arr):
            bad = arr[rounded != arr][:3]
            raise DatasetError(f"{path}: label map has non-integer values (e.g. {bad.tolist()})")
        arr = rounded
        huge = np.unique(arr[np.abs(arr) > MAX_LABEL_VALUE])
        if huge.size:  # before any integer cast, which would wrap them
            raise DatasetError(
                f"{path}: label map has values {[f'{v:g}' for v in huge[:3].tolist()]} beyond the label range "
                f"(declared in dataset.json: {sorted(allowed)})"
            )
    values = set(np.unique(arr).astype(np.int64).tolist())
    negative = sorted(v for v in values if v < 0)
    if negative:
        raise DatasetError(
            f"{path}: label map has negative values {negative}; label values are the non-negative integers "
            f"declared in dataset.json {sorted(allowed)}"
        )
    unknown = sorted(values - allowed)
    if unknown:
        raise DatasetError(
            f"{path}: label values {unknown} are not declared in dataset.json labels {sorted(allowed)}"
        )
    dtype = np.uint8 if max(allowed) < 256 else np.int16
    return arr.astype(dtype), vol.geometry


def _fmt(t: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in t) + ")"


def discover_inputs(input_path: str | Path | Sequence[str | Path], num_channels: int) -> list[Case]:
    """Cases to predict from a folder, one file, or a list of files.

    A folder holds ``<case>_<cccc><ending>`` files (any supported ending). Files are grouped the same way by
    name; a file without a ``_cccc`` suffix is a case of its own: a 3D image for a one-channel model, or a 4D
    image with the channels in its 4th dimension (MSD style). Case ids must be unique."""
    if not isinstance(input_path, (str, Path)):
        paths = [Path(x) for x in input_path]
        if len(paths) == 1:
            return discover_inputs(paths[0], num_channels)
        seen_files: dict[Path, Path] = {}
        for x in paths:
            if not x.is_file():
                _check_input_file(x)
                raise DatasetError(f"{x}: not a file (give one folder, or image files)")
            key = x.resolve()
            if key in seen_files:
                raise DatasetError(f"{x}: given twice (also as {seen_files[key]})")
            seen_files[key] = x
        return _group_files(paths, num_channels, Path(paths[0]).parent)
    p = Path(input_path)
    if p.is_file():
        return _group_files([p], num_channels, p.parent)
    if p.is_symlink() and not p.exists():
        raise DatasetError(f"{p}: broken symbolic link (its target {os.readlink(p)} does not exist)")
    if not p.is_dir():
        raise DatasetError(f"{p}: input not found")
    found: dict[str, dict[int, Path]] = {}
    for f in sorted(p.iterdir()):
        ending = file_ending(f)
        if f.name.startswith(".") or not ending:
            continue  # hidden, or not an image (e.g. a README or an .mhd's data file); ignored
        _check_input_file(f)
        m = _CHANNEL_RE.match(f.name[: -len(ending)])
        if not m:
            raise DatasetError(
                f"{f}: name must be <case>_<channel as 4 digits>{ending}, e.g. case01_0000{ending}"
            )
        ch = int(m.group("ch"))
        if ch >= num_channels:
            raise DatasetError(f"{f}: channel {ch}, but the model was trained with {num_channels} channel(s)")
        _add_channel(found, m.group("case"), ch, f)
    if not found:
        raise DatasetError(f"{p}: no images found (expected <case>_0000{'.nii.gz'} and so on)")
    return _cases_from_channels(found, num_channels, p)


def _check_input_file(f: Path) -> None:
    """An input named like an image must be one: a regular file (or a link to one)."""
    if not os.path.lexists(f):
        raise DatasetError(f"{f}: file not found")
    if f.is_symlink() and not f.exists():
        raise DatasetError(f"{f}: broken symbolic link (its target {os.readlink(f)} does not exist)")
    if f.is_dir():
        raise DatasetError(f"{f}: is a folder, but its name says image; rename or remove it")
    if not f.is_file():
        raise DatasetError(f"{f}: not a regular file (a device, pipe or socket named like an image)")


def _add_channel(found: dict[str, dict[int, Path]], case_id: str, ch: int, f: Path) -> None:
    """Record ``f`` as channel ``ch`` of ``case_id``; a second file for it (another ending) is an error."""
    chans = found.setdefault(case_id, {})
    if ch in chans:
        raise DatasetError(
            f"{f}: channel {ch} of case '{case_id}' is also given as {chans[ch].name}; keep only one of them"
        )
    chans[ch] = f


def _group_files(files: list[Path], num_channels: int, where: Path) -> list[Case]:
    """Cases from explicit files: ``<case>_<cccc>`` files are channels of one case, other files one case
    each (3D for one channel, 4D with every channel)."""
    found: dict[str, dict[int, Path]] = {}
    whole: list[Case] = []
    for f in files:
        ending = file_ending(f)
        if not ending:
            raise DatasetError(f"{f}: unsupported file ending (use one of {', '.join(SUPPORTED_ENDINGS)})")
        stem = f.name[: -len(ending)]
        stored = channels_in_file(f)
        m = _CHANNEL_RE.match(stem)
        if stored > 1 or not m:
            if stored != num_channels:
                what = f"{stored} channels in its 4th dimension" if stored > 1 else "one channel"
                raise DatasetError(
                    f"{f}: holds {what}, but the model needs {num_channels}"
                    + ("; give <case>_<cccc> files or one 4D file" if num_channels > 1 else "")
                )
            whole.append(Case(m.group("case") if m and stored == 1 else stem, (f,), None, four_d=stored > 1))
            continue
        ch = int(m.group("ch"))
        if ch >= num_channels:
            raise DatasetError(f"{f}: channel {ch}, but the model was trained with {num_channels} channel(s)")
        _add_channel(found, m.group("case"), ch, f)
    for case_id, chans in found.items():
        missing = [c for c in range(num_channels) if c not in chans]
        if missing:
            raise DatasetError(
                f"{min(chans.values())}: the model needs {num_channels} channels; case '{case_id}' lacks "
                f"channel(s) {missing} (give every <case>_<cccc> file, or one 4D file)"
            )
    cases = _cases_from_channels(found, num_channels, where) + whole
    seen: set[str] = set()
    for c in cases:
        if c.case_id in seen:
            raise DatasetError(f"{c.images[0]}: case '{c.case_id}' is given twice")
        seen.add(c.case_id)
    return sorted(cases, key=lambda c: c.case_id)


def _cases_from_channels(found: dict[str, dict[int, Path]], num_channels: int, p: Path) -> list[Case]:
    cases = []
    for case_id in sorted(found):
        chans = found[case_id]
        missing = [c for c in range(num_channels) if c not in chans]
        if missing:
            raise DatasetError(
                f"{p}: case '{case_id}' lacks channel(s) {missing}; the model needs {num_channels}"
            )
        cases.append(Case(case_id, tuple(chans[c] for c in range(num_channels)), None))
    return cases
