"""Plans: the typed, versioned artifact that ``autoseg plan`` writes and every later stage reads.

All spatial lists (``spacing``, ``patch_size``, ``strides``, ``kernel_sizes``) are in the *transposed* array
order used for training: volumes are first reoriented to ``orientation`` (a lossless permute/flip), then
their ``(z, y, x)`` arrays are permuted by ``transpose_forward``
so that the coarsest axis comes first (2D configurations then slice along axis 0). For 2D configurations the
spatial lists have two entries (the in-plane axes).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from autoseg.errors import AutosegError, PlansError
from autoseg.jsonio import JSONFileError, read_json, write_json
from autoseg.planning.network_topology import NetworkTopology  # defined below the networks; re-exported here

PLANS_SCHEMA_VERSION = 3
READABLE_SCHEMA_VERSIONS = (1, 2, 3)
"""2 added a configuration's optional ``budget``, 3 its optional ``recipe``; older files have neither."""
# Sanity limits for plans read from disk (a hand-edited WORK/plans.json, or one from a model bundle, is
# untrusted). Every plan the planner makes lies well inside them: its patch starts at 256^3 voxels (2D:
# 2048^2) and is only rounded up to the total stride, it makes at most 7 stages of at most 512 features,
# strides 1-2 and kernels 1 or 3, and its spacings come from images whose spacing is in (0, 100] mm.
MAX_PATCH_VOXELS = {2: 4 * 2048**2, 3: 4 * 256**3}  # 4x the planner's starting budget
MAX_PATCH_AXIS = 8192
MAX_BATCH_VOXELS = 2**30  # batch size x patch voxels of one training step
SPACING_RANGE_MM = (1e-3, 1e3)
MAX_STAGES = 10
MAX_FEATURES = 2048
MAX_STRIDE = 8
MAX_KERNEL = 7
MAX_CONVS_PER_STAGE = 8
MAX_LABEL_VALUE = 32767  # label maps are stored as uint8 or int16
MAX_CHANNELS = 256
MAX_PARAMETERS = 10**9  # 5x the largest planned network (a 3D vnet of 6 stages up to 320 features: 206 M)
MAX_MEDIAN_AXIS = 2**16
MAX_INTENSITY = 1e30  # clip values, mean and std of a CT normalisation
NORMALIZATION_SCHEMES = ("zscore", "ct", "none")
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # a configuration or data folder name
_REQUIRED_KEYS = (
    "dataset_name",
    "dataset_hash",
    "channel_names",
    "labels",
    "file_ending",
    "orientation",
    "transpose_forward",
    "normalization",
    "gpu_memory_gb",
    "configurations",
)


@dataclass(frozen=True)
class ChannelNormalization:
    """How one channel is normalized (see :mod:`autoseg.preprocessing.normalize`)."""

    scheme: str  # one of NORMALIZATION_SCHEMES
    use_mask: bool = False
    clip_low: float | None = None
    clip_high: float | None = None
    mean: float | None = None
    std: float | None = None

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}

    @classmethod
    def from_json(cls, d: dict) -> ChannelNormalization:
        return cls(**d)


@dataclass(frozen=True)
class BudgetPlan:
    """How a ``3d_budget`` configuration was sized (:mod:`autoseg.planning.budget`) and the training recipe
    that goes with it: ``autoseg train`` uses these unless they are given."""

    minutes: float  # the time budget of one training run
    device: str  # cpu | cuda | mps: the device it was planned for
    seconds_per_step: float  # one training step of this configuration on that device
    timing: str  # measured | cached | estimated | assumed (see autoseg.planning.budget.StepTime)
    planned_steps: int  # training steps the budget buys
    iters_per_epoch: int
    val_iters: int

    def check(self, bad) -> None:
        if not _finite(self.minutes) or not 0 < self.minutes <= 1e6:
            raise bad("budget minutes", self.minutes, "a number of minutes in (0, 1e6]")
        if self.device not in ("cpu", "cuda", "mps"):
            raise bad("budget device", self.device, "cpu, cuda or mps")
        if not _finite(self.seconds_per_step) or self.seconds_per_step <= 0:
            raise bad("budget seconds_per_step", self.seconds_per_step, "a positive number")
        for what, value, high in (
            ("planned_steps", self.planned_steps, 10**9),
            ("iters_per_epoch", self.iters_per_epoch, 10**6),
            ("val_iters", self.val_iters, 10**6),
        ):
            if not _int(value) or not 0 <= value <= high:
                raise bad(f"budget {what}", value, f"a whole number in [0, {high}]")


@dataclass(frozen=True)
class Configuration:
    name: str  # "2d" | "3d_fullres" | "3d_lowres"
    dim: int
    data_identifier: str  # folder under WORK/preprocessed shared by configurations with the same spacing
    spacing: list[float]  # target spacing of the preprocessed data, 3 entries (transposed order), mm
    median_shape: list[int]  # median image shape at that spacing (transposed order)
    patch_size: list[int]  # dim entries
    batch_size: int
    network: NetworkTopology
    estimated_memory_gb: float
    batch_dice: bool = False
    previous_stage: str | None = None  # cascade: configuration whose predictions are extra input channels
    estimated_step_seconds: dict[str, float] = field(default_factory=dict)  # {"gpu": s, "cpu": s}, rough
    budget: BudgetPlan | None = None  # only the time-budget configuration (3d_budget) has one
    recipe: dict = field(default_factory=dict)
    """Training settings this configuration trains with by default (a recipe variant, ``autoseg variant``:
    e.g. ``{"loss": "tversky(alpha=0.3,beta=0.7)"}``); a settings file or option still wins. Empty: none."""

    def to_json(self) -> dict:
        d = asdict(self)
        if self.budget is None:
            del d["budget"]  # the standard configurations read as they did before budgets existed
        if not self.recipe:
            del d["recipe"]
        return d

    @classmethod
    def from_json(cls, d: dict) -> Configuration:
        d = dict(d)
        d["network"] = NetworkTopology(**d["network"])
        if d.get("budget") is not None:
            if not isinstance(d["budget"], dict):
                raise PlansError(f"configuration '{d.get('name')}': budget must be an object")
            d["budget"] = BudgetPlan(**d["budget"])
        config = cls(**d)
        config.validate()
        return config

    def validate(self) -> None:
        """Raise :class:`PlansError` (naming this configuration) for values no stage could work with, e.g. a
        hand-edited negative patch size."""

        def bad(what: str, value, must: str) -> PlansError:
            return PlansError(f"configuration '{self.name}': {what} {value!r} must be {must}")

        if self.dim not in (2, 3):
            raise bad("dim", self.dim, "2 or 3")
        if not _positive_ints(self.patch_size, self.dim):
            raise bad("patch_size", self.patch_size, f"{self.dim} positive integers")
        if not _positive_ints([self.batch_size], 1):
            raise bad("batch_size", self.batch_size, "a positive integer")
        if not _positive_numbers(self.spacing, 3):
            raise bad("spacing", self.spacing, "3 positive numbers (mm)")
        net = self.network
        if net.dim != self.dim:
            raise bad("network dim", net.dim, f"the configuration's dim {self.dim}")
        n = len(net.features_per_stage)
        if n == 0 or not _positive_ints(net.features_per_stage, n):
            raise bad("features_per_stage", net.features_per_stage, "positive integers, one per stage")
        for what, value in (("strides", net.strides), ("kernel_sizes", net.kernel_sizes)):
            if (
                not isinstance(value, list)
                or len(value) != n
                or not all(_positive_ints(v, self.dim) for v in value)
            ):
                raise bad(what, value, f"{n} lists (one per stage) of {self.dim} positive integers")
        self._check_ranges(bad)
        if self.budget is not None:
            self.budget.check(bad)
        if self.recipe:
            from autoseg.settings import recipe_settings

            try:
                recipe_settings(self.recipe, where=lambda n, v, a: f"recipe {n} = {v!r}: {a}")
            except AutosegError as exc:
                raise PlansError(f"configuration '{self.name}': {exc}") from None

    def _check_ranges(self, bad) -> None:
        """The sanity limits above (a plan from anywhere must not make predict allocate without bound)."""
        from autoseg.networks.registry import ARCHITECTURES

        net = self.network
        if not isinstance(self.name, str) or not _SAFE_NAME.fullmatch(self.name):
            raise bad("name", self.name, "a folder name of letters, digits, '_', '.', '-' (at most 64)")
        if not isinstance(self.data_identifier, str) or not _SAFE_NAME.fullmatch(self.data_identifier):
            raise bad(
                "data_identifier", self.data_identifier, "a folder name of letters, digits, '_', '.', '-'"
            )
        if (
            any(p > MAX_PATCH_AXIS for p in self.patch_size)
            or math.prod(self.patch_size) > MAX_PATCH_VOXELS[self.dim]
        ):
            raise bad(
                "patch_size",
                self.patch_size,
                f"at most {MAX_PATCH_VOXELS[self.dim]} voxels (4x the planner's starting patch) and "
                f"{MAX_PATCH_AXIS} per axis",
            )
        if self.batch_size * math.prod(self.patch_size) > MAX_BATCH_VOXELS:
            raise bad(
                "batch_size", self.batch_size, f"such that batch x patch is at most {MAX_BATCH_VOXELS} voxels"
            )
        low, high = SPACING_RANGE_MM
        if not all(low <= s <= high for s in self.spacing):
            raise bad("spacing", self.spacing, f"in [{low:g}, {high:g}] mm")
        if (
            not _positive_ints(self.median_shape, len(self.median_shape))
            or not 2 <= len(self.median_shape) <= 3
        ):
            raise bad("median_shape", self.median_shape, "2 or 3 positive integers")
        if any(m > MAX_MEDIAN_AXIS for m in self.median_shape):
            raise bad("median_shape", self.median_shape, f"at most {MAX_MEDIAN_AXIS} per axis")
        if net.architecture not in ARCHITECTURES:
            raise bad("architecture", net.architecture, f"one of {', '.join(ARCHITECTURES)}")
        if net.n_stages > MAX_STAGES:
            raise bad("number of stages", net.n_stages, f"at most {MAX_STAGES}")
        if max(net.features_per_stage) > MAX_FEATURES:
            raise bad("features_per_stage", net.features_per_stage, f"at most {MAX_FEATURES} per stage")
        if any(s > MAX_STRIDE for st in net.strides for s in st):
            raise bad("strides", net.strides, f"at most {MAX_STRIDE}")
        if any(k > MAX_KERNEL or k % 2 == 0 for ks in net.kernel_sizes for k in ks):
            raise bad("kernel_sizes", net.kernel_sizes, f"odd and at most {MAX_KERNEL}")
        if not _positive_ints([net.n_conv_per_stage], 1) or net.n_conv_per_stage > MAX_CONVS_PER_STAGE:
            raise bad("n_conv_per_stage", net.n_conv_per_stage, f"an integer in 1..{MAX_CONVS_PER_STAGE}")
        if not isinstance(net.deep_supervision, bool):
            raise bad("deep_supervision", net.deep_supervision, "true or false")
        if any(p % t for p, t in zip(self.patch_size, net.total_stride())):
            raise bad("patch_size", self.patch_size, f"divisible by the total stride {net.total_stride()}")
        if not _finite(self.estimated_memory_gb) or self.estimated_memory_gb < 0:
            raise bad("estimated_memory_gb", self.estimated_memory_gb, "a non-negative number")
        if not isinstance(self.batch_dice, bool):
            raise bad("batch_dice", self.batch_dice, "true or false")
        if self.previous_stage is not None and not isinstance(self.previous_stage, str):
            raise bad("previous_stage", self.previous_stage, "a configuration name or null")
        if not isinstance(self.estimated_step_seconds, dict):
            raise bad("estimated_step_seconds", self.estimated_step_seconds, "an object")


def _positive_ints(values, n: int) -> bool:
    return (
        isinstance(values, list)
        and len(values) == n
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values)
    )


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _positive_numbers(values, n: int) -> bool:
    return (
        isinstance(values, list)
        and len(values) == n
        and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < float("inf") for v in values
        )
    )


@dataclass(frozen=True)
class Plans:
    dataset_name: str
    dataset_hash: str
    channel_names: list[str]
    labels: dict[str, int]
    regions: dict[str, list[int]]
    file_ending: str
    transpose_forward: list[int]  # permutation applied to (z, y, x) arrays before training
    normalization: list[ChannelNormalization]  # one per channel
    configurations: dict[str, Configuration]
    gpu_memory_gb: float
    reasons: list[str] = field(default_factory=list)  # human-readable planning decisions (--explain)
    orientation: str = "LPS"  # every volume is permuted/flipped to this orientation before preprocessing
    regions_class_order: list[int] = field(default_factory=list)  # non-empty: region-based (sigmoid) training
    ignore_label: int | None = None  # voxels with this label are left out of loss and metrics
    schema_version: int = PLANS_SCHEMA_VERSION
    source: Path | None = field(default=None, compare=False, repr=False)  # the file it was loaded from

    @property
    def region_based(self) -> bool:
        return bool(self.regions_class_order)

    @property
    def training_regions(self) -> list[list[int]]:
        """Label values of each predicted region, in output-channel order (region-based plans only)."""
        return [list(v) for v in self.regions.values()] if self.region_based else []

    @property
    def num_classes(self) -> int:
        """Values a predicted label map can hold, background included (the ignore label excluded)."""
        values = set(self.labels.values()) | {v for vals in self.regions.values() for v in vals}
        return max(v for v in values if v != self.ignore_label) + 1

    @property
    def num_outputs(self) -> int:
        """Network output channels: one per region (sigmoid) or one per class (softmax)."""
        return len(self.regions) if self.region_based else self.num_classes

    @property
    def transpose_backward(self) -> list[int]:
        return [self.transpose_forward.index(i) for i in range(len(self.transpose_forward))]

    def input_channels(self, name: str) -> int:
        """Network input channels of configuration ``name``: the image channels, plus one one-hot channel per
        foreground class for a cascade stage (the previous stage's segmentation)."""
        extra = self.num_classes - 1 if self.configuration(name).previous_stage else 0
        return len(self.channel_names) + extra

    def configuration(self, name: str) -> Configuration:
        if name not in self.configurations:
            where = f"{self.source}: " if self.source is not None else ""
            raise PlansError(
                f"{where}configuration '{name}' is not in the plans "
                f"(available: {', '.join(self.configurations) or 'none'})"
            )
        return self.configurations[name]

    def to_json(self) -> dict:
        return {
            "schema_version": self.schema_version,
            "dataset_name": self.dataset_name,
            "dataset_hash": self.dataset_hash,
            "channel_names": list(self.channel_names),
            "labels": dict(self.labels),
            "regions": {k: list(v) for k, v in self.regions.items()},
            "file_ending": self.file_ending,
            "orientation": self.orientation,
            "regions_class_order": list(self.regions_class_order),
            "ignore_label": self.ignore_label,
            "transpose_forward": list(self.transpose_forward),
            "normalization": [n.to_json() for n in self.normalization],
            "gpu_memory_gb": self.gpu_memory_gb,
            "configurations": {k: c.to_json() for k, c in self.configurations.items()},
            "reasons": list(self.reasons),
        }

    @classmethod
    def from_json(cls, d: dict) -> Plans:
        if not isinstance(d, dict):
            raise PlansError("top level must be a JSON object")
        version = d.get("schema_version")
        if version not in READABLE_SCHEMA_VERSIONS:
            raise PlansError(
                f"plans schema_version {version!r} is not supported (expected one of "
                f"{', '.join(map(str, READABLE_SCHEMA_VERSIONS))})"
            )
        for key in _REQUIRED_KEYS:
            if key not in d:
                raise PlansError(f"required key '{key}' is missing")
        if not isinstance(d["configurations"], dict) or not all(
            isinstance(c, dict) for c in d["configurations"].values()
        ):
            raise PlansError("'configurations' must be an object mapping names to configurations")
        if not isinstance(d["transpose_forward"], list) or sorted(d["transpose_forward"]) != [0, 1, 2]:
            raise PlansError(f"transpose_forward {d['transpose_forward']!r} must be a permutation of 0, 1, 2")
        _check_untrusted(d)
        plans = cls(
            schema_version=version,
            dataset_name=d["dataset_name"],
            dataset_hash=d["dataset_hash"],
            channel_names=list(d["channel_names"]),
            labels={k: int(v) for k, v in d["labels"].items()},
            regions={k: list(v) for k, v in d.get("regions", {}).items()},
            file_ending=d["file_ending"],
            orientation=str(d["orientation"]),
            regions_class_order=[int(v) for v in d.get("regions_class_order", [])],
            ignore_label=d.get("ignore_label"),
            transpose_forward=[int(v) for v in d["transpose_forward"]],
            normalization=[ChannelNormalization.from_json(n) for n in d["normalization"]],
            gpu_memory_gb=float(d["gpu_memory_gb"]),
            configurations={k: Configuration.from_json(c) for k, c in d["configurations"].items()},
            reasons=list(d.get("reasons", [])),
        )
        plans._check_configurations()
        return plans

    def _check_configurations(self) -> None:
        """Each configuration is stored under its own name; a cascade's previous stage exists, is another 3D
        configuration and the chain ends."""
        for key, c in self.configurations.items():
            if c.name != key:
                raise PlansError(f"configuration '{key}' has name {c.name!r}; they must agree")
            seen = [key]
            while self.configurations[seen[-1]].previous_stage is not None:
                prev = self.configurations[seen[-1]].previous_stage
                if prev not in self.configurations or prev in seen or self.configurations[prev].dim != 3:
                    raise PlansError(
                        f"configuration '{key}': previous_stage chain {' -> '.join(seen + [str(prev)])} must "
                        "end at a 3D configuration of these plans, without a cycle"
                    )
                seen.append(prev)
            n_params = self.parameter_count(key)
            if n_params > MAX_PARAMETERS:
                raise PlansError(
                    f"configuration '{key}': its network would have {n_params:,} parameters "
                    f"({n_params * 4 / 2**30:.1f} GiB); at most {MAX_PARAMETERS:,} are allowed"
                )

    def parameter_count(self, name: str) -> int:
        """Weights of configuration ``name``'s network, counted on the meta device (no memory is allocated)."""
        from autoseg.networks.registry import network_parameters

        net = self.configuration(name).network
        return network_parameters(net, self.input_channels(name), self.num_outputs)

    def save(self, path: str | Path) -> Path:
        return write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Plans:
        path = Path(path)
        if not path.is_file():
            raise PlansError(f"{path}: plans not found (run 'autoseg plan DATASET --workdir WORK' first)")
        try:
            plans = cls.from_json(read_json(path))
            return replace(plans, source=path)
        except PlansError as exc:
            raise PlansError(f"{path}: {exc}") from None
        except JSONFileError as exc:  # names the file itself
            raise PlansError(str(exc)) from None
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise PlansError(f"{path}: invalid plans ({type(exc).__name__}: {exc})") from None


_ORIENTATION_AXES = ("LR", "AP", "SI")


def _check_untrusted(d: dict) -> None:
    """Types and ranges of the plan-wide fields of a decoded plans.json (see the limits at the top)."""
    from autoseg.io.volume import SUPPORTED_ENDINGS

    names = d["channel_names"]
    if (
        not isinstance(names, list)
        or not 1 <= len(names) <= MAX_CHANNELS
        or not all(isinstance(n, str) for n in names)
    ):
        raise _bad("channel_names", names, f"a list of 1 to {MAX_CHANNELS} names")
    _check_normalization(d["normalization"], len(names))
    orientation = d["orientation"]
    if (
        not isinstance(orientation, str)
        or len(orientation) != 3
        or sorted(next((i for i, ax in enumerate(_ORIENTATION_AXES) if ch in ax), -1) for ch in orientation)
        != [0, 1, 2]
    ):
        raise _bad(
            "orientation", orientation, "3 letters, one of L/R, one of A/P and one of S/I (e.g. 'LPS')"
        )
    if not isinstance(d["file_ending"], str) or d["file_ending"].lower() not in SUPPORTED_ENDINGS:
        raise _bad("file_ending", d["file_ending"], f"one of {', '.join(SUPPORTED_ENDINGS)}")
    gpu = d["gpu_memory_gb"]
    if not _finite(gpu) or not 0 < gpu <= 1e4:
        raise _bad("gpu_memory_gb", gpu, "a number in (0, 10000]")
    _check_label_fields(d)


def _bad(what: str, value, must: str) -> PlansError:
    """The one-line error for a plan-wide field: its name, its value (cut at 80 characters), what it must be."""
    shown = repr(value)
    return PlansError(f"{what} {shown if len(shown) <= 80 else shown[:77] + '...'} must be {must}")


def _check_normalization(norms, num_channels: int) -> None:
    """One normalization object per channel, with a known scheme and finite, bounded statistics."""
    if not isinstance(norms, list) or len(norms) != num_channels:
        raise _bad("normalization", norms, f"a list with one entry per channel ({num_channels})")
    fields = {"scheme", "use_mask", "clip_low", "clip_high", "mean", "std"}
    for c, n in enumerate(norms):
        if not isinstance(n, dict) or not set(n) <= fields or "scheme" not in n:
            raise _bad(f"normalization of channel {c}", n, f"an object with keys among {sorted(fields)}")
        if n["scheme"] not in NORMALIZATION_SCHEMES:
            raise _bad(
                f"normalization scheme of channel {c}",
                n["scheme"],
                f"one of {', '.join(NORMALIZATION_SCHEMES)}",
            )
        if not isinstance(n.get("use_mask", False), bool):
            raise _bad(f"normalization use_mask of channel {c}", n["use_mask"], "true or false")
        for key in ("clip_low", "clip_high", "mean", "std"):
            v = n.get(key)
            if (n["scheme"] == "ct" or v is not None) and not (_finite(v) and abs(v) <= MAX_INTENSITY):
                raise _bad(
                    f"normalization {key} of channel {c}",
                    v,
                    f"a number of magnitude at most {MAX_INTENSITY:g}",
                )
        if n["scheme"] == "ct" and (n["clip_low"] > n["clip_high"] or n["std"] <= 0):
            raise _bad(f"CT normalization of channel {c}", n, "clip_low <= clip_high and std > 0")


def _label_value(v) -> bool:
    return _int(v) and 0 <= v <= MAX_LABEL_VALUE


def _check_label_fields(d: dict) -> None:
    """labels, regions, regions_class_order and ignore_label: bounded values that agree with each other."""
    labels = d["labels"]
    if not isinstance(labels, dict) or not labels or not all(_label_value(v) for v in labels.values()):
        raise _bad("labels", labels, f"a non-empty object of label values 0..{MAX_LABEL_VALUE}")
    if 0 not in labels.values() or len(set(labels.values())) != len(labels):
        raise _bad("labels", labels, "distinct values with background 0")
    regions = d.get("regions", {})
    if not isinstance(regions, dict) or not all(
        isinstance(v, list) and v and all(_label_value(x) and x > 0 for x in v) for v in regions.values()
    ):
        raise _bad("regions", regions, f"an object of non-empty lists of label values 1..{MAX_LABEL_VALUE}")
    order = d.get("regions_class_order", [])
    if not isinstance(order, list) or not all(_label_value(x) and x > 0 for x in order):
        raise _bad("regions_class_order", order, f"a list of label values 1..{MAX_LABEL_VALUE}")
    if order and len(order) != len(regions):
        raise _bad("regions_class_order", order, f"one value per region ({len(regions)})")
    ignore = d.get("ignore_label")
    others = [v for v in labels.values() if v != ignore] + [x for v in regions.values() for x in v]
    if ignore is not None and (
        not _label_value(ignore) or ignore not in labels.values() or ignore <= max(others)
    ):
        raise _bad("ignore_label", ignore, "null or the largest value in labels")
    plain = sorted(v for v in labels.values() if v != ignore)
    if not order and plain != list(range(len(plain))):
        raise _bad("labels", labels, "consecutive values from 0 (without region-based training)")


def carry_over(old: Plans | None, new: Plans, budget_requested: bool) -> tuple[Plans, list[str]]:
    """``new`` plus the configurations of ``old`` that re-planning would otherwise drop although nothing they
    depend on changed, and one line per configuration kept.

    Kept, when the plan-wide fields (dataset hash, normalization, orientation, labels, ...) are unchanged:
    the time-budget configuration of ``old`` when this plan was made without a budget (``budget_requested``
    false; ``3d_budget`` was sized by an earlier ``--time-budget``), and every recipe variant (``autoseg
    variant``) whose source configuration is in the result unchanged (the variant is that source with a
    recipe). A variant of a changed source, or anything of plans of another dataset, is not kept."""
    if old is None or _plan_wide(old) != _plan_wide(new):
        return new, []
    configs, kept = dict(new.configurations), []
    for name, cfg in old.configurations.items():
        if name not in configs and cfg.budget is not None and not cfg.recipe and not budget_requested:
            configs[name] = cfg
            kept.append(
                f"{name}: kept from the previous plans (sized for a {cfg.budget.minutes:g}-minute budget)"
            )
    for name, cfg in old.configurations.items():
        if name in configs or not cfg.recipe:
            continue
        if any(
            replace(src, name=name, recipe=cfg.recipe) == cfg for src in configs.values() if not src.recipe
        ):
            configs[name] = cfg
            kept.append(f"{name}: recipe variant kept from the previous plans (its source is unchanged)")
    if not kept:
        return new, []
    return replace(new, configurations=configs, reasons=[*new.reasons, *kept]), kept


def _plan_wide(plans: Plans) -> dict:
    """What every configuration of ``plans`` depends on: all but the configurations and the reasons."""
    d = plans.to_json()
    for key in ("configurations", "reasons", "schema_version"):
        d.pop(key)
    return d
