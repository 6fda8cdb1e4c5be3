"""Benchmark throughput: groups per second of ``easyref`` vs the ``ip-adapter`` baseline as groups grow.

Both methods run through the benchmark's own Method classes on tiny models (so this measures our
code paths, not model size), side by side in one process: every round times one group per
(size, method), alternating which method goes first, and the table reports medians over rounds
(the ratio is the median of per-round ratios, robust to a machine whose load drifts).

EasyRef caches encodings by references + prompt, so each round uses a new caption: every timed
call encodes its group, while the unconditional branch stays cached as in a real run.

Tiny random weights push activations into float32's denormal range, where x86 CPUs run up to
~50x slower; real models rarely go there. The script flushes denormals to zero (per thread, hence
one torch thread by default) so the numbers reflect the code, not that artifact.

    python benchmarks/bench_throughput.py --sizes 1 4 16 --rounds 7
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from easyref.bench.manifest import Group
from easyref.bench.methods import EasyRefMethod, IPAdapterMethod, Method, Sampling
from easyref.pipeline import EasyRefPipeline
from easyref.tiny import TINY_IP_ADAPTER_WEIGHTS, make_tiny, write_tiny_ip_adapter


def make_group(folder: Path, size: int, rng: np.random.Generator) -> Group:
    """``size`` random references of varied shapes, written as PNG files like a real benchmark's."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(size):
        height, width = int(rng.integers(48, 112)), int(rng.integers(48, 112))
        path = folder / f"{index}.png"
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return Group(id=f"size{size}", split="held-out", domain="random", references=tuple(paths),
                 target=paths[0], caption="")


def seconds_per_group(method: Method, group: Group, caption: str) -> float:
    group = Group(group.id, group.split, group.domain, group.references, group.target, caption)
    start = time.perf_counter()
    method.prepare(group, seed=0)
    method.generate(group, seed=0, num_images=1)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 16], help="references per group")
    parser.add_argument("--rounds", type=int, default=7, help="timed groups per (size, method); medians reported")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps per image")
    parser.add_argument("--resolution", type=int, default=64, help="image height and width")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)

    work = Path(tempfile.mkdtemp(prefix="bench-throughput-"))
    model = make_tiny(work / "model")
    write_tiny_ip_adapter(work / "ip-adapter", model / "base")
    sampling = Sampling(steps=args.steps, height=args.resolution, width=args.resolution)
    methods: dict[str, Method] = {
        "easyref": EasyRefMethod(EasyRefPipeline.from_pretrained(model, device="cpu", torch_dtype="float32"),
                                 sampling),
        "ip-adapter": IPAdapterMethod(
            IPAdapterMethod.load(model / "base", work / "ip-adapter" / TINY_IP_ADAPTER_WEIGHTS, device="cpu",
                                 torch_dtype="float32"), sampling, scale=1.0, sources={}),
    }
    rng = np.random.default_rng(0)
    groups = {size: make_group(work / f"refs-{size}", size, rng) for size in args.sizes}
    for size, group in groups.items():  # warm-up: first calls pay one-time allocation costs
        for method in methods.values():
            seconds_per_group(method, group, f"warm-up {size}")

    times: dict[tuple[int, str], list[float]] = {(size, name): [] for size in args.sizes for name in methods}
    for round_ in range(args.rounds):
        order = list(methods) if round_ % 2 == 0 else list(reversed(methods))
        for size, group in groups.items():
            for name in order:
                times[size, name].append(seconds_per_group(methods[name], group, f"a photo, round {round_}"))

    print(f"{args.rounds} rounds, {args.steps} steps, {args.resolution}x{args.resolution}, "
          f"{torch.get_num_threads()} thread(s), torch {torch.__version__}, CPU\n")
    print("| references | easyref groups/s | ip-adapter groups/s | easyref / ip-adapter |")
    print("|---:|---:|---:|---:|")
    for size in args.sizes:
        easyref, ip_adapter = times[size, "easyref"], times[size, "ip-adapter"]
        ratio = statistics.median(ip / er for er, ip in zip(easyref, ip_adapter, strict=True))
        print(f"| {size} | {1 / statistics.median(easyref):.2f} | {1 / statistics.median(ip_adapter):.2f} "
              f"| {ratio:.2f} |")


if __name__ == "__main__":
    main()
