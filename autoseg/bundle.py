"""Portable model bundles: ``autoseg export-model WORK model.zip`` and ``import-model`` / ``predict --model``.

A bundle is a zip file holding what prediction needs and nothing else::

    manifest.json                   schema version, autoseg version, configurations, folds, sha256 of every file
    plans.json, dataset.json
    inference_instructions.json     only if find-best ran and chose the exported configurations
    results/<config>/fold_<k>/checkpoint_final.pt   network weights + metadata (no optimizer state)

Import is defensive, since a bundle may come from anywhere: every member name must be a plain relative path
listed in the manifest (no absolute path, no ``..``, no drive letter or backslash, no link, no directory
entry that is not a prefix of a listed file), every file must match its sha256, and the plans and checkpoints
must agree (each checkpoint is loaded with ``weights_only=True`` and checked against the topology of its
configuration). Files are extracted into a temporary folder next to the target and renamed into place.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

import torch

from autoseg import __version__
from autoseg.checkpoint_io import check_compatible, load_checkpoint
from autoseg.errors import CheckpointError, PlansError
from autoseg.jsonio import read_json, temp_path_for
from autoseg.layout import WorkDir
from autoseg.planning.plans import Plans

BUNDLE_SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
_MAX_MEMBER_BYTES = 8 * 2**30  # a member larger than this is refused (zip bombs)


def _topology(plans: Plans, config: str) -> dict:
    from dataclasses import asdict

    return json.loads(json.dumps(asdict(plans.configuration(config).network)))


def _with_previous_stages(plans: Plans, configs: list[str]) -> list[str]:
    out: list[str] = []
    for c in configs:
        chain = [c]
        while plans.configuration(chain[-1]).previous_stage:
            chain.append(plans.configuration(chain[-1]).previous_stage)
        out.extend(x for x in reversed(chain) if x not in out)
    return out


def export_model(
    workdir: str | os.PathLike,
    output: str | os.PathLike,
    configs: list[str] | None = None,
    folds: list[int | str] | None = None,
) -> dict:
    """Write a bundle of ``configs`` (default: what find-best chose, else ``3d_fullres``) and ``folds``
    (default: every trained fold) to ``output`` atomically; returns its manifest."""
    work = WorkDir(Path(workdir))
    plans = Plans.load(work.plans)
    instructions = read_json(work.inference_instructions) if work.inference_instructions.is_file() else None
    if not configs:
        configs = list(instructions["configs"]) if instructions else ["3d_fullres"]
    wanted = _with_previous_stages(plans, list(configs))
    members: dict[str, bytes] = {
        "plans.json": work.plans.read_bytes(),
        "dataset.json": work.dataset_json.read_bytes(),
    }
    if instructions is not None and sorted(instructions["configs"]) == sorted(configs):
        members["inference_instructions.json"] = work.inference_instructions.read_bytes()
    chosen: dict[str, list[str]] = {}
    for c in wanted:
        use = [str(f) for f in folds] if folds else _trained_folds(work, c)
        if not use:
            raise CheckpointError(f"{work.root / 'results' / c}: no trained fold to export")
        chosen[c] = use
        for f in use:
            path = work.fold_dir(c, f) / "checkpoint_final.pt"
            ckpt = load_checkpoint(path)
            check_compatible(ckpt, path, c, _topology(plans, c))
            slim = {k: ckpt[k] for k in ("network", "config", "topology", "epoch") if k in ckpt}
            buf = io.BytesIO()
            torch.save(slim, buf)
            members[f"results/{c}/{work.fold_dir(c, f).name}/checkpoint_final.pt"] = buf.getvalue()
    manifest = {
        "schema_version": BUNDLE_SCHEMA_VERSION,
        "autoseg_version": __version__,
        "configs": list(configs),
        "folds": chosen,
        "files": {name: hashlib.sha256(data).hexdigest() for name, data in members.items()},
    }
    output = Path(output)
    tmp = temp_path_for(output, ".zip")
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            zf.writestr(MANIFEST, json.dumps(manifest, indent=2))
            for name, data in members.items():
                zf.writestr(name, data)
        os.replace(tmp, output)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return manifest


def _trained_folds(work: WorkDir, config: str) -> list[str]:
    folds = [str(k) for k in range(5) if (work.fold_dir(config, k) / "checkpoint_final.pt").is_file()]
    if not folds and (work.fold_dir(config, "all") / "checkpoint_final.pt").is_file():
        folds = ["all"]
    return folds


def _safe_name(name: str, bundle: Path) -> str:
    """``name`` if it is a plain relative POSIX path inside the bundle, else :class:`PlansError`."""
    if "\\" in name or name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise PlansError(f"{bundle}: member '{name}' has an absolute or Windows path; refusing to extract")
    parts = PurePosixPath(name).parts
    if not parts or any(p in ("..", "") for p in parts):
        raise PlansError(f"{bundle}: member '{name}' escapes the target folder; refusing to extract")
    return str(PurePosixPath(*parts))


def import_model(bundle: str | os.PathLike, workdir: str | os.PathLike) -> WorkDir:
    """Check and unpack ``bundle`` into the new folder ``workdir`` (which must not exist or be empty)."""
    bundle, target = Path(bundle), Path(workdir)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise PlansError(f"{target}: exists and is not empty; give a new folder to import the model into")
    try:
        zf = zipfile.ZipFile(bundle)
    except (OSError, zipfile.BadZipFile) as exc:
        raise PlansError(f"{bundle}: not a readable model bundle ({exc})") from None
    with zf:
        manifest = _read_manifest(zf, bundle)
        files = manifest["files"]
        infos = {}
        for info in zf.infolist():
            name = _safe_name(info.filename, bundle)
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise PlansError(f"{bundle}: member '{name}' is a link; refusing to extract")
            if info.is_dir():
                if not any(f.startswith(name.rstrip("/") + "/") for f in files):
                    raise PlansError(f"{bundle}: unexpected folder '{name}'")
                continue
            if name == MANIFEST:
                continue
            if name not in files:
                raise PlansError(f"{bundle}: member '{name}' is not listed in the manifest")
            if name in infos:
                raise PlansError(f"{bundle}: member '{name}' appears twice")
            if info.file_size > _MAX_MEMBER_BYTES:
                raise PlansError(f"{bundle}: member '{name}' is implausibly large ({info.file_size} bytes)")
            infos[name] = info
        missing = sorted(set(files) - set(infos))
        if missing:
            raise PlansError(f"{bundle}: listed file '{missing[0]}' is missing")
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            for name, info in infos.items():
                data = zf.read(info)
                if hashlib.sha256(data).hexdigest() != files[name]:
                    raise PlansError(f"{bundle}: '{name}' does not match its checksum (damaged bundle)")
                dest = staging.joinpath(*PurePosixPath(name).parts)
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(data)
            _check_consistent(WorkDir(staging), manifest, bundle)
            if target.exists():
                target.rmdir()
            os.replace(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return WorkDir(target)


def _read_manifest(zf: zipfile.ZipFile, bundle: Path) -> dict:
    try:
        manifest = json.loads(zf.read(MANIFEST))
    except KeyError:
        raise PlansError(f"{bundle}: no {MANIFEST}; not an autoseg model bundle") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise PlansError(f"{bundle}: {MANIFEST} is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("schema_version") != BUNDLE_SCHEMA_VERSION:
        raise PlansError(
            f"{bundle}: bundle schema {manifest.get('schema_version') if isinstance(manifest, dict) else '?'} "
            f"is not supported (expected {BUNDLE_SCHEMA_VERSION})"
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise PlansError(f"{bundle}: {MANIFEST} has no valid file list")
    for name in files:
        _safe_name(name, bundle)
    return manifest


def _check_consistent(work: WorkDir, manifest: dict, bundle: Path) -> None:
    """Plans load, every configuration named exists, and every checkpoint in the bundle matches the network
    its configuration plans (the checkpoints are found from the file list, not trusted from the manifest)."""
    try:
        plans = Plans.load(work.plans)
    except PlansError as exc:
        raise PlansError(f"{bundle}: {exc}") from None
    for config in manifest.get("configs", []):
        plans.configuration(config)
    checkpoints = [n for n in manifest["files"] if n.endswith(".pt")]
    for name in checkpoints:
        parts = PurePosixPath(name).parts
        if len(parts) != 4 or parts[0] != "results" or parts[3] != "checkpoint_final.pt":
            raise PlansError(f"{bundle}: unexpected file '{name}'")
        config = parts[1]
        plans.configuration(config)
        path = work.root.joinpath(*parts)
        check_compatible(load_checkpoint(path), path, config, _topology(plans, config))
