"""Kill-and-resume of ``autoseg plan``: a rerun finishes exactly the unfinished cases and loses nothing.

``autoseg plan`` runs in a subprocess (its own session, so its pool workers die with it) and is SIGKILLed as
soon as some but not all cases of the phantom dataset are finished. On a machine fast enough to finish all six
before the kill lands, the interruption is simulated instead: the markers of half the cases are deleted, which
is what a kill leaves (``<case>.json`` is written last). Either way a stray temporary file is planted, as a
worker killed mid-write leaves one. The rerun happens in this process with one worker, so the cases it
preprocesses can be counted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from autoseg import api
from autoseg.layout import WorkDir
from autoseg.preprocessing import pipeline

N_CASES = 6  # the conftest phantom dataset
SUFFIXES = (".npy", "_seg.npy", "_fg.npz", ".json")


def _finished(out: Path) -> set[str]:
    return (
        {p.stem for p in out.glob("*.json") if pipeline.case_is_done(out, p.stem)} if out.is_dir() else set()
    )


def _plan_and_kill_part_way(dataset: Path, work: WorkDir, timeout_s: float = 120.0) -> None:
    """Start ``autoseg plan`` and SIGKILL its whole process group once 1..N-1 cases are finished."""
    out = work.preprocessed("fullres")
    cmd = [
        sys.executable,
        "-m",
        "autoseg",
        "plan",
        str(dataset),
        "--workdir",
        str(work.root),
        "--workers",
        "2",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while proc.poll() is None and time.monotonic() < deadline:
            if 0 < len(_finished(out)) < N_CASES:
                break
            time.sleep(0.002)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def _files(out: Path, case_ids) -> list[Path]:
    return [out / f"{c}{s}" for c in sorted(case_ids) for s in SUFFIXES]


def test_killed_plan_resumes_only_unfinished_cases(phantom_dataset, tmp_path, monkeypatch):
    reference = WorkDir(tmp_path / "reference")
    api.plan(phantom_dataset, reference.root, workers=1)
    all_ids = _finished(reference.preprocessed("fullres"))
    assert len(all_ids) == N_CASES

    work = WorkDir(tmp_path / "work")
    out = work.preprocessed("fullres")
    _plan_and_kill_part_way(phantom_dataset, work)
    assert work.plans.is_file(), "the subprocess was killed before it wrote plans.json"
    finished = _finished(out)
    if len(finished) == N_CASES:  # it won the race: interrupt by hand, as a kill would have
        for case_id in sorted(all_ids)[N_CASES // 2 :]:
            (out / f"{case_id}.json").unlink()
        finished = _finished(out)
    assert 0 < len(finished) < N_CASES
    (out / ".phantom_005.npy.autoseg-tmp-00000000dead.tmp.npy").write_bytes(b"half a write")
    mtimes = {p: p.stat().st_mtime_ns for p in _files(out, finished)}

    redone: list[str] = []
    real = pipeline.preprocess_training_case

    def counting(case, *args, **kwargs):
        redone.append(case.case_id)
        return real(case, *args, **kwargs)

    monkeypatch.setattr(pipeline, "preprocess_training_case", counting)
    api.plan(phantom_dataset, work.root, workers=1)

    assert sorted(redone) == sorted(all_ids - finished)
    assert _finished(out) == all_ids
    assert [p for p in work.root.rglob(".*")] == []
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes  # finished cases were not rewritten
    ref_out = reference.preprocessed("fullres")
    for case_id in sorted(all_ids):
        for suffix in (".npy", "_seg.npy"):
            a, b = np.load(out / f"{case_id}{suffix}"), np.load(ref_out / f"{case_id}{suffix}")
            assert a.dtype == b.dtype and np.array_equal(a, b), f"{case_id}{suffix}"
        with np.load(out / f"{case_id}_fg.npz") as a, np.load(ref_out / f"{case_id}_fg.npz") as b:
            assert sorted(a.files) == sorted(b.files)
            assert all(np.array_equal(a[k], b[k]) for k in a.files)
        assert json.loads((out / f"{case_id}.json").read_text()) == json.loads(
            (ref_out / f"{case_id}.json").read_text()
        )


def test_stale_temporary_files_are_removed_before_preprocessing(planned_phantom, tmp_path):
    """Only ``.``-prefixed temporary files go; finished cases and other files stay untouched."""
    from autoseg.io.dataset import discover_cases, load_dataset_json
    from autoseg.planning.plans import Plans

    work = WorkDir(tmp_path / "copy")
    out = work.preprocessed("fullres")
    out.mkdir(parents=True)
    stray = [
        out / ".phantom_000.npy.autoseg-tmp-0000abcd1234.tmp.npy",
        out / ".phantom_000.json.autoseg-tmp-0000abcd1234.tmp",
    ]
    for p in stray:
        p.write_bytes(b"x")
    keep = out / "notes.txt"
    keep.write_text("mine")
    spec = load_dataset_json(planned_phantom.dataset_json)
    source = Path(json.loads(planned_phantom.dataset_json.read_text())["source"])
    cases = discover_cases(source, spec)[:1]
    plans = Plans.load(planned_phantom.plans)
    done = pipeline.preprocess_dataset(cases, spec, plans, plans.configuration("3d_fullres"), out)
    assert done == [cases[0].case_id]
    assert not any(p.exists() for p in stray)
    assert keep.read_text() == "mine"


def test_plan_refuses_to_start_without_disk_space(phantom_dataset, tmp_path, monkeypatch):
    """The preprocessed-size estimate is checked against the free space before any case is written; the
    estimate is close to what preprocessing then writes."""
    import shutil as _shutil
    from collections import namedtuple

    from autoseg import api
    from autoseg.errors import AutosegError

    work = tmp_path / "work"
    real = _shutil.disk_usage
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(_shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(AutosegError, match=r"preprocessing needs about .* GB, only 0.0 GB free on its disk"):
        api.plan(phantom_dataset, work, workers=1)
    assert not list((work / "preprocessed").rglob("*.npy"))
    monkeypatch.setattr(_shutil, "disk_usage", real)
    plans = api.plan(phantom_dataset, work, workers=1)
    from autoseg.fingerprint import Fingerprint
    from autoseg.jsonio import read_json

    fp = Fingerprint.from_json(read_json(work / "fingerprint.json"))
    estimate = api.preprocessed_bytes(fp, plans, tuple(plans.configurations))
    written = sum(f.stat().st_size for f in (work / "preprocessed").rglob("*") if f.is_file())
    assert 0.8 * written < estimate < 1.5 * written, (estimate, written)
