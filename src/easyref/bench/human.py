"""Human preference study (paper Fig. 6): a static A/B page for raters and the win rates of their answers.

:func:`write_compare_page` writes ``compare.html`` plus an ``images/`` folder beside it. The page
opens straight from disk (no server, no network, no framework): for each group it shows the
reference images, the prompt, and the two runs' outputs as "Left" and "Right" in a seeded random
order, with two questions (aesthetics; consistency with the references), each answered A / B /
tie. "Download results" saves a JSON file; the side a rater picked is translated back into the
run it came from using the order stored in the page, so raters never see run names but their
files do.

:func:`win_rates` pools any number of such files. Ties are reported as their own outcome: a run's
win rate is its wins over ALL answers to the question (ties included), so the two runs' rates
and the tie rate add up to 1. Each rate has a 95% Wilson score interval, which stays inside
[0, 1] and behaves with few answers, unlike the normal approximation.
"""

from __future__ import annotations

import html
import json
import math
import random
import shutil
from collections.abc import Sequence
from pathlib import Path

from easyref.bench.manifest import BenchFormatError
from easyref.bench.report import run_labels
from easyref.bench.runs import GeneratedImage, read_images, read_run_info
from easyref.files import atomic_write
from easyref.images import load_image

PAGE = "compare.html"
IMAGES = "images"
THUMBNAIL = 256  # references are context, not the thing judged: small copies keep the folder light
TIE = "tie"
QUESTIONS = (("aesthetics", "Which image looks better (quality, aesthetics)?"),
             ("consistency", "Which image is more consistent with the reference images?"))
Z95 = 1.959963984540054


def _first_images(run: Path) -> dict[str, GeneratedImage]:
    """Each group's first image (index 0): one output per group keeps the study short and unbiased by seed."""
    firsts: dict[str, GeneratedImage] = {}
    for image in read_images(run):
        firsts.setdefault(image.group_id, image)
    return firsts


def _run_names(run_a: Path, run_b: Path) -> tuple[str, str]:
    infos = [read_run_info(run_a), read_run_info(run_b)]
    if infos[0].get("bench_sha256") != infos[1].get("bench_sha256"):
        raise BenchFormatError(f"{run_a} and {run_b} were made on different benchmarks")
    name_a, name_b = run_labels(infos, [run_a, run_b])
    return (f"{name_a} (A)", f"{name_b} (B)") if name_a == name_b else (name_a, name_b)


def _choice_html(key: str, question: str, text: str) -> str:
    options = "".join(f'<label><input type="radio" name="{key}-{question}" value="{value}"> {label}</label>'
                      for value, label in (("left", "Left"), ("right", "Right"), (TIE, "Tie")))
    return f'<fieldset data-question="{question}"><legend>{html.escape(text)}</legend>{options}</fieldset>'


def _group_html(index: int, count: int, caption: str, references: Sequence[str]) -> str:
    refs = "".join(f'<img class="ref" src="{src}" alt="reference">' for src in references)
    outputs = "".join(f'<figure><img class="out" src="{IMAGES}/{index}/{side}.png" alt="{side} output">'
                      f"<figcaption>{side.title()}</figcaption></figure>" for side in ("left", "right"))
    questions = "".join(_choice_html(f"g{index}", qid, text) for qid, text in QUESTIONS)
    return (f'<section class="group" id="g{index}"><h2>Group {index + 1} of {count}</h2>'
            f'<p class="caption">Prompt: {html.escape(caption) or "<em>(none)</em>"}</p>'
            f'<div class="refs"><p>References</p>{refs}</div><div class="outputs">{outputs}</div>{questions}</section>')


_SCRIPT = """
const DATA = JSON.parse(document.getElementById("page-data").textContent);
const TOTAL = DATA.groups.length * DATA.page.questions.length;

function results() {
  const answers = [];
  for (const group of DATA.groups) {
    for (const question of DATA.page.questions) {
      const picked = document.querySelector(`input[name="${group.key}-${question.id}"]:checked`);
      if (!picked) continue;
      const run = picked.value === "tie" ? "tie" : group.order[picked.value];
      answers.push({group_id: group.id, question: question.id, side: picked.value,
                    choice: run === "tie" ? "tie" : DATA.page.runs[run].name});
    }
  }
  return {page: DATA.page, saved_at: new Date().toISOString(), answers: answers};
}

function showProgress() {
  const done = document.querySelectorAll("input[type=radio]:checked").length;
  document.getElementById("progress").textContent = `${done} of ${TOTAL} questions answered`;
}

function download() {
  const text = JSON.stringify(results(), null, 2);
  document.getElementById("results").textContent = text;
  const url = URL.createObjectURL(new Blob([text], {type: "application/json"}));
  const link = document.createElement("a");
  link.href = url;
  link.download = "easyref-preferences.json";
  document.body.appendChild(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

document.addEventListener("change", showProgress);
document.getElementById("download").addEventListener("click", download);
showProgress();
"""

_STYLE = """
body { font-family: sans-serif; max-width: 1100px; margin: 1em auto; padding: 0 1em; }
.group { border-top: 1px solid #ccc; padding: 1em 0; }
.refs img { height: 96px; margin: 2px; }
.outputs { display: flex; gap: 1em; }
.outputs figure { margin: 0; flex: 1; text-align: center; }
.outputs img { max-width: 100%; }
fieldset { border: none; margin: 0.5em 0; }
legend { font-weight: bold; }
label { margin-right: 1.5em; cursor: pointer; }
#bar { border-top: 1px solid #ccc; padding: 1em 0; }
#results { display: none; }
"""


def write_compare_page(run_a: str | Path, run_b: str | Path, output_folder: str | Path, seed: int = 0) -> Path:
    """Write the A/B page for the groups both runs finished; returns the path of ``compare.html``.

    Left/right order: for the groups in sorted id order, ``random.Random(seed).random() < 0.5``
    puts run A on the left. Outputs are copied byte for byte; references are shrunk to
    thumbnails (at most 256 pixels a side).
    """
    run_a, run_b, output = Path(run_a), Path(run_b), Path(output_folder)
    names = _run_names(run_a, run_b)
    firsts_a, firsts_b = _first_images(run_a), _first_images(run_b)
    shared = sorted(firsts_a.keys() & firsts_b.keys())
    if not shared:
        raise BenchFormatError(f"{run_a} and {run_b} have no finished group in common")
    rng = random.Random(seed)
    sections, groups = [], []
    for index, group_id in enumerate(shared):
        folder = output / IMAGES / str(index)
        folder.mkdir(parents=True, exist_ok=True)
        order = {"left": "A", "right": "B"} if rng.random() < 0.5 else {"left": "B", "right": "A"}
        outputs = {"A": firsts_a[group_id], "B": firsts_b[group_id]}
        for side, run in order.items():
            shutil.copyfile(outputs[run].path, folder / f"{side}.png")
        references = []
        for k, path in enumerate(outputs["A"].sidecar["references"]):
            thumbnail = load_image(path)
            thumbnail.thumbnail((THUMBNAIL, THUMBNAIL))
            thumbnail.save(folder / f"ref-{k}.jpg", quality=90)
            references.append(f"{IMAGES}/{index}/ref-{k}.jpg")
        sections.append(_group_html(index, len(shared), outputs["A"].sidecar["caption"], references))
        groups.append({"id": group_id, "key": f"g{index}", "order": order})
    data = {"page": {"seed": seed, "questions": [{"id": qid, "text": text} for qid, text in QUESTIONS],
                     "runs": {"A": {"name": names[0], "folder": str(run_a.resolve())},
                              "B": {"name": names[1], "folder": str(run_b.resolve())}}},
            "groups": groups}
    # "</" cannot appear inside a <script> element, so the JSON escapes it.
    data_json = json.dumps(data).replace("</", "<\\/")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Which image is better?</title><style>{_STYLE}</style></head>
<body>
<h1>Which image is better?</h1>
<p>Each group shows reference images, a prompt and two generated images. Answer both questions for each group
(Tie if you cannot choose), then press <b>Download results</b> at the end and send the file back.</p>
{"".join(sections)}
<div id="bar"><button id="download" type="button">Download results</button> <span id="progress"></span></div>
<pre id="results"></pre>
<script type="application/json" id="page-data">{data_json}</script>
<script>{_SCRIPT}</script>
</body></html>
"""
    return atomic_write(output / PAGE, lambda tmp: tmp.write_text(page, encoding="utf-8"))


def wilson_interval(successes: int, total: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion."""
    if total == 0:
        return 0.0, 1.0
    p = successes / total
    denominator = 1 + z * z / total
    center = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    return max(0.0, center - half), min(1.0, center + half)


def _read_answers(path: Path) -> tuple[tuple[str, str], list[dict]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        names = (data["page"]["runs"]["A"]["name"], data["page"]["runs"]["B"]["name"])
        answers = data["answers"]
        valid = all(isinstance(a, dict) and {"group_id", "question", "choice"} <= a.keys() for a in answers)
    except FileNotFoundError:
        raise BenchFormatError(f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise BenchFormatError(f"{path}: not a results file saved by the compare page ({exc!r})") from None
    if not valid or any(a["choice"] not in (*names, TIE) for a in answers):
        raise BenchFormatError(f"{path}: an answer lacks group_id/question/choice or names an unknown run")
    return names, answers


def win_rates(json_paths: Sequence[str | Path]) -> dict:
    """Pool raters' result files (all from pages for the same two runs) into win rates per question.

    Returns ``{"runs": [name A, name B], "files": n, "questions": {question: {"answers": n,
    "outcomes": {name A | name B | "tie": {"count", "rate", "low", "high"}}}}}``.
    """
    if not json_paths:
        raise BenchFormatError("give at least one results file")
    runs: tuple[str, str] | None = None
    answers: list[dict] = []
    for path in map(Path, json_paths):
        names, found = _read_answers(path)
        if runs is not None and set(names) != set(runs):
            raise BenchFormatError(f"{path} compares {names[0]} with {names[1]}, not {runs[0]} with {runs[1]}")
        runs = runs or names
        answers += found
    questions = {}
    for question in dict.fromkeys([qid for qid, _ in QUESTIONS] + [a["question"] for a in answers]):
        picked = [a["choice"] for a in answers if a["question"] == question]
        if not picked:
            continue
        outcomes = {}
        for outcome in (*runs, TIE):
            count = picked.count(outcome)
            low, high = wilson_interval(count, len(picked))
            outcomes[outcome] = {"count": count, "rate": count / len(picked), "low": low, "high": high}
        questions[question] = {"answers": len(picked), "outcomes": outcomes}
    return {"runs": list(runs), "files": len(json_paths), "questions": questions}
