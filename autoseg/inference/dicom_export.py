"""``predict`` with DICOM: the cases of DICOM series inputs, each case's output files per ``--output-format``,
and the writer that produces them (NIfTI, DICOM-SEG, RT-STRUCT; each file written atomically).

Outputs of a case ``<case>``: ``nifti`` → ``<case>.nii.gz`` (the series' own grid and slice order),
``dicom-seg`` → ``<case>.seg.dcm``, ``rtstruct`` → ``<case>.rtstruct.dcm``. DICOM-SEG and RT-STRUCT refer to
the source series, so they need DICOM input (for a multi-channel model: channel 0's series).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from autoseg.atomic import check_name_fits, check_output_folder
from autoseg.errors import AutosegError, DatasetError
from autoseg.io import dicom

OUTPUT_FORMATS = ("nifti", "dicom-seg", "rtstruct")
SUFFIXES = {"nifti": ".nii.gz", "dicom-seg": ".seg.dcm", "rtstruct": ".rtstruct.dcm"}


def check_formats(formats: Sequence[str] | None) -> list[str]:
    """The requested formats, checked, without repeats, in the order given (default: nifti)."""
    out: list[str] = []
    for f in formats or ["nifti"]:
        name = str(f).strip().lower()
        if name not in OUTPUT_FORMATS:
            raise AutosegError(f"--output-format: '{f}' is not one of {', '.join(OUTPUT_FORMATS)}")
        if name not in out:
            out.append(name)
    return out


@dataclass
class DicomJob:
    """What ``predict`` does for DICOM: the cases, one target per case (its first output) and the writer."""

    cases: list
    targets: list[Path]
    outputs: dict[Path, tuple[dicom.DicomCase, list[tuple[str, Path]]]]
    segments: list[tuple[str, tuple[int, ...]]]
    model_name: str

    def paths(self) -> list[Path]:
        """Every file this job writes (all formats of every case)."""
        return [p for _, paths in self.outputs.values() for _, p in paths]

    def write(self, seg: np.ndarray, props, target: Path) -> Path:
        from autoseg.inference.export import write_segmentation
        from autoseg.io.dicom_seg import write_dicom_seg, write_rtstruct

        case, outputs = self.outputs[target]
        files = case.series[0].files
        for fmt, path in outputs:
            if fmt == "nifti":
                write_segmentation(seg, props, path)
            elif fmt == "dicom-seg":
                write_dicom_seg(seg, files, self.segments, path, self.model_name)
            else:
                write_rtstruct(seg, files, self.segments, path, self.model_name)
        return target


def plan_job(
    inputs: Sequence[str | os.PathLike],
    output_dir: Path,
    formats: Sequence[str] | None,
    *,
    channel_names: Sequence[str],
    channels: dict[int, str] | None,
    segments: list[tuple[str, tuple[int, ...]]] | None = None,
    model_name: str,
    continue_: bool,
    overwrite: bool,
) -> DicomJob | None:
    """The DICOM job for these inputs and formats, or None for plain image inputs with NIfTI output."""
    formats = check_formats(formats)
    dicom_in = dicom.is_dicom_input(inputs)
    needs_dicom_out = any(f != "nifti" for f in formats)
    if not dicom_in:
        if needs_dicom_out:
            first = next(f for f in formats if f != "nifti")
            raise AutosegError(
                f"--output-format {first}: needs DICOM series as input (the output refers to the source slices); "
                f"{Path(inputs[0])} holds no DICOM series"
            )
        if channels:
            raise AutosegError("--channel: only for DICOM series inputs")
        return None
    dicom.require("pydicom", *(["highdicom"] if "dicom-seg" in formats else []))
    cases = dicom.discover_dicom_cases(inputs, len(channel_names), channel_names, channels)
    output_dir = Path(output_dir)
    for d in inputs:
        if output_dir.resolve() == Path(d).resolve() or Path(d).resolve() in output_dir.resolve().parents:
            raise DatasetError(f"{output_dir}: output folder must not be inside an input folder ({d})")
    outputs = {}
    for c in cases:
        paths = [(f, output_dir / f"{c.case_id}{SUFFIXES[f]}") for f in formats]
        outputs[paths[0][1]] = (c, paths)
    check_output_folder(output_dir)
    for _, paths in outputs.values():  # only checks here: stale temporaries go once every check has passed
        for _, p in paths:
            check_name_fits(p)
            if p.is_dir():
                raise DatasetError(f"{p}: is a folder where predict writes an output file; move it away")
    existing = [p for _, paths in outputs.values() for _, p in paths if os.path.lexists(p)]
    if existing and not (continue_ or overwrite):
        raise DatasetError(
            f"{existing[0]}: already exists ({len(existing)} output(s)); use --continue to skip them or --overwrite"
        )
    if continue_:
        outputs = {t: v for t, v in outputs.items() if not all(p.exists() for _, p in v[1])}
    targets = list(outputs)
    return DicomJob([outputs[t][0] for t in targets], targets, outputs, list(segments or []), model_name)
