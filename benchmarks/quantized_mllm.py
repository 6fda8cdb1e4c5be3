"""What 8-bit MLLM weights (``--mllm-quantize int8``) cost, measured side by side on this machine.

    python benchmarks/quantized_mllm.py [--groups 40] [--json result.json]

On the bundled ShapesWorld model (the trained MLLM that ships): for the first N held-in and N held-out
benchmark groups (4 references each), the reference tokens from the float32 MLLM and from the int8 one
(cosine per group), and the judge's concept and prompt accuracy of one image per group generated from
each with the same seed. Then the MLLM body's serialized weight bytes and the encode time per group,
int8 / float32 (interleaved, medians; the machine is shared, so only the ratio is meant to be read).
The tiny random model gets the cosine only. Progress goes to stderr, the table to stdout.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from easyref.pipeline import EasyRefPipeline
from easyref.shapes.examples import example_images
from easyref.shapes.groups import sample_group
from easyref.shapes.judge import ShapesJudge, score_images
from easyref.tiny import make_tiny

REFERENCES = 4
STEPS = 20


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def _weight_bytes(pipe: EasyRefPipeline) -> int:
    buffer = io.BytesIO()
    torch.save(pipe.encoder.mllm.state_dict(), buffer)
    return buffer.tell()


def _pair(model) -> dict[str, EasyRefPipeline]:
    return {name: EasyRefPipeline.from_pretrained(model, device="cpu", torch_dtype="float32", mllm_quantize=quant)
            for name, quant in (("float32", None), ("int8", "int8"))}


def shapesworld(groups: int) -> dict:
    pipes = _pair("shapesworld")
    judge = ShapesJudge.from_pretrained(Path(pipes["float32"].sources["adapter"]).parent / "judge")
    result = {"weight_bytes_ratio": _weight_bytes(pipes["int8"]) / _weight_bytes(pipes["float32"])}
    seconds: dict[str, list[float]] = {"float32": [], "int8": []}
    for split in ("held-in", "held-out"):
        rows = {name: [] for name in pipes}
        cosines = []
        for index in range(groups):
            group = sample_group(split, index, REFERENCES)
            images = example_images(group)
            embeds = {}
            for name in sorted(pipes, key=lambda n: (n != "int8") == bool(index % 2)):  # alternate the order
                pipe = pipes[name]
                began = time.process_time()
                embeds[name] = pipe.encode_references(images, group.caption)
                seconds[name].append(time.process_time() - began)
                image = pipe(embeds=embeds[name], prompt=group.caption, seed=index, num_inference_steps=STEPS,
                             progress=False).images[0]
                rows[name] += score_images(judge, [np.asarray(image.convert("RGB"))], group.concept, group.prompt)
            cosines.append(_cosine(embeds["float32"], embeds["int8"]))
            print(f"{split} {index + 1}/{groups}", file=sys.stderr)
        result[split] = {"cosine_mean": statistics.mean(cosines), "cosine_min": min(cosines),
                         **{f"{name}_{key}": statistics.mean(float(row[key]) for row in rows[name])
                            for name in pipes for key in ("concept_ok", "prompt_ok")}}
    result["encode_cpu_seconds_ratio"] = statistics.median(seconds["int8"]) / statistics.median(seconds["float32"])
    return result


def tiny(groups: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        pipes = _pair(make_tiny(Path(folder) / "tiny"))
        cosines = []
        for index in range(groups):
            images = example_images(sample_group("held-in", index, REFERENCES))
            cosines.append(_cosine(*(pipes[name].encode_references(images, "a cat") for name in pipes)))
    return {"cosine_mean": statistics.mean(cosines), "cosine_min": min(cosines)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=40, help="groups per split (default: 40)")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = {"torch": torch.__version__, "groups_per_split": args.groups, "tiny": tiny(args.groups),
              "shapesworld": shapesworld(args.groups)}
    sw = result["shapesworld"]
    print(f"tiny model: 1 - token cosine, int8 vs float32: mean {1 - result['tiny']['cosine_mean']:.1e} "
          f"(max {1 - result['tiny']['cosine_min']:.1e})")
    print(f"ShapesWorld: MLLM weight bytes int8 / float32 = {sw['weight_bytes_ratio']:.3f}; "
          f"encode CPU time int8 / float32 = {sw['encode_cpu_seconds_ratio']:.2f}")
    print("| split | 1 - token cosine, mean (max) | concept acc. float32 / int8 | prompt acc. float32 / int8 |")
    print("|---|---|---|---|")
    for split in ("held-in", "held-out"):
        row = sw[split]
        print(f"| {split} | {1 - row['cosine_mean']:.1e} ({1 - row['cosine_min']:.1e}) | "
              f"{row['float32_concept_ok']:.3f} / {row['int8_concept_ok']:.3f} | "
              f"{row['float32_prompt_ok']:.3f} / {row['int8_prompt_ok']:.3f} |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
