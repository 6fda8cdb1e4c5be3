"""Turn groups of reference images plus prompts into Qwen2-VL model inputs.

transformers' composite ``Qwen2VLProcessor`` also needs torchvision for its video half, so the
inputs are built here from the two parts EasyRef needs: the tokenizer (with Qwen2-VL's chat
template) and the image processor. This is a plain, testable data transformation.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from easyref.config import EasyRefConfig
from easyref.errors import ModelFormatError
from easyref.images import release_resize

IMAGE_PAD = "<|image_pad|>"
UNCONDITIONAL_IMAGE_SIZE = 512


def unconditional_image() -> Image.Image:
    """The black image the release encodes (with an empty prompt) for the guidance branch."""
    return Image.new("RGB", (UNCONDITIONAL_IMAGE_SIZE, UNCONDITIONAL_IMAGE_SIZE))


def _chat_template_from_folder(folder: Path) -> str | None:
    """Processor-level chat templates live beside the tokenizer in newer Qwen2-VL folders."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    as_json = folder / "chat_template.json"
    if as_json.is_file():
        return json.loads(as_json.read_text()).get("chat_template")
    return None


class ReferenceProcessor:
    """Builds the multimodal instruction: all references, then the instruction text and prompt."""

    def __init__(self, tokenizer, image_processor, config: EasyRefConfig) -> None:
        if not tokenizer.chat_template:
            raise ModelFormatError("the MLLM tokenizer has no chat template (Qwen2-VL-Instruct ships one)")
        if IMAGE_PAD not in tokenizer.get_vocab():
            raise ModelFormatError(f"the MLLM tokenizer has no {IMAGE_PAD} token; is this a Qwen2-VL tokenizer?")
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.config = config
        self.merge_size = int(image_processor.merge_size)

    @classmethod
    def from_pretrained(cls, mllm_path: str | Path, config: EasyRefConfig) -> ReferenceProcessor:
        """Load the tokenizer and the PIL image processor of a Qwen2-VL folder (local or resolved)."""
        from transformers import AutoTokenizer
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        tokenizer = AutoTokenizer.from_pretrained(mllm_path)
        if not tokenizer.chat_template:
            tokenizer.chat_template = _chat_template_from_folder(Path(mllm_path))
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(mllm_path)
        return cls(tokenizer, image_processor, config)

    def save_pretrained(self, folder: str | Path) -> None:
        self.tokenizer.save_pretrained(folder)
        self.image_processor.save_pretrained(folder)

    def prompt_text(self, num_images: int, prompt: str) -> str:
        """The chat-formatted text with one image placeholder per reference."""
        content = [{"type": "image"} for _ in range(num_images)]
        content.append({"type": "text", "text": self.config.instruction + prompt})
        messages = [{"role": "user", "content": content}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def images(self, images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        """Pixel patches and (t, h, w) grids, each image resized to about cond_image_size² pixels."""
        size = {"shortest_edge": self.config.min_pixels, "longest_edge": self.config.max_pixels}
        out = self.image_processor(images=[release_resize(im) for im in images], size=size,
                                   return_tensors="pt")
        return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}

    def __call__(self, groups: Sequence[Sequence[Image.Image]], prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Batch several (group, prompt) pairs; sequences are left-padded so they end together.

        Left padding keeps the appended reference tokens at the same positions for every row,
        and positions are counted from each row's first real token, so a padded row computes the
        same as the row alone.
        """
        if len(groups) != len(prompts):
            raise ValueError("need one prompt per reference group")
        flat = [image for group in groups for image in group]
        vision = self.images(flat)
        tokens_per_image = (vision["image_grid_thw"].prod(-1) // self.merge_size**2).tolist()
        rows, start = [], 0
        for group, prompt in zip(groups, prompts, strict=True):
            text = self.prompt_text(len(group), prompt)
            pieces = text.split(IMAGE_PAD)
            counts = tokens_per_image[start:start + len(group)]
            start += len(group)
            text = pieces[0] + "".join(IMAGE_PAD * n + rest for n, rest in zip(counts, pieces[1:], strict=True))
            rows.append(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        length = max(len(row) for row in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, length - len(row):] = torch.tensor(row)
            attention_mask[i, length - len(row):] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, **vision}

    def rows(self, groups: Sequence[Sequence[Image.Image]], prompts: Sequence[str]) -> dict:
        """Model inputs as the configured aggregation reads them.

        ``tokens`` and ``concat``: one row per group (all its references in one sequence).
        ``average``: one row per reference (each with its group's prompt), and ``group_sizes``
        (a list) saying how many consecutive rows belong to each group.
        """
        if self.config.aggregation != "average":
            return self(groups, prompts)
        if len(groups) != len(prompts):
            raise ValueError("need one prompt per reference group")
        rows = [[image] for group in groups for image in group]
        row_prompts = [prompt for group, prompt in zip(groups, prompts, strict=True) for _ in group]
        return {**self(rows, row_prompts), "group_sizes": [len(group) for group in groups]}
