"""Portable model bundles: ``autoseg export-model WORK model.zip`` and ``import-model`` / ``predict --model``.

A bundle is a zip file holding what prediction needs and nothing else::

    manifest.json                   schema version, autoseg version, configurations, folds, sha256 of every file
    plans.json, dataset.json
    inference_instructions.json     only if find-best ran and chose the exported configurations
    model_card.json, MODEL_CARD.md  the model card, generated from WORK (:mod:`autoseg.model_card`); bundles
                                    exported before model cards have none and import as before
    results/<config>/fold_<k>/checkpoint_final.pt   network weights + metadata (no optimizer state)

Import treats a bundle as untrusted input, since it may come from anywhere, and checks everything before it
writes anything where the user asked:

- **Only what a bundle may hold**: the names above and nothing else (allow-list), each once (no duplicate
  entry, no two names that differ only in case), every one listed in the manifest and every listed one present;
  no absolute path, ``..``, drive letter or backslash, no link, no directory entry but the parents of listed
  files, no encrypted member, no compression method but stored and deflate.
- **Bounded**: the central directory holds at most ``MAX_ENTRIES`` entries; ``manifest.json`` and each
  model card file are at most ``MANIFEST_MAX_BYTES`` and ``CARD_MAX_BYTES`` (1 MiB), each other JSON file at
  most ``JSON_MAX_BYTES`` (16 MiB), each checkpoint at most ``CHECKPOINT_MAX_BYTES`` (1 GiB: the largest
  network the planner makes, a 3D vnet of 6 stages up to 320 features, has 206 M parameters, 787 MiB of
  float32 weights) and at most what the weights of its planned network take (plus 4 KiB per tensor and
  1 MiB), and all members together at most ``TOTAL_MAX_BYTES`` (24 GiB:
  the four configurations the planner makes x six folds x 1 GiB). A member above 1 MiB that its header says
  expands more than ``MAX_RATIO`` (100) times is refused as a zip bomb before anything is expanded (weights
  compress about 1.1x, JSON about 10x). The declared sizes are checked before reading, and the bytes actually
  read are counted while streaming (1 MiB at a time through sha256 into the file), so a header that lies
  cannot make import read or write more; CRC and sha256 are both checked.
- **Checked content**: the plans pass :meth:`Plans.load`'s checks for untrusted plans, dataset.json parses and
  agrees with them, the inference instructions parse and name configurations and folds of the bundle, and every
  checkpoint (loaded with ``weights_only=True``, memory-mapped) is for its configuration and holds exactly the
  tensors (names, shapes, dtypes) of the network its plans describe; the model card, if any, is both files,
  its JSON a card of the plans' dataset with every field of the right type, its Markdown UTF-8 text.

Errors name the bundle and the member (``model.zip:plans.json: ...``). Files are extracted into a temporary
folder next to the target and renamed into place; a refused import leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import stat
import tempfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath

import torch

from autoseg import __version__
from autoseg.atomic import UMASK
from autoseg.checkpoint_io import check_compatible, check_weights, load_checkpoint
from autoseg.errors import AutosegError, CheckpointError, PlansError
from autoseg.jsonio import read_json, temp_path_for
from autoseg.layout import WorkDir
from autoseg.model_card import CARD_MAX_BYTES, read_card
from autoseg.planning.plans import Plans

BUNDLE_SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
MANIFEST_MAX_BYTES = 2**20
JSON_MAX_BYTES = 16 * 2**20
CHECKPOINT_MAX_BYTES = 2**30
TOTAL_MAX_BYTES = 24 * 2**30
MAX_ENTRIES = 256
MAX_RATIO = 100
_CHUNK = 2**20
_JSON_MEMBERS = ("plans.json", "dataset.json", "inference_instructions.json")
_CARD_MEMBERS = (WorkDir.MODEL_CARD_JSON, WorkDir.MODEL_CARD_MD)
_CHECKPOINT = re.compile(
    r"results/([A-Za-z0-9][A-Za-z0-9_.-]{0,63})/(fold_(?:all|[0-9]|[1-9][0-9]))/"
    + re.escape(WorkDir.CHECKPOINT_FINAL)
)
_SHA256 = re.compile(r"[0-9a-f]{64}")


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
    benchmark: bool = True,
) -> dict:
    """Write a bundle of ``configs`` (default: what find-best chose, else ``3d_fullres``) and ``folds``
    (default: every trained fold) to ``output`` atomically, with its model card (``benchmark``: time one
    prediction for it, see :mod:`autoseg.model_card`); returns its manifest. Checkpoints are slimmed, checked
    and written one at a time (memory: one checkpoint, not the bundle)."""
    work = WorkDir(Path(workdir))
    plans = Plans.load(work.plans)
    instructions = read_json(work.inference_instructions) if work.inference_instructions.is_file() else None
    if not configs:
        configs = list(instructions["configs"]) if instructions else ["3d_fullres"]
    configs = list(configs)
    chosen = _chosen_folds(work, plans, configs, folds)
    small = {"plans.json": work.plans.read_bytes(), "dataset.json": work.dataset_json.read_bytes()}
    if instructions is not None and sorted(instructions["configs"]) == sorted(configs):
        small["inference_instructions.json"] = work.inference_instructions.read_bytes()
    else:
        instructions = None  # not bundled: the card does not use it either
    small.update(_card_members(work, plans, configs, chosen, instructions, benchmark))
    return _write_bundle(work, plans, Path(output), configs, chosen, small)


def _chosen_folds(
    work: WorkDir, plans: Plans, configs: list[str], folds: list[int | str] | None
) -> dict[str, list[str]]:
    """The folds to export of each configuration and its previous stages (previous stages first), each
    with a final checkpoint."""
    for f in folds or []:
        if str(f) != "all" and not (str(f).isdigit() and int(f) < 100):
            raise CheckpointError(f"--folds {f!r}: a fold is 'all' or a number from 0 to 99")
    chosen: dict[str, list[str]] = {}
    for c in _with_previous_stages(plans, configs):
        use = [str(int(f)) if str(f) != "all" else "all" for f in folds] if folds else _trained_folds(work, c)
        if not use:
            raise CheckpointError(f"{work.root / 'results' / c}: no trained fold to export")
        for f in use:
            path = work.checkpoint(c, f)
            if not path.is_file():
                raise CheckpointError(f"{path}: checkpoint not found (train {c} fold {f} first)")
        chosen[c] = use
    return chosen


def _card_members(
    work: WorkDir,
    plans: Plans,
    configs: list[str],
    chosen: dict[str, list[str]],
    instructions: dict | None,
    benchmark: bool,
) -> dict[str, bytes]:
    """``model_card.json`` and ``MODEL_CARD.md``, checked to load back as an import will load them."""
    from autoseg import model_card

    timing = (
        model_card.benchmark(work, plans, configs, chosen)
        if benchmark
        else model_card.not_measured("export-model ran with --no-benchmark")
    )
    card = model_card.build_card(work, plans, configs, chosen, instructions, timing)
    text = json.dumps(card.to_json(), indent=2, allow_nan=False) + "\n"
    model_card.card_from_json(json.loads(text), f"{work.root}: model card")
    return {
        WorkDir.MODEL_CARD_JSON: text.encode("utf-8"),
        WorkDir.MODEL_CARD_MD: model_card.render_markdown(card).encode("utf-8"),
    }


def _write_bundle(
    work: WorkDir,
    plans: Plans,
    output: Path,
    configs: list[str],
    chosen: dict[str, list[str]],
    small: dict[str, bytes],
) -> dict:
    """Write ``small`` (name -> bytes), the slimmed checkpoints of ``chosen`` and the manifest to a temporary
    zip beside ``output``, then rename it into place; returns the manifest."""
    hashes: dict[str, str] = {}
    tmp = temp_path_for(output, ".zip")
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for name, data in small.items():
                hashes[name] = hashlib.sha256(data).hexdigest()
                zf.writestr(name, data)
            for c, use in chosen.items():
                expected = _expected_weights(plans, c, str(work.plans))
                for f in use:
                    name = f"results/{c}/{work.fold_dir(c, f).name}/{WorkDir.CHECKPOINT_FINAL}"
                    buf = _slim_checkpoint(work, plans, c, f, expected)
                    hashes[name] = hashlib.sha256(buf.getbuffer()).hexdigest()
                    zf.writestr(name, buf.getbuffer())
                    del buf
            manifest = {
                "schema_version": BUNDLE_SCHEMA_VERSION,
                "autoseg_version": __version__,
                "configs": list(configs),
                "folds": chosen,
                "files": hashes,
            }
            zf.writestr(MANIFEST, json.dumps(manifest, indent=2))
        os.replace(tmp, output)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return manifest


def _slim_checkpoint(work: WorkDir, plans: Plans, config: str, fold: str, expected: dict) -> io.BytesIO:
    """The fold's final checkpoint, checked against the plans, without optimizer state, serialized."""
    path = work.checkpoint(config, fold)
    ckpt = load_checkpoint(path)
    check_compatible(ckpt, path, config, _topology(plans, config))
    check_weights(ckpt, path, expected)
    slim = {k: ckpt[k] for k in ("network", "config", "topology", "epoch") if k in ckpt}
    del ckpt
    buf = io.BytesIO()
    torch.save(slim, buf)
    return buf


def _trained_folds(work: WorkDir, config: str) -> list[str]:
    return [str(f) for f in work.trained_folds(config)]


def _safe_name(name: str, bundle: Path) -> str:
    """``name`` if it is a plain relative POSIX path inside the bundle, else :class:`PlansError`."""
    if "\\" in name or name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise PlansError(f"{bundle}: member '{name}' has an absolute or Windows path; refusing to extract")
    parts = PurePosixPath(name).parts
    if not parts or any(p in ("..", "") for p in parts):
        raise PlansError(f"{bundle}: member '{name}' escapes the target folder; refusing to extract")
    return str(PurePosixPath(*parts))


def _allowed(name: str) -> bool:
    return (
        name == MANIFEST
        or name in _JSON_MEMBERS
        or name in _CARD_MEMBERS
        or _CHECKPOINT.fullmatch(name) is not None
    )


def _show(name: str) -> str:
    return repr(name) if len(name) <= 80 else repr(name[:77] + "...")


def import_model(bundle: str | os.PathLike, workdir: str | os.PathLike) -> WorkDir:
    """Check and unpack ``bundle`` into the new folder ``workdir`` (which must not exist or be empty); see the
    module docstring for what is checked. Nothing is written unless every check passes."""
    bundle, target = Path(bundle), Path(workdir)
    _check_target(target)
    zf = _open_bundle(bundle)
    with zf:
        infos = _check_entries(zf, bundle)
        manifest = _read_manifest(zf, infos.pop(MANIFEST, None), bundle)
        _check_listed(infos, manifest["files"], bundle)
        created = _missing_parents(target)
        try:
            for p in created:
                p.mkdir()
        except OSError as exc:
            _remove_empty(created)
            raise PlansError(f"{target}: cannot create the folder ({exc.strerror or exc})") from None
        staging = None
        try:
            try:
                staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
                os.chmod(staging, 0o777 & ~UMASK)  # a folder like any other, not mkdtemp's 0700
            except OSError as exc:
                raise PlansError(f"{target.parent}: cannot write here ({exc.strerror or exc})") from None
            _unpack(zf, infos, manifest, WorkDir(staging), bundle)
            if target.exists():
                target.rmdir()
            os.replace(staging, target)
        except BaseException as exc:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
            _remove_empty(created)
            if isinstance(exc, AutosegError) and staging is not None:
                # a message about a staged file names the member of the bundle, not the deleted staging path
                text = str(exc).replace(f"{staging}{os.sep}", f"{bundle}:").replace(str(staging), str(bundle))
                if text != str(exc):
                    raise type(exc)(text) from None
            raise
    return WorkDir(target)


def _check_target(target: Path) -> None:
    """``target`` is a new or empty folder that can be created."""
    if target.is_symlink():
        raise PlansError(f"{target}: is a link; give a new folder to import the model into")
    if target.exists() and not target.is_dir():
        raise PlansError(f"{target}: exists and is not a folder; give a new folder to import the model into")
    if target.is_dir() and any(target.iterdir()):
        raise PlansError(
            f"{target}: already holds files (a WORK folder or another model?); give a new or empty folder to "
            "import the model into"
        )
    above = target.parent
    while not above.exists() and above != above.parent:
        above = above.parent
    if not above.is_dir():
        raise PlansError(f"{target}: cannot create the folder ({above} is not a folder)")


def _open_bundle(bundle: Path) -> zipfile.ZipFile:
    """``bundle`` opened as a zip file, after its end record shows a bounded central directory."""
    if not bundle.exists():
        raise PlansError(f"{bundle}: model bundle not found")
    if not bundle.is_file():
        raise PlansError(
            f"{bundle}: not a file; a model bundle is the zip file 'autoseg export-model' writes"
        )
    try:
        with open(bundle, "rb") as fh:
            end = zipfile._EndRecData(fh)  # the end record only: refuse a huge central directory unread
    except OSError as exc:
        raise PlansError(f"{bundle}: cannot read the model bundle ({exc.strerror or exc})") from None
    if not end:
        raise PlansError(f"{bundle}: not a zip file; not a model bundle from 'autoseg export-model'")
    if end[zipfile._ECD_ENTRIES_TOTAL] > MAX_ENTRIES or end[zipfile._ECD_SIZE] > MAX_ENTRIES * 1024:
        raise PlansError(
            f"{bundle}: holds {end[zipfile._ECD_ENTRIES_TOTAL]} entries; a model bundle holds at most {MAX_ENTRIES}"
        )
    try:
        return zipfile.ZipFile(bundle)
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, zipfile.LargeZipFile) as exc:
        raise PlansError(
            f"{bundle}: not a readable zip file ({exc}); the bundle is damaged or truncated"
        ) from None


def _check_listed(infos: dict[str, zipfile.ZipInfo], files: dict[str, str], bundle: Path) -> None:
    """The members are exactly the manifest's files, plans.json and dataset.json among them."""
    extra = sorted(set(infos) - set(files))
    if extra:
        raise PlansError(f"{bundle}:{extra[0]}: member is not listed in the manifest")
    missing = sorted(set(files) - set(infos))
    if missing:
        raise PlansError(f"{bundle}:{missing[0]}: listed in the manifest but missing from the bundle")
    for name in ("plans.json", "dataset.json"):
        if name not in infos:
            raise PlansError(f"{bundle}: no {name}; not a model bundle from 'autoseg export-model'")


def _unpack(
    zf: zipfile.ZipFile, infos: dict[str, zipfile.ZipInfo], manifest: dict, work: WorkDir, bundle: Path
) -> None:
    """Extract and check every member into the staging folder ``work``: the small files first (the plans
    say how large each checkpoint may be), then each checkpoint."""
    files = manifest["files"]
    for name in sorted(infos, key=lambda n: n.endswith(".pt")):
        if name.endswith(".pt"):
            break
        limit = CARD_MAX_BYTES if name in _CARD_MEMBERS else JSON_MAX_BYTES
        _extract(zf, infos[name], files[name], work.root, bundle, limit)
    plans = _check_json_members(work, manifest, set(infos), bundle)
    _check_card(work, set(infos), plans, bundle)
    for name, info in infos.items():
        if name.endswith(".pt"):
            config = _CHECKPOINT.fullmatch(name).group(1)
            expected = _expected_weights(plans, config, f"{bundle}:{name}")
            limit = min(
                CHECKPOINT_MAX_BYTES,
                sum(t.numel() * t.element_size() for t in expected.values()) + 4096 * len(expected) + 2**20,
            )
            why = f" (the weights of the network that plans.json gives '{config}', with margin)"
            _extract(zf, info, files[name], work.root, bundle, limit, why)
            _check_checkpoint(work, name, config, plans, expected, bundle)
    _check_manifest_folds(manifest, set(infos), bundle)


def _missing_parents(target: Path) -> list[Path]:
    """``target``'s ancestors that do not exist yet, outermost first (created for the import, removed again if
    it is refused)."""
    out = []
    p = target.parent
    while not p.exists() and p != p.parent:
        out.append(p)
        p = p.parent
    return list(reversed(out))


def _remove_empty(folders: list[Path]) -> None:
    for p in reversed(folders):
        try:
            p.rmdir()
        except OSError:
            pass


def _check_entries(zf: zipfile.ZipFile, bundle: Path) -> dict[str, zipfile.ZipInfo]:
    """The file members by name, after every check that needs only the central directory."""
    infos: dict[str, zipfile.ZipInfo] = {}
    folders: list[str] = []
    seen: dict[str, str] = {}
    total = 0
    for info in zf.infolist():
        name = _safe_name(info.filename, bundle)
        _check_unique(name, seen, bundle)
        if stat.S_ISLNK(info.external_attr >> 16):
            raise PlansError(f"{bundle}:{name}: member is a link; refusing to extract")
        if info.is_dir():
            folders.append(name.rstrip("/"))
            continue
        _check_member(info, name, bundle)
        total += info.file_size
        if total > TOTAL_MAX_BYTES:
            raise PlansError(
                f"{bundle}: members declare more than {TOTAL_MAX_BYTES} bytes in all ({_mib(TOTAL_MAX_BYTES)}: "
                "4 configurations x 6 folds x 1 GiB)"
            )
        infos[name] = info
    for folder in folders:
        if not any(f.startswith(folder + "/") for f in infos):
            raise PlansError(f"{bundle}:{folder}/: unexpected folder entry")
    return infos


def _check_unique(name: str, seen: dict[str, str], bundle: Path) -> None:
    """``name`` (folder or file) is neither in ``seen`` (case-folded name -> name) nor differs from one of
    them only in case; adds it."""
    key = name.rstrip("/").casefold()
    if key in seen:
        what = (
            "appears twice"
            if seen[key] == name.rstrip("/")
            else f"collides with {_show(seen[key])} (names differ only in case)"
        )
        raise PlansError(f"{bundle}:{name}: member {what}; refusing an ambiguous bundle")
    seen[key] = name.rstrip("/")


def _check_member(info: zipfile.ZipInfo, name: str, bundle: Path) -> None:
    """One file member: allowed name, regular file, not encrypted, stored or deflate, sizes in bounds."""
    if not _allowed(name):
        raise PlansError(
            f"{bundle}:{name}: not something a model bundle holds (only manifest.json, plans.json, "
            f"dataset.json, inference_instructions.json, {WorkDir.MODEL_CARD_JSON}, {WorkDir.MODEL_CARD_MD} "
            f"and results/<config>/fold_<k>/{WorkDir.CHECKPOINT_FINAL})"
        )
    if stat.S_IFMT(info.external_attr >> 16) not in (0, stat.S_IFREG):
        raise PlansError(f"{bundle}:{name}: member is not a regular file; refusing to extract")
    if info.flag_bits & 0x1:
        raise PlansError(f"{bundle}:{name}: member is encrypted; model bundles are not")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise PlansError(
            f"{bundle}:{name}: compression method {info.compress_type} (model bundles use stored or deflate)"
        )
    cap = _member_cap(name)
    if info.file_size > cap:
        raise PlansError(
            f"{bundle}:{name}: declares {info.file_size} bytes; at most {cap} ({_mib(cap)}) are allowed for it"
        )
    if info.compress_type == zipfile.ZIP_STORED and info.file_size != info.compress_size:
        raise PlansError(
            f"{bundle}:{name}: declares {info.file_size} bytes but stores {info.compress_size} uncompressed; "
            "the bundle is damaged or forged"
        )
    if info.file_size > 2**20 and info.file_size > MAX_RATIO * max(info.compress_size, 1):
        raise PlansError(
            f"{bundle}:{name}: would expand {info.file_size / max(info.compress_size, 1):.0f}x "
            f"({info.compress_size} -> {info.file_size} bytes; at most {MAX_RATIO}x); refusing a zip bomb"
        )


def _member_cap(name: str) -> int:
    if name == MANIFEST:
        return MANIFEST_MAX_BYTES
    if name in _CARD_MEMBERS:
        return CARD_MAX_BYTES
    return JSON_MAX_BYTES if name.endswith(".json") else CHECKPOINT_MAX_BYTES


def _mib(n: int) -> str:
    return f"{n / 2**30:g} GiB" if n >= 2**30 else f"{n / 2**20:g} MiB"


def _stream(zf: zipfile.ZipFile, info: zipfile.ZipInfo, bundle: Path, limit: int, sink) -> str:
    """Read member ``info`` in 1 MiB chunks into ``sink`` and return its sha256; refuse more than ``limit``
    bytes (or more than its header declares) as they arrive, and any read error, in one line."""
    name = info.filename
    digest = hashlib.sha256()
    size = 0
    try:
        with zf.open(info) as src:
            while chunk := src.read(_CHUNK):
                size += len(chunk)
                if size > limit or size > info.file_size:
                    raise PlansError(
                        f"{bundle}:{name}: holds more than {min(limit, info.file_size)} bytes "
                        f"({'its header declares ' + str(info.file_size) if size > info.file_size else 'the limit for it'})"
                    )
                digest.update(chunk)
                try:
                    sink(chunk)
                except OSError as exc:
                    raise PlansError(
                        f"{bundle}:{name}: cannot be written out ({exc.strerror or exc}); is the disk full?"
                    ) from None
    except PlansError:
        raise
    except (zipfile.BadZipFile, EOFError, zlib.error, RuntimeError, NotImplementedError, ValueError) as exc:
        raise PlansError(f"{bundle}:{name}: cannot be read ({exc}); the bundle is damaged") from None
    except OSError as exc:
        raise PlansError(f"{bundle}:{name}: cannot be read ({exc.strerror or exc})") from None
    if size != info.file_size:
        raise PlansError(f"{bundle}:{name}: holds {size} bytes, but its header declares {info.file_size}")
    return digest.hexdigest()


def _extract(
    zf: zipfile.ZipFile,
    info: zipfile.ZipInfo,
    sha256: str,
    staging: Path,
    bundle: Path,
    limit: int,
    why: str = "",
) -> None:
    name = _safe_name(info.filename, bundle)
    if info.file_size > limit:
        raise PlansError(
            f"{bundle}:{name}: declares {info.file_size} bytes; at most {limit} are allowed for it{why}"
        )
    dest = staging.joinpath(*PurePosixPath(name).parts)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "xb") as out:
        digest = _stream(zf, info, bundle, limit, out.write)
    if digest != sha256:
        raise PlansError(f"{bundle}:{name}: does not match its checksum in the manifest (damaged bundle)")


def _read_manifest(zf: zipfile.ZipFile, info: zipfile.ZipInfo | None, bundle: Path) -> dict:
    if info is None:
        raise PlansError(f"{bundle}: no {MANIFEST}; not an autoseg model bundle")
    parts: list[bytes] = []
    _stream(zf, info, bundle, MANIFEST_MAX_BYTES, parts.append)
    where = f"{bundle}:{MANIFEST}"
    try:
        manifest = json.loads(b"".join(parts))
    except (ValueError, UnicodeDecodeError) as exc:
        raise PlansError(f"{where}: not valid JSON ({exc})") from None
    except RecursionError:
        raise PlansError(f"{where}: nested too deeply to be a manifest") from None
    if not isinstance(manifest, dict) or manifest.get("schema_version") != BUNDLE_SCHEMA_VERSION:
        version = manifest.get("schema_version") if isinstance(manifest, dict) else "?"
        raise PlansError(
            f"{where}: bundle schema {version!r} is not supported (expected {BUNDLE_SCHEMA_VERSION})"
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(
        isinstance(v, str) and _SHA256.fullmatch(v) for v in files.values()
    ):
        raise PlansError(f"{where}: 'files' must map each file of the bundle to its sha256 (64 hex digits)")
    for name in files:
        if _safe_name(name, bundle) != name or name == MANIFEST or not _allowed(name):
            raise PlansError(f"{where}: lists {_show(name)}, which is not something a model bundle holds")
    configs = manifest.get("configs", [])
    if not isinstance(configs, list) or not all(isinstance(c, str) for c in configs):
        raise PlansError(f"{where}: 'configs' must be a list of configuration names")
    folds = manifest.get("folds", {})
    if not isinstance(folds, dict) or not all(
        isinstance(v, list) and all(isinstance(f, str) for f in v) for v in folds.values()
    ):
        raise PlansError(f"{where}: 'folds' must map configuration names to lists of folds")
    return manifest


def _check_json_members(work: WorkDir, manifest: dict, names: set[str], bundle: Path) -> Plans:
    """Plans (untrusted-plans checks), dataset.json (parsed, and the same channels, labels and file ending as
    the plans), the inference instructions (configurations and folds that are in the bundle)."""
    from autoseg.errors import DatasetError
    from autoseg.io.dataset import parse_dataset_json
    from autoseg.selection import InferenceInstructions

    plans = Plans.load(work.plans)
    where = f"{bundle}:dataset.json"
    try:
        spec = parse_dataset_json(_member_json(work.dataset_json, where), where)
    except DatasetError as exc:
        raise PlansError(str(exc)) from None
    if (
        list(spec.channel_names) != list(plans.channel_names)
        or dict(spec.labels) != dict(plans.labels)
        or spec.file_ending != plans.file_ending
    ):
        raise PlansError(f"{where}: channels, labels or file ending differ from the bundle's plans.json")
    trained = {n.split("/")[1] for n in names if n.endswith(".pt")}
    for config in manifest.get("configs", []):
        _in_plans(plans, config, f"{bundle}:{MANIFEST}")
    if "inference_instructions.json" in names:
        where = f"{bundle}:inference_instructions.json"
        try:
            instructions = InferenceInstructions.from_json(_member_json(work.inference_instructions, where))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise PlansError(
                f"{where}: invalid inference instructions ({type(exc).__name__}: {exc})"
            ) from None
        for config in instructions.configs:
            _in_plans(plans, config, where)
            if config not in trained:
                raise PlansError(
                    f"{where}: names configuration '{config}', but the bundle has no weights for it"
                )
        structures = set(spec.foreground_labels) | set(spec.regions)
        unknown = sorted(set(instructions.postprocessing.keep_largest) - structures)
        if unknown:
            raise PlansError(
                f"{where}: postprocessing names {unknown}, which are not labels or regions of dataset.json"
            )
    return plans


def _check_card(work: WorkDir, names: set[str], plans: Plans, bundle: Path) -> None:
    """The model card, when the bundle has one (bundles exported before model cards have none): both files,
    the JSON a valid card (every field type-checked) of the plans' dataset, channels and labels, the
    Markdown UTF-8 text."""
    present = [n for n in _CARD_MEMBERS if n in names]
    if not present:
        return
    if len(present) == 1:
        other = next(n for n in _CARD_MEMBERS if n not in names)
        raise PlansError(f"{bundle}:{present[0]}: the model card comes with {other}, which the bundle lacks")
    where = f"{bundle}:{WorkDir.MODEL_CARD_JSON}"
    card = read_card(work.model_card, where)
    d = card.dataset
    if (
        d.name != plans.dataset_name
        or d.modalities != list(plans.channel_names)
        or d.labels != dict(plans.labels)
    ):
        raise PlansError(
            f"{where}: describes another dataset, channels or labels than the bundle's plans.json"
        )
    try:
        (work.root / WorkDir.MODEL_CARD_MD).read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PlansError(f"{bundle}:{WorkDir.MODEL_CARD_MD}: not UTF-8 text ({exc.reason})") from None


def _member_json(path: Path, where: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise PlansError(f"{where}: not valid JSON ({exc})") from None
    except RecursionError:
        raise PlansError(f"{where}: nested too deeply") from None


def _in_plans(plans: Plans, config: str, where: str) -> None:
    if config not in plans.configurations:
        raise PlansError(
            f"{where}: names configuration {_show(config)}, which is not in the bundle's plans.json "
            f"(available: {', '.join(plans.configurations)})"
        )


def _expected_weights(plans: Plans, config: str, where: str) -> dict:
    """The state dict (on the meta device: shapes and dtypes, no memory) of ``config``'s planned network."""
    from autoseg.networks import build_network

    _in_plans(plans, config, where)
    try:
        with torch.device("meta"):
            network = build_network(
                plans.configuration(config).network, plans.input_channels(config), plans.num_outputs
            )
    except Exception as exc:  # the plans passed their checks, but the network cannot be built from them
        raise PlansError(
            f"{where}: the network of configuration '{config}' cannot be built ({type(exc).__name__}: {exc})"
        ) from None
    return network.state_dict()


def _check_checkpoint(
    work: WorkDir, name: str, config: str, plans: Plans, expected: dict, bundle: Path
) -> None:
    path = work.root.joinpath(*PurePosixPath(name).parts)
    ckpt = load_checkpoint(path, mmap=True)
    check_compatible(ckpt, path, config, _topology(plans, config))
    check_weights(ckpt, path, expected)
    del ckpt


def _check_manifest_folds(manifest: dict, names: set[str], bundle: Path) -> None:
    """The manifest's ``folds`` are the checkpoints the bundle holds (when it lists any)."""
    held: dict[str, set[str]] = {}
    for n in names:
        if n.endswith(".pt"):
            _, config, fold, _ = n.split("/")
            held.setdefault(config, set()).add(fold[len("fold_") :])
    folds = manifest.get("folds", {})
    if folds and {c: set(v) for c, v in folds.items()} != held:
        raise PlansError(f"{bundle}:{MANIFEST}: 'folds' {folds} does not match the checkpoints in the bundle")
