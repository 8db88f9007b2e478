"""Settings for training and inference: frozen dataclasses with defaults from ``configs/default.toml``.

Settings are always passed in (never read from environment variables). ``load_settings`` merges, in order:
the defaults below, an optional TOML file, then explicit overrides (e.g. from the command line).
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from autoseg.errors import AutosegError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass(frozen=True)
class AugmentationSettings:
    p_rotation: float = 0.2
    rotation_deg: float = 30.0
    p_scale: float = 0.2
    scale_min: float = 0.7
    scale_max: float = 1.4
    p_noise: float = 0.1
    p_blur: float = 0.2
    p_brightness: float = 0.15
    p_contrast: float = 0.15
    p_lowres: float = 0.25
    p_gamma: float = 0.3
    p_gamma_inverted: float = 0.1
    p_mirror: float = 0.5


@dataclass(frozen=True)
class TrainSettings:
    epochs: int = 1000
    iters_per_epoch: int = 250
    val_iters: int = 50
    initial_lr: float = 1e-2
    momentum: float = 0.99
    nesterov: bool = True
    weight_decay: float = 3e-5
    poly_exponent: float = 0.9
    grad_clip: float = 12.0
    oversample_foreground: float = 0.33
    deep_supervision: bool = True
    seed: int = 12345
    num_folds: int = 5
    loader_workers: int = -1
    """Augmentation worker processes; -1: one per core but one (at most 12), 0: a thread in the trainer."""
    time_budget_minutes: float = 0.0
    """Wall-clock budget for the training epochs (0: none); the schedule is stretched to end with it."""
    compile: bool = True
    """torch.compile the network (CUDA only; never on CPU or MPS)."""
    deterministic: bool = False
    """Deterministic algorithms (torch.use_deterministic_algorithms); slower on a GPU."""
    augmentation: AugmentationSettings = field(default_factory=AugmentationSettings)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class InferenceSettings:
    step_size: float = 0.5
    mirroring: bool = True
    mirror_axes: tuple[int, ...] = (0, 1, 2)
    """Axes of the network's patch to mirror at test time (those beyond a 2D network's two are dropped)."""
    tile_batch: int = 0
    """Tiles per forward pass; 0: two on a GPU, one elsewhere (a second tile only costs memory on a CPU)."""
    fix_nonfinite: bool = False
    """Replace NaN/Inf intensities of the inputs by the image's finite minimum/maximum (else an error)."""
    slab_export_gb: float = 2.0
    """Above this size of a case's class probabilities (classes × voxels × 4 bytes on the network's grid), a
    single configuration is exported slab by slab as the sliding window finishes them: memory no longer grows
    with the number of classes, but export no longer overlaps the next case's inference. Not with
    ``--save-probabilities`` or ensembles of configurations, which need the whole array."""
    compile: str = "auto"
    """torch.compile each fold's network: "auto" once it pays (about 30 s of network time ahead), "on", "off"."""
    reuse_heap: bool = True
    """CPU with glibc: keep the memory a forward pass frees for the next pass instead of unmapping it (far
    fewer page faults, about 15 % faster passes; the network's activations stay reserved until the volume is
    done). False: glibc's usual behaviour."""

    def tiles_per_pass(self, device_type: str) -> int:
        """``tile_batch``, or when it is 0: two tiles per forward pass on CUDA, one elsewhere."""
        return self.tile_batch or (2 if device_type == "cuda" else 1)

    def __post_init__(self):
        aliases = {"true": "on", "false": "off"}  # TOML booleans arrive here as "True"/"False"
        object.__setattr__(self, "compile", aliases.get(str(self.compile).lower(), self.compile))
        if not 0 < self.step_size <= 1:
            raise AutosegError(
                f"step size must be in (0, 1] (tiles must overlap or touch), got {self.step_size:g}"
            )
        if self.compile not in ("auto", "on", "off"):
            raise AutosegError(f"inference setting compile must be auto, on or off, got {self.compile!r}")


def _merge(obj, values: dict, where: str):
    known = {f.name: f for f in fields(obj)}
    updates = {}
    for key, val in values.items():
        if key not in known:
            raise AutosegError(f"{where}: unknown setting '{key}' (known: {', '.join(sorted(known))})")
        current = getattr(obj, key)
        if hasattr(current, "__dataclass_fields__"):
            updates[key] = _merge(current, val, f"{where}.{key}")
        else:
            updates[key] = (
                type(current)(val) if current is not None and not isinstance(val, type(current)) else val
            )
    return replace(obj, **updates)


def load_settings(path: str | Path | None = None, **overrides) -> tuple[TrainSettings, InferenceSettings]:
    """Defaults ← TOML file (sections ``[train]``, ``[augmentation]``, ``[inference]``) ← ``overrides``.

    ``overrides`` with value ``None`` are ignored; keys may name train or inference fields (a name both
    have, ``compile``, is a training override: the inference one is set in the file's ``[inference]``).
    """
    train, infer = TrainSettings(), InferenceSettings()
    if path is not None:
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise AutosegError(f"{path}: cannot read settings ({exc})") from None
        if "augmentation" in data:
            data.setdefault("train", {})["augmentation"] = data.pop("augmentation")
        unknown = set(data) - {"train", "inference"}
        if unknown:
            raise AutosegError(f"{path}: unknown section(s) {sorted(unknown)}")
        train = _merge(train, data.get("train", {}), str(path))
        infer = _merge(infer, data.get("inference", {}), str(path))
    tnames = {f.name for f in fields(TrainSettings)}
    inames = {f.name for f in fields(InferenceSettings)}
    tvals = {k: v for k, v in overrides.items() if v is not None and k in tnames}
    ivals = {k: v for k, v in overrides.items() if v is not None and k in inames and k not in tnames}
    bad = [k for k in overrides if k not in tnames | inames]
    if bad:
        raise AutosegError(f"unknown setting(s) {bad}")
    return _merge(train, tvals, "override"), _merge(infer, ivals, "override")
