"""The `train:` config section as typed, validated settings (configs/local.yaml has every key).

Mistakes that would only surface hours into a run (a kd_dim that does not match the teacher,
a batch larger than the data, an unknown objective) are refused here, before Ray starts.
"""

from __future__ import annotations

import copy
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from rdcd.augment import AugmentSettings
from rdcd.losses import RDCDSettings, SSCDSettings

OBJECTIVES = ("rdcd", "sscd")
AMP_MODES = ("auto", "bf16", "off")


class SettingsError(ValueError):
    """A train: setting that cannot work."""


@dataclass(frozen=True)
class StudentSettings:
    backbone: str = "tf_efficientnet_lite0"
    pretrained: str = "auto"
    kd_dim: int = 512
    dim: int = 128
    gem_p: float = 3.0
    dropout: float = 0.2
    input_size: int | None = None
    frozen_blocks: int = 0
    init_from: str | None = None

    @property
    def weights(self) -> bool | str:
        """DescriptorModel's `pretrained` argument."""
        return False if self.pretrained in ("none", "", None) else self.pretrained


@dataclass(frozen=True)
class OptimSettings:
    batch_size: int = 128
    epochs: float = 100
    max_steps: int | None = None
    base_lr: float = 1.0
    warmup_epochs: float = 5
    momentum: float = 0.9
    weight_decay: float = 1e-6
    grad_clip: float | None = None
    amp: str = "auto"


@dataclass(frozen=True)
class ScalingSettings:
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    threads: int | None = None


@dataclass(frozen=True)
class DataSettings:
    cache: str | None = None
    cache_views: int = 16
    cache_quality: int = 95
    cache_features: bool = False
    teacher_actors: int = 1
    teacher_num_cpus: float = 1.0
    teacher_threads: int | None = None
    map_num_cpus: float = 0.5
    shuffle_buffer: int = 256


@dataclass(frozen=True)
class ExportSettings:
    input_size: int = 224
    resize: str = "square"
    background: str | None = None
    background_max: int = 20000
    calibration: str | None = None
    target_precision: float = 0.99


@dataclass(frozen=True)
class TrainSettings:
    input: str
    output: str
    exclude: str | None = None
    objective: str = "rdcd"
    teacher: str = "sscd"
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 500
    checkpoints_kept: int = 2
    max_failures: int = 2
    student: StudentSettings = field(default_factory=StudentSettings)
    augment: AugmentSettings = field(default_factory=AugmentSettings)
    loss: dict[str, Any] = field(default_factory=dict)
    optim: OptimSettings = field(default_factory=OptimSettings)
    scaling: ScalingSettings = field(default_factory=ScalingSettings)
    data: DataSettings = field(default_factory=DataSettings)
    export: ExportSettings = field(default_factory=ExportSettings)

    @property
    def student_size(self) -> int:
        return self.student.input_size or self.augment.size

    @property
    def global_batch(self) -> int:
        return self.optim.batch_size * self.scaling.num_workers

    def rdcd_loss(self) -> RDCDSettings:
        keys = set(RDCDSettings.__dataclass_fields__) - {"kd_dim", "dim"}
        chosen = {k: v for k, v in self.loss.items() if k in keys}
        return RDCDSettings(kd_dim=self.student.kd_dim, dim=self.student.dim, **chosen)

    def sscd_loss(self) -> SSCDSettings:
        return SSCDSettings(tau=self.loss["sscd_tau"], koleo_weight=self.loss["koleo_weight"])

    def needs_teacher(self) -> bool:
        return self.objective == "rdcd" and bool(self.loss.get("use_rel", True))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PATH_KEYS = (
    ("input",),
    ("output",),
    ("exclude",),
    ("data", "cache"),
    ("export", "background"),
    ("export", "calibration"),
)


def with_absolute_paths(config: dict[str, Any]) -> dict[str, Any]:
    """A copy of config whose local train paths are absolute: Ray workers run in another
    directory, so a relative path would land somewhere else on them."""
    resolved = copy.deepcopy(config)
    for keys in PATH_KEYS:
        node = resolved["train"]
        for key in keys[:-1]:
            node = node[key]
        value = node[keys[-1]]
        if value and "://" not in value:
            node[keys[-1]] = os.path.abspath(os.path.expanduser(value))
    return resolved


def from_config(config: dict[str, Any]) -> TrainSettings:
    """Build and check the settings of config['train']."""
    section = dict(config["train"])
    for required in ("input", "output"):
        if not section.get(required):
            raise SettingsError(f"train.{required} is not set (the recipe or --set must give it)")
    try:
        settings = TrainSettings(
            input=section["input"],
            output=section["output"],
            exclude=section["exclude"],
            objective=section["objective"],
            teacher=section["teacher"],
            seed=int(section["seed"]),
            log_every=int(section["log_every"]),
            checkpoint_every=int(section["checkpoint_every"]),
            checkpoints_kept=int(section["checkpoints_kept"]),
            max_failures=int(section["max_failures"]),
            student=StudentSettings(**section["student"]),
            augment=AugmentSettings(size=int(section["augment"]["size"])),
            loss=dict(section["loss"]),
            optim=OptimSettings(**section["optim"]),
            scaling=ScalingSettings(**section["scaling"]),
            data=DataSettings(**section["data"]),
            export=ExportSettings(**section["export"]),
        )
    except TypeError as exc:
        raise SettingsError(f"train: {exc}") from exc
    _check(settings)
    return settings


def _check(s: TrainSettings) -> None:
    if s.objective not in OBJECTIVES:
        raise SettingsError(f"train.objective must be one of {OBJECTIVES}, got {s.objective!r}")
    if s.optim.amp not in AMP_MODES:
        raise SettingsError(f"train.optim.amp must be one of {AMP_MODES}, got {s.optim.amp!r}")
    if s.optim.batch_size < 2 or s.scaling.num_workers < 1:
        raise SettingsError("train.optim.batch_size must be >= 2 and scaling.num_workers >= 1")
    if s.optim.max_steps is None and s.optim.epochs <= 0:
        raise SettingsError("train.optim.epochs must be positive (or set optim.max_steps)")
    if s.checkpoint_every < 1 or s.log_every < 1:
        raise SettingsError("train.checkpoint_every and train.log_every must be >= 1")
    if s.export.resize not in ("square", "short_side"):
        raise SettingsError("train.export.resize must be 'square' or 'short_side'")
    if s.data.cache and s.data.cache_views < 2:
        raise SettingsError("train.data.cache_views must be >= 2 (pairs need two views)")
    if s.student.frozen_blocks < 0:
        raise SettingsError("train.student.frozen_blocks must be >= 0")
    if s.data.cache_features and not (s.data.cache and s.student.frozen_blocks):
        raise SettingsError(
            "train.data.cache_features stores the frozen prefix's output: it needs "
            "train.data.cache and train.student.frozen_blocks > 0"
        )
    if s.objective == "rdcd":
        try:
            s.rdcd_loss()
        except ValueError as exc:
            raise SettingsError(f"train.loss: {exc}") from exc
    else:
        s.sscd_loss()
