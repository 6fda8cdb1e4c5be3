"""The scale-out configs executed: stage ``multi`` under each, its first losses next to the plain path's.

    python benchmarks/scale_out.py --gpu --json scale_out.json     # every GPU: DDP, FSDP, DeepSpeed ZeRO-2
    python benchmarks/scale_out.py --processes 2                   # CPU: 2 gloo processes, DDP and FSDP

Each run is ``accelerate launch --config_file configs/<name>.yaml -m easyref train --stage multi`` on a
tiny model and made-up groups (the same seed, data and batch), as the configs' own comments say to
run them. What is compared: the loss of every logged step against the plain data-parallel run
(``multi_gpu.yaml``), and that each run wrote a final adapter that loads. Sharding changes the order
of floating-point sums, so the losses agree to rounding, not bit for bit; a broken path (a config
that does not shard, gathers the wrong weights, or skips steps) shows as a gap or a missing adapter.
On a CPU the runs use float32 (accelerate's bf16 is for GPUs) and DeepSpeed is left out (it needs CUDA).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from train_throughput import MODULE, free_port, make_data  # noqa: E402 - the sibling benchmark's helpers

CONFIGS = Path(__file__).parents[1] / "configs"
PLAIN = "multi_gpu"
# What accelerate must set up for each config, as the trainer's banner names it; anything else means the
# config did not take effect (accelerate 1.x turns FSDP on only for accelerator processes, not for CPU ones).
EXPECTED = {"multi_gpu": ("multi_gpu", "multi_cpu", "single process"), "fsdp": ("fsdp",),
            "deepspeed_zero2": ("deepspeed",)}


def launch(config: str, model: Path, data: Path, output: Path, args: argparse.Namespace) -> dict:
    """One training run; its per-step losses, or the last line of its error."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / f"{config}.yaml"),
               "--num_processes", str(args.processes), "--main_process_port", str(free_port())]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    if not args.gpu:
        command += ["--mixed_precision", "no"]
        env["ACCELERATE_USE_CPU"] = "true"
    command += ["-m", MODULE, "train", "--stage", "multi", "--model", str(model), "--init", str(model / "adapter"),
                "--lora-rank", "8", "--data", str(data), "--output", str(output), "--resolution", "64",
                "--crop", "center", "--batch-size", "2", "--gradient-accumulation-steps", "1",
                "--max-steps", str(args.steps),
                "--save-steps", str(10 * args.steps), "--log-steps", "1", "--num-workers", "0", "--seed", "0",
                "--no-progress"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout, check=False)
    if done.returncode != 0:
        # torch's launcher ends with the failing rank's own last line ("traceback : error: ...")
        lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
        causes = [line.split(":", 1)[1].strip() for line in lines if line.startswith("traceback :")]
        error = causes[-1] if causes else lines[-1] if lines else f"exit status {done.returncode}"
        return {"error": error, "stderr_tail": done.stderr[-4000:]}
    logged = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]
    # the trainer's banner names the distributed type accelerate actually set up
    banner = next((line.strip() for line in (done.stdout + done.stderr).splitlines() if "process(es) on" in line), "")
    return {"losses": [entry["loss"] for entry in logged], "steps": [entry["step"] for entry in logged],
            "adapter_written": (output / "adapter" / "config.json").is_file(), "banner": banner}


def compare(runs: dict[str, dict]) -> dict[str, dict]:
    """Each run's largest relative loss gap to the plain run, step for step."""
    plain = runs.get(PLAIN, {}).get("losses")
    for name, run in runs.items():
        if "banner" in run:
            setup = run["banner"].split(" on ", 1)[-1].split(", mixed")[0]
            run["set_up_as"] = setup
            run["config_took_effect"] = any(f"({kind})" in setup for kind in EXPECTED[name])
        if name == PLAIN or "losses" not in run or not plain:
            continue
        if len(run["losses"]) != len(plain):
            run["max_relative_gap"] = None
            run["note"] = f"{len(run['losses'])} steps logged, the plain run logged {len(plain)}"
            continue
        run["max_relative_gap"] = max(abs(a - b) / abs(b) for a, b in zip(run["losses"], plain, strict=True))
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--gpu", action="store_true", help="GPU processes (default: CPU processes over gloo)")
    parser.add_argument("--processes", type=int, default=None,
                        help="processes per run (default: every GPU with --gpu, else 2)")
    parser.add_argument("--steps", type=int, default=6, help="training steps per run (default: 6)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per run before it counts as failed")
    parser.add_argument("--json", type=Path, help="write the losses and gaps here")
    args = parser.parse_args(argv)
    if args.processes is None:
        import torch

        args.processes = max(1, torch.cuda.device_count()) if args.gpu else 2
    configs = [PLAIN, "fsdp"]
    if args.gpu:
        configs.append("deepspeed_zero2")

    from easyref.tiny import make_tiny

    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="easyref-scale-out-") as tmp:
        root = Path(tmp)
        model, data = make_tiny(root / "model"), make_data(root)
        for config in configs:
            if config.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
                runs[config] = {"error": "deepspeed is not installed (pip install deepspeed)"}
                continue
            print(f"stage multi under configs/{config}.yaml, {args.processes} process(es)", file=sys.stderr)
            runs[config] = launch(config, model, data, root / config, args)
    compare(runs)
    device = "GPU" if args.gpu else "CPU (gloo)"
    print(f"| config ({args.processes} {device} processes, {args.steps} steps) | set up as | first losses | "
          f"largest gap to {PLAIN} | adapter written |")
    print("|---|---|---|---|---|")
    for name, run in runs.items():
        if "error" in run:
            print(f"| {name} | failed: {run['error']} | | | |")
            continue
        losses = ", ".join(f"{loss:.5f}" for loss in run["losses"][:3])
        gap = "(reference)" if name == PLAIN else (f"{run['max_relative_gap']:.2e}" if run.get("max_relative_gap")
                                                    is not None else run.get("note", "-"))
        setup = run["set_up_as"] + ("" if run["config_took_effect"] else " (NOT the config's type)")
        print(f"| {name} | {setup} | {losses} | {gap} | {run['adapter_written']} |")
    if args.json:
        args.json.write_text(json.dumps({"processes": args.processes, "gpu": args.gpu, "steps": args.steps,
                                         "runs": runs}, indent=2) + "\n")
    return 0 if all("error" not in run or name.startswith("deepspeed") for name, run in runs.items()) else 1


if __name__ == "__main__":
    sys.exit(main())
