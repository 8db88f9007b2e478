"""Model bundles are untrusted input: every hostile bundle is refused through the CLI (``import-model`` and
``predict --model``) with exit 2, one ``error:`` line naming the bundle member (``model.zip:plans.json: ...``),
no traceback, and nothing written; size attacks are refused with bounded memory.

The bundles are made from a phantom WORK whose 3d_fullres fold 0 holds an untrained network of the planned
topology (built, not trained: the tests only need weights that match the plans), exported with the CLI.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import stat
import struct
import subprocess
import sys
import warnings
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from autoseg.cli import main
from autoseg.inference.predictor import topology_key
from autoseg.layout import WorkDir
from autoseg.networks import build_network
from autoseg.planning.plans import Plans
from tests.test_bad_input import _error_line, _listing, _run

CKPT = "results/3d_fullres/fold_0/checkpoint_final.pt"
REPO = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------------------- fixtures


def _write_checkpoint(work: WorkDir, config: str, fold, widen: int = 0) -> None:
    plans = Plans.load(work.plans)
    net = build_network(plans.configuration(config).network, plans.input_channels(config), plans.num_outputs)
    path = work.fold_dir(config, fold) / "checkpoint_final.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    key = topology_key(plans, config)
    torch.save({"network": net.state_dict(), "config": config, "topology": json.dumps(key), "epoch": 1}, path)


@pytest.fixture(scope="module")
def model_work(planned_phantom, tmp_path_factory) -> WorkDir:
    work = WorkDir(tmp_path_factory.mktemp("model") / "work")
    work.root.mkdir()
    for f in (planned_phantom.plans, planned_phantom.dataset_json):
        (work.root / f.name).write_bytes(f.read_bytes())
    _write_checkpoint(work, "3d_fullres", 0)
    return work


@pytest.fixture(scope="module")
def good(model_work, tmp_path_factory) -> Path:
    bundle = tmp_path_factory.mktemp("good") / "model.zip"
    assert main(["export-model", str(model_work.root), str(bundle), "-c", "3d_fullres"]) == 0
    return bundle


def _members(bundle: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(bundle) as zf:
        return {n: zf.read(n) for n in zf.namelist() if n != "manifest.json"}


def _manifest(members: dict[str, bytes], **extra) -> bytes:
    m = {
        "schema_version": 1,
        "autoseg_version": "0",
        "configs": ["3d_fullres"],
        "folds": {"3d_fullres": ["0"]},
        "files": {k: hashlib.sha256(v).hexdigest() for k, v in members.items()},
    }
    m.update(extra)
    return json.dumps(m).encode()


def _zip(path: Path, entries: list[tuple[str | zipfile.ZipInfo, bytes]], comment: bytes = b"") -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate names some cases write on purpose
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for name, data in entries:
                zf.writestr(name, data)
            zf.comment = comment
    return path


def _bundle(path: Path, members: dict[str, bytes], **manifest) -> Path:
    """A bundle of ``members`` with a manifest listing them all with correct checksums."""
    return _zip(path, [("manifest.json", _manifest(members, **manifest)), *members.items()])


def _edit_json(good: Path, name: str, edit: Callable[[dict], None]) -> Callable[[Path], Path]:
    def make(path: Path) -> Path:
        members = _members(good)
        d = json.loads(members[name])
        edit(d)
        members[name] = json.dumps(d).encode()
        return _bundle(path, members)

    return make


def _with_members(good: Path, extra: dict[str, bytes]) -> Callable[[Path], Path]:
    return lambda path: _bundle(path, {**_members(good), **extra})


def _refused(capfd, tmp_path: Path, bundle: Path, *, command: str = "import") -> str:
    """Run import-model (or predict --model) on ``bundle``: one error line, nothing written anywhere under
    ``tmp_path`` (the target is never created, no staging folder is left)."""
    before = _listing(tmp_path)
    dirs = sorted(p for p in tmp_path.rglob("*") if p.is_dir())
    target = tmp_path / "new" / "work"
    if command == "import":
        code, _, err = _run(capfd, "import-model", bundle, target)
    else:
        inputs = tmp_path / "inputs"
        inputs.mkdir(exist_ok=True)
        dirs = sorted(p for p in tmp_path.rglob("*") if p.is_dir())
        code, _, err = _run(
            capfd, "predict", "--model", bundle, inputs, tmp_path / "out", "--device", "cpu", "--no-mirroring"
        )
        assert not (tmp_path / "out").exists()
    line = _error_line(code, err)
    assert not target.exists() and not target.parent.exists()
    assert _listing(tmp_path) == before
    assert sorted(p for p in tmp_path.rglob("*") if p.is_dir()) == dirs
    return line


# ------------------------------------------------------------------------------- the good bundle


def test_exported_bundle_imports_and_holds_only_what_it_lists(good, tmp_path, capfd):
    code, out, err = _run(capfd, "import-model", good, tmp_path / "w")
    assert code == 0, err
    names = sorted(str(p.relative_to(tmp_path / "w")) for p in (tmp_path / "w").rglob("*") if p.is_file())
    assert names == sorted(["plans.json", "dataset.json", "model_card.json", "MODEL_CARD.md", CKPT])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    from autoseg.atomic import UMASK as _UMASK

    assert stat.S_IMODE((tmp_path / "w").stat().st_mode) == 0o777 & ~_UMASK  # not mkdtemp's 0700


# --------------------------------------------------------------------- only what a bundle may hold


def _raw_entry(name: str, data: bytes, mode: int | None = None, flags: int = 0, method=None) -> tuple:
    info = zipfile.ZipInfo(name)
    info.compress_type = zipfile.ZIP_DEFLATED if method is None else method
    if mode is not None:
        info.external_attr = mode << 16
    info.flag_bits |= flags
    return (info, data)


def _entries(
    good: Path, *extra: tuple, manifest_extra: dict[str, bytes] | None = None
) -> Callable[[Path], Path]:
    """The good bundle's entries plus ``extra`` raw entries; the manifest also lists ``manifest_extra``."""

    def make(path: Path) -> Path:
        members = _members(good)
        listed = {**members, **(manifest_extra or {})}
        return _zip(path, [("manifest.json", _manifest(listed)), *members.items(), *extra])

    return make


MEMBER_CASES = [
    ("shell script", lambda g: _with_members(g, {"evil.sh": b"rm -rf ~\n"}), "model.zip:evil.sh: not something a model bundle holds"),
    ("splits.json", lambda g: _with_members(g, {"splits.json": b"[]"}), "model.zip:splits.json: not something a model bundle holds"),
    ("nested zip", lambda g: _with_members(g, {"results/3d_fullres/fold_0/inner.zip": b"PK\x05\x06" + bytes(18)}), "model.zip:results/3d_fullres/fold_0/inner.zip: not something"),
    ("other checkpoint name", lambda g: _with_members(g, {"results/3d_fullres/fold_0/checkpoint_latest.pt": b"x"}), "checkpoint_latest.pt: not something a model bundle holds"),
    ("Plans.json beside plans.json", lambda g: _with_members(g, {"Plans.json": b"{}"}), "model.zip:Plans.json: member collides with 'plans.json' (names differ only in case)"),
    ("duplicate plans.json", lambda g: _entries(g, ("plans.json", b"{}")), "model.zip:plans.json: member appears twice"),
    ("two manifests", lambda g: _entries(g, ("manifest.json", b"{}")), "model.zip:manifest.json: member appears twice"),
    ("unlisted member", lambda g: _entries(g, ("inference_instructions.json", b"{}")), "model.zip:inference_instructions.json: member is not listed in the manifest"),
    ("listed but missing", lambda g: _entries(g, manifest_extra={"inference_instructions.json": b"{}"}), "model.zip:inference_instructions.json: listed in the manifest but missing"),
    ("stray folder entry", lambda g: _entries(g, ("junk/", b"")), "model.zip:junk/: unexpected folder entry"),
    ("symlink", lambda g: _entries(g, _raw_entry("inference_instructions.json", b"/etc/passwd", mode=stat.S_IFLNK | 0o777)), "model.zip:inference_instructions.json: member is a link"),
    ("fifo", lambda g: _entries(g, _raw_entry("inference_instructions.json", b"", mode=stat.S_IFIFO | 0o644)), "model.zip:inference_instructions.json: member is not a regular file"),
    ("absolute path", lambda g: _with_members(g, {"/tmp/evil.json": b"{}"}), "member '/tmp/evil.json' has an absolute or Windows path"),
    ("dot-dot", lambda g: _with_members(g, {"results/../../evil.pt": b"x"}), "member 'results/../../evil.pt' escapes the target folder"),
    ("encrypted member", lambda g: _encrypted(g), "model.zip:dataset.json: member is encrypted"),
    ("bzip2 member", lambda g: _entries(g, _raw_entry("inference_instructions.json", b"{}", method=zipfile.ZIP_BZIP2)), "model.zip:inference_instructions.json: compression method 12"),
    ("checkpoint of an unplanned configuration", lambda g: _with_members(g, {"results/3d_huge/fold_0/checkpoint_final.pt": _members(g)[CKPT]}), "model.zip:results/3d_huge/fold_0/checkpoint_final.pt: names configuration '3d_huge', which is not in the bundle's plans.json"),
    ("manifest folds lie", lambda g: lambda p: _bundle(p, _members(g), folds={"3d_fullres": ["0", "1"]}), "model.zip:manifest.json: 'folds'"),
    ("manifest names an unplanned configuration", lambda g: lambda p: _bundle(p, _members(g), configs=["3d_huge"]), "model.zip:manifest.json: names configuration '3d_huge'"),
]  # fmt: skip


@pytest.mark.parametrize("make, expected", [pytest.param(m, e, id=i) for i, m, e in MEMBER_CASES])
def test_bundle_may_hold_only_its_files(make, expected, good, tmp_path, capfd):
    bundle = make(good)(tmp_path / "model.zip")
    line = _refused(capfd, tmp_path, bundle)
    assert expected in line, line
    assert str(bundle) in line


# ----------------------------------------------------------------------------- the zip file itself


def _truncated(good: Path, path: Path) -> Path:
    path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    return path


def _bad_crc(good: Path, path: Path) -> Path:
    """A stored dataset.json whose bytes are changed after writing (CRC and sha256 no longer match)."""
    members = _members(good)
    with zipfile.ZipFile(path, "w") as zf:  # stored: the data lies in the file as is
        zf.writestr("manifest.json", _manifest(members))
        for k, v in members.items():
            zf.writestr(k, v)
    data = bytearray(path.read_bytes())
    at = data.index(members["dataset.json"][:40])
    data[at + 5] ^= 0x20
    path.write_bytes(bytes(data))
    return path


def _comment_with_fake_end(good: Path, path: Path) -> Path:
    """A zip comment holding a second end-of-central-directory record that points at nonsense."""
    fake = b"PK\x05\x06" + struct.pack("<HHHHIIH", 0, 0, 9999, 9999, 2**31, 7, 0)
    return _zip(path, [("manifest.json", _manifest(_members(good))), *_members(good).items()], comment=fake)


def _local_name_differs(good: Path, path: Path) -> Path:
    """dataset.json's local header names another file than its central-directory entry does."""
    _bundle(path, _members(good))
    data = bytearray(path.read_bytes())
    at = 0
    while data[at + 30 : at + 42] != b"dataset.json":
        at = data.index(b"PK\x03\x04", at + 4)
    data[at + 30 : at + 42] = b"datasex.json"
    path.write_bytes(bytes(data))
    return path


ZIP_CASES = [
    ("not a zip", lambda g, p: (p.write_text("just text\n"), p)[1], "not a zip file"),
    ("empty file", lambda g, p: (p.write_bytes(b""), p)[1], "not a zip file"),
    ("truncated", _truncated, "not a zip file"),
    ("empty zip", lambda g, p: _zip(p, []), "no manifest.json; not an autoseg model bundle"),
    ("no plans", lambda g, p: _bundle(p, {"dataset.json": _members(g)["dataset.json"]}, configs=[], folds={}), "no plans.json"),
    ("bad CRC", _bad_crc, "model.zip:dataset.json: cannot be read (Bad CRC-32"),
    ("comment with a fake end record", _comment_with_fake_end, "model.zip"),
    ("local header names another file", _local_name_differs, "model.zip:dataset.json: cannot be read (File name in directory"),
    ("too many entries", lambda g, p: _zip(p, [(f"f{i}", b"") for i in range(300)]), "holds 300 entries; a model bundle holds at most 256"),
]  # fmt: skip


@pytest.mark.parametrize("make, expected", [pytest.param(m, e, id=i) for i, m, e in ZIP_CASES])
def test_damaged_or_foreign_zip_is_refused(make, expected, good, tmp_path, capfd):
    bundle = make(good, tmp_path / "model.zip")
    line = _refused(capfd, tmp_path, bundle)
    assert expected in line and str(bundle) in line, line


def test_bundle_path_and_target_are_checked(good, model_work, tmp_path, capfd):
    # the bundle is a folder, or absent
    (tmp_path / "folder.zip").mkdir()
    assert "folder.zip: not a file" in _refused(capfd, tmp_path, tmp_path / "folder.zip")
    assert "absent.zip: model bundle not found" in _refused(capfd, tmp_path, tmp_path / "absent.zip")
    # importing into a WORK that already has a model, into a file, or under a file: refused, untouched
    work_before = _listing(model_work.root)
    code, _, err = _run(capfd, "import-model", good, model_work.root)
    assert f"{model_work.root}: already holds files" in _error_line(code, err)
    assert _listing(model_work.root) == work_before
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "folder.zip")
    code, _, err = _run(capfd, "import-model", good, link)
    assert f"{link}: is a link" in _error_line(code, err)
    link.unlink()
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine\n")
    code, _, err = _run(capfd, "import-model", good, a_file)
    assert f"{a_file}: exists and is not a folder" in _error_line(code, err)
    code, _, err = _run(capfd, "import-model", good, a_file / "work")
    assert f"{a_file / 'work'}: cannot create the folder ({a_file} is not a folder)" in _error_line(code, err)
    assert a_file.read_text() == "mine\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.zip", "notes.txt"]


# ------------------------------------------------------------------------------------- bounded sizes


def _patch_header(path: Path, name: str, local_at: int, central_at: int, fmt: str, value) -> Path:
    """Rewrite one field of ``name``'s local header and central-directory entry (at the given offsets)."""
    data = bytearray(path.read_bytes())
    raw = name.encode()
    for sig, field_at, name_len_at, header in (
        (b"PK\x03\x04", local_at, 26, 30),
        (b"PK\x01\x02", central_at, 28, 46),
    ):
        at = 0
        while (at := data.find(sig, at)) >= 0:
            n = struct.unpack_from("<H", data, at + name_len_at)[0]
            if data[at + header : at + header + n] == raw:
                struct.pack_into(fmt, data, at + field_at, value)
            at += 4
    path.write_bytes(bytes(data))
    return path


def _patch_declared_size(path: Path, name: str, size: int) -> Path:
    """Rewrite the uncompressed size that the local header and the central directory declare for ``name``."""
    return _patch_header(path, name, 22, 24, "<I", size)


def _encrypted(good: Path) -> Callable[[Path], Path]:
    """dataset.json flagged as encrypted (general purpose bit 0; zipfile cannot write encrypted members)."""

    def make(path: Path) -> Path:
        _bundle(path, _members(good))
        return _patch_header(path, "dataset.json", 6, 8, "<H", 0x1)

    return make


def _zeros_member(
    path: Path, members: dict[str, bytes], name: str, size: int, listed_hash: str | None = None
):
    """A bundle whose ``name`` is ``size`` zero bytes, written by streaming (the test never holds it whole)."""
    digest = hashlib.sha256()
    chunk = bytes(2**20)
    for _ in range(size // 2**20):
        digest.update(chunk)
    listed = {k: hashlib.sha256(v).hexdigest() for k, v in members.items()}
    listed[name] = listed_hash or digest.hexdigest()
    manifest = {"schema_version": 1, "autoseg_version": "0", "configs": [], "folds": {}, "files": listed}
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        zf.writestr("manifest.json", json.dumps(manifest))
        for k, v in members.items():
            zf.writestr(k, v)
        info = zipfile.ZipInfo(name)
        info.compress_type = zipfile.ZIP_DEFLATED  # level 1: about 230x for zeros, and fast
        with zf.open(info, "w", force_zip64=True) as out:
            for _ in range(size // 2**20):
                out.write(chunk)
    return path


_BOMBS: dict[Path, Path] = {}


def _bomb_checkpoint(good: Path, path: Path) -> Path:
    """The good bundle with a 600 MiB checkpoint of zeros (2.7 MiB deflated), correct hash; made once."""
    if good not in _BOMBS:
        members = _members(good)
        members.pop(CKPT)
        _BOMBS[good] = _zeros_member(good.with_name("bomb.zip"), members, CKPT, 600 * 2**20)
    path.write_bytes(_BOMBS[good].read_bytes())
    return path


def _huge_manifest(good: Path, path: Path) -> Path:
    members = _members(good)
    manifest = _manifest(members)[:-1] + b', "padding": "' + b"x" * (2 * 2**20) + b'"}'
    return _zip(path, [("manifest.json", manifest), *members.items()])


def _lying_manifest_size(good: Path, path: Path) -> Path:
    """manifest.json's header declares 100 bytes; the data holds the whole (valid) manifest."""
    members = _members(good)
    _zip(path, [("manifest.json", _manifest(members)), *members.items()])
    return _patch_declared_size(path, "manifest.json", 100)


def _lying_checkpoint_size(good: Path, path: Path) -> Path:
    """The checkpoint's header declares 600 MiB (a stored member of a few bytes)."""
    members = _members(good)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("manifest.json", _manifest(members))
        for k, v in members.items():
            zf.writestr(k, v)
    return _patch_declared_size(path, CKPT, 600 * 2**20)


def _lying_deflated_checkpoint(good: Path, path: Path) -> Path:
    """The deflated checkpoint's header declares 600 MiB, its compressed size stays the true one."""
    members = _members(good)
    _bundle(path, members)
    return _patch_declared_size(path, CKPT, 600 * 2**20)


def _padded_checkpoint(good: Path, path: Path) -> Path:
    """A checkpoint 4 MiB larger than the weights of its planned network (an extra tensor of noise)."""
    members = _members(good)
    ckpt = torch.load(io.BytesIO(members[CKPT]), weights_only=True)
    ckpt["extra"] = torch.rand(2**20)
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    members[CKPT] = buf.getvalue()
    return _bundle(path, members)


SIZE_CASES = [
    ("600 MiB checkpoint of zeros", _bomb_checkpoint, f"model.zip:{CKPT}: would expand"),
    ("8 MiB dataset.json of spaces (zip bomb)", lambda g, p: _zeros_member(p, {k: v for k, v in _members(g).items() if k != "dataset.json"}, "dataset.json", 8 * 2**20), "model.zip:dataset.json: would expand"),
    ("2 MiB manifest", _huge_manifest, "model.zip:manifest.json: declares"),
    ("manifest header lies about its size", _lying_manifest_size, "model.zip:manifest.json: cannot be read (Bad CRC-32"),
    ("stored checkpoint header lies about its size", _lying_checkpoint_size, f"model.zip:{CKPT}: declares 629145600 bytes but stores"),
    ("deflated checkpoint header lies about its size", _lying_deflated_checkpoint, f"model.zip:{CKPT}: would expand"),
    ("checkpoint larger than its network", _padded_checkpoint, f"model.zip:{CKPT}: declares"),
]  # fmt: skip


@pytest.mark.parametrize("make, expected", [pytest.param(m, e, id=i) for i, m, e in SIZE_CASES])
def test_oversized_members_are_refused(make, expected, good, tmp_path, capfd):
    bundle = make(good, tmp_path / "model.zip")
    line = _refused(capfd, tmp_path, bundle)
    assert expected in line, line


_PEAK = """
import resource, sys, tracemalloc
from autoseg.cli import main
import autoseg.bundle, autoseg.networks, torch  # imported before measuring
# first a small import (the good bundle): what is imported lazily on the way is not counted
assert main(["import-model", sys.argv[3], sys.argv[2] + ".warm"]) == 0
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
tracemalloc.start()
code = main(["import-model", sys.argv[1], sys.argv[2]])
peak = tracemalloc.get_traced_memory()[1]
print(code, peak, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)
"""


def _peak(bundle: Path, target: Path, warm: Path) -> tuple[int, int, int]:
    """exit code, peak Python allocations (bytes) and growth of the peak resident size (KiB) of an import in
    a fresh process, after importing the bundle ``warm``."""
    run = subprocess.run(
        [sys.executable, "-c", _PEAK, str(bundle), str(target), str(warm)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    code, peak, rss = run.stdout.split()[-3:]
    return int(code), int(peak), int(rss)


def test_refusing_a_bomb_and_importing_a_large_checkpoint_take_bounded_memory(model_work, good, tmp_path):
    bomb = _bomb_checkpoint(good, tmp_path / "bomb.zip")
    code, peak, rss = _peak(bomb, tmp_path / "w1", good)
    assert code == 2 and peak < 4 * 2**20 and rss < 64 * 1024, (peak, rss)
    assert not (tmp_path / "w1").exists()

    # a real bundle with a checkpoint of about 20 MiB: streamed to disk and checked memory-mapped, never read whole
    wide = WorkDir(tmp_path / "wide")
    wide.root.mkdir()
    for f in (model_work.plans, model_work.dataset_json):
        (wide.root / f.name).write_bytes(f.read_bytes())
    plans = json.loads(wide.plans.read_text())
    net = plans["configurations"]["3d_fullres"]["network"]
    net["features_per_stage"] = [min(16 * 2**i, 256) for i in range(len(net["features_per_stage"]))]
    wide.plans.write_text(json.dumps(plans))
    _write_checkpoint(wide, "3d_fullres", 0)
    size = (wide.fold_dir("3d_fullres", 0) / "checkpoint_final.pt").stat().st_size
    assert size > 16 * 2**20
    bundle = tmp_path / "wide.zip"
    with zipfile.ZipFile(bundle, "w") as zf:  # stored, as weights barely compress
        members = {n: (wide.root / n).read_bytes() for n in ("plans.json", "dataset.json", CKPT)}
        zf.writestr("manifest.json", _manifest(members))
        for k, v in members.items():
            zf.writestr(k, v)
    del members
    code, peak, rss = _peak(bundle, tmp_path / "w2", good)
    assert code == 0 and (tmp_path / "w2" / CKPT).stat().st_size == size
    # the old import read the member whole (peak above its size); now 1 MiB chunks and a memory map
    assert peak < 4 * 2**20 and rss * 1024 < size / 2, (size, peak, rss)


# ----------------------------------------------------------------------------- plans as untrusted


def _config(key: str, value) -> Callable[[dict], None]:
    return lambda p: p["configurations"]["3d_fullres"].update({key: value})


def _network(key: str, value) -> Callable[[dict], None]:
    return lambda p: p["configurations"]["3d_fullres"]["network"].update({key: value})


def _per_stage(p: dict, key: str, value) -> None:
    net = p["configurations"]["3d_fullres"]["network"]
    net[key] = [value] * len(net["features_per_stage"])


def _stages(n: int) -> Callable[[dict], None]:
    def edit(p: dict) -> None:
        net = p["configurations"]["3d_fullres"]["network"]
        net.update(features_per_stage=[4] * n, strides=[[1, 1, 1]] * n, kernel_sizes=[[3, 3, 3]] * n)

    return edit


def _cycle(p: dict) -> None:
    p["configurations"]["3d_fullres"]["previous_stage"] = "2d"
    p["configurations"]["2d"]["previous_stage"] = "3d_fullres"


def _rename(p: dict) -> None:
    c = p["configurations"].pop("2d")
    c["name"] = "../x"
    p["configurations"]["../x"] = c


PLANS_CASES = [
    ("patch 100000^3", _config("patch_size", [100000] * 3), "configuration '3d_fullres': patch_size [100000, 100000, 100000] must be at most"),
    ("patch 2000^3", _config("patch_size", [2048] * 3), "configuration '3d_fullres': patch_size [2048, 2048, 2048] must be at most 67108864 voxels"),
    ("patch not divisible by the stride", _config("patch_size", [33, 32, 32]), "must be divisible by the total stride"),
    ("spacing 1e-4 mm", _config("spacing", [1e-4, 1e-4, 1e-4]), "configuration '3d_fullres': spacing [0.0001, 0.0001, 0.0001] must be in [0.001, 1000] mm"),
    ("huge batch", _config("batch_size", 10**9), "configuration '3d_fullres': batch_size 1000000000 must be"),
    ("label 1e8", lambda p: p["labels"].update(big=100000000), "labels {"),
    ("labels {}", lambda p: p.update(labels={}), "labels {} must be a non-empty object"),
    ("label as float", lambda p: p["labels"].update(label1=1.5), "must be a non-empty object of label values"),
    ("labels with a gap", lambda p: p["labels"].update(far=7), "consecutive values from 0"),
    ("orientation XYZ", lambda p: p.update(orientation="XYZ"), "orientation 'XYZ' must be 3 letters"),
    ("orientation LLS", lambda p: p.update(orientation="LLS"), "orientation 'LLS' must be 3 letters"),
    ("unknown normalisation", lambda p: p["normalization"][0].update(scheme="magic"), "normalization scheme of channel 0 'magic' must be one of zscore, ct, none"),
    ("normalisation key", lambda p: p["normalization"][0].update(run="os.system"), "normalization of channel 0"),
    ("CT without statistics", lambda p: p["normalization"][0].update(scheme="ct"), "normalization clip_low of channel 0 None must be a number"),
    ("CT std 0", lambda p: p["normalization"][0].update(scheme="ct", clip_low=0, clip_high=1, mean=0, std=0), "CT normalization of channel 0"),
    ("one normalisation for two channels", lambda p: p["normalization"].pop(), "normalization"),
    ("huge features", lambda p: _per_stage(p, "features_per_stage", 10**6), "features_per_stage [1000000, "),
    ("12 stages", _stages(12), "number of stages 12 must be at most 10"),
    ("even kernel", lambda p: _per_stage(p, "kernel_sizes", [4, 4, 4]), "must be odd and at most 7"),
    ("stride 16", lambda p: _per_stage(p, "strides", [16, 16, 16]), "strides [[16, 16, 16], "),
    ("unknown architecture", _network("architecture", "transformer"), "architecture 'transformer' must be one of"),
    ("cascade cycle", _cycle, "previous_stage chain"),
    ("configuration named ../x", _rename, "configuration '../x': name '../x' must be a folder name"),
    ("name and key differ", lambda p: p["configurations"]["2d"].update(name="3d_fullres"), "configuration '2d' has name '3d_fullres'"),
    ("ignore not largest", lambda p: p.update(ignore_label=0), "ignore_label 0 must be null or the largest value"),
    ("file ending .exe", lambda p: p.update(file_ending=".exe"), "file_ending '.exe' must be one of"),
    ("gpu memory NaN (refused by the JSON reader)", lambda p: p.update(gpu_memory_gb=float("nan")), "NaN is not valid JSON"),
]  # fmt: skip


@pytest.mark.parametrize("edit, expected", [pytest.param(e, x, id=i) for i, e, x in PLANS_CASES])
def test_bundle_plans_are_validated(edit, expected, good, tmp_path, capfd):
    bundle = _edit_json(good, "plans.json", edit)(tmp_path / "model.zip")
    line = _refused(capfd, tmp_path, bundle)
    assert f"{bundle}:plans.json: " in line and expected in line, line
    assert ".model.zip" not in line and "/.work." not in line and "/.new." not in line  # no staging path


def test_hand_edited_work_plans_get_the_same_checks(model_work, tmp_path, capfd):
    work = WorkDir(tmp_path / "work")
    work.root.mkdir()
    for f in (model_work.plans, model_work.dataset_json):
        (work.root / f.name).write_bytes(f.read_bytes())
    plans = json.loads(work.plans.read_text())
    plans["configurations"]["3d_fullres"]["patch_size"] = [2048] * 3
    work.plans.write_text(json.dumps(plans))
    inputs = tmp_path / "in"
    inputs.mkdir()
    before = _listing(tmp_path)
    code, _, err = _run(
        capfd, "predict", work.root, inputs, tmp_path / "out", "-c", "3d_fullres", "--device", "cpu"
    )
    line = _error_line(code, err)
    assert f"{work.plans}: configuration '3d_fullres': patch_size [2048, 2048, 2048] must be" in line
    assert _listing(tmp_path) == before and not (tmp_path / "out").exists()


def test_every_planned_plan_passes_the_limits(planned_phantom):
    """The phantom's own plans (and the golden plans of test_planning) load; the limits sit far above them."""
    from autoseg.planning import plans as P

    plans = Plans.load(planned_phantom.plans)
    for c in plans.configurations.values():
        assert sum(1 for _ in c.patch_size) == c.dim
        assert max(c.patch_size) * 4 < P.MAX_PATCH_AXIS
    assert P.MAX_PATCH_VOXELS[3] == 4 * 256**3 and P.MAX_PATCH_VOXELS[2] == 4 * 2048**2


# ------------------------------------------------------------- dataset.json, instructions, manifest


def _instructions(**over) -> dict:
    d = {
        "schema_version": 1,
        "best": "3d_fullres",
        "configs": ["3d_fullres"],
        "folds": [0],
        "postprocessing": {"keep_largest_foreground": False, "keep_largest": []},
        "mean_dice": 0.5,
        "mean_dice_postprocessed": 0.5,
        "scores": {},
        "skipped": [],
        "predict": "",
        "dataset_hash": "",
    }
    d.update(over)
    return d


def _with_instructions(good: Path, d) -> Callable[[Path], Path]:
    return _with_members(good, {"inference_instructions.json": json.dumps(d).encode()})


def _deep(n: int) -> bytes:
    return b"[" * n + b"]" * n


OTHER_JSON_CASES = [
    ("dataset.json not JSON", lambda g: _with_members(g, {"dataset.json": b"{nope"}), "model.zip:dataset.json: not valid JSON"),
    ("dataset.json without background", lambda g: _edit_json(g, "dataset.json", lambda d: d["labels"].pop("background")), "model.zip:dataset.json: 'labels' must contain background"),
    ("dataset.json of another model", lambda g: _edit_json(g, "dataset.json", lambda d: d["labels"].update(extra=3)), "model.zip:dataset.json: channels, labels or file ending differ"),
    ("dataset.json nested deeply", lambda g: _with_members(g, {"dataset.json": _deep(100000)}), "model.zip:dataset.json: nested too deeply"),
    ("instructions of an unknown configuration", lambda g: _with_instructions(g, _instructions(configs=["2d"])), "model.zip:inference_instructions.json: names configuration '2d', but the bundle has no weights for it"),
    ("instructions schema 7", lambda g: _with_instructions(g, _instructions(schema_version=7)), "model.zip:inference_instructions.json: invalid inference instructions"),
    ("instructions postprocess a structure that does not exist", lambda g: _with_instructions(g, _instructions(postprocessing={"keep_largest": ["spleen"]})), "postprocessing names ['spleen']"),
    ("instructions not an object", lambda g: _with_instructions(g, [1, 2]), "model.zip:inference_instructions.json: invalid inference instructions"),
    ("manifest not JSON", lambda g: lambda p: _zip(p, [("manifest.json", b"{"), *_members(g).items()]), "model.zip:manifest.json: not valid JSON"),
    ("manifest nested deeply", lambda g: lambda p: _zip(p, [("manifest.json", _deep(100000)), *_members(g).items()]), "model.zip:manifest.json: nested too deeply"),
    ("manifest schema 2", lambda g: lambda p: _bundle(p, _members(g), schema_version=2), "model.zip:manifest.json: bundle schema 2 is not supported"),
    ("manifest hash not hex", lambda g: lambda p: _zip(p, [("manifest.json", json.dumps({"schema_version": 1, "files": {"plans.json": "x"}}).encode()), *_members(g).items()]), "model.zip:manifest.json: 'files' must map"),
    ("manifest lists itself", lambda g: lambda p: _zip(p, [("manifest.json", _manifest({**_members(g), "manifest.json": b""})), *_members(g).items()]), "model.zip:manifest.json: lists 'manifest.json'"),
]  # fmt: skip


@pytest.mark.parametrize("make, expected", [pytest.param(m, e, id=i) for i, m, e in OTHER_JSON_CASES])
def test_bundle_json_files_are_validated(make, expected, good, tmp_path, capfd):
    bundle = make(good)(tmp_path / "model.zip")
    line = _refused(capfd, tmp_path, bundle)
    assert expected in line, line


# ---------------------------------------------------------------------------------------- weights


class _Exploit:
    """Unpickling this would create a marker file: weights_only loading must refuse it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _checkpoint_edit(good: Path, edit: Callable[[dict], object]) -> Callable[[Path], Path]:
    def make(path: Path) -> Path:
        members = _members(good)
        ckpt = torch.load(io.BytesIO(members[CKPT]), weights_only=True)
        ckpt = edit(ckpt) or ckpt
        buf = io.BytesIO()
        torch.save(ckpt, buf)
        members[CKPT] = buf.getvalue()
        return _bundle(path, members)

    return make


def _first_weight(ckpt: dict) -> str:
    return next(k for k, v in ckpt["network"].items() if v.dim() > 1)


def _wrong_shape(ckpt: dict) -> None:
    k = _first_weight(ckpt)
    ckpt["network"][k] = torch.zeros(ckpt["network"][k].shape[0] + 1, *ckpt["network"][k].shape[1:])


def _wrong_dtype(ckpt: dict) -> None:
    k = _first_weight(ckpt)
    ckpt["network"][k] = ckpt["network"][k].double()


def _sparse(ckpt: dict) -> None:
    k = _first_weight(ckpt)
    ckpt["network"][k] = ckpt["network"][k].to_sparse()


def _nan_weight(ckpt: dict) -> None:
    ckpt["network"][_first_weight(ckpt)][0] = float("nan")


def _missing_weight(ckpt: dict) -> None:
    ckpt["network"].pop(_first_weight(ckpt))


WEIGHT_CASES = [
    ("pickle payload", lambda g, marker: _with_members(g, {CKPT: pickle.dumps({"network": _Exploit(marker)})}), "refused to load: it holds Python objects other than tensors"),
    ("torch.save of a payload", lambda g, marker: _with_members(g, {CKPT: _torch_bytes({"network": _Exploit(marker), "config": "3d_fullres", "topology": "{}"})}), "refused to load: it holds Python objects other than tensors"),
    ("not a torch file", lambda g, marker: _with_members(g, {CKPT: b"PK\x03\x04 not really"}), "not a readable autoseg checkpoint"),
    ("tensor of wrong shape", lambda g, marker: _checkpoint_edit(g, _wrong_shape), "is float32 ["),
    ("float64 tensor", lambda g, marker: _checkpoint_edit(g, _wrong_dtype), "is float64 ["),
    ("missing tensor", lambda g, marker: _checkpoint_edit(g, _missing_weight), "network weights do not match the plans (missing"),
    ("extra tensor", lambda g, marker: _checkpoint_edit(g, lambda c: c["network"].update(evil=torch.zeros(1))), "(unexpected 'evil'"),
    ("network not a dict", lambda g, marker: _checkpoint_edit(g, lambda c: c.update(network=torch.zeros(3))), "'network' is not a dict of tensors"),
    ("other configuration", lambda g, marker: _checkpoint_edit(g, lambda c: c.update(config="2d")), "checkpoint is for configuration '2d', not '3d_fullres'"),
    ("topology not a string", lambda g, marker: _checkpoint_edit(g, lambda c: c.update(topology=5)), "checkpoint network does not match the plans"),
    ("sparse tensor", lambda g, marker: _checkpoint_edit(g, _sparse), "is a torch.sparse_coo tensor, not a dense one"),
    ("a bare tensor", lambda g, marker: _with_members(g, {CKPT: _torch_bytes(torch.zeros(2))}), "not an autoseg checkpoint (a Tensor"),
]  # fmt: skip


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.mark.parametrize("make, expected", [pytest.param(m, e, id=i) for i, m, e in WEIGHT_CASES])
def test_bundle_weights_are_checked(make, expected, good, tmp_path, capfd):
    marker = tmp_path.parent / f"pwned-{tmp_path.name}"
    bundle = make(good, marker)(tmp_path / "model.zip")
    line = _refused(capfd, tmp_path, bundle)
    assert f"{bundle}:{CKPT}: " in line and expected in line, line
    assert not marker.exists()


# ------------------------------------------------------------------------------------ predict --model


@pytest.mark.parametrize(
    "make, expected",
    [
        pytest.param(lambda g: _with_members(g, {"evil.sh": b"x"}), "model.zip:evil.sh: not something", id="evil.sh"),
        pytest.param(lambda g: _edit_json(g, "plans.json", _config("patch_size", [2048] * 3)), "model.zip:plans.json: configuration '3d_fullres': patch_size", id="patch-2048"),
        pytest.param(lambda g: _checkpoint_edit(g, _wrong_shape), f"model.zip:{CKPT}: network weight", id="wrong-shape"),
        pytest.param(lambda g: _checkpoint_edit(g, _nan_weight), f"model.zip:{CKPT}: network weight 'encoder.0.0.0.weight' holds NaN or Inf", id="nan-weight"),
    ],
)  # fmt: skip
def test_predict_with_a_hostile_model_is_refused(make, expected, good, phantom_dataset, tmp_path, capfd):
    bundle = make(good)(tmp_path / "model.zip")
    _one_case(phantom_dataset, tmp_path / "inputs")
    line = _refused(capfd, tmp_path, bundle, command="predict")
    assert expected in line, line
    assert "autoseg-model-" not in line  # not the deleted temporary folder


def test_hostile_weights_in_work_are_refused_before_load_state_dict(
    model_work, phantom_dataset, tmp_path, capfd
):
    """The same weight check guards predict from a WORK folder (a hand-placed checkpoint)."""
    work = WorkDir(tmp_path / "work")
    work.root.mkdir()
    for f in (model_work.plans, model_work.dataset_json):
        (work.root / f.name).write_bytes(f.read_bytes())
    _write_checkpoint(work, "3d_fullres", 0)
    path = work.fold_dir("3d_fullres", 0) / "checkpoint_final.pt"
    ckpt = torch.load(path, weights_only=True)
    _wrong_shape(ckpt)
    torch.save(ckpt, path)
    inputs = tmp_path / "in"
    inputs.mkdir()
    for f in sorted((phantom_dataset / "imagesTr").glob("*_000[01].nii.gz"))[:2]:
        (inputs / f.name).write_bytes(f.read_bytes())
    before = _listing(work.root)
    code, _, err = _run(capfd, "predict", work.root, inputs, tmp_path / "out", "-c", "3d_fullres", "--folds", "0", "--device", "cpu", "--no-mirroring")  # fmt: skip
    line = _error_line(code, err)
    assert f"{path}: network weight" in line and "but the plans' network needs" in line
    assert _listing(work.root) == before and not (tmp_path / "out").exists()


def test_zlib_is_what_zipfile_uses():
    """The bomb cases rely on deflate squeezing zeros about 1000x (the ratio limit is 100x)."""
    assert len(zlib.compress(bytes(2**20), 9)) < 2**20 / 500


# -------------------------------------------------------------- memory estimated before allocating


def _work_with(model_work: WorkDir, tmp_path: Path, edit: Callable[[dict], None]) -> WorkDir:
    work = WorkDir(tmp_path / "work")
    work.root.mkdir()
    for f in (model_work.plans, model_work.dataset_json):
        (work.root / f.name).write_bytes(f.read_bytes())
    plans = json.loads(work.plans.read_text())
    edit(plans)
    work.plans.write_text(json.dumps(plans))
    _write_checkpoint(work, "3d_fullres", 0)
    return work


def _one_case(phantom_dataset: Path, folder: Path) -> Path:
    folder.mkdir()
    for f in sorted((phantom_dataset / "imagesTr").glob("*_000[01].nii.gz"))[:2]:
        (folder / f.name).write_bytes(f.read_bytes())
    return folder


def _wide_first_stage(p: dict) -> None:
    """Within every limit (patch 2^26 voxels, 2048 features, < 10^9 weights), but one tile's first-stage
    feature maps alone need over a terabyte."""
    c = p["configurations"]["3d_fullres"]
    n = len(c["network"]["features_per_stage"])
    c["network"]["features_per_stage"] = [2048] + [8] * (n - 1)
    c["patch_size"] = [512, 512, 256]
    c["batch_size"] = 2


def test_prediction_memory_is_estimated_before_allocating(model_work, phantom_dataset, tmp_path, capfd):
    import resource

    work = WorkDir(tmp_path / "work")
    work.root.mkdir()
    for f in (model_work.plans, model_work.dataset_json):
        (work.root / f.name).write_bytes(f.read_bytes())
    plans = json.loads(work.plans.read_text())
    _wide_first_stage(plans)
    work.plans.write_text(json.dumps(plans))
    # no checkpoint needed: the estimate comes before the network is built or any weight is loaded
    (work.fold_dir("3d_fullres", 0)).mkdir(parents=True)
    (work.fold_dir("3d_fullres", 0) / "checkpoint_final.pt").write_bytes(b"never read")
    inputs = _one_case(phantom_dataset, tmp_path / "in")
    before = _listing(tmp_path)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    code, _, err = _run(capfd, "predict", work.root, inputs, tmp_path / "out", "-c", "3d_fullres", "--folds", "0", "--device", "cpu", "--no-mirroring")  # fmt: skip
    line = _error_line(code, err)
    assert (
        f"{work.plans}: configuration '3d_fullres' (patch [512, 512, 256], 3 outputs) needs at least" in line
    )
    assert "GiB to predict, more than the" in line
    assert _listing(tmp_path) == before and not (tmp_path / "out").exists()
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 256 * 1024  # KiB: nothing big allocated


def test_spacing_far_finer_than_the_image_is_refused_before_resampling(
    model_work, phantom_dataset, tmp_path, capfd
):
    """Spacing 0.002 mm is within the plans' range, but a phantom case resampled to it would take terabytes."""
    work = _work_with(
        model_work, tmp_path, lambda p: p["configurations"]["3d_fullres"].update(spacing=[0.002] * 3)
    )
    inputs = _one_case(phantom_dataset, tmp_path / "in")
    before = _listing(tmp_path)
    code, _, err = _run(capfd, "predict", work.root, inputs, tmp_path / "out", "-c", "3d_fullres", "--folds", "0", "--device", "cpu", "--no-mirroring")  # fmt: skip
    line = _error_line(code, err)
    assert (
        "phantom_000: resampling from spacing" in line
        and "to the plans' 0.002x0.002x0.002 mm gives shape" in line
    )
    assert "more than this machine's" in line
    assert _listing(tmp_path) == before


def test_network_too_large_is_refused_in_the_plans(good, tmp_path, capfd):
    def edit(p: dict) -> None:
        net = p["configurations"]["3d_fullres"]["network"]
        net["features_per_stage"] = [2048] * len(net["features_per_stage"])
        net["kernel_sizes"] = [[7, 7, 7]] * len(net["features_per_stage"])

    bundle = _edit_json(good, "plans.json", edit)(tmp_path / "model.zip")
    line = _refused(capfd, tmp_path, bundle)
    assert f"{bundle}:plans.json: configuration '3d_fullres': its network would have" in line
    assert "at most 1,000,000,000 are allowed" in line


def test_disk_full_while_extracting_is_one_line_and_leaves_nothing(good, tmp_path, capfd, monkeypatch):
    import errno

    class _Full(io.RawIOBase):
        def writable(self) -> bool:
            return True

        def write(self, b) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

    real_open = open

    def fake_open(path, mode="r", *args, **kwargs):
        if "x" in mode:  # the files import extracts
            real_open(path, mode, *args, **kwargs).close()
            return _Full()
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr("autoseg.bundle.open", fake_open, raising=False)
    line = _refused(capfd, tmp_path, good)
    assert f"{good}:" in line and "cannot be written out (No space left on device); is the disk full?" in line


@pytest.mark.parametrize(
    "folds, expected",
    [
        (["abc"], "--folds abc: folds are 0-4 or 'all'"),
        (["-1"], "--folds -1: folds are 0-4 or 'all'"),
        (["3"], "fold_3/checkpoint_final.pt: checkpoint not found (train 3d_fullres fold 3 first)"),
    ],
)
def test_export_refuses_bad_folds_and_writes_nothing(folds, expected, model_work, tmp_path, capfd):
    before = _listing(model_work.root)
    args = [a for f in folds for a in ("--folds", f)]
    code, _, err = _run(capfd, "export-model", model_work.root, tmp_path / "m.zip", "-c", "3d_fullres", *args)
    assert expected in _error_line(code, err)
    assert list(tmp_path.iterdir()) == [] and _listing(model_work.root) == before


def test_export_refuses_a_checkpoint_that_does_not_match_its_network(model_work, tmp_path, capfd):
    work = WorkDir(tmp_path / "work")
    work.root.mkdir()
    for f in (model_work.plans, model_work.dataset_json):
        (work.root / f.name).write_bytes(f.read_bytes())
    _write_checkpoint(work, "3d_fullres", 0)
    path = work.fold_dir("3d_fullres", 0) / "checkpoint_final.pt"
    ckpt = torch.load(path, weights_only=True)
    _wrong_shape(ckpt)
    torch.save(ckpt, path)
    code, _, err = _run(capfd, "export-model", work.root, tmp_path / "m.zip", "-c", "3d_fullres")
    assert f"{path}: network weight" in _error_line(code, err)
    assert not (tmp_path / "m.zip").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
