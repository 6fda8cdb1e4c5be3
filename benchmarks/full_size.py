"""EasyRef at the real size: SDXL base + Qwen2-VL-2B (and IP-Adapter-SDXL to compare), random weights.

    python benchmarks/full_size.py --device cuda --json gpu.json --markdown gpu.md   # 1024², 30 steps
    python benchmarks/full_size.py --device cpu --json cpu.json                      # bfloat16, 512², 2 steps
    python benchmarks/full_size.py --tiny --json tiny.json                           # same code, tiny models

On a CPU without bfloat16 matrix units (no AVX512-BF16 or AMX) bfloat16 is emulated and a full-size run takes
hours (on the 2-core EPYC, one memory process at 256² did not finish one step in 17 minutes); float32 needs
about 29 GB of RAM. docs/BENCHMARKS.md has the measured GPU run.

The architectures come from their published configs (``benchmarks/configs/*.json``), the weights are
random (nothing is downloaded): written once to ``--workdir`` with ``save_pretrained`` and loaded back
the way users load real ones (``EasyRefPipeline.from_pretrained``, diffusers' ``load_ip_adapter``).
Random weights cost exactly the compute and memory of real ones; the images are noise.

Measured side by side in one run, ratios first (the machines are shared and noisy):

1. one UNet step (CFG batch 2) with EasyRef's reference tokens vs the bare UNet       goal <= 1.02
2. one MLLM encode of 1, 4, 16, 64 (GPU: 112) references, in UNet steps, next to its
   FLOP count in UNet steps; on GPU also the batched vision tower vs one call per image goal: time <= 1.3x FLOPs
3. one generation (4 references, CFG): EasyRef's call with new references, its repeated
   call (cached tokens), diffusers' IP-Adapter-SDXL (the 4 references averaged), bare SDXL
                                                     goals: repeated <= 1.03x bare, new <= 1.10x IP-Adapter
4. peak memory of one generation per option, each in a fresh process (GPU: max allocated;
   CPU: peak RSS), as ratios to bare SDXL                                               goal: model offload <= 1.05x

Each measurement that fails is recorded with its error and the others still run. Progress goes to
stderr, the markdown table to stdout (and ``--markdown``), every number to ``--json``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from easyref.pipeline import EasyRefPipeline  # noqa: E402
from inference_overhead import (  # noqa: E402 - the sibling benchmark's timing and FLOP helpers
    PROMPT,
    REF_SIZE,
    compare,
    count_flops,
    interleaved,
    log,
    machine_info,
    reference_images,
    unet_step_inputs,
)

CONFIGS = Path(__file__).parent / "configs"
PIPELINE_REFS = 4
GOALS = {"unet_step": 1.02, "encode_vs_flops": 1.3, "repeated_vs_bare": 1.03, "new_vs_ip_adapter": 1.10,
         "offload_model_memory": 1.05}
MEMORY_OPTIONS = ("bare", "easyref", "offload-model", "offload-sequential", "mllm-int8")


@dataclasses.dataclass(frozen=True)
class Settings:
    """What one run measures; :func:`settings_for` gives the defaults per device and size."""

    device: str
    dtype: str
    mllm_dtype: str
    image: int
    steps: int
    repeats: int
    ref_counts: tuple[int, ...]
    vision_refs: int
    memory_steps: int
    tiny: bool


def settings_for(device: str, tiny: bool) -> Settings:
    if tiny:
        return Settings(device, "float32", "float32", 64, 2, 2, (1, 2, 4), 4, 1, True)
    if device.startswith("cuda"):
        return Settings(device, "float16", "bfloat16", 1024, 30, 3, (1, 4, 16, 64, 112), 16, 2, False)
    return Settings(device, "bfloat16", "bfloat16", 512, 2, 2, (1, 4), 4, 1, False)


def _config(name: str) -> dict:
    return json.loads((CONFIGS / f"{name}.json").read_text())


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


@contextlib.contextmanager
def _building(device: str, dtype: torch.dtype) -> Iterator[None]:
    """New modules are created on ``device`` in ``dtype``: no float32 copy on the CPU first (SDXL's UNet
    alone is 10 GB in float32), and random init runs where the weights will live."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(default)


# -- the models, written once --------------------------------------------------------------------
def write_full_base(folder: Path, device: str, dtype: torch.dtype) -> None:
    """SDXL base from its configs; tokenizers from the tiny writer (the token ids only index embeddings)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from easyref.tiny import write_tiny_base

    write_tiny_base(folder)
    tokenizers = {name: CLIPTokenizer.from_pretrained(folder / name) for name in ("tokenizer", "tokenizer_2")}
    text = {name: CLIPTextConfig(**{**CLIPTextConfig.from_pretrained(folder / tiny).to_dict(), **_config(name)})
            for name, tiny in (("sdxl_text_encoder", "text_encoder"), ("sdxl_text_encoder_2", "text_encoder_2"))}
    torch.manual_seed(0)
    with _building(device, dtype):
        parts = {"unet": UNet2DConditionModel.from_config(_config("sdxl_unet")),
                 "vae": AutoencoderKL.from_config(_config("sdxl_vae")),
                 "text_encoder": CLIPTextModel(text["sdxl_text_encoder"]),
                 "text_encoder_2": CLIPTextModelWithProjection(text["sdxl_text_encoder_2"])}
    StableDiffusionXLPipeline(**parts, **tokenizers, scheduler=EulerDiscreteScheduler.from_config(
        _config("sdxl_scheduler")), image_encoder=None, feature_extractor=None).save_pretrained(folder)


def write_full_mllm(folder: Path, device: str, dtype: torch.dtype) -> None:
    """Qwen2-VL-2B from its config; tokenizer from the tiny writer with its special-token ids, and the
    real model's image processor limits."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil

    from easyref.tiny import write_tiny_mllm

    write_tiny_mllm(folder)
    tiny = Qwen2VLConfig.from_pretrained(folder)
    real = _config("qwen2_vl_2b")
    ids = {key: getattr(tiny, key) for key in ("image_token_id", "video_token_id", "vision_start_token_id",
                                               "vision_end_token_id")}
    config = Qwen2VLConfig(**{**real, **ids})
    torch.manual_seed(0)
    with _building(device, dtype):
        model = Qwen2VLForConditionalGeneration(config)
    model.save_pretrained(folder)
    processor = Qwen2VLImageProcessorPil.from_pretrained(folder)
    processor.size = {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280}
    processor.save_pretrained(folder)


def write_full_ip_adapter(folder: Path, unet, device: str, dtype: torch.dtype) -> None:
    """IP-Adapter-SDXL: its ViT-bigG image encoder and an adapter in the original layout for ``unet``."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from easyref import ip_adapter_format

    config = CLIPVisionConfig(**_config("ip_adapter_sdxl_image_encoder"))
    torch.manual_seed(0)
    with _building(device, dtype):
        encoder = CLIPVisionModelWithProjection(config)
    encoder.save_pretrained(folder / ip_adapter_format.IMAGE_ENCODER_FOLDER)
    state = ip_adapter_format.initial_state(unet, config.projection_dim)
    save_file({key: value.to(dtype) for key, value in state.items()}, str(folder / ip_adapter_format.WEIGHT_NAME))


def write_models(workdir: Path, settings: Settings) -> Path:
    """``workdir/{base,mllm,adapter,ip-adapter}``, written once (``done.json`` marks a finished set)."""
    from easyref.tiny import make_tiny, write_tiny_ip_adapter
    from easyref.weights import save_adapter

    kind = "tiny" if settings.tiny else f"full-{settings.dtype}"
    done = workdir / "done.json"
    if done.is_file() and json.loads(done.read_text()).get("kind") == kind:
        return workdir
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if settings.tiny:
        make_tiny(workdir)
        write_tiny_ip_adapter(workdir / "ip-adapter", workdir / "base")
    else:
        dtype = _dtype(settings.dtype)
        log("writing SDXL (random weights)")
        write_full_base(workdir / "base", settings.device, dtype)
        log("writing Qwen2-VL-2B (random weights)")
        write_full_mllm(workdir / "mllm", settings.device, _dtype(settings.mllm_dtype))
        log("writing the EasyRef adapter")
        torch.manual_seed(0)
        pipe = EasyRefPipeline.create(workdir / "base", workdir / "mllm", torch_dtype=dtype, cond_image_size=REF_SIZE)
        save_adapter(workdir / "adapter", pipe.config, pipe.encoder, pipe.base.unet)
        log("writing IP-Adapter-SDXL (random weights)")
        write_full_ip_adapter(workdir / "ip-adapter", pipe.base.unet, settings.device, dtype)
        del pipe
    done.write_text(json.dumps({"kind": kind, "seconds": time.perf_counter() - start}))
    return workdir


# -- timing on either device -----------------------------------------------------------------------
def _synchronizer(device: str) -> Callable[[], None]:
    return torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)


def timed(variants: dict[str, Callable[[], object]], repeats: int, device: str) -> dict:
    """:func:`inference_overhead.interleaved` with the device drained after every call (GPU work is
    asynchronous: without it a call would be timed at its launch, not its end)."""
    sync = _synchronizer(device)
    return interleaved({name: (lambda fn=fn: (fn(), sync())) for name, fn in variants.items()}, repeats)


def _cast(value, dtype: torch.dtype):
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, dict):
        return {key: _cast(item, dtype) for key, item in value.items()}
    if isinstance(value, list):
        return [_cast(item, dtype) for item in value]
    return value


def _step_inputs(unet, settings: Settings, tokens: int | None) -> dict:
    """One CFG step's inputs at the run's image size, on its device, in the UNet's dtype."""
    return _cast(unet_step_inputs(unet, settings.image // 8, tokens, settings.device), unet.dtype)


# -- the measurements ------------------------------------------------------------------------------
def measure_unet_step(pipe: EasyRefPipeline, bare_unet, settings: Settings) -> dict:
    unet, latent = pipe.base.unet, settings.image // 8
    with_refs = _step_inputs(unet, settings, pipe.config.num_reference_tokens)
    plain = _step_inputs(bare_unet, settings, None)
    variants = {"easyref": lambda: unet(**with_refs), "bare": lambda: bare_unet(**plain)}
    with torch.inference_mode():
        flops = {name: count_flops(fn) for name, fn in variants.items()}
        result = compare(timed(variants, max(5, 4 * settings.repeats), settings.device), "easyref", "bare")
        profiles = {name: profile(fn, settings.device) for name, fn in variants.items()}
    return {**result, "tokens": pipe.config.num_reference_tokens, "latent": latent,
            "flop_ratio": flops["easyref"] / flops["bare"], "unet_step_flops": flops["bare"],
            "profile": profiles, "goal": GOALS["unet_step"]}


def profile(fn: Callable[[], object], device: str, top: int = 12) -> dict:
    """Where one call's time goes (torch.profiler): device time per operator, the busiest first, and the
    whole call's wall time next to the device's busy time (the gap is time the GPU waited for Python)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    gpu = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    sync = _synchronizer(device)
    sync()
    with torch_profile(activities=activities) as prof:
        start = time.perf_counter()
        fn()
        sync()
        wall = time.perf_counter() - start
    events = prof.key_averages()
    key = "self_device_time_total" if gpu else "self_cpu_time_total"
    busiest = sorted(events, key=lambda event: getattr(event, key), reverse=True)[:top]
    return {"wall_s": wall, "device_busy_s": sum(getattr(event, key) for event in events) / 1e6,
            "kernel_launches": sum(event.count for event in events if event.key.startswith("cuda") and
                                   "Launch" in event.key),
            "top": [{"op": event.key, "self_s": getattr(event, key) / 1e6, "calls": event.count}
                    for event in busiest]}


def measure_encode(pipe: EasyRefPipeline, settings: Settings) -> dict:
    """The MLLM's encode of a group per group size, in UNet steps (the adapter's step), next to the same
    ratio in FLOPs. The processor's CPU work (resizing, patching) is timed apart: it is no model FLOP."""
    unet, encoder = pipe.base.unet, pipe.encoder
    step_inputs = _step_inputs(unet, settings, pipe.config.num_reference_tokens)
    rows = []
    with torch.inference_mode():
        step_flops = count_flops(lambda: unet(**step_inputs))
        for count in settings.ref_counts:
            log(f"  encode, {count} reference(s)")
            images = reference_images(count, count)
            start = time.perf_counter()
            inputs = encoder.processor.rows([images], [PROMPT])
            processor_s = time.perf_counter() - start
            variants = {"encode": lambda inputs=inputs: encoder.encode_rows(inputs),
                        "unet_step": lambda: unet(**step_inputs)}
            flops = count_flops(variants["encode"])
            result = compare(timed(variants, settings.repeats, settings.device), "encode", "unet_step")
            estimate = flops / step_flops
            rows.append({"refs": count, "sequence_tokens": int(inputs["input_ids"].shape[1]),
                         "encode_s": result["encode_s"], "unet_step_s": result["unet_step_s"],
                         "processor_s": processor_s, "unet_steps": result["ratio"], "flops": flops,
                         "flop_unet_steps": estimate, "time_over_flops": result["ratio"] / estimate})
    return {"rows": rows, "unet_step_flops": step_flops, "goal": GOALS["encode_vs_flops"]}


def measure_vision(pipe: EasyRefPipeline, settings: Settings) -> dict:
    """The vision tower over ``vision_refs`` references: one batched call vs one call per image."""
    encoder = pipe.encoder
    inputs = encoder.processor.images(reference_images(settings.vision_refs, 7))
    outputs = {}

    def run(mode: str) -> None:
        encoder.vision_batching = mode
        outputs[mode] = encoder.encode_images(**inputs)

    try:
        with torch.inference_mode():
            result = compare(timed({"loop": lambda: run("loop"), "batched": lambda: run("batched")},
                                   settings.repeats, settings.device), "loop", "batched")
    finally:
        encoder.vision_batching = "auto"
    scale = float(outputs["loop"].float().abs().max())
    return {**result, "refs": settings.vision_refs, "speedup": result["ratio"],
            "max_abs_diff": float((outputs["loop"].float() - outputs["batched"].float()).abs().max()),
            "max_abs_value": scale}


def _is_finite_image(image) -> bool:
    import numpy as np

    pixels = np.asarray(image)
    return bool(pixels.std() > 0)  # a NaN decode comes out as one flat (black) image


def measure_generation(pipe: EasyRefPipeline, bare, ip_method, settings: Settings) -> dict:
    """Seconds per image for EasyRef (new references; repeated), IP-Adapter-SDXL, bare SDXL."""
    kwargs = {"num_inference_steps": settings.steps, "guidance_scale": 5.0, "height": settings.image,
              "width": settings.image}
    fresh = iter(range(10_000))
    pipe.unconditional_embeds()  # computed once per model: not part of a new group's cost
    repeated_refs = reference_images(PIPELINE_REFS, 1)
    images = {}

    def easyref_new():
        refs = reference_images(PIPELINE_REFS, 100 + next(fresh))
        images["easyref"] = pipe(refs, PROMPT, seed=0, progress=False, **kwargs).images[0]

    def easyref_repeated():
        images["easyref_repeated"] = pipe(repeated_refs, PROMPT, seed=0, progress=False, **kwargs).images[0]

    def plain():
        images["bare"] = bare(prompt=PROMPT, generator=torch.Generator("cpu").manual_seed(0), **kwargs).images[0]

    variants = {"easyref_new": easyref_new, "easyref_repeated": easyref_repeated, "bare": plain}
    if ip_method is not None:
        def ip_adapter():
            embeds = ip_method.group_embeds(repeated_refs)
            images["ip_adapter"] = ip_method.pipe(prompt=PROMPT, ip_adapter_image_embeds=embeds,
                                                  generator=torch.Generator("cpu").manual_seed(0),
                                                  **kwargs).images[0]

        variants["ip_adapter"] = ip_adapter
    for pipeline in (bare, *([ip_method.pipe] if ip_method is not None else [])):
        pipeline.set_progress_bar_config(disable=True)
    times = timed(variants, settings.repeats, settings.device)
    result = {"steps": settings.steps, "image": settings.image, "refs": PIPELINE_REFS,
              "seconds": {name: statistics.median(values) for name, values in times["wall"].items()},
              "repeated_vs_bare": compare(times, "easyref_repeated", "bare"),
              "finite_images": {name: _is_finite_image(image) for name, image in images.items()},
              "goals": {"repeated_vs_bare": GOALS["repeated_vs_bare"], "new_vs_ip_adapter": GOALS["new_vs_ip_adapter"]}}
    if ip_method is not None:
        result["new_vs_ip_adapter"] = compare(times, "easyref_new", "ip_adapter")
    return result


# -- memory, one process per option ------------------------------------------------------------------
def _peak_bytes(device: str) -> dict:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    peak = {"peak_rss": rss}
    if device.startswith("cuda"):
        peak["max_allocated"] = torch.cuda.max_memory_allocated()
    return peak


def memory_of(option: str, workdir: Path, settings: Settings) -> dict:
    """Load the models one ``option`` needs and make one image; the process's peak memory."""
    from diffusers import StableDiffusionXLPipeline

    kwargs = {"num_inference_steps": settings.memory_steps, "guidance_scale": 5.0, "height": settings.image,
              "width": settings.image}
    start = time.perf_counter()
    if option == "bare":
        pipe = StableDiffusionXLPipeline.from_pretrained(workdir / "base", dtype=_dtype(settings.dtype))
        pipe.to(settings.device).set_progress_bar_config(disable=True)
        pipe(prompt=PROMPT, generator=torch.Generator("cpu").manual_seed(0), **kwargs)
    else:
        options = {"easyref": {}, "offload-model": {"offload": "model"},
                   "offload-sequential": {"offload": "sequential"}, "mllm-int8": {"mllm_quantize": "int8"}}[option]
        pipe = EasyRefPipeline.from_pretrained(workdir, device=settings.device, torch_dtype=settings.dtype,
                                               mllm_dtype=settings.mllm_dtype, **options)
        pipe(reference_images(PIPELINE_REFS, 1), PROMPT, seed=0, progress=False, **kwargs)
    _synchronizer(settings.device)()
    return {"option": option, **_peak_bytes(settings.device), "seconds": time.perf_counter() - start}


def memory_options(settings: Settings) -> list[str]:
    options = ["bare", "easyref"]
    if settings.device.startswith("cuda"):
        options += ["offload-model", "offload-sequential"]
    if importlib.util.find_spec("torchao") is not None:
        options.append("mllm-int8")
    return options


def measure_memory(workdir: Path, settings: Settings, timeout: float) -> dict:
    rows = []
    for option in memory_options(settings):
        log(f"  memory: {option}")
        command = [sys.executable, __file__, "--memory-option", option, "--workdir", str(workdir),
                   "--device", settings.device, "--image", str(settings.image)] + (["--tiny"] if settings.tiny else [])
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            rows.append({"option": option, "error": f"timed out after {timeout:.0f} s"})
            continue
        if done.returncode != 0:
            rows.append({"option": option, "error": (done.stderr.strip().splitlines() or ["?"])[-1]})
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    key = "max_allocated" if settings.device.startswith("cuda") else "peak_rss"
    bare = next((row[key] for row in rows if row["option"] == "bare" and key in row), None)
    for row in rows:
        if bare and key in row:
            row["ratio_to_bare"] = row[key] / bare
    return {"measure": key, "rows": rows, "goal": GOALS["offload_model_memory"]}


# -- report ------------------------------------------------------------------------------------------
def _verdict(value: float | None, goal: float) -> str:
    if value is None:
        return "not measured"
    return "MET" if value <= goal else "NOT MET"


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [f"Device: {result['machine'].get('gpu_name') or result['machine']['cpu']}; SDXL {s['dtype']}, MLLM "
             f"{s['mllm_dtype']}, {s['image']}², {s['steps']} steps{' (tiny models)' if s['tiny'] else ''}.", "",
             "| measurement | value | goal | verdict |", "|---|---|---|---|"]
    step = result.get("unet_step", {})
    if "ratio" in step:
        lines.append(f"| UNet step with {step['tokens']} reference tokens / bare | {step['ratio']:.3f} "
                     f"(FLOPs {step['flop_ratio']:.3f}) | <= {GOALS['unet_step']} | "
                     f"{_verdict(step['ratio'], GOALS['unet_step'])} |")
    for row in result.get("encode", {}).get("rows", []):
        lines.append(f"| MLLM encode, {row['refs']} refs ({row['sequence_tokens']} tokens), in UNet steps | "
                     f"{row['unet_steps']:.2f} (FLOPs {row['flop_unet_steps']:.2f}; time/FLOPs "
                     f"{row['time_over_flops']:.2f}; processor {row['processor_s']:.2f} s) | time/FLOPs <= "
                     f"{GOALS['encode_vs_flops']} | {_verdict(row['time_over_flops'], GOALS['encode_vs_flops'])} |")
    vision = result.get("vision", {})
    if "ratio" in vision:
        lines.append(f"| vision tower, {vision['refs']} refs: per image / batched | {vision['ratio']:.2f} (max diff "
                     f"{vision['max_abs_diff']:.2g} of {vision['max_abs_value']:.2g}) | | |")
    generation = result.get("generation", {})
    if "seconds" in generation:
        seconds = ", ".join(f"{name} {value:.2f} s" for name, value in generation["seconds"].items())
        lines.append(f"| seconds per image ({generation['refs']} refs) | {seconds} | | |")
        repeated = generation["repeated_vs_bare"]["ratio"]
        lines.append(f"| EasyRef repeated call / bare SDXL | {repeated:.3f} | <= {GOALS['repeated_vs_bare']} | "
                     f"{_verdict(repeated, GOALS['repeated_vs_bare'])} |")
        if "new_vs_ip_adapter" in generation:
            new = generation["new_vs_ip_adapter"]["ratio"]
            lines.append(f"| EasyRef new references / IP-Adapter-SDXL | {new:.3f} | <= {GOALS['new_vs_ip_adapter']} "
                         f"| {_verdict(new, GOALS['new_vs_ip_adapter'])} |")
        finite = all(generation["finite_images"].values())
        lines.append(f"| every image finite (not a flat NaN decode) | {finite} | True | "
                     f"{'MET' if finite else 'NOT MET'} |")
    memory = result.get("memory", {})
    for row in memory.get("rows", []):
        if "error" in row:
            lines.append(f"| peak memory, {row['option']} | failed: {row['error']} | | |")
            continue
        value = row[memory["measure"]] / 1e9
        ratio = row.get("ratio_to_bare")
        goal = GOALS["offload_model_memory"] if row["option"] == "offload-model" else None
        lines.append(f"| peak memory ({memory['measure']}), {row['option']} | {value:.2f} GB"
                     f"{f' = {ratio:.2f}x bare' if ratio else ''} | {f'<= {goal}' if goal else ''} | "
                     f"{_verdict(ratio, goal) if goal else ''} |")
    for name, error in result.get("errors", {}).items():
        lines.append(f"| {name} | failed: {error} | | |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """Encode time against the number of references (measured), and the time of a call with new references
    made of the measured repeated call plus that encode, next to bare SDXL and IP-Adapter-SDXL."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["encode"]["rows"]
    refs = [row["refs"] for row in rows]
    encode = [row["encode_s"] + row["processor_s"] for row in rows]
    seconds = result["generation"]["seconds"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(refs, encode, "o-", label="MLLM encode + processor (measured)")
    step_s = statistics.median(row["unet_step_s"] for row in rows)
    left.plot(refs, [row["flop_unet_steps"] * step_s for row in rows], "s--",
              label="its FLOPs at the UNet step's rate (median step)")
    left.set(xscale="log", yscale="log", xlabel="references in the group", ylabel="seconds",
             title="encoding one group")
    right.plot(refs, [seconds["easyref_repeated"] + value for value in encode], "o-",
               label="EasyRef, new references (repeated call + encode)")
    for name, label in (("easyref_repeated", "EasyRef, repeated call"), ("ip_adapter", "IP-Adapter-SDXL, 4 refs"),
                        ("bare", "bare SDXL")):
        if name in seconds:
            right.axhline(seconds[name], linestyle=":", color={"easyref_repeated": "C0", "ip_adapter": "C1",
                                                              "bare": "grey"}[name], label=label)
    settings = result["settings"]
    right.set(xscale="log", xlabel="references in the group", ylabel="seconds per image",
              title=f"one {settings['image']}² image, {settings['steps']} steps")
    for axis in (left, right):
        axis.set_xticks(refs, [str(count) for count in refs])
        axis.legend(fontsize=8)
    figure.suptitle(result["machine"].get("gpu_name") or result["machine"]["cpu"])
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


# -- main ----------------------------------------------------------------------------------------------
def _attempt(result: dict, name: str, fn: Callable[[], dict]) -> None:
    if name in result["skipped"]:
        return
    log(name)
    try:
        result[name] = fn()
    except Exception as exc:  # noqa: BLE001 - one failed measurement must not lose the others
        traceback.print_exc()
        result.setdefault("errors", {})[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


MEASUREMENTS = ("unet_step", "encode", "vision", "generation", "memory")


def _in_process(result: dict, workdir: Path, settings: Settings, skip: tuple[str, ...]) -> None:
    """Measurements 1-3, with the models loaded once; they are freed when this returns."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    from easyref.bench.methods import IPAdapterMethod, Sampling

    log("loading")
    pipe = EasyRefPipeline.from_pretrained(workdir, device=settings.device, torch_dtype=settings.dtype,
                                           mllm_dtype=settings.mllm_dtype)
    bare_unet = UNet2DConditionModel.from_pretrained(workdir / "base" / "unet", dtype=pipe.base.unet.dtype)
    bare_unet.to(settings.device)
    components = {name: part for name, part in pipe.base.components.items() if name != "unet"}
    bare = StableDiffusionXLPipeline(**components, unet=bare_unet)
    _attempt(result, "unet_step", lambda: measure_unet_step(pipe, bare_unet, settings))
    _attempt(result, "encode", lambda: measure_encode(pipe, settings))
    _attempt(result, "vision", lambda: measure_vision(pipe, settings))
    # IP-Adapter-SDXL loads a second SDXL: at full size on a CPU that is more RAM than most machines have.
    ip_method = None
    if "generation" not in skip and (settings.tiny or settings.device.startswith("cuda")):
        ip_pipe = IPAdapterMethod.load(workdir / "base", workdir / "ip-adapter", device=settings.device,
                                       torch_dtype=settings.dtype)
        ip_method = IPAdapterMethod(ip_pipe, Sampling(settings.steps, 5.0, settings.image, settings.image), 1.0, {})
    _attempt(result, "generation", lambda: measure_generation(pipe, bare, ip_method, settings))


def run(workdir: Path, settings: Settings, memory_timeout: float, skip: tuple[str, ...] = ()) -> dict:
    machine = machine_info()
    machine["platform"] = platform.platform()
    if settings.device.startswith("cuda"):
        machine["gpu_name"] = torch.cuda.get_device_name()
    result = {"settings": dataclasses.asdict(settings), "machine": machine, "skipped": list(skip)}
    write_models(workdir, settings)
    _in_process(result, workdir, settings, skip)
    if settings.device.startswith("cuda"):
        torch.cuda.empty_cache()
    _attempt(result, "memory", lambda: measure_memory(workdir, settings, memory_timeout))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny models (seconds; checks the script itself)")
    parser.add_argument("--workdir", type=Path, help="where the random models are written once "
                                                     "(default: a folder in the system's temp dir)")
    parser.add_argument("--steps", type=int, help="denoising steps per image (default: 30 on GPU, 2 on CPU)")
    parser.add_argument("--image", type=int, help="image side in pixels (default: 1024 on GPU, 512 on CPU); the "
                                                  "memory rows are mostly weights, so a CPU can measure them smaller")
    parser.add_argument("--repeats", type=int, help="timed rounds per comparison")
    parser.add_argument("--memory-timeout", type=float, default=300.0, help="seconds per memory process")
    parser.add_argument("--skip", nargs="+", choices=MEASUREMENTS, default=[], help="measurements to leave out")
    parser.add_argument("--json", type=Path, help="write every number here")
    parser.add_argument("--markdown", type=Path, help="write the table here too")
    parser.add_argument("--plot", type=Path, help="draw encode and per-image time against the group size (PNG)")
    parser.add_argument("--from-json", type=Path, help="measure nothing: read a --json file (with --plot, "
                                                        "--markdown)")
    parser.add_argument("--memory-option", choices=MEMORY_OPTIONS, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args(argv)
    settings = settings_for(args.device, args.tiny)
    settings = dataclasses.replace(settings, **{key: value for key, value in (("steps", args.steps),
                                                                            ("repeats", args.repeats),
                                                                            ("image", args.image))
                                                if value is not None})
    workdir = args.workdir or Path(tempfile.gettempdir()) / f"easyref-full-size-{'tiny' if args.tiny else 'real'}"
    if args.memory_option:
        print(json.dumps(memory_of(args.memory_option, workdir, settings)))
        return 0
    if args.from_json:
        result = json.loads(args.from_json.read_text())
    else:
        result = run(workdir, settings, args.memory_timeout, tuple(args.skip))
    table = markdown(result)
    print(table)
    if args.json and not args.from_json:
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    if args.markdown:
        args.markdown.write_text(table + "\n")
    if args.plot:
        plot(result, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
