"""A plain step loop for models trained from synthetic or simple batches.

It trains ShapesWorld's pretrained models (judge, CLIP, DINO, base, MLLM) and the IP-Adapter
baseline.

Each model supplies ``step_loss(step) -> loss``: a batch that is a pure function of the run's
seed and the step number (see :func:`step_rng`), so a run resumed from a checkpoint draws the
same batches as one that never stopped. The loop owns everything else: accelerate for device
placement and the backward pass, AdamW, a progress bar, ``log.jsonl``, and an atomic
``checkpoint/`` (trainable weights, optimizer, step) that a rerun of the same command picks up.

EasyRef's own trainer (``easyref.training.loop``) is the tool for the three EasyRef stages, with
its data pipeline, multi-process sharding and mixed precision; this one is deliberately plainer.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from easyref.errors import InvalidArgumentError
from easyref.files import atomic_folder, atomic_write, write_json

CHECKPOINT = "checkpoint"
LOG = "log.jsonl"
_WEIGHTS = "trainable.safetensors"
_OPTIMIZER = "optimizer.pt"
_STATE = "state.json"


@dataclasses.dataclass
class LoopSettings:
    """How long and how fast to train. ``schedule="cosine"`` decays the rate to 10% by the last step.

    ``restarts`` are steps where the schedule starts over (warmup, then decay to the next restart or
    the end), for runs made of phases that train different parts, such as a warm-up of one tower.
    """

    steps: int
    learning_rate: float
    seed: int = 0
    save_every: int = 250
    log_every: int = 25
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "cosine"
    restarts: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise InvalidArgumentError(f"steps must be at least 1, got {self.steps}")
        if not self.learning_rate > 0:
            raise InvalidArgumentError(f"learning rate must be positive, got {self.learning_rate}")
        if self.schedule not in ("cosine", "constant"):
            raise InvalidArgumentError(f"schedule must be cosine or constant, got {self.schedule!r}")
        if any(not 0 < restart < self.steps for restart in self.restarts):
            raise InvalidArgumentError(f"restarts must lie between 0 and {self.steps}, got {self.restarts}")

    def rate_factor(self, step: int) -> float:
        start = max((r for r in self.restarts if r <= step), default=0)
        end = min((r for r in self.restarts if r > step), default=self.steps)
        step -= start
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return 1.0
        progress = (step - self.warmup_steps) / max(1, end - start - self.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def step_rng(seed: int, step: int, stream: int = 0) -> np.random.Generator:
    """The random source of one batch: the same (seed, step, stream) always gives the same draws."""
    return np.random.default_rng([seed, step, stream])


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """A torch generator for one batch (diffusion noise, timesteps), derived like :func:`step_rng`."""
    return torch.Generator().manual_seed(int(step_rng(seed, step, stream + 1_000_003).integers(2**62)))


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _load_checkpoint(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    state = load_file(str(folder / _WEIGHTS))
    params = _trainable(model)
    if set(state) != set(params):
        raise InvalidArgumentError(f"{folder} does not hold this model's trainable weights; "
                                   f"delete it to start over")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)
    optimizer.load_state_dict(torch.load(folder / _OPTIMIZER, weights_only=True))
    return int(json.loads((folder / _STATE).read_text())["step"])


def _save_checkpoint(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
    with atomic_folder(folder) as staging:
        save_file({k: v.detach().cpu().contiguous() for k, v in _trainable(model).items()},
                  str(staging / _WEIGHTS))
        torch.save(optimizer.state_dict(), staging / _OPTIMIZER)
        (staging / _STATE).write_text(json.dumps({"step": step}))


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines past ``step``: a run killed after its last checkpoint logged steps it will redo."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    atomic_write(path, lambda tmp: tmp.write_text("".join(line + "\n" for line in kept)))


def train(name: str, model: nn.Module, step_loss: Callable[[int], torch.Tensor], settings: LoopSettings,
          work_dir: str | Path, progress: bool = True) -> dict:
    """Train ``model``'s trainable parameters for ``settings.steps`` steps, resuming from ``work_dir``.

    Returns a summary (steps, final loss as the mean of the last logged window, seconds) that is
    also written to ``work_dir/summary.json``. The caller saves the trained model itself
    (``save_pretrained``), so the published folder is written once, at the end.
    """
    from accelerate import Accelerator

    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    torch.manual_seed(settings.seed)
    params = list(_trainable(model).values())
    if not params:
        raise InvalidArgumentError(f"{name}: the model has no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    start = 0
    checkpoint = work_dir / CHECKPOINT
    if (checkpoint / _STATE).is_file():
        start = _load_checkpoint(checkpoint, model, optimizer)
    _truncate_log(work_dir / LOG, start)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    window: list[float] = []
    began = time.perf_counter()
    bar = tqdm(total=settings.steps, initial=start, desc=name, disable=not progress, dynamic_ncols=True)
    with open(work_dir / LOG, "a") as log:
        for step in range(start, settings.steps):
            for group in optimizer.param_groups:
                group["lr"] = settings.learning_rate * settings.rate_factor(step)
            loss = step_loss(step)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{name}: loss became {loss.item()} at step {step}; "
                                         f"lower the learning rate")
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            optimizer.step()
            window.append(loss.item())
            bar.update(1)
            done = step + 1
            if done % settings.log_every == 0 or done == settings.steps:
                mean = float(np.mean(window))
                bar.set_postfix(loss=f"{mean:.4f}")
                log.write(json.dumps({"step": done, "loss": mean, "lr": optimizer.param_groups[0]["lr"]}) + "\n")
                log.flush()
                window = []
            if done % settings.save_every == 0 and done < settings.steps:
                _save_checkpoint(checkpoint, accelerator.unwrap_model(model), optimizer, done)
    bar.close()
    model.eval()
    losses = [json.loads(line)["loss"] for line in (work_dir / LOG).read_text().splitlines() if line.strip()]
    summary = {"name": name, "steps": settings.steps, "first_loss": losses[0] if losses else None,
               "final_loss": losses[-1] if losses else None, "seconds_this_session": time.perf_counter() - began}
    write_json(work_dir / "summary.json", summary)
    return summary
