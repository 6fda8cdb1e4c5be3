"""Why ``easyref shapes reproduce`` runs steps side by side: two one-thread processes against one
two-thread process, doing the same work, on this machine.

    python benchmarks/parallel_steps.py [--steps 150] [--rounds 2] [--json result.json]

Two copies of one real step (``easyref shapes pretrain clip OUT --steps N``: rendering, training and the
evaluation, as reproduce runs it) are run through :func:`easyref.shapes.schedule.run_steps` twice: one
after the other with every core each (``jobs=1``), and at the same time with one share of the cores each
(``jobs=2``). The two layouts alternate for ``--rounds`` rounds and the medians are compared; the machine
may be shared, so only the ratio is meant to be read. Progress goes to stderr, the table to stdout.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from easyref.shapes.schedule import Step, command, run_steps


def _two_pretrainings(folder: Path, steps: int, jobs: int) -> float:
    """Wall seconds for two CLIP pretrainings of ``steps`` steps, ``jobs`` at a time."""
    work = [Step(f"clip {index}", functools.partial(command, ["shapes", "pretrain", "clip", folder / str(index),
                                                               "--steps", steps]))
            for index in range(2)]
    start = time.perf_counter()
    run_steps(work, jobs=jobs, logs=folder / "logs", progress=False)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150, help="CLIP training steps per copy (default: 150)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds (default: 2)")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers to this file")
    args = parser.parse_args()
    times: dict[int, list[float]] = {1: [], 2: []}
    for round_index in range(args.rounds):
        for jobs in (1, 2):
            with tempfile.TemporaryDirectory() as folder:
                seconds = _two_pretrainings(Path(folder), args.steps, jobs)
            times[jobs].append(seconds)
            print(f"round {round_index + 1}, jobs={jobs}: {seconds:.1f} s", file=sys.stderr)
    one, two = statistics.median(times[1]), statistics.median(times[2])
    result = {"cores": os.cpu_count(), "steps": args.steps, "rounds": args.rounds,
              "seconds_one_at_a_time": one, "seconds_side_by_side": two, "speedup": one / two}
    print("| layout | wall (median) |\n|---|---|")
    print(f"| one after the other, {os.cpu_count()} threads each | {one:.1f} s |")
    print(f"| side by side, {max(1, (os.cpu_count() or 1) // 2)} thread(s) each | {two:.1f} s |")
    print(f"\nside by side is {one / two:.2f}x as fast")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
