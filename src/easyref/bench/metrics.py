"""MRBench metrics (paper §5): CLIP-I, CLIP-T and DINO-I, their per-split summaries and paired comparisons.

Higher is better for all three:

* **CLIP-I**: cosine of the CLIP image embeddings of the generated image and the group's target image;
* **CLIP-T**: CLIPScore (Hessel et al. 2021), ``2.5 x max(cos, 0)`` of the generated image's CLIP image
  embedding and the caption's CLIP text embedding: the scale of the paper's CLIP-T (0.6-0.73) and of
  IP-Adapter's evaluation; raw image-text cosines sit near 0.2-0.35. The raw cosine is kept in
  ``scores.csv`` as ``clip_t_cosine``;
* **DINO-I**: cosine of the DINOv2 embeddings (the pooled, layer-normed CLS token) of generated vs target.

:func:`score_runs` writes ``scores.csv`` (one row per generated image) and ``scores.json`` (which
models scored it) into each run folder. Everything downstream (summaries, reports, comparisons)
reads only those files, so scoring runs once per run and the models never reload for a report.

Uncertainty is estimated over GROUPS, not images: a group's seeds share references and a target,
so they are not independent samples. Each group's images are averaged first; a split's score is
the mean of its group means and its 95% interval is a seeded percentile bootstrap that resamples
groups.

torch and transformers load only when models do, so summaries, reports and win rates start at once.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm.auto import tqdm

from easyref.bench.manifest import SPLITS, BenchFormatError
from easyref.bench.runs import GeneratedImage, read_images, read_run_info
from easyref.errors import InvalidArgumentError, ModelFormatError
from easyref.files import atomic_write, package_versions, write_json
from easyref.hub import resolve
from easyref.images import load_image

METRICS = ("clip_i", "clip_t", "dino_i")
METRIC_LABELS = {"clip_i": "CLIP-I", "clip_t": "CLIP-T", "dino_i": "DINO-I"}
SCORES = "scores.csv"
SCORES_INFO = "scores.json"
CLIPSCORE_WEIGHT = 2.5
RAW_CLIP_T = "clip_t_cosine"
COLUMNS = ("group_id", "split", "domain", "method", "seed", "index", "references", "image", *METRICS, RAW_CLIP_T)
RESAMPLES = 1000
LEVEL = 0.95

Scores = str | Path | Sequence[dict]

if TYPE_CHECKING:
    import torch
    from transformers import BaseImageProcessor, CLIPModel, Dinov2Model, PreTrainedTokenizerBase


# -- models -------------------------------------------------------------------------------------

def _reason(exc: Exception) -> str:
    """First line of a library's error: enough to act on, without its multi-page traceback."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _load_pretrained(source: str | Path, what: str, model_type: str, model_class, dtype):
    """Load a model folder or hub id as ``model_class``, refusing anything that is not ``model_type``.

    transformers will happily load a DINOv2 folder into CLIPModel with random weights and only a
    log line; scores from such a model would look plausible and mean nothing, so the config's
    model type and the loading report are checked here.
    """
    from transformers import AutoConfig

    folder = resolve(source, what)
    try:
        found = AutoConfig.from_pretrained(folder).model_type
    except Exception as exc:  # noqa: BLE001 - any unreadable config is the same problem for the user
        raise ModelFormatError(f"{what} {source}: no readable config.json ({_reason(exc)})") from None
    if found != model_type:
        raise ModelFormatError(f"{what} {source} is a {found!r} model; expected {model_type!r}")
    try:
        model, info = model_class.from_pretrained(folder, dtype=dtype, output_loading_info=True)
    except Exception as exc:  # noqa: BLE001
        raise ModelFormatError(f"{what} {source}: cannot load the weights ({_reason(exc)})") from None
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise ModelFormatError(f"{what} {source}: {len(missing)} weights missing from the checkpoint "
                               f"(e.g. {missing[0]})")
    return folder, model.eval()


def _image_processor(folder: Path, what: str):
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(folder)
    except Exception as exc:  # noqa: BLE001
        raise ModelFormatError(f"{what} {folder}: no usable image processor "
                               f"(preprocessor_config.json; {_reason(exc)})") from None


@dataclasses.dataclass
class MetricModels:
    """CLIP and DINOv2 with their processors, on one device; embeddings come back unit-length float32."""

    clip: CLIPModel
    clip_processor: BaseImageProcessor
    tokenizer: PreTrainedTokenizerBase
    dino: Dinov2Model
    dino_processor: BaseImageProcessor
    info: dict  # what scored: sources as given, device, dtype; saved as scores.json

    @classmethod
    def load(cls, clip: str | Path, dino: str | Path, device: str | None = None) -> MetricModels:
        """Load from local folders or hub ids: float16 on a GPU, float32 on CPU (fp16 is slow there)."""
        from transformers import AutoTokenizer, CLIPModel, Dinov2Model

        from easyref.devices import pick_device, pick_dtype

        torch_device = pick_device(device)
        dtype = pick_dtype(None, torch_device)
        clip_folder, clip_model = _load_pretrained(clip, "CLIP model", "clip", CLIPModel, dtype)
        dino_folder, dino_model = _load_pretrained(dino, "DINOv2 model", "dinov2", Dinov2Model, dtype)
        try:
            tokenizer = AutoTokenizer.from_pretrained(clip_folder)
        except Exception as exc:  # noqa: BLE001
            raise ModelFormatError(f"CLIP model {clip}: no usable tokenizer ({_reason(exc)})") from None
        return cls(clip_model.to(torch_device), _image_processor(clip_folder, "CLIP model"), tokenizer,
                   dino_model.to(torch_device), _image_processor(dino_folder, "DINOv2 model"),
                   {"clip": str(clip), "dino": str(dino), "device": str(torch_device), "dtype": str(dtype)})

    def clip_images(self, images: Sequence) -> torch.Tensor:
        pixels = _pixels(self.clip, self.clip_processor, images)
        return _embed(lambda: self.clip.get_image_features(pixel_values=pixels).pooler_output)

    def clip_texts(self, texts: Sequence[str]) -> torch.Tensor:
        # CLIP's text tower has a fixed context (77 tokens); longer captions are cut, as in CLIP-T.
        length = min(self.tokenizer.model_max_length, self.clip.config.text_config.max_position_embeddings)
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, max_length=length,
                                return_tensors="pt").to(self.clip.device)
        return _embed(lambda: self.clip.get_text_features(input_ids=tokens["input_ids"],
                                                          attention_mask=tokens["attention_mask"]).pooler_output)

    def dino_images(self, images: Sequence) -> torch.Tensor:
        pixels = _pixels(self.dino, self.dino_processor, images)
        return _embed(lambda: self.dino(pixel_values=pixels).pooler_output)


def _pixels(model, processor, images: Sequence) -> torch.Tensor:
    pixels = processor(images=list(images), return_tensors="pt")["pixel_values"]
    return pixels.to(model.device, model.dtype)


def _embed(forward: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Run a model without autograd; float32 unit vectors on CPU, so a cosine is a dot product and
    fp16 rounding stays out of it."""
    import torch

    with torch.inference_mode():
        features = forward()
    return torch.nn.functional.normalize(features.float().cpu(), dim=-1)


# -- scoring ------------------------------------------------------------------------------------

def _batches(items: Sequence, size: int) -> Iterable[Sequence]:
    return (items[start:start + size] for start in range(0, len(items), size))


def _check_run(run: Path) -> list[GeneratedImage]:
    """Everything a run must have before models load: images, and every target they point at."""
    images = read_images(run)
    if not images:
        raise BenchFormatError(f"run folder {run} has no finished images; run 'easyref bench run' first")
    for image in images:
        target = Path(image.sidecar["target"])
        if not target.is_file():
            raise BenchFormatError(f"{image.path}: its target image {target} is missing")
    return images


def _score_images(images: Sequence[GeneratedImage], models: MetricModels, batch_size: int,
                  desc: str) -> list[tuple[float, float, float, float]]:
    """(CLIP-I, CLIP-T, DINO-I, raw CLIP-T cosine) per image; each target and caption is embedded once,
    however many seeds."""
    targets: dict[str, tuple] = {}
    captions: dict[str, object] = {}
    results = []
    for batch in tqdm(list(_batches(images, batch_size)), desc=desc, unit="batch"):
        new_targets = sorted({i.sidecar["target"] for i in batch} - targets.keys())
        if new_targets:
            pictures = [load_image(path) for path in new_targets]
            for path, clip, dino in zip(new_targets, models.clip_images(pictures), models.dino_images(pictures),
                                        strict=True):
                targets[path] = (clip, dino)
        new_captions = sorted({i.sidecar["caption"] for i in batch} - captions.keys())
        if new_captions:
            captions.update(zip(new_captions, models.clip_texts(new_captions), strict=True))
        pictures = [load_image(i.path) for i in batch]
        for image, clip, dino in zip(batch, models.clip_images(pictures), models.dino_images(pictures), strict=True):
            target_clip, target_dino = targets[image.sidecar["target"]]
            text_cosine = float(clip @ captions[image.sidecar["caption"]])
            results.append((float(clip @ target_clip), clip_score(text_cosine), float(dino @ target_dino),
                            text_cosine))
    return results


def clip_score(cosine: float) -> float:
    """CLIPScore from an image-text cosine: ``2.5 x max(cos, 0)`` (Hessel et al. 2021)."""
    return CLIPSCORE_WEIGHT * max(cosine, 0.0)


def _write_scores(run: Path, images: Sequence[GeneratedImage], scores: Sequence[tuple], method: str) -> Path:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    for image, values in zip(images, scores, strict=True):
        side = image.sidecar
        writer.writerow([side["group_id"], side["split"], side["domain"], side.get("method", method),
                         side.get("seed", ""), side.get("index", ""), len(side.get("references", [])),
                         image.path.relative_to(run).as_posix(), *(f"{v:.6f}" for v in values)])
    return atomic_write(run / SCORES, lambda tmp: tmp.write_text(buffer.getvalue()))


def score_runs(runs: Sequence[str | Path], clip: str | Path, dino: str | Path, batch_size: int = 16,
               device: str | None = None) -> list[Path]:
    """Score every finished image of each run; write ``scores.csv`` and ``scores.json`` into each.

    All runs are checked (images present, targets on disk) before the models load, and the
    models load once for all runs. Returns the ``scores.csv`` paths.
    """
    if batch_size < 1:
        raise InvalidArgumentError(f"batch size must be at least 1, got {batch_size}")
    checked = [(Path(run), _check_run(Path(run)), read_run_info(run)) for run in runs]
    models = MetricModels.load(clip, dino, device)
    written = []
    for run, images, info in checked:
        scores = _score_images(images, models, batch_size, desc=f"scoring {run.name}")
        written.append(_write_scores(run, images, scores, info.get("method", "")))
        write_json(run / SCORES_INFO, {**models.info, "images": len(images), "versions": package_versions()})
    return written


def score_run(run: str | Path, clip: str | Path, dino: str | Path, batch_size: int = 16,
              device: str | None = None) -> Path:
    """Score one run (see :func:`score_runs`); returns its ``scores.csv``."""
    return score_runs([run], clip, dino, batch_size, device)[0]


# -- reading and summarising --------------------------------------------------------------------

def read_scores(path: str | Path) -> list[dict]:
    """Rows of a ``scores.csv`` with numbers parsed; a missing file says which command makes it."""
    path = Path(path)
    if path.is_dir():
        path = path / SCORES
    if not path.is_file():
        raise BenchFormatError(f"{path} does not exist: score the run first with "
                               f"'easyref bench score {path.parent} --clip ... --dino ...'")
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise BenchFormatError(f"{path}: missing column(s) {', '.join(missing)}; score the run again with "
                                   f"'easyref bench score'")
        try:
            rows = [{**row, "references": int(row["references"]),
                     **{m: float(row[m]) for m in (*METRICS, RAW_CLIP_T)}} for row in reader]
        except ValueError as exc:
            raise BenchFormatError(f"{path} line {reader.line_num}: {exc}") from None
    if not rows:
        raise BenchFormatError(f"{path} holds no scores")
    return rows


def _rows(scores: Scores) -> Sequence[dict]:
    return read_scores(scores) if isinstance(scores, (str, Path)) else scores


@dataclasses.dataclass(frozen=True)
class GroupScore:
    """One group's metrics averaged over its images (seeds): the unit that is resampled."""

    group_id: str
    split: str
    domain: str
    references: int
    images: int
    values: np.ndarray  # one mean per metric, in METRICS order


def group_scores(scores: Scores) -> dict[str, GroupScore]:
    """Average each group's images; keyed by group id, in first-seen order."""
    collected: dict[str, list[dict]] = {}
    for row in _rows(scores):
        collected.setdefault(row["group_id"], []).append(row)
    return {gid: GroupScore(gid, rows[0]["split"], rows[0]["domain"], int(rows[0]["references"]), len(rows),
                            np.array([[float(r[m]) for m in METRICS] for r in rows]).mean(axis=0))
            for gid, rows in collected.items()}


def bootstrap_interval(values: np.ndarray, seed: int = 0, resamples: int = RESAMPLES,
                       level: float = LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap interval of the mean over the first axis (one row per group).

    Every column (metric) uses the same resampled groups. Seeded, so reports are reproducible.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 1:
        values = values[:, None]
    rng = np.random.default_rng(seed)
    means = np.stack([values[rng.integers(0, len(values), len(values))].mean(axis=0) for _ in range(resamples)])
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2], axis=0)
    return low, high


def split_order(splits: Iterable[str]) -> list[str]:
    """The benchmark's splits first, in paper order, then anything else alphabetically."""
    found = set(splits)
    return [s for s in SPLITS if s in found] + sorted(found - set(SPLITS))


def _summary_row(split: str, domain: str, groups: Sequence[GroupScore], seed: int) -> dict:
    values = np.stack([g.values for g in groups])
    low, high = bootstrap_interval(values, seed)
    row = {"split": split, "domain": domain, "groups": len(groups), "images": sum(g.images for g in groups)}
    for k, metric in enumerate(METRICS):
        row.update({metric: float(values[:, k].mean()), f"{metric}_low": float(low[k]),
                    f"{metric}_high": float(high[k])})
    return row


def summarize(scores: Scores, seed: int = 0) -> list[dict]:
    """Mean and 95% bootstrap interval per split (``domain`` = "all") and per split and domain.

    Each row: split, domain, groups, images, and for each metric its mean and ``<metric>_low`` /
    ``<metric>_high``. The mean is over group means, so every group counts once.
    """
    groups = list(group_scores(scores).values())
    rows = []
    for split in split_order(g.split for g in groups):
        in_split = [g for g in groups if g.split == split]
        rows.append(_summary_row(split, "all", in_split, seed))
        for domain in sorted({g.domain for g in in_split}):
            rows.append(_summary_row(split, domain, [g for g in in_split if g.domain == domain], seed))
    return rows


def compare(scores_a: Scores, scores_b: Scores, seed: int = 0) -> list[dict]:
    """Paired comparison of two runs on the groups both scored, per split and metric.

    Each row: split, metric, groups, mean_a, mean_b, difference (A - B, mean over groups of the
    per-group difference) with its 95% bootstrap interval (``low``, ``high``; resampling groups),
    and ``a_wins`` / ``ties``: the share of groups where A's group mean is higher / equal.
    Pairing removes the spread between easy and hard groups, so the interval is much narrower
    than comparing two independent summaries.
    """
    a, b = group_scores(scores_a), group_scores(scores_b)
    shared = [gid for gid in a if gid in b]
    if not shared:
        raise BenchFormatError("the two runs share no group ids: were they made on the same benchmark?")
    rows = []
    for split in split_order(a[gid].split for gid in shared):
        ids = [gid for gid in shared if a[gid].split == split]
        values_a = np.stack([a[gid].values for gid in ids])
        values_b = np.stack([b[gid].values for gid in ids])
        diff = values_a - values_b
        low, high = bootstrap_interval(diff, seed)
        for k, metric in enumerate(METRICS):
            rows.append({"split": split, "metric": metric, "groups": len(ids),
                         "mean_a": float(values_a[:, k].mean()), "mean_b": float(values_b[:, k].mean()),
                         "difference": float(diff[:, k].mean()), "low": float(low[k]), "high": float(high[k]),
                         "a_wins": float((diff[:, k] > 0).mean()), "ties": float((diff[:, k] == 0).mean())})
    return rows


def scores_info(run: str | Path) -> dict:
    """Which models scored a run (``scores.json``); empty if the file is absent."""
    path = Path(run) / SCORES_INFO
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BenchFormatError(f"{path} is not valid JSON ({exc.msg})") from None
