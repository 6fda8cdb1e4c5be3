"""ShapesWorld's MLLM: a small Qwen2-VL pretrained to describe scenes and to say what a group shares.

EasyRef assumes its MLLM already understands groups of images before EasyRef trains anything
(the reference tokens only *gather* what the frozen layers computed). The miniature earns that
assumption the way Qwen2-VL does, in one run of the shared loop with two phases:

1. vision warm-up: the vision tower alone learns the scene's attributes from its pooled outputs
   (linear heads on the mean and max of the merged tokens; the heads are thrown away). Qwen2-VL's
   vision tower starts from a pretrained ViT; from scratch, a ViT learns shapes from ~50k images
   and a language model in front of it learns nothing until the tokens already carry them;
2. vision-language pretraining, teacher forced through the chat template, loss on the answer:
   * captioning: one clean (or lightly spoiled) scene + "Describe the image." -> its full caption;
   * group questions: a train group's 1-8 spoiled references + "What do these images have in
     common?" -> its concept ("the same red striped star"). One reference is ambiguous
     (clutter), so the answer can only be read from what several references share.

Inputs are built by EasyRef's own :class:`~easyref.prompting.ReferenceProcessor` (chat template,
left padding, the same image resizing) with the answer appended. Positions are the model's own
M-RoPE (``get_rope_index``, padding-aware through the attention mask), so training and
``generate`` agree; EasyRef's encoder later runs the layers with plain 1-D positions (as the
release does with the real model), and the evaluation reports the answers under those too.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from easyref.config import EasyRefConfig
from easyref.errors import InvalidArgumentError
from easyref.files import atomic_folder, write_json
from easyref.prompting import IMAGE_PAD, ReferenceProcessor
from easyref.shapes.groups import DESCRIBE, QUESTION, concept_text, sample_group
from easyref.shapes.splits import random_train_attributes
from easyref.shapes.vocab import qwen_tokenizer
from easyref.shapes.world import ATTRIBUTES, Attributes, View, clean_scene, random_attributes, render
from easyref.training.steps import LoopSettings, step_rng, train

# EasyRef's adapter reads 64x64 references at this size: 8x8 patches of 7 px, 16 merged tokens each.
COND_IMAGE_SIZE = 56
PATCH_SIZE = 7
MERGE_SIZE = 2
MAX_REFERENCES = 8
IGNORE = -100
# What the vision warm-up predicts: everything a pooled feature can know (not the position).
WARMUP_ATTRIBUTES = tuple(name for name in ATTRIBUTES if name != "position")
EVAL_REFERENCES = (1, 2, 4, 8)


@dataclasses.dataclass(frozen=True)
class MllmSettings:
    """Architecture and budget. The text model keeps 4 layers: EasyRef runs the first 3 frozen and
    trains a copy of the last. ``steps`` counts both phases; the first ``vision_fraction`` of them
    are the vision warm-up."""

    vision_embed_dim: int = 64
    vision_depth: int = 2
    vision_heads: int = 4
    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    steps: int = 4500
    vision_fraction: float = 2 / 3
    vision_batch: int = 32
    group_rows: int = 12
    caption_rows: int = 4
    learning_rate: float = 2e-3
    warmup_steps: int = 50

    @property
    def mrope_section(self) -> list[int]:
        """Qwen2-VL's split of the rotary frequencies (16/24/24 of 64) scaled to this head size."""
        half = self.hidden_size // self.num_heads // 2
        height = width = half * 3 // 8
        return [half - height - width, height, width]

    def vision_steps(self, steps: int) -> int:
        return int(round(steps * self.vision_fraction))


def _reference_config() -> EasyRefConfig:
    # No instruction (the question is the whole user text); only the image size matters otherwise.
    return EasyRefConfig(mllm_hidden_size=1, cross_attention_dim=1, cond_image_size=COND_IMAGE_SIZE,
                         instruction="")


def image_processor() -> Qwen2VLImageProcessorPil:
    """Qwen2-VL's image processor with 7-px patches (the real model uses 14 px on larger images)."""
    config = _reference_config()
    return Qwen2VLImageProcessorPil(
        size={"shortest_edge": config.min_pixels, "longest_edge": config.max_pixels},
        patch_size=PATCH_SIZE, merge_size=MERGE_SIZE, temporal_patch_size=2,
        image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD,
    )


def question_processor(tok, images: Qwen2VLImageProcessorPil) -> ReferenceProcessor:
    """EasyRef's own input builder with no instruction: the question is the whole user text."""
    return ReferenceProcessor(tok, images, _reference_config())


def build_model(tok, settings: MllmSettings, seed: int = 0) -> Qwen2VLForConditionalGeneration:
    """A randomly initialised Qwen2-VL sized by ``settings``, its token ids taken from ``tok``."""
    ids = {name: tok.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", IMAGE_PAD), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    text_config = {
        "vocab_size": len(tok),
        "hidden_size": settings.hidden_size,
        "intermediate_size": settings.intermediate_size,
        "num_hidden_layers": settings.num_layers,
        "num_attention_heads": settings.num_heads,
        "num_key_value_heads": settings.num_kv_heads,
        # Room for EasyRef's largest group (128 references of 18 tokens each).
        "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "mrope_section": settings.mrope_section, "rope_theta": 1e4},
        "bos_token_id": tok.pad_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    vision_config = {"patch_size": PATCH_SIZE, "spatial_merge_size": MERGE_SIZE, "temporal_patch_size": 2,
                     "embed_dim": settings.vision_embed_dim, "depth": settings.vision_depth,
                     "num_heads": settings.vision_heads, "hidden_size": settings.hidden_size}
    config = Qwen2VLConfig(text_config=text_config, vision_config=vision_config, tie_word_embeddings=True, **ids)
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config)
    generation = model.generation_config
    generation.eos_token_id, generation.pad_token_id, generation.bos_token_id = tok.eos_token_id, tok.pad_token_id, None
    return model


# -- examples ---------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Example:
    """One user turn (images, then a question) and the assistant's answer."""

    images: tuple[Image.Image, ...]
    question: str
    answer: str


def group_example(split: str, index: int, num_references: int, seed: int = 0) -> Example:
    """Group ``index`` of ``split`` asked :data:`QUESTION`; the answer is its concept in words."""
    group = sample_group(split, index, num_references, seed)
    return Example(tuple(Image.fromarray(render(scene)) for scene in group.references), QUESTION,
                   concept_text(group.kind, group.concept))


def single_scene(rng: np.random.Generator, train_only: bool = True) -> tuple[Attributes, Image.Image]:
    """A clean scene, half the time lightly spoiled (lighting, noise; never occluded or cropped, so
    its full caption stays true)."""
    attributes = random_train_attributes(rng) if train_only else random_attributes(rng)
    scene = clean_scene(attributes, rng)
    if rng.random() < 0.5:
        scene = dataclasses.replace(scene, view=View(
            gains=tuple(float(g) for g in rng.uniform(0.85, 1.15, 3)), offset=float(rng.uniform(-12, 12)),
            noise_sigma=float(rng.uniform(0, 5)), noise_seed=int(rng.integers(2**31))))
    return attributes, Image.fromarray(render(scene))


def caption_example(rng: np.random.Generator, train_only: bool = True) -> Example:
    attributes, image = single_scene(rng, train_only)
    return Example((image,), DESCRIBE, attributes.caption())


def mm_token_type_ids(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """Qwen2-VL's modality map (1 at image placeholders), which its M-RoPE position code requires."""
    return (input_ids == image_token_id).int()


def teacher_forcing_batch(processor: ReferenceProcessor, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
    """Model inputs with the answers appended, and ``labels`` on the answer tokens only.

    The prompt part is EasyRef's own (left padded, ending in the assistant header); each answer
    and its ``<|im_end|>`` follow it, right padded to the longest answer. Padding at both ends is
    harmless: the attention mask hides it from attention and from the M-RoPE positions.
    """
    tok = processor.tokenizer
    prompts = processor([ex.images for ex in examples], [ex.question for ex in examples])
    answers = [tok(ex.answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for ex in examples]
    start, width = prompts["input_ids"].shape[1], max(len(ids) for ids in answers)
    tail = torch.full((len(examples), width), tok.pad_token_id, dtype=torch.long)
    tail_mask = torch.zeros_like(tail)
    for row, ids in enumerate(answers):
        tail[row, :len(ids)] = torch.tensor(ids)
        tail_mask[row, :len(ids)] = 1
    input_ids = torch.cat([prompts["input_ids"], tail], dim=1)
    attention_mask = torch.cat([prompts["attention_mask"], tail_mask], dim=1)
    labels = torch.full_like(input_ids, IGNORE)
    labels[:, start:] = tail.masked_fill(tail_mask == 0, IGNORE)
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "mm_token_type_ids": mm_token_type_ids(input_ids, tok.convert_tokens_to_ids(IMAGE_PAD)),
            "pixel_values": prompts["pixel_values"], "image_grid_thw": prompts["image_grid_thw"], "labels": labels}


def answer_loss(model: Qwen2VLForConditionalGeneration, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens (the model shifts the labels itself)."""
    return model(**batch).loss


def training_examples(step: int, seed: int, settings: MllmSettings) -> list[Example]:
    """A vision-language batch, a pure function of (seed, step). All group rows of a step share one
    group size (1-8, drawn per step) so rows pad little; their group indexes follow from the step."""
    rng = step_rng(seed, step)
    size = int(rng.integers(1, MAX_REFERENCES + 1))
    first = step * settings.group_rows
    groups = [group_example("train", first + i, size, seed) for i in range(settings.group_rows)]
    return groups + [caption_example(rng) for _ in range(settings.caption_rows)]


# -- the vision warm-up -----------------------------------------------------------------------------

class VisionProbe(nn.Module):
    """Two readers of an image's merged vision tokens, each with a linear output per attribute.

    * mean and max over the tokens: learns fast (the max finds the object's parts), but a
      language model cannot take a per-feature max, and alone it leaves shapes unreadable to it;
    * one attention query per attribute over the normalised tokens: reads the way a language
      model's attention head does, so what it learns to find, the MLLM can find too.
    """

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.sizes = [len(ATTRIBUTES[name]) for name in WARMUP_ATTRIBUTES]
        self.pooled = nn.Sequential(nn.LayerNorm(2 * hidden_size), nn.Linear(2 * hidden_size, sum(self.sizes)))
        self.norm = nn.LayerNorm(hidden_size)
        self.keys = nn.Linear(hidden_size, hidden_size)
        self.queries = nn.Parameter(0.02 * torch.randn(len(self.sizes), hidden_size))
        self.outputs = nn.ModuleList(nn.Linear(hidden_size, size) for size in self.sizes)

    def forward(self, tokens: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
        """Logits of both readers, attribute by attribute: [pooled..., attention...]."""
        chunks = tokens.split(counts)
        pooled = torch.stack([torch.cat([chunk.mean(0), chunk.amax(0)]) for chunk in chunks])
        read = []
        for chunk in chunks:
            values = self.norm(chunk)
            weights = torch.softmax(self.queries @ self.keys(values).T / values.shape[-1] ** 0.5, dim=-1)
            read.append(weights @ values)
        read = torch.stack(read)
        attended = [out(read[:, i]) for i, out in enumerate(self.outputs)]
        return [*self.pooled(pooled).split(self.sizes, dim=-1), *attended]


class _Pretraining(nn.Module):
    """What the loop trains: the MLLM and the warm-up's probe (dropped before saving)."""

    def __init__(self, mllm: Qwen2VLForConditionalGeneration) -> None:
        super().__init__()
        self.mllm = mllm
        self.probe = VisionProbe(mllm.config.vision_config.hidden_size)


def vision_loss(mllm: Qwen2VLForConditionalGeneration, probe: VisionProbe, processor: ReferenceProcessor,
                rng: np.random.Generator, batch: int) -> torch.Tensor:
    """Mean cross-entropy of both probe readers' attribute predictions on single scenes."""
    scenes = [single_scene(rng) for _ in range(batch)]
    inputs = processor.images([image for _, image in scenes])
    tokens = mllm.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).pooler_output
    counts = (inputs["image_grid_thw"].prod(-1) // MERGE_SIZE**2).tolist()
    labels = [torch.tensor([getattr(a, name) for a, _ in scenes]) for name in WARMUP_ATTRIBUTES]
    losses = [nn.functional.cross_entropy(out, target) for out, target in zip(probe(tokens, counts), 2 * labels,
                                                                              strict=True)]
    return torch.stack(losses).mean()


# -- evaluation -------------------------------------------------------------------------------------

@torch.no_grad()
def answer(model: Qwen2VLForConditionalGeneration, processor: ReferenceProcessor, examples: Sequence[Example],
           max_new_tokens: int = 24) -> list[str]:
    """Greedy answers, decoded without special tokens."""
    inputs = processor([ex.images for ex in examples], [ex.question for ex in examples])
    image_token_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    out = model.generate(**inputs, mm_token_type_ids=mm_token_type_ids(inputs["input_ids"], image_token_id),
                         max_new_tokens=max_new_tokens, do_sample=False)
    new = out[:, inputs["input_ids"].shape[1]:]
    return [text.strip() for text in processor.tokenizer.batch_decode(new, skip_special_tokens=True)]


@torch.no_grad()
def exact_under_flat_positions(model: Qwen2VLForConditionalGeneration, processor: ReferenceProcessor,
                               examples: Sequence[Example]) -> list[bool]:
    """Would greedy decoding give each answer if positions were 1-D, as EasyRef's encoder runs them?

    Teacher forced: greedy decoding reproduces the answer exactly when every answer token (and the
    final ``<|im_end|>``) is the argmax given the ones before it.
    """
    batch = teacher_forcing_batch(processor, examples)
    labels = batch.pop("labels")
    positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    logits = model(**batch, position_ids=positions.unsqueeze(0).expand(3, -1, -1)).logits
    hits = (logits[:, :-1].argmax(-1) == labels[:, 1:]) | (labels[:, 1:] == IGNORE)
    return hits.all(-1).tolist()


def _correct(model, processor: ReferenceProcessor, examples: Sequence[Example], batch_size: int,
             flat: bool = False) -> list[bool]:
    hits = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        if flat:
            hits += exact_under_flat_positions(model, processor, chunk)
        else:
            hits += [got == ex.answer for got, ex in zip(answer(model, processor, chunk), chunk, strict=True)]
    return hits


_CAPTION = re.compile(r"a (?P<size>\w+) (?P<colour>\w+) (?P<pattern>\w+) (?P<shape>\w+) at the (?P<position>[\w ]+?) "
                      r"on a (?P<background>\w+) (?P<texture>\w+) background")


def caption_scores(model, processor: ReferenceProcessor, scenes: Sequence[tuple[Attributes, Image.Image]],
                   batch_size: int) -> dict:
    """Exact-match accuracy of greedy captions, and how often each attribute is named right in them
    (an unparseable caption names none)."""
    exact, right = 0, {name: 0 for name in ATTRIBUTES}
    for start in range(0, len(scenes), batch_size):
        chunk = scenes[start:start + batch_size]
        texts = answer(model, processor, [Example((image,), DESCRIBE, "") for _, image in chunk])
        for (attributes, _), text in zip(chunk, texts, strict=True):
            exact += text == attributes.caption()
            match = _CAPTION.fullmatch(text)
            for name, value in attributes.names().items():
                right[name] += bool(match) and match[name] == value
    count = max(1, len(scenes))
    return {"exact": exact / count, "attributes": {name: hits / count for name, hits in right.items()}}


def _mean(hits: Sequence[bool]) -> float:
    return float(np.mean(hits)) if len(hits) else float("nan")


def _by_kind(hits: Sequence[bool], split: str, seed: int) -> dict[str, float]:
    kinds = [sample_group(split, i, 1, seed).kind for i in range(len(hits))]
    return {kind: _mean([hit for hit, k in zip(hits, kinds, strict=True) if k == kind]) for kind in sorted(set(kinds))}


def evaluate(model: Qwen2VLForConditionalGeneration, processor: ReferenceProcessor, *, seed: int = 0,
             num_groups: int = 200, batch_size: int = 32) -> dict:
    """Exact-match accuracy of greedy answers.

    Group questions on held-in groups at 1, 2, 4 and 8 references and on held-out groups at 4
    (each also per concept kind at 4; held-out ``scene`` groups ask for an answer form never
    trained, so they measure zero-shot composition), and captions of fresh clean scenes (training
    combinations, and any combination). ``flat_positions`` repeats the 4-reference numbers with
    EasyRef's 1-D positions.
    """
    model.eval()
    held_in_groups = {n: [group_example("held-in", i, n, seed) for i in range(num_groups)] for n in EVAL_REFERENCES}
    held_in = {n: _correct(model, processor, examples, batch_size) for n, examples in held_in_groups.items()}
    held_out_groups = [group_example("held-out", i, 4, seed) for i in range(num_groups)]
    held_out = _correct(model, processor, held_out_groups, batch_size)
    rng = np.random.default_rng([seed, 7919])
    scenes = [single_scene(rng) for _ in range(num_groups)]
    any_combination = [single_scene(rng, train_only=False) for _ in range(num_groups)]
    return {
        "held_in": {str(n): _mean(hits) for n, hits in held_in.items()},
        "held_in_by_kind": _by_kind(held_in[4], "held-in", seed),
        "held_out": _mean(held_out),
        "held_out_by_kind": _by_kind(held_out, "held-out", seed),
        "captions": caption_scores(model, processor, scenes, batch_size),
        "captions_any_combination": caption_scores(model, processor, any_combination, batch_size),
        "flat_positions": {"held_in": _mean(_correct(model, processor, held_in_groups[4], batch_size, flat=True)),
                           "held_out": _mean(_correct(model, processor, held_out_groups, batch_size, flat=True))},
        "groups_per_split": num_groups,
    }


# -- the whole run ----------------------------------------------------------------------------------

def save_mllm(model: Qwen2VLForConditionalGeneration, processor: ReferenceProcessor, output: Path) -> None:
    """Model, tokenizer and image processor in one folder, written atomically."""
    with atomic_folder(output) as staging:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)


def parameter_counts(model: Qwen2VLForConditionalGeneration) -> dict[str, int]:
    vision = sum(p.numel() for p in model.model.visual.parameters())
    total = sum(p.numel() for p in model.parameters())
    return {"vision": vision, "language": total - vision, "total": total, "fp16_bytes": 2 * total}


def pretrain_mllm(output: Path, *, steps: int | None = None, seed: int = 0, progress: bool = True,
                  settings: MllmSettings | None = None, eval_groups: int = 200,
                  work_dir: Path | None = None) -> dict:
    """Pretrain the MLLM, save it into ``output`` and measure it; returns the summary.

    ``steps=None`` is the full budget (``settings.steps``). Checkpoints and logs go to
    ``work_dir`` (default ``output/../work/<output name>``), so rerunning the same call resumes.
    """
    settings = settings or MllmSettings()
    steps = settings.steps if steps is None else steps
    if steps < 1:
        raise InvalidArgumentError(f"steps must be at least 1, got {steps}")
    output = Path(output)
    work_dir = Path(work_dir) if work_dir is not None else output.parent / "work" / output.name
    tok = qwen_tokenizer()
    processor = question_processor(tok, image_processor())
    mllm = build_model(tok, settings, seed)
    bundle = _Pretraining(mllm)
    vision_steps = settings.vision_steps(steps)

    def step_loss(step: int) -> torch.Tensor:
        if step < vision_steps:
            return vision_loss(mllm, bundle.probe, processor, step_rng(seed, step), settings.vision_batch)
        return answer_loss(mllm, teacher_forcing_batch(processor, training_examples(step, seed, settings)))

    # Each phase gets its own warmup and decay: the language model starts learning only in the second.
    loop = LoopSettings(steps=steps, learning_rate=settings.learning_rate, seed=seed,
                        warmup_steps=min(settings.warmup_steps, steps // 10),
                        restarts=(vision_steps,) if 0 < vision_steps < steps else ())
    training = train("mllm", bundle, step_loss, loop, work_dir, progress=progress)
    save_mllm(mllm, processor, output)
    summary = {"settings": dataclasses.asdict(settings), "steps": steps, "vision_steps": vision_steps,
               "parameters": parameter_counts(mllm), "training": training,
               "quality": evaluate(mllm, processor, seed=seed, num_groups=eval_groups)}
    write_json(work_dir / "quality.json", summary)
    return summary
