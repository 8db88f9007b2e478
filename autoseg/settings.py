"""Settings for training and inference: frozen dataclasses with defaults from ``configs/default.toml``.

Settings are always passed in (never read from environment variables). ``load_settings`` merges, in order:
the defaults below, an optional TOML file, then explicit overrides (e.g. from the command line).
"""

from __future__ import annotations

import math
import numbers
import sys
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from autoseg.errors import AutosegError
from autoseg.layout import MAX_FOLDS
from autoseg.loss_spec import DEFAULT_LOSS, LossSpecError, parse_loss

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class SettingError(AutosegError):
    """One setting has a value of the wrong type or out of range. ``str()`` names it as the API does;
    :func:`load_settings` re-words it for a settings file (``[section] name = value``) or an option."""

    def __init__(self, name: str, value, allowed: str):
        self.name, self.value, self.allowed = name, value, allowed
        super().__init__(f"setting {name} = {_show(value)}: {allowed}")


def _show(value) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _num(v) -> str:
    return str(v) if isinstance(v, int) else f"{v:g}"


def _finite(v) -> bool:
    return math.isfinite(v)


def _check_types(obj) -> None:
    """Every field of the dataclass ``obj`` has its declared type: a bool is no number, an int is accepted
    (and stored) as a float, a list of whole numbers as a tuple."""
    for f in fields(obj):
        v = getattr(obj, f.name)
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        if kind == "bool":
            if not isinstance(v, bool):
                raise SettingError(f.name, v, "must be true or false")
        elif kind == "int":
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise SettingError(f.name, v, "must be a whole number")
            object.__setattr__(obj, f.name, int(v))
        elif kind == "float":
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise SettingError(f.name, v, "must be a number")
            object.__setattr__(obj, f.name, float(v))
            if not _finite(float(v)):
                raise SettingError(f.name, v, "must be a finite number")
        elif kind.startswith("tuple[int"):
            if not isinstance(v, (list, tuple)) or any(
                isinstance(a, bool) or not isinstance(a, numbers.Integral) for a in v
            ):
                raise SettingError(f.name, v, "must be a list of whole numbers")
            object.__setattr__(obj, f.name, tuple(int(a) for a in v))


def _check_range(name: str, value, low=None, high=None, *, low_open=False, what="") -> None:
    """``low <= value <= high`` (``low < value`` with ``low_open``); the message says what is allowed."""
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and value > high
    if too_low or too_high:
        if low is not None and high is not None:
            allowed = f"must be in {'(' if low_open else '['}{_num(low)}, {_num(high)}]"
        elif low is not None:
            allowed = f"must be {'>' if low_open else '>='} {_num(low)}"
        else:
            allowed = f"must be <= {_num(high)}"
        raise SettingError(name, value, allowed + (f" ({what})" if what else ""))


MAX_WORKERS = 64
"""Most worker processes any command starts (more only exhausts memory and process limits)."""


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
    p_elastic: float = 0.0
    """Elastic deformation per sample (batchgenerators' displacement field: uniform noise in [-1, 1] per voxel
    and axis, smoothed by a Gaussian of ``sigma`` voxels, times ``alpha``); 0: none, as nnU-Net v2."""
    elastic_alpha_min: float = 0.0
    elastic_alpha_max: float = 900.0
    """Range of ``alpha`` (nnU-Net v1's 3D default, 0-900; batchgenerators' own is 0-1000) for a 3D field; a 2D
    field (2D patches, the planes of thick-slice patches) takes 2/9 of it, as nnU-Net v1's 2D range (0-200)."""
    elastic_sigma_min: float = 9.0
    elastic_sigma_max: float = 13.0
    """Range of ``sigma`` in voxels (nnU-Net v1's default, 9-13; batchgenerators' own is 10-13)."""
    p_rot90: float = 0.0
    """A rotation by 90, 180 or 270 degrees in a plane of two interchangeable axes (similar target spacing,
    equal patch extent: :func:`autoseg.training.augmentation.interchangeable_axes`) per sample; 0: none."""
    p_transpose: float = 0.0
    """A random permutation of the interchangeable axes per sample; 0: none."""

    def __post_init__(self):
        _check_types(self)
        for f in fields(self):
            if f.name.startswith("p_"):
                _check_range(f.name, getattr(self, f.name), 0, 1, what="a probability")
        _check_range("rotation_deg", self.rotation_deg, 0, 180, what="degrees")
        _check_range("scale_min", self.scale_min, 0, low_open=True)
        _check_range("scale_max", self.scale_max, self.scale_min, what="at least scale_min")
        _check_range("elastic_alpha_min", self.elastic_alpha_min, 0)
        _check_range(
            "elastic_alpha_max",
            self.elastic_alpha_max,
            self.elastic_alpha_min,
            what="at least elastic_alpha_min",
        )
        _check_range("elastic_sigma_min", self.elastic_sigma_min, 0, low_open=True, what="voxels")
        _check_range(
            "elastic_sigma_max",
            self.elastic_sigma_max,
            self.elastic_sigma_min,
            what="at least elastic_sigma_min",
        )


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
    loss: str = DEFAULT_LOSS
    """Loss expression (:mod:`autoseg.loss_spec`), e.g. ``dice+ce`` or ``0.5*tversky(alpha=0.3)+0.5*focal``;
    kept in its canonical spelling (every parameter written out)."""
    optimizer: str = "sgd"
    """sgd (with ``momentum`` and ``nesterov``), adam or adamw (``weight_decay`` decoupled for adamw)."""
    schedule: str = "poly"
    """Learning-rate decay over the run (or the time budget): poly (``poly_exponent``), cosine, or plateau
    (multiplied by ``plateau_factor`` whenever the validation pseudo-Dice EMA has not risen by
    ``plateau_threshold`` for ``plateau_patience`` epochs; never below a thousandth of ``initial_lr``)."""
    plateau_patience: int = 10
    """Epochs without improvement of the validation EMA before a plateau schedule lowers the rate."""
    plateau_factor: float = 0.5
    """What a plateau schedule multiplies the rate by (0 < factor < 1)."""
    plateau_threshold: float = 0.001
    """Rise of the validation EMA (Dice) that counts as an improvement for a plateau schedule."""
    warmup_fraction: float = 0.0
    """Part of the run (or budget) over which the rate rises linearly from a tenth of ``initial_lr``."""
    output_prior: bool = True
    """Start the output biases at the log class frequencies of the fingerprint (prior initialisation, see
    :mod:`autoseg.networks.heads`); false: PyTorch's default initialisation, as nnU-Net."""
    augmentation: AugmentationSettings = field(default_factory=AugmentationSettings)

    def __post_init__(self):
        if not isinstance(self.augmentation, AugmentationSettings):
            raise SettingError("augmentation", self.augmentation, "must be AugmentationSettings")
        _check_types(self)
        self._check_recipe()
        _check_range("epochs", self.epochs, 1)
        _check_range("iters_per_epoch", self.iters_per_epoch, 1)
        _check_range("val_iters", self.val_iters, 0, what="0: no pseudo-Dice")
        _check_range("initial_lr", self.initial_lr, 0, low_open=True)
        _check_range("momentum", self.momentum, 0, 0.999)
        if self.nesterov and self.momentum == 0:
            raise SettingError("momentum", self.momentum, "must be > 0 with nesterov = true")
        _check_range("weight_decay", self.weight_decay, 0)
        _check_range("poly_exponent", self.poly_exponent, 0)
        _check_range("grad_clip", self.grad_clip, 0, low_open=True)
        _check_range(
            "oversample_foreground", self.oversample_foreground, 0, 1, what="a fraction of each batch"
        )
        _check_range("seed", self.seed, 0, 2**32 - 1)
        _check_range(
            "num_folds",
            self.num_folds,
            2,
            MAX_FOLDS,
            what="folds 0 .. num_folds-1 are trained and cross-validated",
        )
        _check_range("loader_workers", self.loader_workers, -1, MAX_WORKERS, what="-1: one per core but one")
        _check_range("time_budget_minutes", self.time_budget_minutes, 0, 1e6, what="0: none")

    def _check_recipe(self) -> None:
        """Loss expression, optimizer, schedule and warmup; the loss is stored in its canonical spelling."""
        if not isinstance(self.loss, str):
            raise SettingError("loss", self.loss, "must be a loss expression (text)")
        try:
            object.__setattr__(self, "loss", parse_loss(self.loss).text())
        except LossSpecError as exc:
            raise SettingError("loss", self.loss, str(exc)) from None
        if self.optimizer not in OPTIMIZERS:
            raise SettingError("optimizer", self.optimizer, f"must be {' or '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise SettingError("schedule", self.schedule, f"must be {' or '.join(SCHEDULES)}")
        _check_range("warmup_fraction", self.warmup_fraction, 0, 0.5, what="a fraction of the run")
        _check_range("plateau_patience", self.plateau_patience, 1, what="epochs")
        if not 0 < self.plateau_factor < 1:
            raise SettingError("plateau_factor", self.plateau_factor, "must be in (0, 1): it lowers the rate")
        _check_range("plateau_threshold", self.plateau_threshold, 0, 1, what="a rise of the Dice EMA")

    def to_json(self) -> dict:
        return asdict(self)


OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("poly", "cosine", "plateau")
RECIPE_KEYS = (
    "loss",
    "optimizer",
    "schedule",
    "warmup_fraction",
    "plateau_patience",
    "plateau_factor",
    "plateau_threshold",
)
"""Training settings a resumed run must keep (the optimizer's state and the loss curve depend on them)."""
VARIANT_KEYS = (
    *RECIPE_KEYS,
    "initial_lr",
    "weight_decay",
    "momentum",
    "nesterov",
    "poly_exponent",
    "output_prior",
)
"""What a recipe variant of a configuration (``autoseg variant``, ``Configuration.recipe``) may set."""


def recipe_settings(recipe: dict, base: TrainSettings | None = None, where=None) -> TrainSettings:
    """``base`` (default :class:`TrainSettings`) with a configuration's ``recipe`` set, every key and value
    checked: :class:`AutosegError` worded by ``where(name, value, allowed)`` (default: as a command-line
    option) for a key outside :data:`VARIANT_KEYS` or a value out of range."""
    where = where or _as_option
    if not isinstance(recipe, dict):
        raise AutosegError(where("recipe", recipe, "must be a table of training settings"))
    for key, value in recipe.items():
        if key not in VARIANT_KEYS:
            raise AutosegError(
                where(key, value, f"not a recipe setting (recipe settings: {', '.join(VARIANT_KEYS)})")
            )
    return _merge(base or TrainSettings(), recipe, where)


BACKENDS = ("torch", "onnxruntime", "openvino")
"""Values of ``InferenceSettings.backend`` (:mod:`autoseg.inference.backends`)."""


@dataclass(frozen=True)
class InferenceSettings:
    step_size: float = 0.5
    mirroring: bool = True
    mirror_axes: tuple[int, ...] = (0, 1, 2)
    """Axes of the network's patch to mirror at test time (those beyond a 2D network's two are dropped)."""
    mirror_axes_from_find_best: bool = True
    """Mirror over the axes find-best measured to pay for themselves (``mirroring`` in
    inference_instructions.json) when predicting with its configuration; False (or an explicit
    ``--mirror-axes``): ``mirror_axes``."""
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
    skip_background_tiles: bool = True
    """Tiles holding nothing but each channel's background value (outside the body: 0 outside the nonzero
    mask, or a constant minimum such as BraTS's) are not run; what only they cover is background."""
    precision: str = "auto"
    """Arithmetic of the network's forward passes: "auto" (float16 autocast on CUDA; bfloat16 autocast on a CPU
    whose /proc/cpuinfo flags report native bf16, avx512_bf16 or amx_bf16; float32 elsewhere), "fp32" or
    "bf16". The probabilities are accumulated in float32 whatever this says."""
    save_uncertainty: bool = False
    """Also write ``<case>_uncertainty.npz`` (float16 entropy of the ensemble mean and, with two members or
    more, their mutual information, in the image's grid) and ``uncertainty.csv`` (per case and structure: mean
    uncertainty inside and on the boundary, volume); see :mod:`autoseg.inference.uncertainty`."""
    calibration: bool = True
    """Apply find-best's temperature (inference instructions' ``calibration``) to every saved probability; the
    label maps never change by it (docs/calibration.md)."""
    unetpp_inference: str = "auto"
    """UNet++ at predict time, the paper's two modes: "accurate" (the mean of the nested full-resolution heads),
    "fast" (the network pruned at ``unetpp_prune_depth``), or "auto": what find-best chose for its configuration
    (inference instructions' ``unetpp``), else accurate. Other networks ignore it."""
    unetpp_prune_depth: int = 0
    """Depth of the fast mode, 1 .. the network's depth (its stages - 1); 0: find-best's choice, else the
    deepest (the full network with its last head only)."""
    backend: str = "torch"
    """Kernels of the forward passes: "torch" (eager or compiled, as ``compile`` says), or "onnxruntime" /
    "openvino": each fold's network exported to ONNX once and run by that engine on the CPU in float32 (the
    optional extras ``autoseg[onnx]``, ``autoseg[openvino]``; ``compile`` and ``precision`` do not apply).
    See docs/inference.md."""
    export_cache: str = "~/.cache/autoseg/onnx"
    """Folder where ``onnxruntime`` / ``openvino`` keep each exported network, keyed by its weights, topology,
    tile shape and torch version, so a later predict with the same fold skips the export; "" exports to a
    temporary folder every time (docs/inference.md)."""

    def tiles_per_pass(self, device_type: str) -> int:
        """``tile_batch``, or when it is 0: two tiles per forward pass on CUDA, one elsewhere."""
        return self.tile_batch or (2 if device_type == "cuda" else 1)

    def __post_init__(self):
        aliases = {"true": "on", "false": "off"}  # TOML booleans arrive here as True/False
        if isinstance(self.compile, (bool, str)):
            object.__setattr__(self, "compile", aliases.get(str(self.compile).lower(), self.compile))
        _check_types(self)
        _check_range("step_size", self.step_size, 0, 1, low_open=True, what="tiles must overlap or touch")
        if not self.mirror_axes or any(a not in (0, 1, 2) for a in self.mirror_axes):
            raise SettingError("mirror_axes", self.mirror_axes, "must be patch axes among 0, 1, 2")
        if len(set(self.mirror_axes)) != len(self.mirror_axes):
            raise SettingError("mirror_axes", self.mirror_axes, "must not repeat an axis")
        _check_range("tile_batch", self.tile_batch, 0, 64, what="0: automatic")
        _check_range("slab_export_gb", self.slab_export_gb, 0, what="0: always slab by slab")
        if self.compile not in ("auto", "on", "off"):
            raise SettingError("compile", self.compile, "must be auto, on or off")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise SettingError("precision", self.precision, "must be auto, fp32 or bf16")
        if self.backend not in BACKENDS:
            raise SettingError(
                "backend", self.backend, f"must be {', '.join(BACKENDS[:-1])} or {BACKENDS[-1]}"
            )
        if self.unetpp_inference not in ("auto", "accurate", "fast"):
            raise SettingError("unetpp_inference", self.unetpp_inference, "must be auto, accurate or fast")
        _check_range(
            "unetpp_prune_depth", self.unetpp_prune_depth, 0, 8, what="0: find-best's or the deepest"
        )


OPTION_NAMES = {
    "time_budget_minutes": "--time-budget",
    "loader_workers": "--workers",
    "step_size": "--step",
    "unetpp_prune_depth": "--prune-depth",
}
"""Command-line spellings of the settings whose option is not ``--`` + the name with dashes."""


def option_name(setting: str) -> str:
    return OPTION_NAMES.get(setting, "--" + setting.replace("_", "-"))


def _merge(obj, values: dict, where):
    """``obj`` with ``values`` set. ``where(name, value, allowed)`` words the error of a bad value: a
    settings file names its section and key, the command line its option."""
    known = {f.name: f for f in fields(obj)}
    updates = {}
    for key, val in values.items():
        if key not in known:
            raise AutosegError(where(key, val, f"unknown setting (known: {', '.join(sorted(known))})"))
        current = getattr(obj, key)
        if hasattr(current, "__dataclass_fields__"):
            if not isinstance(val, dict):
                raise AutosegError(where(key, val, "must be a table of settings"))
            updates[key] = _merge(current, val, _nested(where, key))
        else:
            updates[key] = val
    try:
        return replace(obj, **updates)
    except SettingError as exc:
        raise AutosegError(where(exc.name, exc.value, exc.allowed)) from None


def _nested(where, section: str):
    return lambda name, value, allowed: where(f"{section}.{name}", value, allowed)


def _in_file(path: Path, section: str):
    return lambda name, value, allowed: f"{path}: [{section}] {name} = {_toml(value)}: {allowed}"


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return str(value)


def _as_option(name: str, value, allowed: str) -> str:
    if isinstance(value, (list, tuple)):
        value = ",".join(map(str, value))
    return f"{option_name(name)} {value}: {allowed}"


def inference_settings(**values) -> InferenceSettings:
    """:class:`InferenceSettings` from keyword values (``None``: the default); a bad value is refused in one
    line naming its command-line option."""
    return _merge(InferenceSettings(), {k: v for k, v in values.items() if v is not None}, _as_option)


def load_settings(
    path: str | Path | None = None, train_defaults: TrainSettings | None = None, **overrides
) -> tuple[TrainSettings, InferenceSettings]:
    """Defaults (``train_defaults``: those of a time-budget configuration's plan, else :class:`TrainSettings`'s)
    ← TOML file (sections ``[train]``, ``[augmentation]``, ``[inference]``) ← ``overrides``.

    ``overrides`` with value ``None`` are ignored; keys may name train or inference fields (a name both
    have, ``compile``, is a training override: the inference one is set in the file's ``[inference]``).
    Every value is checked (type and range) here: a bad one raises :class:`AutosegError` naming the file,
    section and key, or the command-line option of an override.
    """
    train, infer = train_defaults or TrainSettings(), InferenceSettings()
    if path is not None:
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise AutosegError(f"{path}: cannot read settings ({exc})") from None
        unknown = set(data) - {"train", "inference", "augmentation"}
        if unknown:
            raise AutosegError(
                f"{path}: unknown section(s) {sorted(unknown)} (known: train, augmentation, inference)"
            )
        for section in ("train", "inference", "augmentation"):
            if not isinstance(data.get(section, {}), dict):
                raise AutosegError(f"{path}: {section} = {_toml(data[section])}: must be a [{section}] table")
        if "augmentation" in data:
            if "augmentation" in data.get("train", {}):
                raise AutosegError(f"{path}: [augmentation] and [train.augmentation] both given; keep one")
            train = replace(
                train,
                augmentation=_merge(train.augmentation, data["augmentation"], _in_file(path, "augmentation")),
            )
        train = _merge(train, data.get("train", {}), _in_file(path, "train"))
        infer = _merge(infer, data.get("inference", {}), _in_file(path, "inference"))
    tnames = {f.name for f in fields(TrainSettings)}
    inames = {f.name for f in fields(InferenceSettings)}
    tvals = {k: v for k, v in overrides.items() if v is not None and k in tnames}
    ivals = {k: v for k, v in overrides.items() if v is not None and k in inames and k not in tnames}
    bad = [k for k in overrides if k not in tnames | inames]
    if bad:
        raise AutosegError(f"unknown setting(s) {bad}")
    return _merge(train, tvals, _as_option), _merge(infer, ivals, _as_option)
