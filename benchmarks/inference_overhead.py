"""What EasyRef adds to an SDXL generation, measured side by side on this machine.

    python benchmarks/inference_overhead.py                 # tiny models (seconds)
    python benchmarks/inference_overhead.py --size small    # mid-sized random models (minutes)
    python benchmarks/inference_overhead.py --size small --threads 0 --json small.json  # torch's threads

Four measurements, each comparing variants in the same run (interleaved, alternating order,
medians over ``--repeats`` rounds; the machines this runs on are shared and noisy, so only RATIOS
are meant to be read, never absolute times). Every comparison is timed on two clocks, wall time
and this process's CPU time, with one torch thread unless ``--threads`` says otherwise: with one
thread the CPU time is the time the work actually ran, whatever else the machine was doing.

1. one denoising step: the UNet with EasyRef's decoupled cross-attention over 64 extra key/value
   tokens vs a separately loaded bare UNet with the same weights (CFG batch 2).
2. MLLM backbone passes per pipeline call (first call, new references, repeated call).
3. vision tower over 1, 4 and 16 references of 336x336: one batched call vs one call per image.
4. whole generation from cached embeds vs the bare ``StableDiffusionXLPipeline``.

Sizes: ``tiny`` is ``easyref.tiny.make_tiny`` (64x64 images). ``small`` is built here from random
weights (no downloads) so that the MLLM-to-UNet FLOP ratio resembles SDXL + Qwen2-VL-2B; the
header prints both pairs' FLOPs. Progress goes to stderr, the result table to stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from easyref.adapter import install_adapter, set_scale
from easyref.encoder import ReferenceEncoder
from easyref.pipeline import EasyRefPipeline
from easyref.prompting import ReferenceProcessor
from easyref.tiny import make_tiny, write_tiny_base, write_tiny_mllm
from easyref.weights import save_adapter

PROMPT = "a red bicycle leaning on a stone wall"
GUIDANCE = 5.0
REF_SIZE = 336  # Qwen2-VL: 336x336 -> 24x24 patches of 14 -> 12x12 = 144 merged tokens
REF_COUNTS = (1, 4, 16)
PIPELINE_REFS = 4  # group size for measurements 2 and 4
SMALL_IMAGE_SIZE = 512

# -- the real pair, for the FLOP ratio the small models imitate ----------------------------------
# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (the fields that shape compute).
SDXL_UNET_CONFIG = {
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280], "cross_attention_dim": 2048, "in_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "layers_per_block": 2,
    "norm_num_groups": 32, "out_channels": 4, "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128, "transformer_layers_per_block": [1, 2, 10], "use_linear_projection": True,
}
# Qwen/Qwen2-VL-2B-Instruct config.json (compute-shaping fields).
QWEN2_VL_2B_TEXT = {"vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                    "num_attention_heads": 12, "num_key_value_heads": 2, "tie_word_embeddings": True,
                    "rope_parameters": {"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6}}
QWEN2_VL_2B_VISION = {"depth": 32, "embed_dim": 1280, "hidden_size": 1536, "num_heads": 16, "mlp_ratio": 4}
# Assumed token counts of one real prefill: each 336x336 reference is 144 image tokens plus
# <|vision_start|>/<|vision_end|>; the chat template, instruction and a short prompt about 50 more.
REAL_TOKENS_PER_REF = 146
REAL_TEXT_TOKENS = 50
PATCHES_PER_REF = (REF_SIZE // 14) ** 2  # 576 vision-tower tokens before the 2x2 merge


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def human(n: float, unit: str = "") -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {prefix}{unit}"
    return f"{n:.0f} {unit}".rstrip()


# -- FLOP counting -----------------------------------------------------------------------------
def _sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """QK^T and AV of one attention call (2 FLOPs per multiply-add, like the rest of the counter)."""
    *batch, q_len, dim = query
    heads = int(np.prod(batch))
    return 2 * heads * q_len * key[-2] * dim + 2 * heads * q_len * key[-2] * value[-1]


# PyTorch's counter has no formula for the CPU flash-attention kernel that SDPA dispatches to here, and its
# GPU formulas refuse grouped-query attention (Qwen2's 2 key/value heads for 12 query heads); this one
# counts by the query's heads, which is what grouped-query attention computes.
_CUSTOM_FLOPS = {op: _sdpa_flops for op in (
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu, torch.ops.aten._scaled_dot_product_flash_attention,
    torch.ops.aten._scaled_dot_product_efficient_attention, torch.ops.aten._scaled_dot_product_cudnn_attention)}


def count_flops(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False, custom_mapping=_CUSTOM_FLOPS) as counter:
        fn()
    return counter.get_total_flops()


# -- machine and models --------------------------------------------------------------------------
def machine_info() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    versions = {"python": platform.python_version()}
    for package in ("torch", "diffusers", "transformers", "easyref"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "usable_cpus": usable,
            "torch_threads": torch.get_num_threads(), "versions": versions, "load_average_start": load_average(),
            "gpu": "a CUDA GPU is present but unused (CPU fp32 run)" if torch.cuda.is_available() else "no GPU"}


def load_average() -> list[float] | None:
    """1/5/15-minute load: other processes on the machine are the main source of noise here."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def write_small_base(folder: Path, seed: int = 0) -> None:
    """SDXL's block structure (3 levels, DownBlock2D first, 2/3 resnets, text-time conditioning,
    head_dim 64) at 1/5 of its widths and 2/4 instead of 2/10 transformer layers; a VAE with SDXL's
    4 levels (8x down-sampling) at 1/8 of its widths. Tokenizers and scheduler come from the tiny
    writer, so token ids are the tested ones."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    write_tiny_base(folder, seed)
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    tokenizer_2 = CLIPTokenizer.from_pretrained(folder / "tokenizer_2")
    text_size = {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 2,
                 "projection_dim": 128}
    text_config = CLIPTextConfig(**{**CLIPTextConfig.from_pretrained(folder / "text_encoder").to_dict(), **text_size})
    text_config_2 = CLIPTextConfig(**{**CLIPTextConfig.from_pretrained(folder / "text_encoder_2").to_dict(),
                                      **text_size})
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(64, 128, 256),
        layers_per_block=2,
        sample_size=SMALL_IMAGE_SIZE // 8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(1, 2, 4),  # diffusers' name for the head count: head_dim 64 as in SDXL
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=32,
        transformer_layers_per_block=(1, 2, 4),
        projection_class_embeddings_input_dim=6 * 32 + 128,
        cross_attention_dim=128 + 128,
        norm_num_groups=32,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=(16, 32, 64, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=2,
        norm_num_groups=16,
        sample_size=SMALL_IMAGE_SIZE,
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(text_config)
    torch.manual_seed(seed)
    text_encoder_2 = CLIPTextModelWithProjection(text_config_2)
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=EulerDiscreteScheduler.from_pretrained(folder / "scheduler"),
        image_encoder=None, feature_extractor=None,
    )
    pipe.save_pretrained(folder, safe_serialization=True)


def write_small_mllm(folder: Path, seed: int = 0) -> None:
    """Qwen2-VL sized so that one prefill of 1/4/16 references costs about as many small-UNet steps
    as Qwen2-VL-2B costs SDXL steps (0.11/0.36/1.60 here vs 0.10/0.36/1.47, see the header):
    LM hidden 256 (head_dim 64, 2 KV heads), 6 layers, MLP 1280; vision embed 256 (head_dim 64),
    depth 3, MLP ratio 4, 2x2 merge. Tokenizer and token ids come from the tiny writer (a byte-level
    BPE, so the text costs about 200 tokens where Qwen2's real vocabulary needs about 50)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    write_tiny_mllm(folder, seed)
    tiny = Qwen2VLConfig.from_pretrained(folder)
    text = {key: value for key, value in tiny.text_config.to_dict().items() if key != "layer_types"}  # per layer
    text = {**text, "hidden_size": 256, "intermediate_size": 1280, "num_hidden_layers": 6,
            "num_attention_heads": 4, "num_key_value_heads": 2,
            "rope_parameters": {"rope_type": "default", "mrope_section": [8, 12, 12], "rope_theta": 1e6}}
    vision = {**tiny.vision_config.to_dict(), "depth": 3, "embed_dim": 256, "num_heads": 4, "hidden_size": 256,
              "mlp_ratio": 4}
    config = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=tiny.image_token_id,
                           video_token_id=tiny.video_token_id, vision_start_token_id=tiny.vision_start_token_id,
                           vision_end_token_id=tiny.vision_end_token_id)
    torch.manual_seed(seed)
    Qwen2VLForConditionalGeneration(config).save_pretrained(folder)


def make_small(folder: Path, seed: int = 0) -> Path:
    """Like ``make_tiny``: base/, mllm/ and a random adapter/ written through the real code paths."""
    write_small_base(folder / "base", seed)
    write_small_mllm(folder / "mllm", seed)
    torch.manual_seed(seed)
    pipe = EasyRefPipeline.create(folder / "base", folder / "mllm", cond_image_size=REF_SIZE)
    save_adapter(folder / "adapter", pipe.config, pipe.encoder, pipe.base.unet)
    return folder


def reference_images(count: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (REF_SIZE, REF_SIZE, 3), dtype=np.uint8)) for _ in range(count)]


# -- timing --------------------------------------------------------------------------------------
Timings = dict[str, dict[str, list[float]]]  # clock ("wall" or "cpu") -> variant -> seconds per call


def interleaved(variants: dict[str, Callable[[], object]], repeats: int, inner: int = 1) -> Timings:
    """Seconds per call of each variant: one warm-up each, then ``repeats`` rounds that run every
    variant ``inner`` times, alternating the order between rounds so drift hits both alike.

    Both clocks are kept: wall time, and this process's CPU time. With one torch thread the CPU
    time is the time the computation actually ran, so it does not grow when other processes
    take the CPU away (they still share caches and memory bandwidth)."""
    for fn in variants.values():
        fn()
    times: Timings = {"wall": {name: [] for name in variants}, "cpu": {name: [] for name in variants}}
    names = list(variants)
    for round_ in range(repeats):
        for name in names if round_ % 2 == 0 else names[::-1]:
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(inner):
                variants[name]()
            times["cpu"][name].append((time.process_time() - cpu) / inner)
            times["wall"][name].append((time.perf_counter() - wall) / inner)
    return times


def _ratios(times: dict[str, list[float]], numerator: str, denominator: str) -> dict:
    paired = [a / b for a, b in zip(times[numerator], times[denominator], strict=True)]
    med_a, med_b = statistics.median(times[numerator]), statistics.median(times[denominator])
    return {f"{numerator}_s": med_a, f"{denominator}_s": med_b, "ratio": med_a / med_b,
            "best_ratio": min(times[numerator]) / min(times[denominator]),
            "paired_ratio_min": min(paired), "paired_ratio_max": max(paired),
            "samples": {name: times[name] for name in (numerator, denominator)}}


def compare(times: Timings, numerator: str, denominator: str) -> dict:
    """Wall-clock medians and their ratio (the result), the ratio of the fastest rounds (other
    processes only ever add time), the spread of the per-round (paired) ratios, and the same
    numbers for CPU time under ``"cpu"``."""
    return {**_ratios(times["wall"], numerator, denominator),
            "cpu": _ratios(times["cpu"], numerator, denominator)}


# -- the real pair -------------------------------------------------------------------------------
def unet_step_inputs(unet, latent: int, num_tokens: int | None, device="cpu") -> dict:
    """CFG batch 2 inputs for one UNet call (random; compute does not depend on the values)."""
    config = unet.config
    generator = torch.Generator("cpu").manual_seed(0)
    text_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    side = float(latent * 8)
    cond = {"text_embeds": torch.randn(2, text_dim, generator=generator).to(device),
            "time_ids": torch.tensor([[side, side, 0.0, 0.0, side, side]] * 2, device=device)}
    if num_tokens is not None:
        cond["image_embeds"] = [torch.randn(2, 1, num_tokens, config.cross_attention_dim,
                                            generator=generator).to(device)]
    return {"sample": torch.randn(2, config.in_channels, latent, latent, generator=generator).to(device),
            "timestep": torch.tensor(500, device=device),
            "encoder_hidden_states": torch.randn(2, 77, config.cross_attention_dim, generator=generator).to(device),
            "added_cond_kwargs": cond}


def real_pair(num_tokens: int) -> dict:
    """SDXL UNet FLOPs counted on the meta device (no weights), Qwen2-VL-2B prefill FLOPs from its
    parameter counts: 2 FLOPs per parameter and token, plus attention (4·layers·T²·width)."""
    from diffusers import UNet2DConditionModel
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
    unet_params = params(unet)
    with torch.inference_mode():
        bare = count_flops(lambda: unet(**unet_step_inputs(unet, 128, None, "meta")))
        install_adapter(unet, num_tokens)
        adapted = count_flops(lambda: unet(**unet_step_inputs(unet, 128, num_tokens, "meta")))
    with torch.device("meta"):
        mllm = Qwen2VLForConditionalGeneration(Qwen2VLConfig(text_config=QWEN2_VL_2B_TEXT,
                                                             vision_config=QWEN2_VL_2B_VISION,
                                                             tie_word_embeddings=True))
    lm, visual = mllm.model.language_model, mllm.model.visual
    lm_layers, merger = params(lm.layers), params(visual.merger)
    text, vision = mllm.config.text_config, mllm.config.vision_config
    attn_width = text.num_attention_heads * (text.hidden_size // text.num_attention_heads)

    def prefill(refs: int) -> float:
        tokens = REAL_TOKENS_PER_REF * refs + REAL_TEXT_TOKENS
        patches = PATCHES_PER_REF * refs
        lm_flops = 2 * lm_layers * tokens + 4 * text.num_hidden_layers * tokens**2 * attn_width
        vision_flops = (2 * (params(visual) - merger) * patches + 2 * merger * patches / 4
                        + 4 * vision.depth * refs * PATCHES_PER_REF**2 * vision.embed_dim)
        return lm_flops + vision_flops

    return {"name": "SDXL + Qwen2-VL-2B (real)", "image": 1024, "unet_params": unet_params,
            "unet_step_flops": bare, "unet_step_flops_adapter": adapted,
            "mllm_lm_params": params(lm), "mllm_lm_layer_params": lm_layers, "mllm_vision_params": params(visual),
            "mllm_flops": {refs: prefill(refs) for refs in REF_COUNTS}}


# -- the four measurements ---------------------------------------------------------------------
def measure_unet_step(pipe: EasyRefPipeline, bare_unet, latent: int, repeats: int, inner: int) -> dict:
    unet = pipe.base.unet
    set_scale(unet, 1.0)
    tokens = pipe.config.num_reference_tokens
    with_refs = unet_step_inputs(unet, latent, tokens)
    plain = unet_step_inputs(bare_unet, latent, None)
    variants = {"easyref": lambda: unet(**with_refs), "bare": lambda: bare_unet(**plain)}
    flops_easyref, flops_bare = count_flops(variants["easyref"]), count_flops(variants["bare"])
    result = compare(interleaved(variants, repeats, inner), "easyref", "bare")
    return {**result, "latent": latent, "tokens": tokens, "flops_easyref": flops_easyref, "flops_bare": flops_bare,
            "flop_ratio": flops_easyref / flops_bare}


def measure_backbone_calls(pipe: EasyRefPipeline, generate_kwargs: dict) -> dict:
    encoder = pipe.encoder
    backbone, encode = encoder.backbone, encoder.encode
    calls, encode_seconds = [0], [0.0]

    def counting_backbone(*args, **kwargs):
        calls[0] += 1
        return backbone(*args, **kwargs)

    def timed_encode(*args, **kwargs):
        start = time.perf_counter()
        try:
            return encode(*args, **kwargs)
        finally:
            encode_seconds[0] += time.perf_counter() - start

    first, second = reference_images(PIPELINE_REFS, 1), reference_images(PIPELINE_REFS, 2)
    pipe.clear_cache()
    encoder.backbone, encoder.encode = counting_backbone, timed_encode
    rows = []
    try:
        for label, refs in (("first call", first), ("second call, new references", second),
                            ("repeated call", second)):
            calls[0], encode_seconds[0] = 0, 0.0
            start = time.perf_counter()
            pipe(refs, PROMPT, **generate_kwargs)
            rows.append({"call": label, "backbone_calls": calls[0], "release_backbone_calls": 2,
                         "seconds": time.perf_counter() - start, "encode_seconds": encode_seconds[0]})
    finally:
        del encoder.backbone, encoder.encode
    return {"refs": PIPELINE_REFS, "rows": rows, "expected": [2, 1, 0], "steps": generate_kwargs["num_inference_steps"]}


def measure_vision(pipe: EasyRefPipeline, repeats: int) -> dict:
    if pipe.config.cond_image_size == REF_SIZE:
        encoder = pipe.encoder
    else:  # tiny: its adapter keeps references at 56x56; re-read them at 336x336 with the same weights
        config = dataclasses.replace(pipe.config, cond_image_size=REF_SIZE)
        processor = ReferenceProcessor(pipe.encoder.processor.tokenizer, pipe.encoder.processor.image_processor,
                                       config)
        encoder = ReferenceEncoder(pipe.encoder.mllm_for_saving(), processor, config)
    visual = encoder.mllm.visual
    images = reference_images(max(REF_COUNTS), 3)
    rows = []
    for count in REF_COUNTS:
        inputs = encoder.processor.images(images[:count])
        merged_tokens = (inputs["image_grid_thw"].prod(-1) // encoder.processor.merge_size**2).tolist()
        outputs = {}

        def run(mode: str, inputs=inputs, outputs=outputs) -> None:
            encoder.vision_batching = mode
            outputs[mode] = encoder.encode_images(**inputs)

        log(f"  vision tower, {count} reference(s)")
        times = interleaved({"loop": lambda: run("loop"), "batched": lambda: run("batched")}, repeats)
        result = compare(times, "loop", "batched")
        rows.append({"refs": count, "tokens_per_image": merged_tokens[0], **result,
                     "speedup": result["ratio"],
                     "max_abs_diff": float((outputs["loop"] - outputs["batched"]).abs().max())})
    calls = [0]
    hook = visual.register_forward_hook(lambda *args: calls.__setitem__(0, calls[0] + 1))
    try:
        encoder.vision_batching = "auto"
        encoder.encode_images(**encoder.processor.images(images[:4]))
    finally:
        hook.remove()
        encoder.vision_batching = "auto"
    return {"rows": rows, "auto_picks": "loop" if calls[0] == 4 else "batched" if calls[0] == 1 else "?",
            "device": str(encoder.device)}


def measure_generation(pipe: EasyRefPipeline, bare, generate_kwargs: dict, repeats: int) -> dict:
    embeds = pipe.encode_references(reference_images(PIPELINE_REFS, 1), PROMPT)
    negative = pipe.unconditional_embeds()
    steps, height = generate_kwargs["num_inference_steps"], generate_kwargs["height"]
    bare.set_progress_bar_config(disable=True)

    def easyref():
        return pipe(prompt=PROMPT, embeds=embeds, negative_embeds=negative, seed=0, **generate_kwargs)

    def plain():
        return bare(prompt=PROMPT, generator=torch.Generator("cpu").manual_seed(0), **{
            k: v for k, v in generate_kwargs.items() if k != "progress"})

    result = compare(interleaved({"easyref": easyref, "bare": plain}, repeats), "easyref", "bare")
    return {**result, "steps": steps, "image": height}


# -- report --------------------------------------------------------------------------------------
def verdict(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


def goal_verdict(result: dict, goal: float) -> str:
    """MET when the median ratio is at most ``goal``; a miss is flagged when the per-round ratios
    straddle the goal, i.e. when this run cannot tell the two apart."""
    if result["ratio"] <= goal:
        return "MET"
    if result["paired_ratio_min"] <= goal:
        return "NOT MET (within noise: the paired range contains the goal)"
    return "NOT MET"


def _span(result: dict) -> str:
    return f"{result['paired_ratio_min']:.3f}..{result['paired_ratio_max']:.3f}"


def ratio_line(clock: str, result: dict, numerator: str, denominator: str, scale: float, unit: str) -> str:
    return (f"   {clock:<5}{denominator} {result[f'{denominator}_s'] * scale:.3f} {unit}, {numerator} "
            f"{result[f'{numerator}_s'] * scale:.3f} {unit} -> ratio {result['ratio']:.3f} "
            f"(best-of {result['best_ratio']:.3f}, paired {_span(result)})")


def report(r: dict) -> str:
    m, sizes = r["machine"], r["models"]
    v = m["versions"]
    lines = [
        f"EasyRef inference overhead: size={r['size']}, repeats={r['repeats']} (medians; ratios only)",
        f"machine: {m['cpu']}, {m['logical_cpus']} logical CPUs ({m['usable_cpus']} usable), "
        f"torch threads {m['torch_threads']}, {m['gpu']}; load average (1/5/15 min) {m['load_average_start']} at "
        f"start, {m['load_average_end']} at end",
        f"versions: python {v['python']}, torch {v['torch']}, diffusers {v['diffusers']}, "
        f"transformers {v['transformers']}, easyref {v['easyref']}",
        f"models ({r['size']}): UNet {human(sizes['unet'])}, VAE {human(sizes['vae'])}, text encoders "
        f"{human(sizes['text_encoders'])}, MLLM LM {human(sizes['mllm_lm'])} + vision {human(sizes['mllm_vision'])}, "
        f"EasyRef head {human(sizes['easyref_head'])}, to_k_ip/to_v_ip {human(sizes['adapter_kv'])}",
        "",
        "FLOPs (2 per multiply-add; UNet step = CFG batch 2; MLLM = one prefill with 1/4/16 refs of 336x336)",
        f"  {'pair':<28}{'UNet params':>12}{'UNet step':>12}{'MLLM 1 / 4 / 16 refs':>30}{'MLLM/UNet 1/4/16':>22}",
    ]
    for pair in r["flops"]:
        mllm = pair["mllm_flops"]
        step = pair["unet_step_flops"]
        lines.append(
            f"  {pair['name'] + ', ' + str(pair['image']) + '²':<28}{human(pair['unet_params']):>12}"
            f"{human(step):>12}{' / '.join(human(mllm[n]) for n in REF_COUNTS):>30}"
            f"{' / '.join(f'{mllm[n] / step:.2f}' for n in REF_COUNTS):>22}")
    s1 = r["unet_step"]
    real = r["flops"][0]
    lines += [
        "",
        "ratio = median/median over the rounds (the result); best-of = fastest/fastest (other processes only add",
        "time); paired = range of the per-round ratios (the noise). wall = elapsed time; cpu = this process's CPU",
        "time (with 1 torch thread: the time it actually computed, whoever else was using the machine)",
        "",
        f"1. UNet step, CFG batch 2, latent 4x{s1['latent']}x{s1['latent']}, {s1['tokens']} reference tokens",
        ratio_line("wall", s1, "easyref", "bare", 1e3, "ms"),
        ratio_line("cpu", s1["cpu"], "easyref", "bare", 1e3, "ms"),
        f"   FLOP ratio {s1['flop_ratio']:.3f} (real SDXL at 1024²: "
        f"{real['unet_step_flops_adapter'] / real['unet_step_flops']:.3f})",
        f"   goal <= 1.10: wall {goal_verdict(s1, 1.10)}; cpu {goal_verdict(s1['cpu'], 1.10)}",
    ]
    s2 = r["backbone_calls"]
    lines += ["", f"2. MLLM backbone passes per pipeline call ({s2['refs']} refs)",
              f"   {'call':<30}{'easyref':>8}{'release':>9}{'MLLM s':>9}{'call s':>9}{'MLLM share':>12}"]
    lines += [f"   {row['call']:<30}{row['backbone_calls']:>8}{row['release_backbone_calls']:>9}"
              f"{row['encode_seconds']:>9.2f}{row['seconds']:>9.2f}{row['encode_seconds'] / row['seconds']:>12.1%}"
              for row in s2["rows"]]
    got = [row["backbone_calls"] for row in s2["rows"]]
    lines.append(f"   expected {s2['expected']}, got {got}: {verdict(got == s2['expected'])}; MLLM s = time in "
                 f"encoder.encode, call s = whole call ({s2['steps']} steps; one run each)")
    s3 = r["vision"]
    lines += ["", f"3. vision tower, refs of {REF_SIZE}x{REF_SIZE} ({s3['rows'][0]['tokens_per_image']} merged tokens "
              f"each): one call per image (loop) vs one call for all (batched)",
              f"   {'refs':>4}{'loop ms':>9}{'batched ms':>12}{'speed-up':>10}{'best-of':>9}{'paired':>14}"
              f"{'cpu speed-up':>14}{'cpu paired':>14}{'max |diff|':>12}"]
    lines += [f"   {row['refs']:>4}{row['loop_s'] * 1e3:>9.1f}{row['batched_s'] * 1e3:>12.1f}{row['speedup']:>10.3f}"
              f"{row['best_ratio']:>9.3f}{_span(row):>14}{row['cpu']['ratio']:>14.3f}{_span(row['cpu']):>14}"
              f"{row['max_abs_diff']:>12.2e}"
              for row in s3["rows"]]
    lines.append(f"   speed-up = loop/batched (> 1: batched faster); vision_batching='auto' picks "
                 f"'{s3['auto_picks']}' on {s3['device']}")
    s4 = r["generation"]
    lines += [
        "",
        f"4. generation from cached embeds vs bare StableDiffusionXLPipeline, {s4['steps']} steps, "
        f"{s4['image']}x{s4['image']}, CFG {GUIDANCE}",
        ratio_line("wall", s4, "easyref", "bare", 1, "s"),
        ratio_line("cpu", s4["cpu"], "easyref", "bare", 1, "s"),
        f"   goal <= step ratio: wall {s1['ratio']:.3f} {goal_verdict(s4, s1['ratio'])}; "
        f"cpu {s1['cpu']['ratio']:.3f} {goal_verdict(s4['cpu'], s1['cpu']['ratio'])}",
        "",
        f"total wall time {r['wall_s']:.0f} s",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("tiny", "small"), default="tiny")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed rounds per comparison (default 15 for tiny, 7 for small)")
    parser.add_argument("--steps", type=int, default=8, help="denoising steps in measurements 2 and 4 (default 8)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1; 0 = torch's default). With 2+ OpenMP threads, other "
                             "processes on the CPU stall every parallel op and times swing 2-10x; one thread "
                             "keeps the ratios stable")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where to write the model folders (default: a temporary folder)")
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 15 if args.size == "tiny" else 7
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.threads < 0:
        parser.error("--threads must be 0 (torch's default) or more")
    if args.threads:
        torch.set_num_threads(args.threads)

    from diffusers import StableDiffusionXLPipeline

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        folder = (args.workdir or Path(tmp)) / f"easyref-{args.size}"
        log(f"writing {args.size} model folder to {folder}")
        (make_tiny if args.size == "tiny" else make_small)(folder)
        log("loading EasyRef and a separate bare SDXL pipeline")
        pipe = EasyRefPipeline.from_pretrained(folder, device="cpu", torch_dtype="float32")
        bare = StableDiffusionXLPipeline.from_pretrained(folder / "base", dtype=torch.float32)
        unet, encoder = pipe.base.unet, pipe.encoder
        image = unet.config.sample_size * pipe.base.vae_scale_factor
        latent = image // pipe.base.vae_scale_factor
        generate_kwargs = {"num_inference_steps": args.steps, "guidance_scale": GUIDANCE, "height": image,
                           "width": image, "progress": False}
        results = {
            "size": args.size, "repeats": args.repeats, "machine": machine_info(),
            "models": {
                "unet": params(bare.unet), "vae": params(bare.vae),
                "text_encoders": params(bare.text_encoder) + params(bare.text_encoder_2),
                "mllm_lm": params(encoder.language_model), "mllm_vision": params(encoder.mllm.visual),
                "easyref_head": sum(params(m) for m in encoder.head_modules().values()),
                "adapter_kv": params(unet) - params(bare.unet),
            },
        }
        with torch.inference_mode():
            log("FLOPs: the real pair (meta device, no weights)")
            real = real_pair(pipe.config.num_reference_tokens)
            log(f"FLOPs: the {args.size} pair")
            ours = {"name": f"{args.size} (this run)", "image": image, "unet_params": params(bare.unet),
                    "unet_step_flops": count_flops(lambda: bare.unet(**unet_step_inputs(bare.unet, latent, None))),
                    "mllm_flops": {}}
            prefill_images = reference_images(max(REF_COUNTS), 4)
            for count in REF_COUNTS:
                ours["mllm_flops"][count] = count_flops(
                    lambda count=count: encoder.encode([prefill_images[:count]], [PROMPT]))
            results["flops"] = [real, ours]
            inner = 5 if args.size == "tiny" else 2
            log(f"1. UNet step, {args.repeats} rounds x {inner}")
            results["unet_step"] = measure_unet_step(pipe, bare.unet, latent, args.repeats, inner)
            log("3. vision tower, loop vs batched")
            results["vision"] = measure_vision(pipe, args.repeats)
            log(f"4. generation, {args.repeats} rounds")
            results["generation"] = measure_generation(pipe, bare, generate_kwargs, args.repeats)
            log("2. MLLM backbone passes per pipeline call")
            results["backbone_calls"] = measure_backbone_calls(pipe, generate_kwargs)
    results["wall_s"] = time.perf_counter() - started
    results["machine"]["load_average_end"] = load_average()
    print(report(results))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2, default=str))
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
