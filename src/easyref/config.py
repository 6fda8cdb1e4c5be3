"""EasyRef's own hyper-parameters: what ``adapter/config.json`` holds.

Everything the reference encoder and the adapter need to rebuild themselves lives here, so an
adapter folder is self-describing: the release's defaults are the dataclass defaults.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

from easyref.errors import InvalidArgumentError, ModelFormatError
from easyref.files import read_json

RELEASE_INSTRUCTION = (
    "Visualize a scene that closely resembles the provided images, capturing the essence and "
    "details described in this prompt:\n"
)
# The release's inference default: what SDXL's negative branch reads when the user names nothing.
RELEASE_NEGATIVE_PROMPT = "monochrome, lowres, bad anatomy, worst quality, low quality"
AGGREGATIONS = ("tokens", "average", "concat")
REFERENCE_ATTENTIONS = ("bidirectional", "causal")
# Paper Fig. 9 goes to 112 references; past 128 the MLLM prefill dominates every call.
MAX_REFERENCES = 128
CONFIG_NAME = "config.json"

Aggregation = Literal["tokens", "average", "concat"]
ReferenceAttention = Literal["bidirectional", "causal"]


@dataclasses.dataclass
class EasyRefConfig:
    """Shape and behaviour of the EasyRef adapter.

    ``aggregation`` picks how a group becomes conditioning tokens (paper Table 5):

    * ``tokens``: all references and the prompt in one MLLM sequence; ``num_reference_tokens``
      learnable tokens appended at the last ``num_final_layers`` layers; their outputs are the
      group representation (EasyRef).
    * ``average``: each reference encoded alone with the prompt; the reference-token outputs
      are averaged over the group.
    * ``concat``: one sequence as in ``tokens``; the final-layer outputs at the image-token
      positions of all references are concatenated (length grows with the group).

    ``reference_attention`` is the mask among reference tokens in the final layers:
    ``bidirectional`` (each reference token sees all others: the paper's intent) or ``causal``
    (each sees only earlier ones: what the release computes, see METHOD.md §4).

    ``negative_prompt`` is the text negative prompt used when a call names none: the release's for
    SDXL; a model whose base never saw those words (ShapesWorld) records "" instead.
    """

    mllm_hidden_size: int
    cross_attention_dim: int
    num_reference_tokens: int = 64
    num_final_layers: int = 1
    aggregation: Aggregation = "tokens"
    reference_attention: ReferenceAttention = "bidirectional"
    cond_image_size: int = 336
    instruction: str = RELEASE_INSTRUCTION
    lora_rank: int | None = None
    max_references: int = MAX_REFERENCES
    negative_prompt: str = RELEASE_NEGATIVE_PROMPT

    def __post_init__(self) -> None:
        for name in ("instruction", "negative_prompt", "aggregation", "reference_attention"):
            if not isinstance(getattr(self, name), str):
                raise InvalidArgumentError(f"{name} must be a string, got {getattr(self, name)!r}")
        for name in ("mllm_hidden_size", "cross_attention_dim", "num_reference_tokens", "num_final_layers",
                     "max_references", "cond_image_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidArgumentError(f"{name} must be a positive integer, got {value!r}")
        if self.aggregation not in AGGREGATIONS:
            raise InvalidArgumentError(
                f"aggregation must be one of {', '.join(AGGREGATIONS)}, got {self.aggregation!r}"
            )
        if self.reference_attention not in REFERENCE_ATTENTIONS:
            raise InvalidArgumentError(
                f"reference_attention must be one of {', '.join(REFERENCE_ATTENTIONS)}, "
                f"got {self.reference_attention!r}"
            )
        if self.cond_image_size < 56 or self.cond_image_size % 28:
            raise InvalidArgumentError(
                f"cond_image_size must be a multiple of 28 and at least 56, got {self.cond_image_size}"
            )
        if self.lora_rank is not None and (isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int)
                                           or self.lora_rank < 1):
            raise InvalidArgumentError(f"lora_rank must be a positive integer or null, got {self.lora_rank!r}")

    @property
    def min_pixels(self) -> int:
        """Lower pixel bound handed to the Qwen2-VL image processor (the release's formula)."""
        return (self.cond_image_size // 28 - 1) ** 2 * 28 * 28

    @property
    def max_pixels(self) -> int:
        """Upper pixel bound handed to the Qwen2-VL image processor (the release's formula)."""
        return ((self.cond_image_size // 28) ** 2 + 1) * 28 * 28

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> EasyRefConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ModelFormatError(f"{source}: unknown adapter config keys {unknown}")
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING and f.name not in data]
        if missing:
            raise ModelFormatError(f"{source}: adapter config lacks {missing}")
        try:
            return cls(**data)
        except InvalidArgumentError as exc:
            raise ModelFormatError(f"{source}: {exc}") from None

    @classmethod
    def load(cls, folder: str | Path) -> EasyRefConfig:
        path = Path(folder) / CONFIG_NAME
        if not path.is_file():
            raise ModelFormatError(f"adapter folder {folder} has no {CONFIG_NAME}")
        data = read_json(path, ModelFormatError)
        if not isinstance(data, dict):
            raise ModelFormatError(f"{path} must hold a JSON object")
        return cls.from_dict(data, source=str(path))
