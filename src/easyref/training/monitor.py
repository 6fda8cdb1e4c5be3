"""What a user watches during training: a progress bar, JSON lines, TensorBoard and validation grids.

Only the main process creates a :class:`Monitor` that writes; the others get a silent one, so
the loop calls it unconditionally. ``log.jsonl`` holds one object per logged step (``step``,
``loss``, ``lr``, ``samples_per_s``, ``eta_s``, ``epoch``, ``skipped_records``,
``dropped_references``, ``time``), the same numbers the bar shows; TensorBoard gets them too when
the ``tensorboard`` package is installed.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from easyref.files import atomic_write

LOG_FILE = "log.jsonl"
VALIDATION_FOLDER = "validation"
TENSORBOARD_FOLDER = "tensorboard"


def truncate_log(path: Path, last_step: int) -> None:
    """Drop lines logged after ``last_step`` (by a run that was killed and is now resumed)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= last_step:
                kept.append(line)
        except json.JSONDecodeError:
            continue
    atomic_write(path, lambda tmp: tmp.write_text("".join(line + "\n" for line in kept)))


class Monitor:
    """Progress bar + JSON lines + optional TensorBoard for steps ``start_step..total_steps``."""

    def __init__(self, output: Path, total_steps: int, start_step: int, enabled: bool, progress: bool = True,
                 tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.output = output
        self.bar = None
        self.writer = None
        self.log_path = output / LOG_FILE
        if not enabled:
            return
        truncate_log(self.log_path, start_step)
        self._bar_range = (start_step, total_steps) if progress else None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard not installed: JSON lines only
                SummaryWriter = None
            if SummaryWriter is not None:
                self.writer = SummaryWriter(str(output / TENSORBOARD_FOLDER))

    def say(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def start(self) -> None:
        """Show the progress bar (after the start-up summary, so the two do not interleave)."""
        if self.enabled and self._bar_range is not None and self.bar is None:
            from tqdm.auto import tqdm

            start, total = self._bar_range
            self.bar = tqdm(total=total, initial=start, desc="training", unit="step", dynamic_ncols=True,
                            file=sys.stderr)

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def log(self, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        values = {"time": round(time.time(), 3), **values}
        with open(self.log_path, "a") as handle:
            handle.write(json.dumps(values) + "\n")
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.2e}",
                                 samples_s=f"{values['samples_per_s']:.2f}", refresh=False)
        if self.writer is not None:
            for key, value in values.items():
                if key not in ("step", "time") and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"train/{key}", value, values["step"])

    def image(self, tag: str, path: Path, step: int) -> None:
        if self.writer is not None:
            import numpy as np

            self.writer.add_image(tag, np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


def make_grid(rows: Sequence[Sequence[Image.Image]], cell: int, gap: int = 2) -> Image.Image:
    """Paste images into a white grid, one list per row, each resized to ``cell`` x ``cell``."""
    columns = max(len(row) for row in rows)
    grid = Image.new("RGB", (columns * cell + (columns - 1) * gap, len(rows) * cell + (len(rows) - 1) * gap),
                     "white")
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            grid.paste(image.convert("RGB").resize((cell, cell)), (c * (cell + gap), r * (cell + gap)))
    return grid


def save_grid(rows: Sequence[Sequence[Image.Image]], path: Path, cell: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = make_grid(rows, cell)
    return atomic_write(path, lambda tmp: grid.save(tmp, format="PNG"))
