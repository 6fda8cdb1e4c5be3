"""``easyref demo``: a Gradio page over one loaded :class:`~easyref.pipeline.EasyRefPipeline`.

Drop a group of references, type a prompt, get images with the same JSON sidecar the CLI writes.
The page is a thin layer: :class:`DemoBackend` does the work (validation, generation, files) and is
what tests call directly; :func:`build_app` only lays it out. One generation runs at a time (the
queue shows waiting visitors their place); the pipeline's content-keyed encoding cache means that
changing only the seed, steps or size does not run the MLLM again.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# Gradio reports usage to its servers unless told not to; this page must work (and stay quiet) offline.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402
from PIL import Image  # noqa: E402

from easyref.controls import LAYER_PRESETS, active_steps, parse_layers  # noqa: E402
from easyref.errors import EasyRefError  # noqa: E402
from easyref.files import atomic_write, sha256_file  # noqa: E402
from easyref.images import load_references  # noqa: E402
from easyref.pipeline import MAX_SIDE, EasyRefPipeline, check_generation_args  # noqa: E402

DEFAULT_PORT = 7860
MAX_IMAGES = 4
MAX_SEED = 2**31 - 1
# Small images (ShapesWorld draws 64x64) are shown enlarged with crisp pixels, not blurred.
CSS = ".easyref-pixels img { image-rendering: pixelated; }"
# No web fonts: the page must look the same offline as online.
THEME = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])

Progress = Callable[..., Any]


def _named(path: str) -> str:
    """The name the visitor gave the file: Gradio keeps it as the last part of its upload path."""
    return Path(path).name


def _readable(exc: EasyRefError, paths: Sequence[str]) -> str:
    """The library's message with Gradio's upload folders cut down to the visitor's file names."""
    message = str(exc)
    for path in paths:
        message = message.replace(str(path), _named(path))
    return message


class DemoBackend:
    """Everything the page does, callable without a browser.

    Every generation gets a folder of its own under ``output_dir`` (images and sidecar), so that
    downloads never collide and nothing the visitor did not make is ever overwritten.
    """

    def __init__(self, pipe: EasyRefPipeline, output_dir: str | Path | None = None,
                 model_label: str = "", examples: Sequence[tuple[str, list[str], str]] = ()) -> None:
        self.pipe = pipe
        self.output_dir = Path(output_dir) if output_dir else Path(tempfile.mkdtemp(prefix="easyref-demo-"))
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.model_label = model_label
        self.examples = list(examples)
        self.runs = 0

    @property
    def default_side(self) -> int:
        base = self.pipe.base
        return base.default_sample_size * base.vae_scale_factor

    def check_group(self, files: Sequence[str] | None) -> tuple[list[Image.Image], str]:
        """Previews of the uploaded references and a one-line status (a count, or what is wrong)."""
        paths = list(files or [])
        if not paths:
            return [], "Drop 1 or more reference images."
        try:
            images = self._load(paths, "reference")
        except gr.Error as exc:
            return [], f"⚠️ {exc.message}"
        return images, f"{len(images)} reference{'s' * (len(images) != 1)} ready."

    def _load(self, paths: Sequence[str], what: str) -> list[Image.Image]:
        """Decode and check every file (type, size, count) as the CLI does; errors name the visitor's file."""
        try:
            return load_references(list(paths), self.pipe.config.max_references)
        except EasyRefError as exc:
            raise gr.Error(f"{what}s: {_readable(exc, paths)}") from None

    def generate(self, files: Sequence[str] | None, negative_files: Sequence[str] | None, prompt: str,
                 negative_prompt: str, scale: float, steps: int, guidance: float, seed: int, height: int,
                 width: int, num_images: int, ref_start: float = 0.0, ref_end: float = 1.0,
                 ref_layers: str = "all", progress: Progress | None = None
                 ) -> tuple[list[tuple[str, str]], list[str], str]:
        """Generate; returns the gallery (path, caption), the files to download, and a status line.

        Bad input raises :class:`gradio.Error` with one readable sentence; the server keeps serving.
        """
        progress = progress or (lambda *args, **kwargs: None)
        paths, negative_paths = list(files or []), list(negative_files or [])
        if not paths:
            raise gr.Error("add at least one reference image")
        values = {"seed": seed, "num_inference_steps": steps, "height": height, "width": width,
                  "num_images": num_images}
        if any(value is None for value in values.values()):
            raise gr.Error("fill in seed, steps, size and number of images")
        seed, steps, height, width, num_images = (int(value) for value in values.values())
        try:
            check_generation_args(height=height, width=width, scale=float(scale), guidance_scale=float(guidance),
                                  num_inference_steps=steps, num_images=num_images, seed=seed)
            active_steps(steps, float(ref_start), float(ref_end))
            layers = parse_layers(ref_layers)
        except EasyRefError as exc:
            raise gr.Error(str(exc)) from None
        progress(0, desc="reading the references")
        images = self._load(paths, "reference")
        negatives = self._load(negative_paths, "negative reference") if negative_paths else None

        def step_done(pipe: Any, step: int, timestep: Any, outputs: dict) -> dict:
            progress((step + 1, steps), desc="denoising")
            return outputs

        began = time.perf_counter()
        try:
            result = self.pipe(images, prompt or "", negative_references=negatives, negative_prompt=negative_prompt,
                               seed=seed, num_inference_steps=steps, guidance_scale=float(guidance),
                               scale=float(scale), height=height, width=width, num_images=num_images,
                               progress=False, callback_on_step_end=step_done, ref_start=float(ref_start),
                               ref_end=float(ref_end), ref_layers=layers)
        except EasyRefError as exc:
            raise gr.Error(str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - a bug must not take the page down or show a traceback
            traceback.print_exc()
            raise gr.Error(f"unexpected {type(exc).__name__}: {exc}") from None
        seconds = time.perf_counter() - began
        return self._save(result, paths, negative_paths, seconds)

    def _save(self, result: Any, paths: list[str], negative_paths: list[str], seconds: float
              ) -> tuple[list[tuple[str, str]], list[str], str]:
        self.runs += 1
        seed = result.settings["seed"]
        folder = self.output_dir / f"{self.runs:04d}"
        folder.mkdir(parents=True, exist_ok=False)
        stem = f"easyref-seed{seed}"
        names = [f"{stem}.png"] if len(result.images) == 1 else [f"{stem}_{i}.png" for i in range(len(result.images))]
        for image, name in zip(result.images, names, strict=True):
            atomic_write(folder / name, lambda tmp, image=image: image.save(tmp, format="PNG"))
        record = {**self.pipe.sidecar(result, names),
                  "references": [{"name": _named(p), "sha256": sha256_file(p)} for p in paths],
                  "app": "easyref demo", "model": self.model_label}
        if negative_paths:
            record["negative_references"] = [{"name": _named(p), "sha256": sha256_file(p)} for p in negative_paths]
        sidecar = atomic_write(folder / f"{stem}.json",
                               lambda tmp: tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n"))
        outputs = [str(folder / name) for name in names]
        gallery = [(path, f"seed {seed}") for path in outputs]
        return gallery, [*outputs, str(sidecar)], f"seed **{seed}** · {seconds:.1f} s · {self.model_label}"


def random_seed() -> int:
    return random.randint(0, MAX_SEED)


def build_app(backend: DemoBackend) -> gr.Blocks:
    """The page: references and settings on the left, results and downloads on the right."""
    pipe, side = backend.pipe, backend.default_side
    with gr.Blocks(title="EasyRef") as app:
        gr.Markdown(f"## EasyRef · {backend.model_label}\nImages that follow what a group of references "
                    "share, and the prompt.")
        with gr.Row():
            with gr.Column():
                most = pipe.config.max_references
                references = gr.File(label=f"reference group (drop 1–{most} images; drag to reorder)",
                                     file_count="multiple", file_types=["image"], allow_reordering=True,
                                     height=200, elem_id="references")
                group_status = gr.Markdown("Drop 1 or more reference images.", elem_id="group-status")
                previews = gr.Gallery(label="the group", columns=8, rows=1, height=130, fit_columns=False,
                                      interactive=False, elem_classes=["easyref-pixels"], object_fit="contain")
                prompt = gr.Textbox(label="prompt", lines=2, elem_id="prompt")
                with gr.Row():
                    seed = gr.Number(label="seed", value=0, precision=0, minimum=0, maximum=MAX_SEED,
                                     elem_id="seed")
                    dice = gr.Button("random seed", elem_id="random-seed")
                    scale = gr.Slider(0, 2, value=1.0, step=0.05, label="reference scale (0 = base model)")
                generate = gr.Button("Generate", variant="primary", elem_id="generate")
                with gr.Accordion("more settings", open=False, elem_id="more-settings"):
                    with gr.Row():
                        steps = gr.Slider(1, 100, value=30, step=1, label="steps", elem_id="steps")
                        guidance = gr.Slider(1, 15, value=5.0, step=0.5, label="guidance")
                        num_images = gr.Slider(1, MAX_IMAGES, value=1, step=1, label="images")
                    with gr.Row():
                        height = gr.Slider(64, MAX_SIDE, value=side, step=8, label="height")
                        width = gr.Slider(64, MAX_SIDE, value=side, step=8, label="width")
                    with gr.Row():
                        ref_start = gr.Slider(0, 1, value=0.0, step=0.05, label="references from (fraction of steps)")
                        ref_end = gr.Slider(0, 1, value=1.0, step=0.05, label="references until")
                        ref_layers = gr.Dropdown(list(LAYER_PRESETS), value="all", allow_custom_value=True,
                                                 label="layers (preset, or diffusers' per-block JSON)")
                    negative_prompt = gr.Textbox(label="negative prompt", value=pipe.config.negative_prompt)
                    negative_references = gr.File(label="negative references (optional: what to move away from)",
                                                  file_count="multiple", file_types=["image"])
            with gr.Column():
                results = gr.Gallery(label="results", columns=2, height=320, fit_columns=False, elem_id="results",
                                     elem_classes=["easyref-pixels"], object_fit="contain")
                status = gr.Markdown(elem_id="status")
                downloads = gr.File(label="download (images + JSON sidecar)", file_count="multiple",
                                    interactive=False, elem_id="downloads")
        if backend.examples:
            gr.Examples(examples=[[files, caption] for _, files, caption in backend.examples],
                        inputs=[references, prompt], label="example groups (click one)",
                        example_labels=[f"{name}: {caption}" for name, _, caption in backend.examples])

        references.change(backend.check_group, inputs=references, outputs=[previews, group_status])
        dice.click(random_seed, outputs=seed, queue=False)

        def run(*values, progress=gr.Progress()):  # noqa: B008 - how Gradio asks for a progress bar
            return backend.generate(*values, progress=progress)

        generate.click(run, inputs=[references, negative_references, prompt, negative_prompt, scale, steps,
                                    guidance, seed, height, width, num_images, ref_start, ref_end, ref_layers],
                       outputs=[results, downloads, status], concurrency_limit=1)
    app.queue(default_concurrency_limit=1)
    return app


def example_groups(folder: Path) -> list[tuple[str, list[str], str]]:
    """The bundled ShapesWorld example groups written as files: (name, reference paths, caption) each."""
    from easyref.shapes.examples import example_names, write_example

    groups = []
    for name in example_names():
        out = write_example(name, folder)
        groups.append((name, sorted(str(p) for p in out.glob("ref-*.png")), (out / "caption.txt").read_text().strip()))
    return groups


def launch(backend: DemoBackend, host: str = "127.0.0.1", port: int = DEFAULT_PORT, share: bool = False,
           block: bool = True) -> gr.Blocks:
    """Serve the page; ``block=False`` returns at once (tests, notebooks) and ``app.close()`` stops it."""
    app = build_app(backend)
    allowed = [str(backend.output_dir), *{str(Path(files[0]).parent.parent) for _, files, _ in backend.examples}]
    app.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=not block, quiet=True,
               allowed_paths=allowed, theme=THEME, css=CSS, footer_links=[])
    return app
