"""Training throughput of stage 3 (multi) on tiny models: 1 vs 2 processes, with and without gradient checkpointing.

Runs ``easyref train --stage multi`` four times under ``accelerate launch`` on a tiny model and
made-up groups, reads the per-step timestamps the runs write to ``log.jsonl``, and prints samples/s
for each setting and the ratios between them. The first ``--warmup`` steps are not timed.

    python benchmarks/train_throughput.py                 # CPU: 1 thread per process
    python benchmarks/train_throughput.py --gpu           # one GPU per process

On CPU each process gets ``--threads`` threads, so two processes use twice the cores of one: the
ratio measures data-parallel scaling, not a fixed core budget. Tiny models measure the loop's own
overhead (data, collation, communication), not what real SDXL + Qwen2-VL steps cost.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

MODULE = "easyref"  # the module `accelerate launch -m` runs


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_data(root: Path, groups: int = 4, per_group: int = 4) -> Path:
    rng = np.random.default_rng(0)
    records = []
    for g in range(groups):
        names = []
        for i in range(per_group):
            name = f"g{g}_{i}.png"
            Image.fromarray(rng.integers(0, 256, (96, 80 + 8 * i, 3), dtype=np.uint8)).save(root / name)
            names.append(name)
        records += [{"image_file": [n for n in names if n != t], "text": [f"group {g}"], "target": t} for t in names]
    path = root / "groups.json"
    path.write_text(json.dumps(records))
    return path


def run(model: Path, data: Path, output: Path, processes: int, checkpointing: bool, args) -> float:
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--mixed_precision", "no",
                "--main_process_port", str(free_port())]
    launcher += ["--multi_gpu", "--num_processes", str(processes)] if processes > 1 else ["--num_processes", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    if not args.gpu:
        env["ACCELERATE_USE_CPU"] = "true"
        if processes == 1:
            launcher.append("--cpu")
    command = [*launcher, "-m", MODULE, "train", "--stage", "multi", "--model", str(model),
               "--init", str(model / "adapter"), "--lora-rank", "8", "--data", str(data), "--output", str(output),
               "--resolution", str(args.resolution), "--batch-size", str(args.batch_size),
               "--gradient-accumulation-steps", "1", "--max-steps", str(args.warmup + args.steps),
               "--save-steps", str(10 * (args.warmup + args.steps)), "--log-steps", "1", "--num-workers", "0",
               "--no-progress", *(["--gradient-checkpointing"] if checkpointing else [])]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"run failed ({processes} processes, checkpointing {checkpointing}):\n{result.stderr[-3000:]}")
    logged = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]
    start, end = logged[args.warmup - 1], logged[-1]
    samples = (end["step"] - start["step"]) * args.batch_size * processes
    return samples / (end["time"] - start["time"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run (default: 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed first steps (default: 3)")
    parser.add_argument("--resolution", type=int, default=64, help="(default: 64)")
    parser.add_argument("--batch-size", type=int, default=2, help="per process (default: 2)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per process (default: 1)")
    parser.add_argument("--gpu", action="store_true", help="one GPU per process instead of CPU processes")
    parser.add_argument("--json", metavar="FILE", help="also write the numbers to FILE")
    args = parser.parse_args()

    from easyref.tiny import make_tiny

    with tempfile.TemporaryDirectory(prefix="easyref-train-bench-") as tmp:
        root = Path(tmp)
        model = make_tiny(root / "model")
        data = make_data(root)
        results = {}
        for processes in (1, 2):
            for checkpointing in (False, True):
                started = time.perf_counter()
                rate = run(model, data, root / f"run-{processes}-{int(checkpointing)}", processes, checkpointing, args)
                results[(processes, checkpointing)] = rate
                print(f"  {processes} process(es), gradient checkpointing {'on ' if checkpointing else 'off'}: "
                      f"{rate:6.2f} samples/s  ({time.perf_counter() - started:.0f} s wall)", file=sys.stderr)

    device = "GPU" if args.gpu else f"CPU, {args.threads} thread(s) per process"
    print(f"stage 3 (multi) training throughput, tiny models, {args.resolution} px, batch {args.batch_size} per "
          f"process, {device}, {args.steps} timed steps")
    print(f"{'processes':>9}  {'grad ckpt':>9}  {'samples/s':>9}")
    for (processes, checkpointing), rate in results.items():
        print(f"{processes:>9}  {'on' if checkpointing else 'off':>9}  {rate:>9.2f}")
    scaling = {ckpt: results[(2, ckpt)] / results[(1, ckpt)] for ckpt in (False, True)}
    cost = {procs: results[(procs, True)] / results[(procs, False)] for procs in (1, 2)}
    print(f"2 vs 1 process: {scaling[False]:.2f}x (checkpointing off), {scaling[True]:.2f}x (on)")
    print(f"checkpointing on vs off: {cost[1]:.2f}x (1 process), {cost[2]:.2f}x (2 processes)")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "settings": vars(args), "samples_per_s": {f"{p}proc_{'ckpt' if c else 'nockpt'}": r
                                                      for (p, c), r in results.items()},
            "scaling_2_vs_1": {"nockpt": scaling[False], "ckpt": scaling[True]},
            "checkpointing_cost": {"1proc": cost[1], "2proc": cost[2]},
        }, indent=2))


if __name__ == "__main__":
    main()
