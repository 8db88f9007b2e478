"""Plans: the typed, versioned artifact that ``autoseg plan`` writes and every later stage reads.

All spatial lists (``spacing``, ``patch_size``, ``strides``, ``kernel_sizes``) are in the *transposed* array
order used for training: volumes are first reoriented to ``orientation`` (a lossless permute/flip), then
their ``(z, y, x)`` arrays are permuted by ``transpose_forward``
so that the coarsest axis comes first (2D configurations then slice along axis 0). For 2D configurations the
spatial lists have two entries (the in-plane axes).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from autoseg.errors import PlansError
from autoseg.jsonio import JSONFileError, read_json, write_json
from autoseg.preprocessing.normalize import ChannelNormalization

PLANS_SCHEMA_VERSION = 1
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
class NetworkTopology:
    """What ``autoseg.networks.build_network`` needs. One entry per stage in each list."""

    architecture: str  # registry name, e.g. "unet"
    dim: int  # 2 or 3
    strides: list[list[int]]  # stride of the first conv of each stage; stage 0 is all ones
    kernel_sizes: list[list[int]]
    features_per_stage: list[int]
    n_conv_per_stage: int = 2
    deep_supervision: bool = True

    @property
    def n_stages(self) -> int:
        return len(self.strides)

    def total_stride(self) -> list[int]:
        out = [1] * self.dim
        for s in self.strides:
            out = [a * b for a, b in zip(out, s)]
        return out


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

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> Configuration:
        d = dict(d)
        d["network"] = NetworkTopology(**d["network"])
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


def _positive_ints(values, n: int) -> bool:
    return (
        isinstance(values, list)
        and len(values) == n
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values)
    )


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
        if version != PLANS_SCHEMA_VERSION:
            raise PlansError(
                f"plans schema_version {version!r} is not supported (expected {PLANS_SCHEMA_VERSION})"
            )
        for key in _REQUIRED_KEYS:
            if key not in d:
                raise PlansError(f"required key '{key}' is missing")
        if not isinstance(d["configurations"], dict) or not all(
            isinstance(c, dict) for c in d["configurations"].values()
        ):
            raise PlansError("'configurations' must be an object mapping names to configurations")
        if sorted(d["transpose_forward"]) != [0, 1, 2]:
            raise PlansError(f"transpose_forward {d['transpose_forward']!r} must be a permutation of 0, 1, 2")
        return cls(
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
