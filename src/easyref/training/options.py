"""The settings of one training run: plain values, the release's defaults, every range checked.

``TrainOptions`` is what ``easyref train`` builds from its flags and what :func:`easyref.
training.loop.train` takes, so a Python user can start a run without the command line.
Settings left as ``None`` take the stage's default (the release's settings, METHOD.md §3).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from easyref.config import AGGREGATIONS, REFERENCE_ATTENTIONS
from easyref.errors import InvalidArgumentError, ModelFormatError
from easyref.single_file import check_base_config
from easyref.training import stages

# How a target becomes a training image: a centred or random square after resizing the short side, or
# the whole image at about resolution² pixels with its aspect ratio kept (sides multiples of 64).
CROPS = ("center", "random", "aspect")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
MIXED_PRECISION = ("no", "fp16", "bf16")
DEFAULT_LORA_RANK = 128  # the release's


@dataclasses.dataclass(frozen=True)
class Augmentations:
    """The release's augmentations; the defaults are its settings (METHOD.md §2.6, §3)."""

    resolution: int = 1024
    max_references: int = 28  # the release's effective cap
    truncate_probability: float = 0.4
    drop_text: float = 0.05
    drop_references: float = 0.05
    drop_both: float = 0.05
    face_expand: float = 0.49  # each side of the face square moves out by a random whole 0..49% of it
    face_flip: float = 0.5
    crop: str | None = None  # None: the stage's (the release's): align / single "center", multi "aspect"

    def __post_init__(self) -> None:
        for name in ("truncate_probability", "drop_text", "drop_references", "drop_both", "face_flip"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise InvalidArgumentError(f"{name.replace('_', '-')} must be a probability in [0, 1], got {value}")
        if self.drop_text + self.drop_references + self.drop_both > 1:
            raise InvalidArgumentError("drop-text + drop-references + drop-both must not exceed 1")
        if self.crop is not None and self.crop not in CROPS:
            raise InvalidArgumentError(f"crop must be one of {', '.join(CROPS)}, got {self.crop!r}")
        if self.face_expand < 0:
            raise InvalidArgumentError(f"face-expand must be >= 0, got {self.face_expand}")
        if self.max_references < 1:
            raise InvalidArgumentError(f"max-references must be at least 1, got {self.max_references}")
        if self.resolution < 64 or self.resolution % 8:
            raise InvalidArgumentError(f"resolution must be a multiple of 8 and at least 64, got {self.resolution}")


# The release's per-device settings (its training scripts, METHOD.md §3): stage 1 lr 1e-4, batch 8;
# stage 2 lr 4e-5, batch 4 x 2 accumulated; stage 3 lr 2e-5, batch 1 x 4 accumulated.
STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "align": {"learning_rate": 1e-4, "batch_size": 8, "gradient_accumulation_steps": 1},
    "single": {"learning_rate": 4e-5, "batch_size": 4, "gradient_accumulation_steps": 2},
    "multi": {"learning_rate": 2e-5, "batch_size": 1, "gradient_accumulation_steps": 4},
}

# The release's target crops: stages 1-2 a centre square (its "--random_crop" path with center_crop=True),
# stage 3 the whole image with its aspect ratio kept (METHOD.md §3).
STAGE_CROPS = {"align": "center", "single": "center", "multi": "aspect"}

# Settings that may change when a run is resumed (they do not change what is computed per step).
RESUMABLE_CHANGES = frozenset({
    "max_steps", "save_steps", "keep_checkpoints", "log_steps", "num_workers", "resume", "progress",
    "validation_steps", "validation_records", "validation_seeds", "validation_inference_steps",
    "validation_guidance_scale", "pause_after_steps", "output",
})


@dataclasses.dataclass
class TrainOptions:
    stage: str
    data: Path
    output: Path
    model: str | None = None
    base: str | None = None
    mllm: str | None = None
    base_config: str | None = None  # configures a single-file --base (easyref.single_file)
    init: Path | None = None
    # Stages single / multi from a new adapter instead of the previous stage's (the paper's
    # progressive-training ablation: multi-reference training alone).
    skip_earlier_stages: bool = False
    image_root: Path | None = None
    allow_absolute_paths: bool = False  # records' absolute paths are refused unless asked for
    max_steps: int = 10_000
    save_steps: int = 500
    keep_checkpoints: int = 3
    batch_size: int | None = None
    gradient_accumulation_steps: int | None = None
    learning_rate: float | None = None
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    weight_decay: float = 0.0  # the release's scripts: no weight decay, no gradient clipping
    max_grad_norm: float = 0.0  # 0 = off
    resolution: int = 1024
    mixed_precision: str | None = None  # None: what `accelerate launch` / its config says
    seed: int = 42
    gradient_checkpointing: bool = False
    lora_rank: int | None = None
    noise_offset: float = 0.0
    augment: Augmentations = dataclasses.field(default_factory=Augmentations)
    num_workers: int = 4
    resume: str | None = None
    log_steps: int = 10
    validation_steps: int = 0
    validation_records: int = 2
    validation_seeds: int = 2
    validation_inference_steps: int = 30
    validation_guidance_scale: float = 5.0
    # A new adapter (stage align without --init) takes these; None: EasyRefConfig's defaults.
    num_reference_tokens: int | None = None
    num_final_layers: int | None = None
    cond_image_size: int | None = None
    reference_attention: str | None = None
    # None: the --init adapter's aggregation (a new adapter: tokens); may change an --init adapter's.
    aggregation: str | None = None
    # None: the --init adapter's default negative prompt (a new adapter: the release's); recorded in the adapter.
    negative_prompt: str | None = None
    progress: bool = True
    # Debug: after this step's checkpoint, every process stops and waits to be killed (tests of --resume).
    pause_after_steps: int | None = None

    def resolved(self) -> TrainOptions:
        """A copy with stage defaults filled in and paths made absolute."""
        stages.check_stage(self.stage)
        filled = {key: value for key, value in STAGE_DEFAULTS[self.stage].items() if getattr(self, key) is None}
        if self.augment.crop is None:
            filled["augment"] = dataclasses.replace(self.augment, crop=STAGE_CROPS[self.stage])
        paths = {name: Path(value).expanduser().absolute() for name in ("data", "output", "init", "image_root")
                 if (value := getattr(self, name)) is not None}
        if self.image_root is None:
            paths["image_root"] = Path(self.data).expanduser().absolute().parent
        for name in ("model", "base", "mllm", "base_config"):  # local paths made absolute, hub ids as given
            value = getattr(self, name)
            if value is not None and Path(value).expanduser().exists():
                paths[name] = str(Path(value).expanduser().absolute())
        return dataclasses.replace(self, **filled, **paths)

    def fresh_adapter_kwargs(self) -> dict[str, Any]:
        names = ("num_reference_tokens", "num_final_layers", "cond_image_size", "reference_attention")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    def check(self) -> None:
        """Every number and combination, before any file or model is touched beyond a stat."""
        stages.check_stage(self.stage)
        if self.skip_earlier_stages and (self.init is not None or not stages.needs_init(self.stage)):
            raise InvalidArgumentError("--skip-earlier-stages starts stage single or multi from a new adapter: "
                                       "it goes without --init, and stage align always starts new")
        if stages.needs_init(self.stage) and self.init is None and not self.skip_earlier_stages:
            previous = {"single": "stage 1 (align)", "multi": "stage 2 (single)"}[self.stage]
            raise InvalidArgumentError(
                f"stage {self.stage} continues from the adapter of {previous}: pass --init RUN/adapter"
            )
        if self.init is not None and self.fresh_adapter_kwargs():
            given = ", ".join("--" + name.replace("_", "-") for name in self.fresh_adapter_kwargs())
            raise InvalidArgumentError(f"{given} shape a new adapter; the --init adapter already fixes them")
        if self.model is None and (self.base is None or self.mllm is None):
            raise InvalidArgumentError("give --model DIR (holding base/ and mllm/) or both --base and --mllm")
        check_base_config(self.base, self.base_config)
        if self.init is not None and not (Path(self.init) / "config.json").is_file():
            raise ModelFormatError(f"--init {self.init} is not an adapter folder (no config.json); "
                                   "pass RUN/adapter of the previous stage")
        positive = ("max_steps", "save_steps", "keep_checkpoints", "batch_size", "gradient_accumulation_steps",
                    "log_steps", "validation_records", "validation_seeds", "validation_inference_steps")
        for name in positive:
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise InvalidArgumentError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
        for name in ("lr_warmup_steps", "num_workers", "validation_steps"):
            if getattr(self, name) < 0:
                raise InvalidArgumentError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.learning_rate is not None and not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise InvalidArgumentError(f"--learning-rate must be a positive number, got {self.learning_rate}")
        for name in ("weight_decay", "max_grad_norm", "noise_offset", "validation_guidance_scale"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise InvalidArgumentError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise InvalidArgumentError(f"--lr-scheduler must be one of {', '.join(LR_SCHEDULERS)}")
        if self.mixed_precision is not None and self.mixed_precision not in MIXED_PRECISION:
            raise InvalidArgumentError(f"--mixed-precision must be one of {', '.join(MIXED_PRECISION)}")
        if self.lora_rank is not None and not stages.trains_mllm(self.stage):
            raise InvalidArgumentError("--lora-rank applies to stages single and multi (stage align trains no LoRA)")
        if self.lora_rank is not None and self.lora_rank < 1:
            raise InvalidArgumentError(f"--lora-rank must be a positive integer, got {self.lora_rank}")
        if self.aggregation is not None and self.aggregation not in AGGREGATIONS:
            raise InvalidArgumentError(f"--aggregation must be one of {', '.join(AGGREGATIONS)}")
        if self.reference_attention is not None and self.reference_attention not in REFERENCE_ATTENTIONS:
            raise InvalidArgumentError(f"--reference-attention must be one of {', '.join(REFERENCE_ATTENTIONS)}")
        if not 0 <= self.seed < 2**32:
            raise InvalidArgumentError(f"--seed must be between 0 and 2**32 - 1, got {self.seed}")
        if self.augment.resolution != self.resolution:
            raise InvalidArgumentError("augment.resolution must equal resolution")

    def identity(self) -> dict[str, Any]:
        """What makes two runs the same run (``run.json``): everything but RESUMABLE_CHANGES."""
        out = {}
        for field in dataclasses.fields(self):
            if field.name in RESUMABLE_CHANGES:
                continue
            value = getattr(self, field.name)
            if isinstance(value, Augmentations):
                value = dataclasses.asdict(value)
            elif isinstance(value, Path):
                value = str(value)
            out[field.name] = value
        return out
